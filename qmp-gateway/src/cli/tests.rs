//! Whole command lines: every option, the cross-checks and the refusals.

use super::*;

const BASE: &[&str] = &["-kernel", "/k", "-qmp", "unix:/tmp/q.sock,server,nowait"];

fn run(extra: &[&str]) -> Result<GatewayConfig, CliError> {
    let args = BASE.iter().chain(extra).copied();
    match parse_args(args)? {
        CliAction::Run(c) => Ok(*c),
        other => panic!("unexpected {other:?}"),
    }
}

fn fails(extra: &[&str], want: &str) {
    let e = run(extra).unwrap_err();
    let text = e.to_string();
    assert!(text.contains(want), "{extra:?}: {text}");
    assert!(!text.contains('\n'), "one line: {text}");
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn the_guide_example() {
    // The microvm example from the StratoVirt configuration guide.
    let c = run(&[
        "-append",
        "console=ttyS0 root=/dev/vda rw reboot=k panic=1",
        "-drive",
        "file=/home/rootfs.ext4,id=rootfs,readonly=false",
        "-device",
        "virtio-blk-device,drive=rootfs",
        "-serial",
        "stdio",
    ])
    .unwrap();
    assert_eq!(c.kernel, PathBuf::from("/k"));
    assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda rw reboot=k panic=1");
    assert_eq!(c.drives.len(), 1);
    assert!(!c.drives[0].read_only);
    assert_eq!(c.serial, Some(SerialConfig::Stdio));
    assert_eq!(c.qmp, [ListenAddr::Unix("/tmp/q.sock".into())]);
    // Defaults.
    assert_eq!((c.vcpus, c.mem_mib), (1, 256));
    assert_eq!(c.machine, MachineConfig::default());
    assert_eq!((c.name, c.uuid, c.initrd, c.log), (None, None, None, None));
    assert!(!c.disable_seccomp);
}

#[test]
fn every_option() {
    let c = run(&[
        "-name",
        "vm-1",
        "-uuid",
        "0E8B1A3C-0000-4000-8000-00000000ABCD",
        "-initrd",
        "/i",
        "-append",
        "console=ttyS0",
        "-smp",
        "cpus=4",
        "-m",
        "2G",
        "-machine",
        "type=microvm,dump-guest-core=on,mem-share=on",
        "-drive",
        "id=d0,file=/d0.img,direct=off",
        "-drive",
        "id=d1,file=/d1.img,readonly=on,throttling.iops-total=100",
        "-object",
        "iothread,id=io1",
        "-device",
        "virtio-blk-device,drive=d0,id=blk0,iothread=io1",
        "-device",
        "virtio-blk-device,drive=d1,id=blk1,serial=S1",
        "-netdev",
        "tap,id=n0,ifname=tap0",
        "-device",
        "virtio-net-device,netdev=n0,id=net0,mac=52:54:00:12:34:56,iothread=io1",
        "-chardev",
        "socket,id=mon0,path=/tmp/m.sock,server,nowait",
        "-mon",
        "chardev=mon0,id=monitor0,mode=control",
        "-qmp",
        "tcp:127.0.0.1:4444,server,nowait",
        "-chardev",
        "file,id=ser,path=/tmp/serial.log",
        "-serial",
        "chardev:ser",
        "-D",
        "/tmp/log",
        "-disable-seccomp",
    ])
    .unwrap();
    assert_eq!(c.name.as_deref(), Some("vm-1"));
    assert_eq!(
        c.uuid.as_deref(),
        Some("0e8b1a3c-0000-4000-8000-00000000abcd")
    );
    assert_eq!(c.initrd, Some(PathBuf::from("/i")));
    assert_eq!((c.vcpus, c.mem_mib), (4, 2048));
    assert!(c.machine.dump_guest_core && c.machine.mem_share);
    assert_eq!(c.drives.len(), 2);
    assert_eq!(c.devices.len(), 3);
    assert_eq!(c.netdevs.len(), 1);
    assert_eq!(c.iothreads, ["io1"]);
    assert_eq!(c.chardevs.len(), 2);
    assert_eq!(
        c.qmp,
        [
            ListenAddr::Unix("/tmp/q.sock".into()),
            ListenAddr::Tcp("127.0.0.1:4444".into()),
            ListenAddr::Unix("/tmp/m.sock".into()),
        ]
    );
    assert_eq!(c.serial, Some(SerialConfig::File("/tmp/serial.log".into())));
    assert_eq!(c.log, Some(Some(PathBuf::from("/tmp/log"))));
    assert!(c.disable_seccomp);
}

#[test]
fn optional_log_file() {
    // `-D` followed by another option has no file.
    let c = run(&["-D", "-disable-seccomp"]).unwrap();
    assert_eq!(c.log, Some(None));
    assert!(c.disable_seccomp);
    assert_eq!(run(&["-D"]).unwrap().log, Some(None));
}

#[test]
fn sizes_counts_and_names() {
    assert_eq!(run(&["-smp", "254"]).unwrap().vcpus, 254);
    assert_eq!(run(&["-m", "512"]).unwrap().mem_mib, 512);
    assert_eq!(run(&["-m", "512M"]).unwrap().mem_mib, 512);
    assert_eq!(run(&["-m", "512G"]).unwrap().mem_mib, 512 * 1024);
    fails(&["-smp", "0"], "between 1 and 254");
    fails(&["-smp", "255"], "between 1 and 254");
    fails(&["-smp", "cpus=2,sockets=2"], "unknown parameter 'sockets'");
    fails(&["-m", "255"], "between 256M and 512G");
    fails(&["-m", "513G"], "between 256M and 512G");
    fails(&["-m", "lots"], "expected a size");
    fails(&["-name", ""], "1 to 255 characters");
    let long = "n".repeat(256);
    fails(&["-name", &long], "1 to 255 characters");
    assert!(run(&["-name", &long[..255]]).is_ok());
    fails(&["-uuid", "1234"], "expected xxxxxxxx-");
    fails(
        &["-uuid", "0e8b1a3c-0000-4000-8000-00000000abcg"],
        "expected xxxxxxxx-",
    );
}

#[test]
fn machine_types() {
    assert!(run(&["-machine", "microvm"]).is_ok());
    assert!(run(&["-machine", "MicroVm"]).is_ok());
    fails(
        &["-machine", "q35"],
        "-machine q35 (the standard VM): not implemented yet (issue 4)",
    );
    fails(&["-machine", "virt"], "expected microvm or q35");
    fails(
        &["-machine", "microvm,accel=kvm"],
        "unknown parameter 'accel'",
    );
    fails(
        &["-machine", "microvm,mem-share=maybe"],
        "expected on or off",
    );
}

#[test]
fn not_implemented_options_are_refused_by_name() {
    fails(
        &["-incoming", "file:/tmp/t"],
        "-incoming: not implemented yet",
    );
    fails(
        &["-mem-path", "/dev/hugepages"],
        "-mem-path: not implemented yet",
    );
    fails(&["-daemonize", "-serial", "stdio"], "no stdio");
    let c = run(&["-daemonize", "-pidfile", "/run/vm1.pid"]).unwrap();
    assert!(c.daemonize);
    assert_eq!(
        c.pidfile.as_deref(),
        Some(std::path::Path::new("/run/vm1.pid"))
    );
    fails(
        &["-object", "rng-random,id=r,filename=/dev/urandom"],
        "rng-random",
    );
    fails(
        &[
            "-device",
            "virtio-balloon-device",
            "-device",
            "virtio-balloon-device,id=b2",
        ],
        "only one virtio-balloon-device per VM",
    );
    fails(
        &[
            "-device",
            "virtio-balloon-device,deflate-on-oom=true",
            "-mem-path",
            "/dev/hugepages",
        ],
        "virtio-balloon-device and -mem-path are mutually exclusive",
    );
    fails(&["-drive", "id=d,file=/d,format=qcow2"], "(issue 8)");
    fails(&["-netdev", "tap,id=n,ifname=t,vhost=on"], "(issue 6)");
}

#[test]
fn syntax_errors() {
    fails(&["-bogus"], "unknown option '-bogus'");
    fails(&["stray"], "unexpected argument 'stray'");
    fails(&["-name"], "requires a value");
    fails(&["-name", "a", "-name", "b"], "given more than once");
    fails(
        &["-serial", "pty"],
        "expected stdio, chardev:ID or file:PATH",
    );
    let e = parse_args(["-qmp", "unix:/q,server,nowait"]).unwrap_err();
    assert_eq!(e.to_string(), "option '-kernel' is required");
    let e = parse_args(["-kernel", "/k"]).unwrap_err();
    assert!(
        e.to_string().starts_with("a QMP channel is required"),
        "{e}"
    );
}

#[test]
fn help_and_version() {
    assert_eq!(parse_args(["-help"]).unwrap(), CliAction::Help);
    assert_eq!(parse_args(["--help"]).unwrap(), CliAction::Help);
    assert_eq!(parse_args(["-h"]).unwrap(), CliAction::Help);
    assert_eq!(parse_args(["-version"]).unwrap(), CliAction::Version);
    assert_eq!(parse_args(["--version"]).unwrap(), CliAction::Version);
    // Help wins over an otherwise incomplete command line.
    assert_eq!(parse_args(["-m", "1G", "-help"]).unwrap(), CliAction::Help);
    assert!(USAGE.contains("-qmp unix:PATH,server,nowait"));
}

#[test]
fn cross_references() {
    let disk = |n: usize| {
        [
            format!("id=d{n},file=/d{n}"),
            format!("virtio-blk-device,drive=d{n}"),
        ]
    };
    fails(
        &["-device", "virtio-blk-device,drive=nope"],
        "no -drive with id 'nope'",
    );
    fails(
        &["-drive", "id=d,file=/d"],
        "'d' is not used by any -device",
    );
    fails(
        &[
            "-drive",
            "id=d,file=/d",
            "-device",
            "virtio-blk-device,drive=d",
            "-device",
            "virtio-blk-device,drive=d",
        ],
        "drive 'd' is used by two devices",
    );
    fails(
        &["-drive", "id=d,file=/a", "-drive", "id=d,file=/b"],
        "option '-drive': id 'd' is used twice",
    );
    fails(
        &["-device", "virtio-net-device,netdev=n"],
        "no -netdev with id 'n'",
    );
    fails(
        &["-netdev", "tap,id=n,ifname=t"],
        "'n' is not used by any -device",
    );
    fails(
        &[
            "-netdev",
            "tap,id=n,ifname=t",
            "-device",
            "virtio-net-device,netdev=n,id=x",
            "-drive",
            "id=d,file=/d",
            "-device",
            "virtio-blk-device,drive=d,id=x",
        ],
        "option '-device': id 'x' is used twice",
    );
    fails(
        &[
            "-drive",
            "id=d,file=/d",
            "-device",
            "virtio-blk-device,drive=d,iothread=io9",
        ],
        "no -object iothread with id 'io9'",
    );
    fails(
        &["-object", "iothread,id=a", "-object", "iothread,id=a"],
        "option '-object': id 'a' is used twice",
    );
    // Six disks fit, seven do not.
    let mut args: Vec<String> = Vec::new();
    for n in 0..7 {
        let [d, dev] = disk(n);
        args.extend(["-drive".into(), d, "-device".into(), dev]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(run(&refs[..24]).is_ok());
    fails(&refs, "at most 6 disks");
    let mut args: Vec<String> = Vec::new();
    for n in 0..3 {
        args.extend([
            "-netdev".into(),
            format!("tap,id=n{n},ifname=tap{n}"),
            "-device".into(),
            format!("virtio-net-device,netdev=n{n}"),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(run(&refs[..8]).is_ok());
    fails(&refs, "at most 2 network cards");
}

#[test]
fn chardevs_monitors_and_serial() {
    let c = parse_args([
        "-kernel",
        "/k",
        "-chardev",
        "socket,id=c,host=127.0.0.1,port=0,server,nowait",
        "-mon",
        "chardev=c,mode=control",
    ])
    .unwrap();
    let CliAction::Run(c) = c else {
        panic!("run expected")
    };
    assert_eq!(c.qmp, [ListenAddr::Tcp("127.0.0.1:0".into())]);
    assert_eq!(
        run(&["-serial", "file:/tmp/s"]).unwrap().serial,
        Some(SerialConfig::File("/tmp/s".into()))
    );
    assert_eq!(
        run(&["-chardev", "stdio,id=s", "-serial", "chardev:s"])
            .unwrap()
            .serial,
        Some(SerialConfig::Stdio)
    );
    fails(
        &["-mon", "chardev=x,mode=control"],
        "no -chardev with id 'x'",
    );
    fails(
        &["-chardev", "stdio,id=s", "-mon", "chardev=s,mode=control"],
        "must be a socket to serve QMP",
    );
    fails(
        &[
            "-chardev",
            "socket,id=s,path=/tmp/s,server,nowait",
            "-mon",
            "chardev=s,mode=control",
            "-mon",
            "chardev=s,mode=control",
        ],
        "chardev 's' is used twice",
    );
    fails(
        &["-chardev", "pty,id=p", "-serial", "chardev:p"],
        "-serial on a pty chardev: not implemented yet",
    );
    fails(
        &[
            "-chardev",
            "socket,id=s,path=/tmp/s,server,nowait",
            "-serial",
            "chardev:s",
        ],
        "-serial on a socket chardev: not implemented yet",
    );
    fails(
        &[
            "-chardev",
            "socket,id=s,path=/tmp/s,server,nowait",
            "-mon",
            "chardev=s,mode=control",
            "-serial",
            "chardev:s",
        ],
        "already used by -mon",
    );
    fails(&["-serial", "chardev:none"], "no -chardev with id 'none'");
    fails(
        &["-chardev", "stdio,id=s"],
        "'s' is not used by -mon or -serial",
    );
    fails(
        &["-chardev", "stdio,id=s", "-chardev", "pty,id=s"],
        "option '-chardev': id 's' is used twice",
    );
    fails(
        &["-qmp", "unix:/tmp/q.sock,server,nowait"],
        "unix:/tmp/q.sock is given twice",
    );
}

/// The command line Kata Containers' StratoVirt driver builds
/// (src/runtime/virtcontainers/stratovirt.go, `createParams` and the device `getParams`).
const KATA: &[&str] = &[
    "-name",
    "sandbox-4f0c",
    "-uuid",
    "9a1c1b55-7c1f-4b1e-9d7e-2f4d2c8a1b00",
    "-smp",
    "1",
    "-m",
    "2048",
    "-kernel",
    "/usr/share/kata-containers/vmlinux.container",
    "-append",
    "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 reboot=k \
     panic=1 net.ifnames=0 pci=off iommu=off acpi=off quiet 8250.nr_uarts=0",
    "-qmp",
    "unix:/run/vc/vm/4f0c/qmp.socket,server,nowait",
    "-D",
    "-disable-seccomp",
    "-machine",
    "type=microvm,dump-guest-core=off,mem-share=on",
    "-drive",
    "id=rootfs,file=/usr/share/kata-containers/kata-containers.img,readonly=on,direct=off",
    "-device",
    "virtio-blk-device,drive=rootfs,id=virtio-blk0",
    "-netdev",
    "tap,id=eth0,fds=3",
    "-device",
    "virtio-net-device,netdev=eth0,id=eth0,mac=02:42:ac:11:00:02",
];

#[test]
fn kata_containers_command_line() {
    let CliAction::Run(c) = parse_args(KATA.iter().copied()).unwrap() else {
        panic!("run expected")
    };
    assert_eq!(c.name.as_deref(), Some("sandbox-4f0c"));
    assert_eq!((c.vcpus, c.mem_mib), (1, 2048));
    assert_eq!(c.log, Some(None));
    assert!(c.disable_seccomp && c.machine.mem_share && !c.machine.dump_guest_core);
    assert!(c.drives[0].read_only && !c.drives[0].direct);
    assert_eq!(c.netdevs[0].tap, TapConfig::Fd(3));
    // Kata always adds a virtio-rng device (and vsock, virtio-fs): refused by name until
    // flotilla has them.
    let mut with_rng: Vec<&str> = KATA.to_vec();
    with_rng.extend([
        "-object",
        "rng-random,id=objrng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=objrng0,id=virtio-rng0",
    ]);
    let e = parse_args(with_rng).unwrap_err();
    assert!(
        e.to_string()
            .contains("virtio-rng-device: not implemented yet"),
        "{e}"
    );
    let mut with_vsock: Vec<&str> = KATA.to_vec();
    with_vsock.extend([
        "-device",
        "vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd=4",
    ]);
    let e = parse_args(with_vsock).unwrap_err();
    assert!(
        e.to_string()
            .contains("vhost-vsock-device: not implemented yet"),
        "{e}"
    );
}
