//! Turning a [`GatewayConfig`] into running processes: one `flotilla-blk` per disk (the
//! gateway opens the image and hands the descriptor over; the backend opens no path), then
//! the core with its control socket and one connected vhost-user socket per disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Child;

use super::backend::{balloon_spec, blk_spec, net_spec, BackendSpec, BlkOptions};
use super::pidfd::Pidfd;
use super::spawn::{sibling_program, spawn_with_fds, FIRST_CHILD_FD};
use super::tap;
use crate::cli::devices::{
    AioEngine, BlkDeviceConfig, DeviceConfig, DriveConfig, NetDeviceConfig, TapConfig,
};
use crate::cli::{GatewayConfig, SerialConfig};

/// Disk slots of microvm (the core's `blk0`..`blk5`), cold- and hot-plugged disks together.
pub const BLK_SLOTS: usize = 6;
/// NIC slots of microvm (the core's `net0`, `net1`: the guest's eth0 and eth1).
pub const NET_SLOTS: usize = 2;

/// Why the VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Something the command line asks for is not available yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(String),
    /// A disk image could not be opened.
    #[error("drive '{id}': cannot open '{path}': {source}")]
    Image {
        /// Drive id.
        id: String,
        /// Image path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A tap could not be opened.
    #[error("netdev '{id}': {source}")]
    Tap {
        /// Netdev id.
        id: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A process or socket could not be created.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl LaunchError {
    /// Exit status: 2 for the user's input (unsupported option, unreadable image), 1 else.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Spawn { .. } => 1,
            _ => 2,
        }
    }
}

/// A backend started with the VM (cold plug), to be handed to the [`super::Supervisor`].
pub struct ColdBackend {
    /// Device id.
    pub id: String,
    /// QMP driver name.
    pub driver: &'static str,
    /// The `-drive` it serves (disks).
    pub drive: Option<String>,
    /// The `-netdev` it serves (NICs).
    pub netdev: Option<String>,
    /// The core's slot (`blk0`, ...): cold-plugged disks fill the first slots in order.
    pub slot: String,
    /// How to start it again.
    pub spec: BackendSpec,
    /// The running process (set once started).
    pub pidfd: Option<Pidfd>,
}

/// The VM's processes.
pub struct LaunchedVm {
    /// `flotilla-vmm`.
    pub core: Child,
    /// Our end of the control socket.
    pub control: UnixStream,
    /// The backends, in slot order.
    pub backends: Vec<ColdBackend>,
}

/// A device the core gets on its command line: `-device` text naming chardev `vu-ID`, and the
/// core's end of the backend's socketpair.
struct CoreDevice {
    id: String,
    device: String,
    core_end: UnixStream,
}

fn spawn_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Spawn { what, source }
}

/// `-drive`'s backend options (the device adds its own: serial, queues).
pub fn drive_options(drive: &DriveConfig) -> BlkOptions {
    BlkOptions {
        image_name: drive.file.to_string_lossy().into_owned(),
        read_only: drive.read_only,
        direct: drive.direct,
        iops: drive.iops,
        aio: drive.aio.map(|aio| match aio {
            AioEngine::Native => "native",
            AioEngine::IoUring => "io_uring",
            AioEngine::Off => "sync",
        }),
        ..BlkOptions::default()
    }
}

/// Opens an image for a backend: read-write unless `read_only`.
pub fn open_image(path: &std::path::Path, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

/// The core's command line; device `k`'s socket is inherited at fd 4+k (3 is the control
/// socket).
fn core_args(config: &GatewayConfig, devices: &[CoreDevice]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-kernel".into(),
        config.kernel.to_string_lossy().into_owned(),
        "-m".into(),
        config.mem_mib.to_string(),
        "-smp".into(),
        config.vcpus.to_string(),
        "-control-fd".into(),
        FIRST_CHILD_FD.to_string(),
    ];
    if let Some(initrd) = &config.initrd {
        args.extend(["-initrd".into(), initrd.to_string_lossy().into_owned()]);
    }
    if !config.cmdline.is_empty() {
        args.extend(["-append".into(), config.cmdline.clone()]);
    }
    if let Some(name) = &config.name {
        args.extend(["-name".into(), name.clone()]);
    }
    match &config.serial {
        Some(SerialConfig::Stdio) => args.extend(["-serial".into(), "stdio".into()]),
        Some(SerialConfig::File(p)) => {
            args.extend(["-serial".into(), format!("file:{}", p.display())])
        }
        None => {}
    }
    if config.disable_seccomp {
        // The core's filters only; its namespaces, empty root and dropped privileges stay.
        args.push("-disable-seccomp".into());
    }
    match &config.log {
        Some(Some(path)) => args.extend(["-D".into(), path.to_string_lossy().into_owned()]),
        Some(None) => args.push("-D".into()),
        None => {}
    }
    for (k, dev) in devices.iter().enumerate() {
        let fd = FIRST_CHILD_FD + 1 + k as i32;
        args.extend([
            "-chardev".into(),
            format!("socket,id=vu-{},fd={fd}", dev.id),
            "-device".into(),
            dev.device.clone(),
        ]);
    }
    args
}

/// Starts the backends and the core.
pub fn launch_vm(config: &GatewayConfig) -> Result<LaunchedVm, LaunchError> {
    let mut core_devices = Vec::new();
    let mut backends = Vec::new();
    let disks: Vec<&BlkDeviceConfig> = config
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceConfig::Blk(b) => Some(b),
            _ => None,
        })
        .collect();
    if disks.len() > BLK_SLOTS {
        return Err(LaunchError::NotImplemented(format!(
            "more than {BLK_SLOTS} disks (microvm has {BLK_SLOTS} disk slots, hot-plugged ones included); {} disks",
            disks.len()
        )));
    }
    let nics: Vec<&NetDeviceConfig> = config
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceConfig::Net(n) => Some(n),
            _ => None,
        })
        .collect();
    if nics.len() > NET_SLOTS {
        return Err(LaunchError::NotImplemented(format!(
            "more than {NET_SLOTS} NICs (microvm has {NET_SLOTS} NIC slots, hot-plugged ones included); {} NICs",
            nics.len()
        )));
    }
    let blk_program = sibling_program("flotilla-blk", "FLOTILLA_BLK");
    for (n, dev) in disks.into_iter().enumerate() {
        let id = dev.id.clone().unwrap_or_else(|| format!("blk{n}"));
        let drive = config
            .drives
            .iter()
            .find(|d| d.id == dev.drive)
            .ok_or_else(|| {
                LaunchError::NotImplemented(format!("device '{id}' without its -drive"))
            })?;
        let image =
            open_image(&drive.file, drive.read_only).map_err(|source| LaunchError::Image {
                id: drive.id.clone(),
                path: drive.file.display().to_string(),
                source,
            })?;
        let opts = BlkOptions {
            num_queues: dev.num_queues,
            serial: dev.serial.clone(),
            ..drive_options(drive)
        };
        let spec = blk_spec(blk_program.clone(), &opts, image.into());
        let device = format!(
            "vhost-user-blk-device,id={id},chardev=vu-{id},num-queues={}",
            dev.num_queues.unwrap_or(1)
        );
        start_cold(
            &mut core_devices,
            &mut backends,
            ColdBackend {
                id,
                driver: "virtio-blk-device",
                drive: Some(drive.id.clone()),
                netdev: None,
                slot: format!("blk{n}"),
                spec,
                pidfd: None,
            },
            device,
        )?;
    }
    let net_program = sibling_program("flotilla-net", "FLOTILLA_NET");
    for (n, nic) in nics.into_iter().enumerate() {
        let id = nic.id.clone().unwrap_or_else(|| format!("net{n}"));
        let netdev = config
            .netdevs
            .iter()
            .find(|d| d.id == nic.netdev)
            .ok_or_else(|| {
                LaunchError::NotImplemented(format!("device '{id}' without its -netdev"))
            })?;
        let tap = match &netdev.tap {
            TapConfig::Ifname(name) => tap::open_tap(name),
            TapConfig::Fd(fd) => tap::adopt_tap(*fd),
        }
        .map_err(|source| LaunchError::Tap {
            id: netdev.id.clone(),
            source,
        })?;
        let spec = net_spec(net_program.clone(), nic.mac, tap);
        let mut device = format!("vhost-user-net-device,id={id},chardev=vu-{id}");
        if let Some(m) = nic.mac {
            device.push_str(&format!(
                ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ));
        }
        start_cold(
            &mut core_devices,
            &mut backends,
            ColdBackend {
                id,
                driver: "virtio-net-device",
                drive: None,
                netdev: Some(netdev.id.clone()),
                slot: format!("net{n}"),
                spec,
                pidfd: None,
            },
            device,
        )?;
    }
    for dev in config.devices.iter().filter_map(|d| match d {
        DeviceConfig::Balloon(b) => Some(b),
        _ => None,
    }) {
        let id = dev.id.clone().unwrap_or_else(|| "balloon0".into());
        let program = sibling_program("flotilla-balloon", "FLOTILLA_BALLOON");
        let spec = balloon_spec(program, dev.deflate_on_oom);
        let device = format!(
            "vhost-user-balloon-device,id={id},chardev=vu-{id},deflate-on-oom={}",
            if dev.deflate_on_oom { "on" } else { "off" }
        );
        start_cold(
            &mut core_devices,
            &mut backends,
            ColdBackend {
                id,
                driver: "virtio-balloon-device",
                drive: None,
                netdev: None,
                slot: "balloon0".into(),
                spec,
                pidfd: None,
            },
            device,
        )?;
    }
    let (control, core_control) =
        UnixStream::pair().map_err(spawn_err("the control socketpair"))?;
    let mut fds: Vec<&dyn AsRawFd> = vec![&core_control];
    fds.extend(core_devices.iter().map(|d| &d.core_end as &dyn AsRawFd));
    let core_program = sibling_program("flotilla-vmm", "FLOTILLA_VMM");
    let core = spawn_with_fds(&core_program, &core_args(config, &core_devices), &fds)
        .map_err(spawn_err(core_program.display().to_string()))?;
    log::info!("core: flotilla-vmm pid {}", core.id());
    Ok(LaunchedVm {
        core,
        control,
        backends,
    })
}

/// Starts a cold-plugged backend; its socket goes to the core with `device`.
fn start_cold(
    core_devices: &mut Vec<CoreDevice>,
    backends: &mut Vec<ColdBackend>,
    mut backend: ColdBackend,
    device: String,
) -> Result<(), LaunchError> {
    let inc = backend.spec.spawn().map_err(spawn_err(format!(
        "{} for '{}'",
        backend.spec.program.display(),
        backend.id
    )))?;
    log::info!(
        "{} '{}': {} pid {}",
        backend.driver,
        backend.id,
        backend.spec.program.display(),
        inc.pidfd.pid()
    );
    core_devices.push(CoreDevice {
        id: backend.id.clone(),
        device,
        core_end: inc.core_end,
    });
    backend.pidfd = Some(inc.pidfd);
    backends.push(backend);
    Ok(())
}
