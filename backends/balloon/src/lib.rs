//! flotilla-balloon: a vhost-user virtio-balloon backend whose inflated
//! pages really go back to the host.
//!
//! The modules follow a buffer through the device: [`device`] is what the
//! device is on the wire, [`pfn`] reads and coalesces the PFN arrays of the
//! inflate and deflate queues, [`release`] punches the pages out of the
//! guest memory file, [`stats`] keeps the statistics queue's buffer, and
//! [`backend`] ties them to `vhost-user-backend`. [`run`] is the program.
//!
//! The config space (`num_pages`, `actual`) belongs to the VMM core, which
//! serves it from its vhost-user frontend's cache; this backend is the data
//! path only and keeps no state a restart would need.

#![warn(missing_docs)]

pub mod backend;
pub mod device;
pub mod pfn;
pub mod release;
pub mod sandbox;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use flotilla_backend::cli::VhostUserArgs;
use flotilla_backend::jail::Jail;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BackendOptions, BalloonBackend, STATS_TIMER_EVENT};

/// Guest memory as the backend maps it (no dirty-page bitmap: the backend
/// does not take part in live migration).
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors of flotilla-balloon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host's page size is not the balloon's 4 KiB.
    #[error(
        "host page size is {0} bytes; virtio-balloon pages are 4096 bytes and guest and host \
         page sizes must match"
    )]
    PageSize(i64),
    /// The stats timer could not be created.
    #[error("cannot create the stats timer: {0}")]
    Timer(std::io::Error),
    /// A buffer the guest posted cannot be read.
    #[error("unreadable buffer: {0}")]
    Buffer(String),
    /// The shared backend code failed.
    #[error(transparent)]
    Backend(#[from] flotilla_backend::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The flotilla-balloon command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-balloon",
    version,
    about = "vhost-user virtio-balloon backend that returns inflated guest pages to the host",
    args_override_self = true
)]
pub struct Args {
    /// vhost-user program conventions (--socket-path, --fd, --print-capabilities, logging).
    #[command(flatten)]
    pub vhost_user: VhostUserArgs,

    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest deflates the balloon
    /// by itself instead of OOM-killing.
    #[arg(long)]
    pub deflate_on_oom: bool,

    /// Ask the guest for fresh memory statistics this many seconds after
    /// each update arrives; 0 keeps the first update only.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub stats_interval: u64,
}

/// The `--print-capabilities` document. The vhost-user specification
/// defines no balloon features; "deflate-on-oom" names our own flag.
pub fn capabilities() -> String {
    flotilla_backend::cli::capabilities("balloon", &["deflate-on-oom"])
}

/// Runs the program after `flotilla_backend::daemon::prepare`.
pub fn run(args: &Args) -> Result<()> {
    release::check_host_page_size()?;
    let connection = args.vhost_user.connection()?;
    let opts = BackendOptions {
        deflate_on_oom: args.deflate_on_oom,
        stats_interval: (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval)),
    };
    log::info!(
        "virtio-balloon, deflate-on-oom {}, stats interval {}",
        if opts.deflate_on_oom { "on" } else { "off" },
        opts.stats_interval
            .map_or("off".to_string(), |d| format!("{} s", d.as_secs()))
    );
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = Arc::new(BalloonBackend::new(opts, mem.clone())?);
    let timer = backend.timer_fd();
    flotilla_backend::daemon::serve(
        "flotilla-balloon",
        backend,
        mem,
        &connection,
        &Jail::new(&args.vhost_user, sandbox::policy()),
        |daemon| {
            let handler = daemon
                .get_epoll_handlers()
                .into_iter()
                .next()
                .ok_or_else(|| "no worker thread".to_string())?;
            handler
                .register_listener(timer, vmm_sys_util::epoll::EventSet::IN, STATS_TIMER_EVENT)
                .map_err(|e| format!("watching the stats timer: {e}"))
        },
    )?;
    Ok(())
}
