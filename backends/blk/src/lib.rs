//! flotilla-blk: a vhost-user virtio-blk backend serving one raw image.
//!
//! The modules follow a request through the device: [`request`] parses the
//! descriptor chain, [`disk`] owns the image, [`aio`] runs reads, writes
//! and flushes asynchronously, [`throttle`] limits the request rate,
//! [`config`] is what the guest negotiates, and [`backend`] ties them to
//! `vhost-user-backend`, with one [`queue`] worker per request queue.
//! [`run`] is the program.

#![warn(missing_docs)]

pub mod aio;
pub mod backend;
pub mod config;
pub mod disk;
pub mod queue;
pub mod request;
pub mod sandbox;
pub mod throttle;

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_backend::cli::VhostUserArgs;
use flotilla_backend::jail::Jail;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::aio::AioMode;
use crate::backend::{BackendOptions, BlockBackend};
use crate::disk::{Disk, DiskOptions};

/// Guest memory as the backend maps it (no dirty-page bitmap: the backend
/// does not take part in live migration yet).
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors of flotilla-blk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened or used.
    #[error("image {path}: cannot {what}: {source}")]
    Image {
        /// Image path (or name, with --image-fd).
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An I/O engine could not be created.
    #[error("queue {queue}: cannot create the I/O engine: {source}")]
    Engine {
        /// Queue index.
        queue: usize,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Invalid command-line combination.
    #[error("{0}")]
    Options(String),
    /// The shared backend code failed.
    #[error(transparent)]
    Backend(#[from] flotilla_backend::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The flotilla-blk command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-blk",
    version,
    about = "vhost-user virtio-blk backend for one raw image",
    args_override_self = true
)]
pub struct Args {
    /// vhost-user program conventions (--socket-path, --fd, --print-capabilities, logging).
    #[command(flatten)]
    pub vhost_user: VhostUserArgs,

    /// Raw image to serve (with --image-fd only used as its name).
    /// `--blk-file` is the spelling the vhost-user spec gives block backends.
    #[arg(
        long,
        visible_alias = "blk-file",
        value_name = "FILE",
        required_unless_present = "print_capabilities"
    )]
    pub image: Option<PathBuf>,

    /// Serve this already-open image fd instead of opening --image.
    #[arg(long, value_name = "N")]
    pub image_fd: Option<i32>,

    /// Offer a read-only device; writes fail with IOERR.
    /// `--read-only` is the vhost-user spec's spelling.
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// Number of request queues, one worker thread each.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Busy-poll each queue for 50 µs after it runs dry before sleeping on
    /// the kick eventfd: lower latency for busy guests, at some CPU cost.
    #[arg(long)]
    pub poll: bool,

    /// Serial number returned by GET_ID (at most 20 bytes are used).
    #[arg(long, value_name = "S")]
    pub serial: Option<String>,

    /// I/O engine: auto (io_uring if available, else threads), io_uring, native (= io_uring), threads, sync.
    #[arg(long, value_enum, default_value = "auto")]
    pub aio: AioMode,

    /// Limit the device to N requests per second over all queues.
    #[arg(long, value_name = "N")]
    pub iops_total: Option<u64>,
}

/// The `--print-capabilities` document: the vhost-user spec's block
/// features, which tell a management tool it may pass `--read-only` and
/// `--blk-file`.
pub fn capabilities() -> String {
    flotilla_backend::cli::capabilities("block", &["read-only", "blk-file"])
}

/// Runs the program after `flotilla_backend::daemon::prepare`.
pub fn run(args: &Args) -> Result<()> {
    if args.iops_total == Some(0) {
        return Err(Error::Options("--iops-total must be at least 1".into()));
    }
    let connection = args.vhost_user.connection()?;
    let path = args
        .image
        .clone()
        .ok_or_else(|| Error::Options("--image is required".into()))?;
    let disk = Arc::new(Disk::open(&DiskOptions {
        path: path.clone(),
        fd: args.image_fd,
        readonly: args.readonly,
        direct: args.direct,
    })?);
    let serial = args.serial.clone().unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = Arc::new(BlockBackend::new(
        disk,
        &BackendOptions {
            num_queues: args.num_queues,
            serial,
            aio: args.aio,
            iops_total: args.iops_total,
            poll: args.poll,
        },
        mem.clone(),
    )?);
    let listeners = backend.listeners();
    let tracker = backend.inflight_tracker();
    let mut jail = Jail::new(&args.vhost_user, sandbox::policy());
    if let Some(fd) = args.image_fd {
        jail = jail.keep_fd(fd);
    }
    flotilla_backend::daemon::serve_tracked(
        "flotilla-blk",
        backend,
        mem,
        &connection,
        &jail,
        Some(tracker),
        |daemon| {
            let handlers = daemon.get_epoll_handlers();
            for (thread, fd, id) in listeners {
                let handler = handlers
                    .get(thread)
                    .ok_or_else(|| format!("no worker thread {thread}"))?;
                handler
                    .register_listener(fd, vmm_sys_util::epoll::EventSet::IN, id)
                    .map_err(|e| format!("worker {thread}: watching fd {fd}: {e}"))?;
            }
            Ok(())
        },
    )?;
    Ok(())
}
