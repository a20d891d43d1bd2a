//! Devices and their backends: `-drive`, `-device`, `-netdev` and `-object`.
//!
//! Every key StratoVirt documents for the microvm machine is understood; an unknown key is an
//! error. Devices and backends StratoVirt has but flotilla does not implement yet are refused
//! by name, with the issue that will bring them.

use std::path::PathBuf;

use vmm::options::KeyValues;

use super::CliError;

/// Largest `throttling.iops-total` (StratoVirt: 0..=1000000, 0 = unlimited).
pub const MAX_IOPS: u64 = 1_000_000;
/// Longest virtio-blk serial (the device's ID string is 20 bytes).
pub const MAX_BLK_SERIAL: usize = 20;
/// Most virtqueues for a disk.
pub const MAX_BLK_QUEUES: u16 = 32;

/// Asynchronous I/O engine of a disk (`aio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioEngine {
    /// Linux native AIO (flotilla-blk maps it to io_uring).
    Native,
    /// io_uring.
    IoUring,
    /// Synchronous I/O.
    Off,
}

/// A `-drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,throttling.iops-total=N]
/// [,if=none][,format=raw][,aio=native|io_uring|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Its id, referenced by `-device ...,drive=ID`.
    pub id: String,
    /// The image on the host.
    pub file: PathBuf,
    /// Read-only (default off).
    pub read_only: bool,
    /// Open with O_DIRECT (StratoVirt's default: on).
    pub direct: bool,
    /// IOPS limit, `None` for unlimited.
    pub iops: Option<u64>,
    /// The I/O engine, `None` for the backend's default.
    pub aio: Option<AioEngine>,
}

/// `-device virtio-blk-device,drive=ID[,id=ID][,serial=S][,iothread=T][,num-queues=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkDeviceConfig {
    /// Device id (QMP `device_del` uses it).
    pub id: Option<String>,
    /// The `-drive` it exposes.
    pub drive: String,
    /// The serial the guest reads.
    pub serial: Option<String>,
    /// The `-object iothread` named for it.
    pub iothread: Option<String>,
    /// Number of request queues.
    pub num_queues: Option<u16>,
}

/// `-device virtio-net-device,netdev=ID[,id=ID][,mac=MAC][,iothread=T]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDeviceConfig {
    /// Device id.
    pub id: Option<String>,
    /// The `-netdev` it uses.
    pub netdev: String,
    /// The guest MAC address.
    pub mac: Option<[u8; 6]>,
    /// The `-object iothread` named for it.
    pub iothread: Option<String>,
}

/// A `-device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    /// `virtio-blk-device`.
    Blk(BlkDeviceConfig),
    /// `virtio-net-device`.
    Net(NetDeviceConfig),
    /// `virtio-balloon-device`.
    Balloon(BalloonDeviceConfig),
}

/// `-device virtio-balloon-device[,id=ID][,deflate-on-oom=BOOL]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonDeviceConfig {
    /// Device id.
    pub id: Option<String>,
    /// Give pages back to a guest running out of memory.
    pub deflate_on_oom: bool,
}

impl DeviceConfig {
    /// The device's id, if given.
    pub fn id(&self) -> Option<&str> {
        match self {
            DeviceConfig::Blk(b) => b.id.as_deref(),
            DeviceConfig::Net(n) => n.id.as_deref(),
            DeviceConfig::Balloon(b) => b.id.as_deref(),
        }
    }

    /// The iothread it names, if any.
    pub fn iothread(&self) -> Option<&str> {
        match self {
            DeviceConfig::Blk(b) => b.iothread.as_deref(),
            DeviceConfig::Net(n) => n.iothread.as_deref(),
            DeviceConfig::Balloon(_) => None,
        }
    }
}

/// Where a tap comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapConfig {
    /// `ifname=NAME`: the gateway opens /dev/net/tun and attaches to NAME.
    Ifname(String),
    /// `fd=N`: an open tap fd we inherited.
    Fd(i32),
}

/// `-netdev tap,id=ID,(ifname=NAME|fd=N|fds=N)[,queues=1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetdevConfig {
    /// Its id, referenced by `-device ...,netdev=ID`.
    pub id: String,
    /// The tap.
    pub tap: TapConfig,
}

/// An `-object`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectConfig {
    /// `iothread,id=ID`.
    Iothread(String),
}

fn required<'a>(kv: &'a KeyValues, option: &str, key: &str) -> Result<&'a str, CliError> {
    match kv.get(key) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(CliError::invalid(option, format!("'{key}' is required"))),
    }
}

fn optional_string(kv: &KeyValues, key: &str) -> Option<String> {
    kv.get(key).map(str::to_string)
}

fn not_implemented(what: String, issue: Option<u8>) -> CliError {
    CliError::NotImplemented { what, issue }
}

/// Parses a `-drive`.
pub fn parse_drive(text: &str) -> Result<DriveConfig, CliError> {
    let kv = KeyValues::parse("drive", text, None)?;
    kv.check_keys(&[
        "id",
        "file",
        "readonly",
        "direct",
        "throttling.iops-total",
        "if",
        "format",
        "aio",
    ])?;
    match kv.get("if") {
        None | Some("none") => {}
        Some("pflash") => {
            return Err(not_implemented(
                "-drive if=pflash (UEFI firmware)".into(),
                None,
            ))
        }
        Some(other) => return Err(kv.invalid("if", other, "expected none").into()),
    }
    match kv.get("format") {
        None | Some("raw") => {}
        Some("qcow2") => return Err(not_implemented("-drive format=qcow2".into(), Some(8))),
        Some(other) => return Err(kv.invalid("format", other, "expected raw").into()),
    }
    let aio = match kv.get("aio") {
        None => None,
        Some("native") => Some(AioEngine::Native),
        Some("io_uring") => Some(AioEngine::IoUring),
        Some("off") => Some(AioEngine::Off),
        Some(other) => {
            return Err(kv
                .invalid("aio", other, "expected native, io_uring or off")
                .into())
        }
    };
    let iops = match kv.get("throttling.iops-total") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(n) if n <= MAX_IOPS => Some(n),
            _ => {
                return Err(kv
                    .invalid("throttling.iops-total", v, "must be between 0 and 1000000")
                    .into())
            }
        },
    };
    Ok(DriveConfig {
        id: required(&kv, "drive", "id")?.to_string(),
        file: PathBuf::from(required(&kv, "drive", "file")?),
        read_only: kv.get_bool("readonly")?.unwrap_or(false),
        direct: kv.get_bool("direct")?.unwrap_or(true),
        iops,
        aio,
    })
}

/// Device models StratoVirt has that flotilla does not (yet), with the issue bringing them.
const UNIMPLEMENTED_DEVICES: &[(&str, Option<u8>)] = &[
    ("virtio-blk-pci", Some(4)),
    ("virtio-net-pci", Some(4)),
    ("virtio-balloon-pci", Some(7)),
    ("vhost-user-blk-device", Some(8)),
    ("vhost-user-blk-pci", Some(8)),
    ("vhost-user-net-pci", Some(6)),
    ("pcie-root-port", Some(4)),
    ("virtio-rng-device", None),
    ("virtio-rng-pci", None),
    ("vhost-vsock-device", None),
    ("vhost-vsock-pci", None),
    ("virtio-serial-device", None),
    ("virtio-serial-pci", None),
    ("virtconsole", None),
    ("virtserialport", None),
    ("vfio-pci", None),
    ("virtio-scsi-pci", None),
    ("scsi-hd", None),
    ("scsi-cd", None),
    ("virtio-fs-device", None),
    ("vhost-user-fs-device", None),
    ("vhost-user-fs-pci", None),
    ("virtio-gpu-pci", None),
    ("pci-bridge", None),
];

/// Parses a `-device`.
pub fn parse_device(text: &str) -> Result<DeviceConfig, CliError> {
    let kv = KeyValues::parse("device", text, Some("driver"))?;
    let driver = kv.get("driver").unwrap_or_default();
    match driver {
        "virtio-blk-device" => {
            kv.check_keys(&["driver", "id", "drive", "serial", "iothread", "num-queues"])?;
            let serial = optional_string(&kv, "serial");
            if let Some(s) = &serial {
                if s.len() > MAX_BLK_SERIAL {
                    return Err(kv.invalid("serial", s, "at most 20 bytes").into());
                }
            }
            let num_queues = match kv.get("num-queues") {
                None => None,
                Some(v) => match v.parse::<u16>() {
                    Ok(n) if (1..=MAX_BLK_QUEUES).contains(&n) => Some(n),
                    _ => {
                        return Err(kv
                            .invalid("num-queues", v, "must be between 1 and 32")
                            .into())
                    }
                },
            };
            Ok(DeviceConfig::Blk(BlkDeviceConfig {
                id: optional_string(&kv, "id"),
                drive: required(&kv, "device", "drive")?.to_string(),
                serial,
                iothread: optional_string(&kv, "iothread"),
                num_queues,
            }))
        }
        "virtio-net-device" => {
            kv.check_keys(&["driver", "id", "netdev", "mac", "iothread"])?;
            let mac = kv
                .get("mac")
                .map(|m| parse_mac(m).ok_or_else(|| kv.invalid("mac", m, MAC_REASON)))
                .transpose()?;
            Ok(DeviceConfig::Net(NetDeviceConfig {
                id: optional_string(&kv, "id"),
                netdev: required(&kv, "device", "netdev")?.to_string(),
                mac,
                iothread: optional_string(&kv, "iothread"),
            }))
        }
        "virtio-balloon-device" => {
            kv.check_keys(&["driver", "id", "deflate-on-oom"])?;
            Ok(DeviceConfig::Balloon(BalloonDeviceConfig {
                id: optional_string(&kv, "id"),
                deflate_on_oom: kv.get_bool("deflate-on-oom")?.unwrap_or(false),
            }))
        }
        _ => match UNIMPLEMENTED_DEVICES.iter().find(|(d, _)| *d == driver) {
            Some((_, issue)) => Err(not_implemented(format!("-device {driver}"), *issue)),
            None => Err(CliError::invalid(
                "device",
                format!(
                    "unknown device '{driver}' (supported: virtio-blk-device, virtio-net-device, virtio-balloon-device)"
                ),
            )),
        },
    }
}

const MAC_REASON: &str = "expected a unicast MAC such as 52:54:00:12:34:56";

/// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses are refused, as QEMU does.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// Parses a `-netdev`.
pub fn parse_netdev(text: &str) -> Result<NetdevConfig, CliError> {
    let kv = KeyValues::parse("netdev", text, Some("type"))?;
    match kv.get("type").unwrap_or_default() {
        "tap" => {}
        "vhost-user" => {
            return Err(not_implemented(
                "-netdev vhost-user (standard VM)".into(),
                Some(6),
            ))
        }
        other => {
            return Err(CliError::invalid(
                "netdev",
                format!("unknown type '{other}' (expected tap)"),
            ))
        }
    }
    kv.check_keys(&[
        "type", "id", "ifname", "fd", "fds", "vhost", "vhostfd", "queues",
    ])?;
    if kv.get_bool("vhost")? == Some(true) || kv.get("vhostfd").is_some() {
        return Err(not_implemented(
            "-netdev vhost=on/vhostfd (kernel vhost-net; flotilla's net backend is the \
             flotilla-net process)"
                .into(),
            Some(6),
        ));
    }
    match kv.get("queues") {
        None | Some("1") => {}
        Some(v) if v.parse::<u16>().is_ok_and(|n| n > 1) => {
            return Err(not_implemented(
                "-netdev queues>1 (multi-queue)".into(),
                Some(6),
            ))
        }
        Some(v) => return Err(kv.invalid("queues", v, "expected a queue count").into()),
    }
    // Kata Containers passes its tap as `fds=N` (several `N:M` for multi-queue).
    let fd = match (kv.get("fd"), kv.get("fds")) {
        (Some(_), Some(_)) => {
            return Err(CliError::invalid("netdev", "give fd= or fds=, not both"))
        }
        (Some(fd), None) => Some(("fd", fd)),
        (None, Some(fds)) if fds.contains(':') => {
            return Err(not_implemented(
                "-netdev fds=N:M... (multi-queue)".into(),
                Some(6),
            ))
        }
        (None, Some(fds)) => Some(("fds", fds)),
        (None, None) => None,
    };
    let tap = match (kv.get("ifname"), fd) {
        (Some(name), None) if !name.is_empty() && name.len() < 16 => {
            TapConfig::Ifname(name.to_string())
        }
        (Some(name), None) => {
            return Err(kv
                .invalid("ifname", name, "must be 1 to 15 characters")
                .into())
        }
        (None, Some((key, fd))) => match fd.parse::<i32>() {
            Ok(n) if n >= 0 => TapConfig::Fd(n),
            _ => {
                return Err(kv
                    .invalid(key, fd, "expected a file descriptor number")
                    .into())
            }
        },
        _ => {
            return Err(CliError::invalid(
                "netdev",
                "exactly one of ifname=NAME and fd=N (or fds=N) is required",
            ))
        }
    };
    Ok(NetdevConfig {
        id: required(&kv, "netdev", "id")?.to_string(),
        tap,
    })
}

/// Parses an `-object`.
pub fn parse_object(text: &str) -> Result<ObjectConfig, CliError> {
    let kv = KeyValues::parse("object", text, Some("qom-type"))?;
    match kv.get("qom-type").unwrap_or_default() {
        "iothread" => {
            kv.check_keys(&["qom-type", "id"])?;
            Ok(ObjectConfig::Iothread(
                required(&kv, "object", "id")?.to_string(),
            ))
        }
        "rng-random" => {
            kv.check_keys(&["qom-type", "id", "filename"])?;
            required(&kv, "object", "id")?;
            required(&kv, "object", "filename")?;
            Err(not_implemented(
                "-object rng-random (virtio-rng)".into(),
                None,
            ))
        }
        other => Err(CliError::invalid(
            "object",
            format!("unknown object type '{other}' (expected iothread or rng-random)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T, CliError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn balloon() {
        assert_eq!(
            parse_device("virtio-balloon-device,deflate-on-oom=true,id=b").unwrap(),
            DeviceConfig::Balloon(BalloonDeviceConfig {
                id: Some("b".into()),
                deflate_on_oom: true
            })
        );
        assert_eq!(
            parse_device("virtio-balloon-device").unwrap(),
            DeviceConfig::Balloon(BalloonDeviceConfig {
                id: None,
                deflate_on_oom: false
            })
        );
    }

    #[test]
    fn drives() {
        let d = parse_drive("id=rootfs,file=/img.raw").unwrap();
        assert_eq!(
            d,
            DriveConfig {
                id: "rootfs".into(),
                file: "/img.raw".into(),
                read_only: false,
                direct: true,
                iops: None,
                aio: None
            }
        );
        let d = parse_drive(
            "file=/a,id=d1,readonly=on,direct=off,throttling.iops-total=200,if=none,format=raw,aio=io_uring",
        )
        .unwrap();
        assert!(d.read_only && !d.direct);
        assert_eq!((d.iops, d.aio), (Some(200), Some(AioEngine::IoUring)));
        assert_eq!(
            parse_drive("id=a,file=/a,aio=native").unwrap().aio,
            Some(AioEngine::Native)
        );
        assert_eq!(
            parse_drive("id=a,file=/a,aio=off").unwrap().aio,
            Some(AioEngine::Off)
        );
        assert_eq!(
            parse_drive("id=a,file=/a,throttling.iops-total=0")
                .unwrap()
                .iops,
            None
        );
        let bad = [
            ("file=/a", "'id' is required"),
            ("id=a", "'file' is required"),
            ("id=a,file=", "'file' is required"),
            ("id=a,file=/a,cache=none", "unknown parameter 'cache'"),
            ("id=a,file=/a,readonly=yes", "expected on or off"),
            (
                "id=a,file=/a,throttling.iops-total=1000001",
                "between 0 and 1000000",
            ),
            (
                "id=a,file=/a,throttling.iops-total=-1",
                "between 0 and 1000000",
            ),
            ("id=a,file=/a,if=virtio", "expected none"),
            (
                "id=a,file=/a,if=pflash",
                "if=pflash (UEFI firmware): not implemented yet",
            ),
            (
                "id=a,file=/a,format=qcow2",
                "format=qcow2: not implemented yet (issue 8)",
            ),
            ("id=a,file=/a,format=vmdk", "expected raw"),
            (
                "id=a,file=/a,aio=threads",
                "expected native, io_uring or off",
            ),
            ("id=a,id=b,file=/a", "given more than once"),
        ];
        for (text, want) in bad {
            let e = err(parse_drive(text));
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("-drive"), "{text}: {e}");
        }
    }

    #[test]
    fn devices() {
        assert_eq!(
            parse_device("virtio-blk-device,drive=rootfs").unwrap(),
            DeviceConfig::Blk(BlkDeviceConfig {
                id: None,
                drive: "rootfs".into(),
                serial: None,
                iothread: None,
                num_queues: None
            })
        );
        let d =
            parse_device("virtio-blk-device,drive=d,id=blk0,serial=SN1,iothread=io1,num-queues=4")
                .unwrap();
        assert_eq!(d.id(), Some("blk0"));
        assert_eq!(d.iothread(), Some("io1"));
        let d = parse_device("driver=virtio-net-device,netdev=n0,id=net0,mac=12:34:56:78:9A:BC")
            .unwrap();
        assert_eq!(
            d,
            DeviceConfig::Net(NetDeviceConfig {
                id: Some("net0".into()),
                netdev: "n0".into(),
                mac: Some([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]),
                iothread: None
            })
        );
        let bad = [
            ("virtio-blk-device", "'drive' is required"),
            (
                "virtio-blk-device,drive=d,bus=pcie.0",
                "unknown parameter 'bus'",
            ),
            (
                "virtio-blk-device,drive=d,serial=123456789012345678901",
                "at most 20",
            ),
            ("virtio-blk-device,drive=d,num-queues=0", "between 1 and 32"),
            (
                "virtio-blk-device,drive=d,num-queues=33",
                "between 1 and 32",
            ),
            ("virtio-net-device", "'netdev' is required"),
            (
                "virtio-net-device,netdev=n,mac=01:00:00:00:00:01",
                "unicast MAC",
            ),
            ("virtio-net-device,netdev=n,mac=12:34:56", "unicast MAC"),
            (
                "virtio-net-device,netdev=n,mac=12:34:56:78:9a:bc:de",
                "unicast MAC",
            ),
            (
                "virtio-net-device,netdev=n,mac=zz:34:56:78:9a:bc",
                "unicast MAC",
            ),
            (
                "virtio-net-device,netdev=n,drive=d",
                "unknown parameter 'drive'",
            ),
            (
                "virtio-balloon-device,deflate-on-oom=maybe",
                "deflate-on-oom",
            ),
            ("virtio-balloon-device,size=1", "unknown parameter 'size'"),
            (
                "virtio-blk-pci,drive=d,bus=pcie.0,addr=0x3",
                "-device virtio-blk-pci: not implemented yet (issue 4)",
            ),
            (
                "virtio-rng-device,rng=r",
                "-device virtio-rng-device: not implemented yet",
            ),
            (
                "vhost-vsock-device,id=v,guest-cid=3",
                "vhost-vsock-device: not implemented yet",
            ),
            ("virtconsole,chardev=c", "virtconsole: not implemented yet"),
            ("e1000,netdev=n", "unknown device 'e1000'"),
        ];
        for (text, want) in bad {
            let e = err(parse_device(text));
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn netdevs() {
        assert_eq!(
            parse_netdev("tap,id=n0,ifname=tap0").unwrap(),
            NetdevConfig {
                id: "n0".into(),
                tap: TapConfig::Ifname("tap0".into())
            }
        );
        assert_eq!(
            parse_netdev("tap,id=n0,fd=5,vhost=off,queues=1")
                .unwrap()
                .tap,
            TapConfig::Fd(5)
        );
        // Kata Containers' spelling.
        assert_eq!(
            parse_netdev("tap,id=eth0,fds=3").unwrap().tap,
            TapConfig::Fd(3)
        );
        let bad = [
            ("tap,id=n0", "exactly one of ifname"),
            ("tap,id=n0,ifname=t,fd=3", "exactly one of ifname"),
            ("tap,ifname=t", "'id' is required"),
            (
                "tap,id=n,ifname=averyveryverylongname",
                "1 to 15 characters",
            ),
            ("tap,id=n,fd=x", "file descriptor number"),
            ("tap,id=n,fds=-1", "file descriptor number"),
            ("tap,id=n,fd=3,fds=4", "not both"),
            ("tap,id=n,ifname=t,fds=4", "exactly one of ifname"),
            (
                "tap,id=n,fds=3:4",
                "fds=N:M... (multi-queue): not implemented yet (issue 6)",
            ),
            ("tap,id=n,ifname=t,vhost=on", "vhost-net"),
            (
                "tap,id=n,ifname=t,vhostfd=4",
                "not implemented yet (issue 6)",
            ),
            ("tap,id=n,ifname=t,queues=2", "multi-queue"),
            ("tap,id=n,ifname=t,queues=x", "expected a queue count"),
            ("tap,id=n,ifname=t,script=/x", "unknown parameter 'script'"),
            ("user,id=n", "unknown type 'user'"),
            (
                "vhost-user,id=n,chardev=c",
                "vhost-user (standard VM): not implemented yet",
            ),
        ];
        for (text, want) in bad {
            let e = err(parse_netdev(text));
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn objects() {
        assert_eq!(
            parse_object("iothread,id=io1").unwrap(),
            ObjectConfig::Iothread("io1".into())
        );
        for (text, want) in [
            ("iothread", "'id' is required"),
            (
                "iothread,id=a,poll-max-ns=1",
                "unknown parameter 'poll-max-ns'",
            ),
            (
                "rng-random,id=r,filename=/dev/random",
                "rng-random (virtio-rng): not implemented yet",
            ),
            ("rng-random,id=r", "'filename' is required"),
            ("memory-backend-ram,id=m", "unknown object type"),
        ] {
            let e = err(parse_object(text));
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
