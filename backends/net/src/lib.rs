//! flotilla-net: a vhost-user virtio-net backend on a tap device.
//!
//! The modules follow a frame through the device: [`tap`] owns the tap fd,
//! [`chain`] turns guest descriptor chains into iovecs, [`header`] checks
//! and fixes the virtio-net header, [`rx`] and [`tx`] are the two queue
//! workers ([`ring`] publishes multi-buffer receive completions at once),
//! [`config`] is what the guest negotiates, [`stats`] counts, and
//! [`backend`] ties them to `vhost-user-backend`. [`run`] is the program.

#![warn(missing_docs)]

pub mod backend;
pub mod chain;
pub mod config;
pub mod header;
pub mod pacing;
pub mod ring;
pub mod rx;
pub mod sandbox;
pub mod stats;
pub mod tap;
pub mod tx;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use flotilla_backend::cli::VhostUserArgs;
use flotilla_backend::jail::Jail;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::NetBackend;
use crate::config::MacAddr;
use crate::tap::{Tap, TapError};

/// Guest memory as the backend maps it (no dirty-page bitmap: the backend
/// does not take part in live migration yet).
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors of flotilla-net.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Invalid command-line combination.
    #[error("{0}")]
    Options(String),
    /// The shared backend code failed.
    #[error(transparent)]
    Backend(#[from] flotilla_backend::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The flotilla-net command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-net",
    version,
    about = "vhost-user virtio-net backend on a tap device",
    args_override_self = true
)]
pub struct Args {
    /// vhost-user program conventions (--socket-path, --fd, --print-capabilities, logging).
    #[command(flatten)]
    pub vhost_user: VhostUserArgs,

    /// Serve this already-open tap fd (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR),
    /// handed over by the parent; the backend opens nothing itself.
    #[arg(long, value_name = "N", conflicts_with = "tap")]
    pub tap_fd: Option<RawFd>,

    /// Open (or create) the tap IFNAME through /dev/net/tun (standalone use).
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,

    /// MAC address offered to the guest (default: random 52:54:00:xx:xx:xx).
    #[arg(long, value_name = "XX:XX:XX:XX:XX:XX")]
    pub mac: Option<MacAddr>,

    /// Busy-poll each queue for 50 µs after it runs dry (the transmit ring,
    /// the tap, or the receive ring) before sleeping: fewer guest kicks and
    /// wakeups for a busy NIC, at the cost of CPU time.
    #[arg(long)]
    pub poll: bool,
}

/// The `--print-capabilities` document.
pub fn capabilities() -> String {
    flotilla_backend::cli::capabilities("net", &[])
}

/// The tap the command line names, opened before
/// `flotilla_backend::daemon::prepare`: the jail's first step moves the
/// process into a network namespace of its own, and a tap created by name
/// after that would live there, out of the host's reach.
pub fn open_tap(args: &Args) -> Result<Tap> {
    match (args.tap_fd, &args.tap) {
        (Some(fd), None) => Ok(Tap::from_fd(fd)?),
        (None, Some(name)) => Ok(Tap::open(name)?),
        _ => Err(Error::Options(
            "exactly one of --tap-fd and --tap must be given".into(),
        )),
    }
}

/// Runs the program on `tap` ([`open_tap`]) after
/// `flotilla_backend::daemon::prepare`.
pub fn run(args: &Args, tap: Tap) -> Result<()> {
    let connection = args.vhost_user.connection()?;
    let mac = args.mac.unwrap_or_else(MacAddr::random);
    log::info!(
        "tap {}, mac {mac}{}",
        tap.name(),
        if args.poll { ", busy-polling" } else { "" }
    );
    // The tap fd (handed over, or opened before the jail noted the inherited
    // fds) is the device's; any other inherited fd is closed when the jail is
    // entered.
    let jail = Jail::new(&args.vhost_user, sandbox::policy()).keep_fd(tap.as_raw_fd());
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = Arc::new(NetBackend::new(tap, mac, mem.clone(), args.poll));
    let listeners = backend.listeners();
    let stats = backend.stats();
    let result = flotilla_backend::daemon::serve(
        "flotilla-net",
        backend,
        mem,
        &connection,
        &jail,
        |daemon| {
            let handlers = daemon.get_epoll_handlers();
            for (thread, fd, events, id) in listeners {
                let handler = handlers
                    .get(thread)
                    .ok_or_else(|| format!("no worker thread {thread}"))?;
                handler
                    .register_listener(fd, events, id)
                    .map_err(|e| format!("worker {thread}: watching the tap: {e}"))?;
            }
            Ok(())
        },
    );
    log::info!("{stats}");
    result?;
    Ok(())
}
