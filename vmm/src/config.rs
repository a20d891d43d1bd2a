//! The validated machine configuration `flotilla-vmm` boots.
//!
//! Ranges follow the StratoVirt user guide (vCPUs 1..=254, memory 256 MiB..=512 GiB, name
//! 1..=255 characters), so a command line StratoVirt rejects is rejected here too.

use std::path::PathBuf;

use crate::options::{KeyValues, OptionError, OptionSpec, ParsedOptions};

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 256;
/// Largest guest memory accepted, in MiB (512 GiB).
pub const MAX_MEM_MIB: u64 = 512 * 1024;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u8 = 254;
/// Longest VM name accepted.
pub const MAX_NAME_LEN: usize = 255;

/// Where the guest's ttyS0 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// Our stdin/stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
}

/// Everything needed to build and boot a microvm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// `-name`, used in logs.
    pub name: Option<String>,
    /// Kernel image: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line given by the user (the VMM may append to it).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Serial console destination; `None` discards guest output.
    pub serial: Option<SerialConfig>,
    /// Also describe virtio-mmio devices with `virtio_mmio.device=` on the kernel command line,
    /// for custom kernels built without ACPI.
    pub mmio_cmdline: bool,
    /// `-D [file]`: log destination (`Some(None)` = stderr).
    pub log: Option<Option<PathBuf>>,
    /// `-control-fd N`: an inherited, connected unix socket to the `flotilla` gateway.
    pub control_fd: Option<i32>,
    /// vhost-user devices, in command-line order (disks fill the disk slots in this order).
    pub vhost_user: Vec<VhostUserConfig>,
}

impl VmConfig {
    /// The disks, in slot order.
    pub fn disks(&self) -> Vec<&VhostUserConfig> {
        self.vhost_user
            .iter()
            .filter(|d| matches!(d.kind, VhostUserKind::Blk { .. }))
            .collect()
    }

    /// The NICs, in slot order.
    pub fn nics(&self) -> Vec<&VhostUserConfig> {
        self.vhost_user
            .iter()
            .filter(|d| matches!(d.kind, VhostUserKind::Net { .. }))
            .collect()
    }

    /// The balloon, if any (at most one).
    pub fn balloon(&self) -> Option<&VhostUserConfig> {
        self.vhost_user
            .iter()
            .find(|d| matches!(d.kind, VhostUserKind::Balloon { .. }))
    }
}

/// `-chardev socket,id=C,path=P|fd=N -device vhost-user-<type>-device,id=D,chardev=C,...`: a
/// device served by a vhost-user backend at `socket`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserConfig {
    /// Device id.
    pub id: String,
    /// Where the backend is.
    pub socket: BackendSocket,
    /// The device type and its options.
    pub kind: VhostUserKind,
}

/// What a vhost-user device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhostUserKind {
    /// `vhost-user-blk-device[,num-queues=N]`.
    Blk {
        /// Queues the device offers.
        num_queues: u16,
    },
    /// `vhost-user-net-device[,mac=MAC]`.
    Net {
        /// The MAC the guest sees (else one is made up per slot).
        mac: Option<[u8; 6]>,
    },
    /// `vhost-user-balloon-device[,deflate-on-oom=on|off]`.
    Balloon {
        /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
        deflate_on_oom: bool,
    },
}

/// How to reach a vhost-user backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSocket {
    /// Connect to a listening unix socket (`path=`).
    Path(PathBuf),
    /// An inherited, already connected socket (`fd=`), as the `flotilla` gateway passes it.
    Fd(i32),
}

/// Most queues a vhost-user block device may have.
pub const MAX_BLK_QUEUES: u16 = 16;

/// Joins `-chardev socket,...` and `-device vhost-user-blk-device,...` options.
fn parse_vhost_user(opts: &ParsedOptions) -> Result<Vec<VhostUserConfig>, OptionError> {
    let mut chardevs = Vec::new();
    for text in opts.values("chardev") {
        let kv = KeyValues::parse("chardev", text, Some("backend"))?;
        kv.check_keys(&["backend", "id", "path", "fd"])?;
        if kv.get("backend") != Some("socket") {
            return Err(kv.invalid(
                "backend",
                kv.get("backend").unwrap_or_default(),
                "only socket is supported",
            ));
        }
        let id = kv
            .get("id")
            .filter(|i| !i.is_empty())
            .ok_or_else(|| kv.invalid("id", "", "required"))?;
        let socket =
            match (kv.get("path"), kv.get("fd")) {
                (Some(p), None) if !p.is_empty() => BackendSocket::Path(PathBuf::from(p)),
                (None, Some(fd)) => BackendSocket::Fd(parse_fd(fd).map_err(|_| {
                    kv.invalid("fd", fd, "expected an inherited descriptor above 2")
                })?),
                _ => {
                    let path = kv.get("path").unwrap_or_default();
                    return Err(kv.invalid("path", path, "give exactly one of path= and fd="));
                }
            };
        if chardevs
            .iter()
            .any(|(c, _): &(String, BackendSocket)| c == id)
        {
            return Err(kv.invalid("id", id, "duplicate chardev id"));
        }
        chardevs.push((id.to_string(), socket));
    }
    let mut devices: Vec<VhostUserConfig> = Vec::new();
    for text in opts.values("device") {
        let kv = KeyValues::parse("device", text, Some("driver"))?;
        kv.check_keys(&[
            "driver",
            "id",
            "chardev",
            "num-queues",
            "deflate-on-oom",
            "mac",
        ])?;
        let driver = kv.get("driver").unwrap_or_default();
        if ![
            "vhost-user-blk-device",
            "vhost-user-net-device",
            "vhost-user-balloon-device",
        ]
        .contains(&driver)
        {
            return Err(kv.invalid(
                "driver",
                driver,
                "expected vhost-user-blk-device, vhost-user-net-device or vhost-user-balloon-device",
            ));
        }
        if driver != "vhost-user-net-device" && kv.get("mac").is_some() {
            return Err(kv.invalid("mac", "", "only for a NIC"));
        }
        let id = kv
            .get("id")
            .filter(|i| !i.is_empty())
            .ok_or_else(|| kv.invalid("id", "", "required"))?;
        if devices.iter().any(|d| d.id == id) {
            return Err(kv.invalid("id", id, "duplicate device id"));
        }
        let chardev = kv.get("chardev").unwrap_or_default();
        let socket = chardevs
            .iter()
            .find(|(c, _)| c == chardev)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| kv.invalid("chardev", chardev, "no -chardev with this id"))?;
        let kind = if driver == "vhost-user-net-device" {
            if kv.get("num-queues").is_some() || kv.get("deflate-on-oom").is_some() {
                return Err(kv.invalid("driver", driver, "a NIC takes only id, chardev and mac"));
            }
            let mac = kv
                .get("mac")
                .map(|m| {
                    parse_mac(m).ok_or_else(|| {
                        kv.invalid("mac", m, "expected a unicast MAC such as 52:54:00:12:34:56")
                    })
                })
                .transpose()?;
            VhostUserKind::Net { mac }
        } else if driver == "vhost-user-balloon-device" {
            if kv.get("num-queues").is_some() {
                return Err(kv.invalid("num-queues", "", "a balloon has no request queues"));
            }
            if devices
                .iter()
                .any(|d| matches!(d.kind, VhostUserKind::Balloon { .. }))
            {
                return Err(kv.invalid("driver", driver, "only one balloon per VM"));
            }
            let deflate_on_oom = match kv.get("deflate-on-oom") {
                None | Some("off" | "false") => false,
                Some("on" | "true") => true,
                Some(v) => {
                    return Err(kv.invalid("deflate-on-oom", v, "expected on/off or true/false"))
                }
            };
            VhostUserKind::Balloon { deflate_on_oom }
        } else {
            if kv.get("deflate-on-oom").is_some() {
                return Err(kv.invalid("deflate-on-oom", "", "only for a balloon"));
            }
            let num_queues = match kv.get("num-queues") {
                None => 1,
                Some(n) => match n.parse::<u16>() {
                    Ok(q) if (1..=MAX_BLK_QUEUES).contains(&q) => q,
                    _ => return Err(kv.invalid("num-queues", n, "must be between 1 and 16")),
                },
            };
            VhostUserKind::Blk { num_queues }
        };
        devices.push(VhostUserConfig {
            id: id.to_string(),
            socket,
            kind,
        });
    }
    Ok(devices)
}

/// The options `flotilla-vmm` accepts on its own command line.
pub const VMM_OPTIONS: &[OptionSpec] = &[
    OptionSpec::value("kernel"),
    OptionSpec::value("initrd"),
    OptionSpec::value("append"),
    OptionSpec::value("m"),
    OptionSpec::value("smp"),
    OptionSpec::value("serial"),
    OptionSpec::value("name"),
    OptionSpec::value("machine"),
    OptionSpec::optional("D"),
    OptionSpec::value("control-fd"),
    OptionSpec::flag("disable-seccomp"),
    OptionSpec::repeated("chardev"),
    OptionSpec::repeated("device"),
    OptionSpec::flag("help"),
    OptionSpec::flag("h"),
    OptionSpec::flag("version"),
];

impl VmConfig {
    /// Builds and validates a configuration from parsed options.
    pub fn from_options(opts: &ParsedOptions) -> Result<Self, OptionError> {
        let kernel = opts
            .value("kernel")
            .ok_or_else(|| OptionError::MissingValue("kernel".into()))?;
        let name = opts.value("name").map(parse_name).transpose()?;
        let mem_mib = opts
            .value("m")
            .map(parse_mem_mib)
            .transpose()?
            .unwrap_or(MIN_MEM_MIB);
        let vcpus = opts.value("smp").map(parse_smp).transpose()?.unwrap_or(1);
        let serial = opts.value("serial").map(parse_serial).transpose()?;
        let mmio_cmdline = match opts.value("machine") {
            Some(text) => parse_machine(text)?,
            None => false,
        };
        Ok(VmConfig {
            name,
            kernel: PathBuf::from(kernel),
            initrd: opts.value("initrd").map(PathBuf::from),
            cmdline: opts.value("append").unwrap_or_default().to_string(),
            mem_mib,
            vcpus,
            serial,
            mmio_cmdline,
            log: opts.has("D").then(|| opts.value("D").map(PathBuf::from)),
            control_fd: opts.value("control-fd").map(parse_fd).transpose()?,
            vhost_user: parse_vhost_user(opts)?,
        })
    }
}

/// `aa:bb:cc:dd:ee:ff`, unicast.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

fn invalid(option: &str, value: &str, reason: &str) -> OptionError {
    OptionError::InvalidValue {
        option: option.into(),
        key: option.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// `-name NAME`: 1..=255 characters.
pub fn parse_name(text: &str) -> Result<String, OptionError> {
    if text.is_empty() || text.chars().count() > MAX_NAME_LEN {
        return Err(invalid("name", text, "must be 1 to 255 characters"));
    }
    Ok(text.to_string())
}

/// `-m N[M|G]` (MiB without a suffix), within 256 MiB..=512 GiB.
pub fn parse_mem_mib(text: &str) -> Result<u64, OptionError> {
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'M' | 'm')) => (&text[..i], 1),
        Some((i, 'G' | 'g')) => (&text[..i], 1024),
        _ => (text, 1),
    };
    let mib = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| invalid("m", text, "expected a size such as 512, 512M or 2G"))?;
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(invalid("m", text, "memory must be between 256M and 512G"));
    }
    Ok(mib)
}

/// `-smp [cpus=]N`, 1..=254.
pub fn parse_smp(text: &str) -> Result<u8, OptionError> {
    let kv = KeyValues::parse("smp", text, Some("cpus"))?;
    kv.check_keys(&["cpus"])?;
    let cpus = kv.get("cpus").unwrap_or_default();
    match cpus.parse::<u8>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(kv.invalid("cpus", cpus, "must be between 1 and 254")),
    }
}

/// `-control-fd N`: a descriptor number above stdio.
fn parse_fd(text: &str) -> Result<i32, OptionError> {
    match text.parse::<i32>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(invalid(
            "control-fd",
            text,
            "expected an inherited descriptor number above 2",
        )),
    }
}

/// `-serial stdio|file:PATH`.
pub fn parse_serial(text: &str) -> Result<SerialConfig, OptionError> {
    match text {
        "stdio" => Ok(SerialConfig::Stdio),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(invalid("serial", text, "expected stdio or file:PATH")),
        },
    }
}

/// `-machine [type=]microvm[,virtio-mmio-cmdline=on|off]`; returns the cmdline switch.
fn parse_machine(text: &str) -> Result<bool, OptionError> {
    let kv = KeyValues::parse("machine", text, Some("type"))?;
    kv.check_keys(&["type", "virtio-mmio-cmdline"])?;
    match kv.get("type") {
        None | Some("microvm") => {}
        Some(other) => return Err(kv.invalid("type", other, "only microvm is supported")),
    }
    Ok(kv.get_bool("virtio-mmio-cmdline")?.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::parse;

    fn config(args: &[&str]) -> Result<VmConfig, OptionError> {
        VmConfig::from_options(&parse(VMM_OPTIONS, args.iter().copied())?)
    }

    #[test]
    fn full_command_line() {
        let c = config(&[
            "-kernel",
            "k",
            "-initrd",
            "i",
            "-append",
            "console=ttyS0",
            "-m",
            "1G",
            "-smp",
            "cpus=4",
            "-serial",
            "file:/tmp/s",
            "-name",
            "vm1",
            "-machine",
            "microvm,virtio-mmio-cmdline=on",
            "-D",
        ])
        .unwrap();
        assert_eq!(c.mem_mib, 1024);
        assert_eq!(c.vcpus, 4);
        assert_eq!(c.serial, Some(SerialConfig::File("/tmp/s".into())));
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert!(c.mmio_cmdline);
        assert_eq!(c.log, Some(None));
        assert_eq!(c.cmdline, "console=ttyS0");
    }

    #[test]
    fn vhost_user_blk_devices() {
        let c = config(&[
            "-kernel",
            "k",
            "-chardev",
            "socket,id=c0,path=/run/b0.sock",
            "-device",
            "vhost-user-blk-device,id=disk0,chardev=c0,num-queues=2",
        ])
        .unwrap();
        assert_eq!(
            c.vhost_user,
            vec![VhostUserConfig {
                id: "disk0".into(),
                socket: BackendSocket::Path("/run/b0.sock".into()),
                kind: VhostUserKind::Blk { num_queues: 2 }
            }]
        );
        let c = config(&[
            "-kernel",
            "k",
            "-chardev",
            "socket,id=c,fd=5",
            "-device",
            "vhost-user-blk-device,id=d,chardev=c",
        ])
        .unwrap();
        assert_eq!(c.vhost_user[0].socket, BackendSocket::Fd(5));
        let c = config(&[
            "-kernel",
            "k",
            "-chardev",
            "socket,id=c,fd=5",
            "-chardev",
            "socket,id=b,fd=6",
            "-device",
            "vhost-user-blk-device,id=d,chardev=c",
            "-device",
            "vhost-user-balloon-device,id=balloon0,chardev=b,deflate-on-oom=true",
        ])
        .unwrap();
        assert_eq!(c.disks().len(), 1);
        let n = config(&[
            "-kernel",
            "k",
            "-chardev",
            "socket,id=c,fd=5",
            "-device",
            "vhost-user-net-device,id=n,chardev=c,mac=52:54:00:00:00:07",
        ])
        .unwrap();
        assert_eq!(
            n.nics()[0].kind,
            VhostUserKind::Net {
                mac: Some([0x52, 0x54, 0, 0, 0, 7])
            }
        );
        assert!(parse_mac("01:00:00:00:00:00").is_none());
        assert!(parse_mac("52:54:00:00:00").is_none());
        assert!(parse_mac("52:54:00:00:00:0g").is_none());
        assert_eq!(
            c.balloon().map(|b| &b.kind),
            Some(&VhostUserKind::Balloon {
                deflate_on_oom: true
            })
        );
        for bad in [
            &["-device", "vhost-user-blk-device,id=d,chardev=missing"][..],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "virtio-blk-device,id=d,chardev=c",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-blk-device,id=d,chardev=c,num-queues=0",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-blk-device,id=d,chardev=c,bogus=1",
            ],
            &["-chardev", "file,id=c,path=/s"],
            &["-chardev", "socket,id=c"],
            &["-chardev", "socket,id=c,path=/s,fd=5"],
            &["-chardev", "socket,id=c,fd=1"],
            &["-chardev", "socket,id=c,path=/s,fd=5"],
            &["-chardev", "socket,id=c,fd=1"],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-chardev",
                "socket,id=c,path=/t",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-blk-device,id=d,chardev=c",
                "-device",
                "vhost-user-blk-device,id=d,chardev=c",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-balloon-device,id=b1,chardev=c",
                "-device",
                "vhost-user-balloon-device,id=b2,chardev=c",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-balloon-device,id=b1,chardev=c,deflate-on-oom=maybe",
            ],
            &[
                "-chardev",
                "socket,id=c,path=/s",
                "-device",
                "vhost-user-blk-device,id=b1,chardev=c,deflate-on-oom=on",
            ],
        ] {
            let mut args = vec!["-kernel", "k"];
            args.extend_from_slice(bad);
            assert!(config(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults() {
        let c = config(&["-kernel", "k"]).unwrap();
        assert_eq!((c.mem_mib, c.vcpus, c.serial, c.log), (256, 1, None, None));
        assert_eq!(c.control_fd, None);
        assert!(config(&["-kernel", "k", "-control-fd", "1"]).is_err());
        assert_eq!(
            config(&["-kernel", "k", "-control-fd", "7"])
                .unwrap()
                .control_fd,
            Some(7)
        );
    }

    #[test]
    fn ranges_are_enforced() {
        assert_eq!(parse_mem_mib("256").unwrap(), 256);
        assert_eq!(parse_mem_mib("512G").unwrap(), 512 * 1024);
        for bad in ["255", "513G", "", "G", "12X", "-5", "99999999999999999999G"] {
            assert!(parse_mem_mib(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_smp("254").unwrap(), 254);
        for bad in ["0", "255", "two", "cpus=", "sockets=1"] {
            assert!(parse_smp(bad).is_err(), "{bad}");
        }
        assert!(parse_name("").is_err());
        assert!(parse_name(&"x".repeat(256)).is_err());
        assert!(parse_name(&"x".repeat(255)).is_ok());
        assert!(parse_serial("pty").is_err());
        assert!(parse_serial("file:").is_err());
        assert!(config(&["-kernel", "k", "-machine", "q35"]).is_err());
        assert!(config(&["-m", "512"]).is_err());
    }
}
