//! Network benchmark with a real guest: iperf3 in the guest against an `iperf3 -s` on the
//! tap, under flotilla (`-netdev tap` served by flotilla-net) and under QEMU microvm
//! (its own tap backend, `vhost=off`, and the kernel's vhost-net when `/dev/vhost-net`
//! exists on the KVM host), and QEMU microvm as the frontend of a standalone flotilla-net
//! (`--tap`, vhost-user), interleaved, in one KVM host session. Driven by
//! `tests/bench/net.sh`.
//!
//! Every run creates a network namespace on the KVM host and deletes it afterwards; the
//! VMM creates its tap inside it, the host side of the tap is 10.0.2.1/24 with the iperf3
//! server, the guest is 10.0.2.2/24 (`tests/guest/scenarios/iperf.sh`). No traffic
//! leaves the namespace.
//!
//! Usage: bench_net_vm [--runs N] [--seconds S] [--pin CPUS] [--only flotilla|qemu|qemu-vhost|qemu-flotilla-net]...
//!
//! The VMM and everything it starts run pinned as the tests pin them (`L2_PIN_VAR`: one
//! CPU of the nested KVM host, none on hardware KVM); `--pin CPUS` runs them under
//! `taskset -c CPUS` instead, `--pin all` unpinned (the iperf3 server is never pinned).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flotilla_tests::host::L2_PIN_VAR;
use flotilla_tests::{iperf3_guest_images, paths, shell_quote, GuestConfig, Images, KvmHost, Vmm};

/// Guest size: one vCPU (the KVM host VM has two, shared with the VMM, its backend and
/// the iperf3 server), enough memory for iperf3's buffers.
const GUEST_CPUS: u32 = 1;
const GUEST_MEM_MIB: u32 = 512;
/// The tap every VMM creates in the run's namespace.
const TAP: &str = "flbtap0";
const MAC: &str = "52:54:00:12:34:56";

/// One VMM configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// `flotilla -netdev tap,...`: the gateway starts flotilla-net for the tap.
    Flotilla,
    /// QEMU's own tap backend in its main loop (`vhost=off`).
    Qemu,
    /// QEMU with the in-kernel vhost-net worker (`vhost=on`).
    QemuVhost,
    /// QEMU as the vhost-user frontend of flotilla-net started on its own (`--tap`): the
    /// same backend under another VMM, which separates what the backend does from what
    /// flotilla's core does (tests/README.md "Platform failures").
    QemuFlotillaNet,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Flotilla,
        Variant::Qemu,
        Variant::QemuVhost,
        Variant::QemuFlotillaNet,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Flotilla => "flotilla",
            Variant::Qemu => "qemu",
            Variant::QemuVhost => "qemu-vhost",
            Variant::QemuFlotillaNet => "qemu-flotilla-net",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Flotilla => "flotilla + flotilla-net",
            Variant::Qemu => "QEMU microvm, tap vhost=off",
            Variant::QemuVhost => "QEMU microvm, tap vhost=on",
            Variant::QemuFlotillaNet => "QEMU microvm + flotilla-net (vhost-user)",
        }
    }

    /// The VMM command line; `$w` is the run's work directory (expanded by the shell).
    fn command(self, images: &Images, secs: u32) -> String {
        let config = GuestConfig {
            extra_append: format!("flotilla.iperf_secs={secs}"),
            ..GuestConfig::new(Vmm::Flotilla, "iperf")
        };
        let kernel = shell_quote(&images.kernel.to_string_lossy());
        let initrd = shell_quote(&images.initramfs.to_string_lossy());
        let append = shell_quote(&config.kernel_cmdline());
        match self {
            Variant::Flotilla => format!(
                "{} -name netbench -kernel {kernel} -initrd {initrd} -append {append} \
                 -m {GUEST_MEM_MIB} -smp {GUEST_CPUS} -serial file:$w/serial.log \
                 -qmp unix:$w/qmp.sock,server,nowait -netdev tap,id=net0,ifname={TAP} \
                 -device virtio-net-device,netdev=net0,id=nic0,mac={MAC}",
                shell_quote(&paths::program("flotilla").to_string_lossy()),
            ),
            // flotilla-net first (it creates the tap the script waits for), QEMU once its
            // socket is there; modern virtio-mmio, as flotilla's core offers.
            Variant::QemuFlotillaNet => format!(
                "sh -c \"{} --socket-path $w/net.sock --tap {TAP} --mac {MAC} \
                 --log-file $w/backend.log & \
                 while [ ! -S $w/net.sock ]; do sleep 0.1; done; \
                 exec {} -M microvm,acpi=on -enable-kvm -cpu host -m {GUEST_MEM_MIB} \
                 -smp {GUEST_CPUS} -global virtio-mmio.force-legacy=false \
                 -nodefaults -no-user-config -nographic -no-reboot -serial file:$w/serial.log \
                 -kernel {kernel} -initrd {initrd} -append {append} \
                 -object memory-backend-memfd,id=ram,size={GUEST_MEM_MIB}M,share=on \
                 -machine memory-backend=ram -chardev socket,id=c0,path=$w/net.sock \
                 -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-device,netdev=n0,mac={MAC}\"",
                shell_quote(&paths::program("flotilla-net").to_string_lossy()),
                shell_quote(&paths::qemu_binary()),
            ),
            Variant::Qemu | Variant::QemuVhost => {
                format!(
                "{} -M microvm,acpi=on -enable-kvm -cpu host -m {GUEST_MEM_MIB} -smp {GUEST_CPUS} \
                 -nodefaults -no-user-config -nographic -no-reboot -serial file:$w/serial.log \
                 -kernel {kernel} -initrd {initrd} -append {append} \
                 -netdev tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={} \
                 -device virtio-net-device,netdev=n0,mac={MAC}",
                shell_quote(&paths::qemu_binary()),
                if self == Variant::QemuVhost { "on" } else { "off" },
            )
            }
        }
    }
}

/// What one run measured, in Mbit/s (iperf3's receiver side).
#[derive(Debug, Default, Clone)]
struct Sample {
    tx_mbps: Option<f64>,
    rx_mbps: Option<f64>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match bench(args.get(1..).unwrap_or_default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_net_vm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The shell script one run executes on the KVM host, inside a fresh namespace. The VMM
/// is killed after `deadline_secs` (a hung guest still leaves its logs in the output).
fn run_script(vmm_command: &str, deadline_secs: u64, pin: Option<&str>) -> String {
    let vmm_command = match pin {
        Some("all") => vmm_command.to_string(),
        Some(cpus) => format!("taskset -c {cpus} {vmm_command}"),
        None => format!("${L2_PIN_VAR} {vmm_command}"),
    };
    format!(
        r#"w=$(mktemp -d /tmp/flotilla-netbench.XXXXXX) || exit 1
ip link set lo up
iperf3 -s -p 5201 >"$w/server.log" 2>&1 &
srv=$!
{vmm_command} </dev/null >"$w/vmm.log" 2>&1 &
vmm=$!
(sleep {deadline_secs}; echo "killed after {deadline_secs} s" >>"$w/vmm.log"; kill $vmm) >/dev/null 2>&1 &
watchdog=$!
while ! ip link show {TAP} >/dev/null 2>&1 && kill -0 $vmm 2>/dev/null; do sleep 0.1; done
ip addr add 10.0.2.1/24 dev {TAP} && ip link set {TAP} up
wait $vmm
st=$?
kill $watchdog $srv 2>/dev/null
wait $srv 2>/dev/null
echo "VMM-STATUS=$st"
grep -a FLOTILLA- "$w/serial.log"
if [ $st -ne 0 ] || ! grep -q 'iperf rx_mbps=[0-9]' "$w/serial.log"; then
    echo '--- serial (tail) ---'; tail -c 3000 "$w/serial.log"
    echo '--- VMM output (tail) ---'; tail -c 3000 "$w/vmm.log"
    [ -f "$w/backend.log" ] && {{ echo '--- backend log (tail) ---'; tail -c 2000 "$w/backend.log"; }}
    echo '--- iperf3 server (tail) ---'; tail -c 2000 "$w/server.log"
fi
rm -rf "$w"
exit $st
"#
    )
}

/// On the KVM host: makes `/dev/vhost-net` available if the kernel has the module. In the
/// nested L1 VM the modules come from the extracted L1 kernel package in the image cache
/// (the L1 initramfs does not load them), inserted with the cached busybox-static's
/// `insmod` (the host may have no kmod).
fn vhost_net_script(nested: bool) -> String {
    let load = if nested {
        let extract = shell_quote(&paths::cache_dir().join("extract").to_string_lossy());
        format!(
            r#"r=$(uname -r)
d=$(ls -d {extract}/linux-image-"$r"_*/lib/modules/"$r" 2>/dev/null | head -n1)
bb=$(ls {extract}/busybox-static_*/bin/busybox 2>/dev/null | head -n1)
for m in vhost/vhost_iotlb net/tap vhost/vhost vhost/vhost_net; do
    [ -n "$bb" ] && "$bb" insmod "$d/kernel/drivers/$m.ko"
done
"#
        )
    } else {
        "modprobe vhost_net\n".to_string()
    };
    format!("[ -e /dev/vhost-net ] || {{\n{load}}}\n[ -e /dev/vhost-net ] && echo VHOST-NET=yes || echo VHOST-NET=no")
}

fn parse_sample(stdout: &str) -> Sample {
    let mut sample = Sample::default();
    for line in stdout.lines() {
        let Some(rest) = line.split("FLOTILLA-RESULT iperf ").nth(1) else {
            continue;
        };
        for kv in rest.split_whitespace() {
            if let Some(v) = kv.strip_prefix("tx_mbps=") {
                sample.tx_mbps = v.parse().ok();
            } else if let Some(v) = kv.strip_prefix("rx_mbps=") {
                sample.rx_mbps = v.parse().ok();
            }
        }
    }
    sample
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut runs = 3usize;
    let mut secs = 10u32;
    let mut only: Vec<Variant> = Vec::new();
    let mut pin: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--runs needs a number")?
            }
            "--seconds" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--seconds needs a number")?
            }
            "--pin" => pin = Some(it.next().ok_or("--pin needs a CPU list")?.clone()),
            "--only" => {
                let name = it.next().ok_or("--only needs a variant")?;
                only.push(
                    *Variant::ALL
                        .iter()
                        .find(|v| v.name() == name)
                        .ok_or_else(|| format!("unknown variant {name}"))?,
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let images = iperf3_guest_images().map_err(|e| e.to_string())?;
    let flotilla = paths::program("flotilla");
    if !flotilla.is_file() || !paths::program("flotilla-net").is_file() {
        return Err(format!(
            "{} or flotilla-net missing (cargo build --release -p qmp-gateway -p vmm -p flotilla-net)",
            flotilla.display()
        ));
    }
    let host = KvmHost::get();
    let started = Instant::now();
    host.run("true", Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    if host.is_nested() {
        eprintln!(
            "bench_net_vm: KVM host is the nested L1 VM (ready in {:.1}s); numbers are L2-in-TCG, compare only side by side",
            started.elapsed().as_secs_f64()
        );
    }
    let check = host
        .run("command -v iperf3", Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    if check.status != 0 {
        return Err("iperf3 not found on the KVM host (apt-get install iperf3)".into());
    }
    let vhost = host
        .run(
            &vhost_net_script(host.is_nested()),
            Duration::from_secs(120),
        )
        .map_err(|e| e.to_string())?;
    let has_vhost = vhost.stdout_str().contains("VHOST-NET=yes");
    eprintln!("bench_net_vm: /dev/vhost-net on the KVM host: {has_vhost}");
    if !has_vhost {
        eprintln!("{}", vhost.stderr_str().trim_end());
    }
    let variants: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| only.is_empty() || only.contains(v))
        .filter(|v| *v != Variant::QemuVhost || has_vhost)
        .collect();
    for v in &variants {
        eprintln!("bench_net_vm: {}: {}", v.name(), v.command(&images, secs));
    }

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let timeout = Duration::from_secs(240 + 4 * u64::from(secs));
    for run in 1..=runs {
        for v in &variants {
            let ns = format!("flnb{}r{run}", std::process::id());
            let script = run_script(
                &v.command(&images, secs),
                120 + 4 * u64::from(secs),
                pin.as_deref(),
            );
            let cmd = format!(
                "ulimit -c 0; ip netns add {ns} || exit 1; ip netns exec {ns} sh -c {}; st=$?; ip netns del {ns}; exit $st",
                shell_quote(&script)
            );
            let t0 = Instant::now();
            let out = host.run(&cmd, timeout).map_err(|e| e.to_string())?;
            let stdout = out.stdout_str();
            let s = parse_sample(&stdout);
            eprintln!(
                "run {run}/{runs} {}: guest->host {:?} Mbit/s, host->guest {:?} Mbit/s, status {}, {:.0} s",
                v.name(),
                s.tx_mbps,
                s.rx_mbps,
                out.status,
                t0.elapsed().as_secs_f64()
            );
            if out.status != 0 || s.tx_mbps.is_none() || s.rx_mbps.is_none() {
                failures.push(format!(
                    "{} run {run}: status {}\n{}\n{}",
                    v.name(),
                    out.status,
                    stdout.trim_end(),
                    out.stderr_str().trim_end()
                ));
            }
            samples.entry(v.name()).or_default().push(s);
        }
    }

    println!(
        "\niperf3 (one TCP stream, {secs} s each way), guest {GUEST_CPUS} vCPU / {GUEST_MEM_MIB} MiB, {runs} runs per VMM{}.",
        if host.is_nested() {
            ", inside the nested L1 KVM host (QEMU TCG)"
        } else {
            ""
        }
    );
    println!("Receiver-side Gbit/s: median (min-max).\n");
    println!("| VMM | ok runs | guest → host | host → guest |");
    println!("|---|---|---|---|");
    for v in &variants {
        let list = samples.get(v.name()).cloned().unwrap_or_default();
        let ok = list
            .iter()
            .filter(|s| s.tx_mbps.is_some() && s.rx_mbps.is_some())
            .count();
        let tx = summarize(list.iter().filter_map(|s| s.tx_mbps).collect());
        let rx = summarize(list.iter().filter_map(|s| s.rx_mbps).collect());
        println!("| {} | {ok}/{runs} | {tx} | {rx} |", v.label());
    }
    if !has_vhost {
        println!("\n(no /dev/vhost-net on the KVM host: QEMU vhost=on not measured)");
    }
    for f in &failures {
        println!("\nfailed: {f}");
    }
    Ok(())
}

/// Median (min-max) of Mbit/s values, printed in Gbit/s.
fn summarize(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let g = |x: f64| x / 1000.0;
    format!("{:.3} ({:.3}-{:.3})", g(median), g(v[0]), g(v[v.len() - 1]))
}
