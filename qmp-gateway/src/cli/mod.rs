//! StratoVirt's command line, parsed and validated into a [`GatewayConfig`].
//!
//! The syntax (single-dash options, `key=value` lists, `-D [file]`) comes from
//! [`vmm::options`]; the ranges (vCPUs, memory, name) from [`vmm::config`], so the gateway
//! and the core agree on what is valid. Everything StratoVirt accepts for the microvm machine
//! is understood. Options and values flotilla does not implement yet are refused with a
//! message naming them (and the issue that brings them), never ignored.

pub mod chardev;
pub mod devices;

use std::collections::HashSet;
use std::path::PathBuf;

use vmm::config::{parse_mem_mib, parse_name, parse_smp, MIN_MEM_MIB};
use vmm::options::{self, KeyValues, OptionError, OptionSpec, ParsedOptions};

use crate::qmp::ListenAddr;
pub use chardev::{ChardevBackend, ChardevConfig, MonitorConfig, SerialArg};
pub use devices::{
    AioEngine, BlkDeviceConfig, DeviceConfig, DriveConfig, NetDeviceConfig, NetdevConfig,
    ObjectConfig, TapConfig,
};

/// Most disks on a microvm (StratoVirt's limit, hotplugged ones included).
pub const MAX_DISKS: usize = 6;
/// Most NICs on a microvm.
pub const MAX_NICS: usize = 2;

/// A command-line error. Printed as one line; the process exits with status 2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A syntax or range error from the option parser.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// An option's value is wrong.
    #[error("option '-{option}': {reason}")]
    Invalid {
        /// The option, without dash.
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// A required option is absent.
    #[error("{0}")]
    Missing(String),
    /// Valid StratoVirt, but flotilla cannot do it yet.
    #[error("{what}: not implemented yet{}", issue.map(|n| format!(" (issue {n})")).unwrap_or_default())]
    NotImplemented {
        /// What was asked for, naming the option.
        what: String,
        /// The tracking issue, when there is one.
        issue: Option<u8>,
    },
}

impl CliError {
    /// An [`CliError::Invalid`] for `option`.
    pub fn invalid(option: &str, reason: impl Into<String>) -> Self {
        CliError::Invalid {
            option: option.to_string(),
            reason: reason.into(),
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        2
    }
}

/// `-machine` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineConfig {
    /// `dump-guest-core`: include guest memory in a core dump (default off).
    pub dump_guest_core: bool,
    /// `mem-share`: guest memory shared with other processes. flotilla's memory is always a
    /// shared memfd (the vhost-user backends need it); the flag is kept for the core.
    pub mem_share: bool,
}

/// Where the guest's serial port goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// Our standard input and output.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
}

/// The validated configuration of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// `-name`.
    pub name: Option<String>,
    /// `-uuid`, lower-case.
    pub uuid: Option<String>,
    /// `-kernel`.
    pub kernel: PathBuf,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub cmdline: String,
    /// `-smp`.
    pub vcpus: u8,
    /// `-m`, in MiB.
    pub mem_mib: u64,
    /// `-machine`.
    pub machine: MachineConfig,
    /// `-drive`s, in command-line order.
    pub drives: Vec<DriveConfig>,
    /// `-device`s, in command-line order.
    pub devices: Vec<DeviceConfig>,
    /// `-netdev`s.
    pub netdevs: Vec<NetdevConfig>,
    /// `-object iothread` ids.
    pub iothreads: Vec<String>,
    /// `-chardev`s.
    pub chardevs: Vec<ChardevConfig>,
    /// Every QMP listener: `-qmp` ones first, then `-mon` ones.
    pub qmp: Vec<ListenAddr>,
    /// `-serial`.
    pub serial: Option<SerialConfig>,
    /// `-D [file]`: `Some(None)` logs to stderr.
    pub log: Option<Option<PathBuf>>,
    /// `-disable-seccomp`.
    pub disable_seccomp: bool,
    /// `-daemonize`: detach once QMP is being served.
    pub daemonize: bool,
    /// `-pidfile`: where to write the gateway's pid.
    pub pidfile: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CliAction {
    /// Run a VM.
    Run(Box<GatewayConfig>),
    /// `-help`: print [`USAGE`].
    Help,
    /// `-version`: print the version.
    Version,
}

/// Every option StratoVirt's command line has.
pub const GATEWAY_OPTIONS: &[OptionSpec] = &[
    OptionSpec::value("name"),
    OptionSpec::value("uuid"),
    OptionSpec::value("kernel"),
    OptionSpec::value("append"),
    OptionSpec::value("initrd"),
    OptionSpec::value("smp"),
    OptionSpec::value("m"),
    OptionSpec::value("machine"),
    OptionSpec::repeated("drive"),
    OptionSpec::repeated("device"),
    OptionSpec::repeated("netdev"),
    OptionSpec::repeated("chardev"),
    OptionSpec::repeated("mon"),
    OptionSpec::repeated("qmp"),
    OptionSpec::value("serial"),
    OptionSpec::repeated("object"),
    OptionSpec::optional("D"),
    OptionSpec::value("pidfile"),
    OptionSpec::flag("daemonize"),
    OptionSpec::flag("disable-seccomp"),
    OptionSpec::value("incoming"),
    OptionSpec::value("mem-path"),
    OptionSpec::flag("help"),
    OptionSpec::flag("h"),
    OptionSpec::flag("version"),
];

/// The `-help` text.
pub const USAGE: &str = "\
Usage: flotilla -kernel PATH -qmp unix:PATH,server,nowait [options]
StratoVirt-compatible VMM front end (microvm machine).

  -name NAME                 VM name (1..255 characters)
  -uuid UUID                 VM UUID
  -kernel PATH               bzImage or ELF vmlinux
  -append CMDLINE            kernel command line
  -initrd PATH               initial ramdisk
  -smp [cpus=]N              vCPUs, 1..254 (default 1)
  -m N[M|G]                  memory, 256M..512G (default 256M)
  -machine [type=]microvm[,dump-guest-core=on|off][,mem-share=on|off]
  -drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,throttling.iops-total=N]
         [,if=none][,format=raw][,aio=native|io_uring|off]
  -device virtio-blk-device,drive=ID[,id=ID][,serial=S][,iothread=T][,num-queues=N]
  -device virtio-net-device,netdev=ID[,id=ID][,mac=MAC][,iothread=T]
  -netdev tap,id=ID,ifname=NAME|fd=N|fds=N
  -object iothread,id=ID
  -chardev stdio|pty|file|socket,id=ID[,path=PATH][,host=H,port=N][,server,nowait]
  -mon chardev=ID[,id=ID],mode=control
                             QMP on a socket chardev
  -qmp unix:PATH,server,nowait | tcp:HOST:PORT,server,nowait
  -serial stdio|chardev:ID|file:PATH
  -D [FILE]                  log to FILE (or stderr)
  -disable-seccomp           no seccomp filters
  -help, -version

Not implemented yet (refused): -incoming, -mem-path, machine q35,
format=qcow2, PCI/balloon/rng/vsock/console devices, vhost-net.";

/// Parses the arguments after the program name.
pub fn parse_args<I, S>(args: I) -> Result<CliAction, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let opts = options::parse(GATEWAY_OPTIONS, args)?;
    if opts.has("help") || opts.has("h") {
        return Ok(CliAction::Help);
    }
    if opts.has("version") {
        return Ok(CliAction::Version);
    }
    GatewayConfig::from_options(&opts).map(|c| CliAction::Run(Box::new(c)))
}

fn not_implemented(what: &str, issue: Option<u8>) -> CliError {
    CliError::NotImplemented {
        what: what.to_string(),
        issue,
    }
}

impl GatewayConfig {
    /// Builds and validates the configuration.
    pub fn from_options(opts: &ParsedOptions) -> Result<Self, CliError> {
        // Valid StratoVirt that we do not do yet, before anything else: the message should
        // name the real obstacle.
        // StratoVirt: hugepages and the balloon exclude each other (inflated hugepages free
        // nothing). Said before the generic refusal of -mem-path, which would hide it.
        if opts.has("mem-path")
            && opts
                .values("device")
                .any(|d| d.starts_with("virtio-balloon"))
        {
            return Err(CliError::invalid(
                "device",
                "virtio-balloon-device and -mem-path are mutually exclusive (a balloon cannot give hugepages back)",
            ));
        }
        for (option, issue) in [("incoming", None), ("mem-path", None)] {
            if opts.has(option) {
                return Err(not_implemented(&format!("-{option}"), issue));
            }
        }
        let machine = opts
            .value("machine")
            .map(parse_machine)
            .transpose()?
            .unwrap_or_default();
        let kernel = opts
            .value("kernel")
            .ok_or_else(|| CliError::Missing("option '-kernel' is required".into()))?;
        let drives = collect(opts, "drive", devices::parse_drive)?;
        let devices = collect(opts, "device", devices::parse_device)?;
        let netdevs = collect(opts, "netdev", devices::parse_netdev)?;
        let objects = collect(opts, "object", devices::parse_object)?;
        let chardevs = collect(opts, "chardev", chardev::parse_chardev)?;
        let monitors = collect(opts, "mon", chardev::parse_mon)?;
        let mut qmp = collect(opts, "qmp", chardev::parse_qmp)?;
        let serial = opts
            .value("serial")
            .map(chardev::parse_serial)
            .transpose()?;
        let iothreads: Vec<String> = objects
            .into_iter()
            .map(|o| match o {
                ObjectConfig::Iothread(id) => id,
            })
            .collect();

        unique("drive", drives.iter().map(|d| d.id.as_str()))?;
        unique("device", devices.iter().filter_map(|d| d.id()))?;
        unique("netdev", netdevs.iter().map(|n| n.id.as_str()))?;
        unique("object", iothreads.iter().map(String::as_str))?;
        unique("chardev", chardevs.iter().map(|c| c.id.as_str()))?;
        check_devices(&devices, &drives, &netdevs, &iothreads)?;

        let mut chardev_users: HashSet<&str> = HashSet::new();
        for mon in &monitors {
            let c = find_chardev(&chardevs, "mon", &mon.chardev)?;
            if !chardev_users.insert(&c.id) {
                return Err(CliError::invalid(
                    "mon",
                    format!("chardev '{}' is used twice", c.id),
                ));
            }
            match &c.backend {
                ChardevBackend::Socket(addr) => qmp.push(addr.clone()),
                _ => {
                    return Err(CliError::invalid(
                        "mon",
                        format!("chardev '{}' must be a socket to serve QMP", c.id),
                    ))
                }
            }
        }
        let serial = match serial {
            None => None,
            Some(SerialArg::Stdio) => Some(SerialConfig::Stdio),
            Some(SerialArg::File(p)) => Some(SerialConfig::File(p)),
            Some(SerialArg::Chardev(id)) => {
                let c = find_chardev(&chardevs, "serial", &id)?;
                if !chardev_users.insert(&c.id) {
                    return Err(CliError::invalid(
                        "serial",
                        format!("chardev '{id}' is already used by -mon"),
                    ));
                }
                match &c.backend {
                    ChardevBackend::Stdio => Some(SerialConfig::Stdio),
                    ChardevBackend::File(p) => Some(SerialConfig::File(p.clone())),
                    ChardevBackend::Pty => {
                        return Err(not_implemented("-serial on a pty chardev", None))
                    }
                    ChardevBackend::Socket(_) => {
                        return Err(not_implemented("-serial on a socket chardev", None))
                    }
                }
            }
        };
        if let Some(unused) = chardevs
            .iter()
            .find(|c| !chardev_users.contains(c.id.as_str()))
        {
            return Err(CliError::invalid(
                "chardev",
                format!(
                    "'{}' is not used by -mon or -serial (virtio-console is not implemented yet)",
                    unused.id
                ),
            ));
        }
        if qmp.is_empty() {
            return Err(CliError::Missing(
                "a QMP channel is required: -qmp unix:PATH,server,nowait \
                 (or -chardev socket,...,server,nowait with -mon chardev=ID,mode=control)"
                    .into(),
            ));
        }
        unique_listeners(&qmp)?;

        Ok(GatewayConfig {
            name: opts.value("name").map(parse_name).transpose()?,
            uuid: opts.value("uuid").map(parse_uuid).transpose()?,
            kernel: PathBuf::from(kernel),
            initrd: opts.value("initrd").map(PathBuf::from),
            cmdline: opts.value("append").unwrap_or_default().to_string(),
            vcpus: opts.value("smp").map(parse_smp).transpose()?.unwrap_or(1),
            mem_mib: opts
                .value("m")
                .map(parse_mem_mib)
                .transpose()?
                .unwrap_or(MIN_MEM_MIB),
            machine,
            drives,
            devices,
            netdevs,
            iothreads,
            chardevs,
            qmp,
            serial,
            log: opts.has("D").then(|| opts.value("D").map(PathBuf::from)),
            disable_seccomp: opts.has("disable-seccomp"),
            daemonize: opts.has("daemonize"),
            pidfile: opts.value("pidfile").map(PathBuf::from),
        })
        .and_then(|c: GatewayConfig| {
            if c.daemonize && c.serial == Some(SerialConfig::Stdio) {
                return Err(CliError::invalid(
                    "daemonize",
                    "a daemon has no stdio for '-serial stdio'",
                ));
            }
            if c.pidfile.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(CliError::invalid("pidfile", "empty path"));
            }
            Ok(c)
        })
    }
}

fn collect<T>(
    opts: &ParsedOptions,
    option: &str,
    parse: fn(&str) -> Result<T, CliError>,
) -> Result<Vec<T>, CliError> {
    opts.values(option).map(parse).collect()
}

fn unique<'a>(option: &str, ids: impl Iterator<Item = &'a str>) -> Result<(), CliError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(CliError::invalid(
                option,
                format!("id '{id}' is used twice"),
            ));
        }
    }
    Ok(())
}

fn unique_listeners(addrs: &[ListenAddr]) -> Result<(), CliError> {
    for (i, a) in addrs.iter().enumerate() {
        if addrs[..i].contains(a) {
            return Err(CliError::invalid("qmp", format!("{a} is given twice")));
        }
    }
    Ok(())
}

fn find_chardev<'a>(
    chardevs: &'a [ChardevConfig],
    option: &str,
    id: &str,
) -> Result<&'a ChardevConfig, CliError> {
    chardevs
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| CliError::invalid(option, format!("no -chardev with id '{id}'")))
}

/// Cross-references: every device names an existing backend, each backend is used exactly
/// once, iothreads exist, and the microvm limits hold.
fn check_devices(
    devices: &[DeviceConfig],
    drives: &[DriveConfig],
    netdevs: &[NetdevConfig],
    iothreads: &[String],
) -> Result<(), CliError> {
    let mut used_drives = HashSet::new();
    let mut used_netdevs = HashSet::new();
    let mut balloons = 0;
    for d in devices {
        if let Some(t) = d.iothread() {
            if !iothreads.iter().any(|i| i == t) {
                return Err(CliError::invalid(
                    "device",
                    format!("no -object iothread with id '{t}'"),
                ));
            }
        }
        match d {
            DeviceConfig::Blk(b) => {
                if !drives.iter().any(|dr| dr.id == b.drive) {
                    return Err(CliError::invalid(
                        "device",
                        format!("no -drive with id '{}'", b.drive),
                    ));
                }
                if !used_drives.insert(b.drive.as_str()) {
                    return Err(CliError::invalid(
                        "device",
                        format!("drive '{}' is used by two devices", b.drive),
                    ));
                }
            }
            DeviceConfig::Balloon(_) => {
                if balloons > 0 {
                    return Err(CliError::invalid(
                        "device",
                        "only one virtio-balloon-device per VM",
                    ));
                }
                balloons += 1;
            }
            DeviceConfig::Net(n) => {
                if !netdevs.iter().any(|nd| nd.id == n.netdev) {
                    return Err(CliError::invalid(
                        "device",
                        format!("no -netdev with id '{}'", n.netdev),
                    ));
                }
                if !used_netdevs.insert(n.netdev.as_str()) {
                    return Err(CliError::invalid(
                        "device",
                        format!("netdev '{}' is used by two devices", n.netdev),
                    ));
                }
            }
        }
    }
    if let Some(d) = drives.iter().find(|d| !used_drives.contains(d.id.as_str())) {
        return Err(CliError::invalid(
            "drive",
            format!("'{}' is not used by any -device", d.id),
        ));
    }
    if let Some(n) = netdevs
        .iter()
        .find(|n| !used_netdevs.contains(n.id.as_str()))
    {
        return Err(CliError::invalid(
            "netdev",
            format!("'{}' is not used by any -device", n.id),
        ));
    }
    if used_drives.len() > MAX_DISKS {
        return Err(CliError::invalid(
            "device",
            format!("at most {MAX_DISKS} disks on a microvm"),
        ));
    }
    if used_netdevs.len() > MAX_NICS {
        return Err(CliError::invalid(
            "device",
            format!("at most {MAX_NICS} network cards on a microvm"),
        ));
    }
    Ok(())
}

/// `-machine [type=]microvm|q35[,dump-guest-core=on|off][,mem-share=on|off]`.
fn parse_machine(text: &str) -> Result<MachineConfig, CliError> {
    let kv = KeyValues::parse("machine", text, Some("type"))?;
    kv.check_keys(&["type", "dump-guest-core", "mem-share"])?;
    match kv.get("type").map(str::to_ascii_lowercase).as_deref() {
        None | Some("microvm") => {}
        Some("q35") => return Err(not_implemented("-machine q35 (the standard VM)", Some(4))),
        Some(_) => {
            let t = kv.get("type").unwrap_or_default();
            return Err(kv.invalid("type", t, "expected microvm or q35").into());
        }
    }
    Ok(MachineConfig {
        dump_guest_core: kv.get_bool("dump-guest-core")?.unwrap_or(false),
        mem_share: kv.get_bool("mem-share")?.unwrap_or(false),
    })
}

/// `-uuid xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits).
fn parse_uuid(text: &str) -> Result<String, CliError> {
    let groups: Vec<&str> = text.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let hex = groups
        .iter()
        .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
    if lengths != [8, 4, 4, 4, 12] || !hex {
        return Err(CliError::invalid(
            "uuid",
            format!("'{text}': expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
        ));
    }
    Ok(text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests;
