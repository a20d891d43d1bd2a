//! Turning a [`GatewayConfig`] into running processes: one `flotilla-blk` per disk (the
//! gateway opens the image and hands the descriptor over; the backend opens no path), then
//! the core with its control socket and one connected vhost-user socket per disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Child;

use super::spawn::{sibling_program, spawn_with_fds, FIRST_CHILD_FD};
use crate::cli::devices::{AioEngine, BlkDeviceConfig, DeviceConfig, DriveConfig};
use crate::cli::{GatewayConfig, SerialConfig};

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

/// The VM's processes.
pub struct LaunchedVm {
    /// `flotilla-vmm`.
    pub core: Child,
    /// Our end of the control socket.
    pub control: UnixStream,
    /// The backends, by device id.
    pub backends: Vec<(String, Child)>,
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

/// The flotilla-blk command line for a disk whose socket is fd 3 and image fd 4.
fn blk_args(drive: &DriveConfig, dev: &BlkDeviceConfig) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--fd".into(),
        FIRST_CHILD_FD.to_string(),
        "--image".into(),
        drive.file.to_string_lossy().into_owned(),
        "--image-fd".into(),
        (FIRST_CHILD_FD + 1).to_string(),
    ];
    if drive.read_only {
        args.push("--readonly".into());
    }
    if drive.direct {
        args.push("--direct".into());
    }
    if let Some(q) = dev.num_queues {
        args.extend(["--num-queues".into(), q.to_string()]);
    }
    if let Some(serial) = &dev.serial {
        args.extend(["--serial".into(), serial.clone()]);
    }
    if let Some(iops) = drive.iops {
        args.extend(["--iops-total".into(), iops.to_string()]);
    }
    if let Some(aio) = drive.aio {
        let engine = match aio {
            AioEngine::Native => "native",
            AioEngine::IoUring => "io_uring",
            AioEngine::Off => "sync",
        };
        args.extend(["--aio".into(), engine.into()]);
    }
    args
}

fn open_image(drive: &DriveConfig) -> Result<File, LaunchError> {
    OpenOptions::new()
        .read(true)
        .write(!drive.read_only)
        .open(&drive.file)
        .map_err(|source| LaunchError::Image {
            id: drive.id.clone(),
            path: drive.file.display().to_string(),
            source,
        })
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
        let image = open_image(drive)?;
        let (core_end, blk_end) = UnixStream::pair().map_err(spawn_err("a socketpair"))?;
        let child = spawn_with_fds(&blk_program, &blk_args(drive, dev), &[&blk_end, &image])
            .map_err(spawn_err(format!("{} for '{id}'", blk_program.display())))?;
        log::info!("disk '{id}': flotilla-blk pid {}", child.id());
        backends.push((id.clone(), child));
        disks.push(Disk {
            id,
            num_queues: dev.num_queues.unwrap_or(1),
            core_end,
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
