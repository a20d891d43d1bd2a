//! Turning a [`GatewayConfig`] into running processes: one `flotilla-blk` per disk (the
//! gateway opens the image and hands the descriptor over; the backend opens no path), then
//! the core with its control socket and one connected vhost-user socket per disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Child;

use super::backend::{blk_spec, BackendSpec, BlkOptions};
use super::pidfd::Pidfd;
use super::spawn::{sibling_program, spawn_with_fds, FIRST_CHILD_FD};
use crate::cli::devices::{AioEngine, DeviceConfig, DriveConfig};
use crate::cli::{GatewayConfig, SerialConfig};

/// Disk slots of microvm (the core's `blk0`..`blk5`), cold- and hot-plugged disks together.
pub const BLK_SLOTS: usize = 6;

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
    /// The `-drive` it serves.
    pub drive: String,
    /// The core's slot (`blk0`, ...): cold-plugged disks fill the first slots in order.
    pub slot: String,
    /// How to start it again.
    pub spec: BackendSpec,
    /// The running process.
    pub pidfd: Pidfd,
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

struct Disk {
    id: String,
    num_queues: u16,
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

/// The core's command line; disk `k`'s socket is inherited at fd 4+k (3 is the control socket).
fn core_args(config: &GatewayConfig, disks: &[Disk]) -> Vec<String> {
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
    match &config.log {
        Some(Some(path)) => args.extend(["-D".into(), path.to_string_lossy().into_owned()]),
        Some(None) => args.push("-D".into()),
        None => {}
    }
    for (k, disk) in disks.iter().enumerate() {
        let fd = FIRST_CHILD_FD + 1 + k as i32;
        args.extend([
            "-chardev".into(),
            format!("socket,id=vu-{},fd={fd}", disk.id),
            "-device".into(),
            format!(
                "vhost-user-blk-device,id={},chardev=vu-{},num-queues={}",
                disk.id, disk.id, disk.num_queues
            ),
        ]);
    }
    args
}

/// Starts the backends and the core.
pub fn launch_vm(config: &GatewayConfig) -> Result<LaunchedVm, LaunchError> {
    let mut disks = Vec::new();
    let mut backends = Vec::new();
    let blk_program = sibling_program("flotilla-blk", "FLOTILLA_BLK");
    let disk_count = config
        .devices
        .iter()
        .filter(|d| matches!(d, DeviceConfig::Blk(_)))
        .count();
    if disk_count > BLK_SLOTS {
        return Err(LaunchError::NotImplemented(format!(
            "more than {BLK_SLOTS} disks (microvm has {BLK_SLOTS} disk slots, hot-plugged ones included); {disk_count} disks"
        )));
    }
    for (n, device) in config.devices.iter().enumerate() {
        let dev = match device {
            DeviceConfig::Blk(b) => b,
            DeviceConfig::Net(_) => {
                return Err(LaunchError::NotImplemented(
                    "virtio-net-device (issue 6: flotilla-net)".into(),
                ))
            }
        };
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
        let inc = spec
            .spawn()
            .map_err(spawn_err(format!("{} for '{id}'", blk_program.display())))?;
        log::info!("disk '{id}': flotilla-blk pid {}", inc.pidfd.pid());
        backends.push(ColdBackend {
            id: id.clone(),
            drive: drive.id.clone(),
            slot: format!("blk{}", disks.len()),
            spec,
            pidfd: inc.pidfd,
        });
        disks.push(Disk {
            id,
            num_queues: dev.num_queues.unwrap_or(1),
            core_end: inc.core_end,
        });
    }
    let (control, core_control) =
        UnixStream::pair().map_err(spawn_err("the control socketpair"))?;
    let mut fds: Vec<&dyn AsRawFd> = vec![&core_control];
    fds.extend(disks.iter().map(|d| &d.core_end as &dyn AsRawFd));
    let core_program = sibling_program("flotilla-vmm", "FLOTILLA_VMM");
    let core = spawn_with_fds(&core_program, &core_args(config, &disks), &fds)
        .map_err(spawn_err(core_program.display().to_string()))?;
    log::info!("core: flotilla-vmm pid {}", core.id());
    Ok(LaunchedVm {
        core,
        control,
        backends,
    })
}
