//! Code shared by every flotilla vhost-user backend program (flotilla-blk,
//! flotilla-net, flotilla-balloon), and the jail primitives every flotilla
//! process uses ([`jail`]: seccomp, capabilities, rlimits, namespaces, the
//! empty root; the core and the gateway build this crate without its default
//! `daemon` feature and get only those).
//!
//! A backend is a standard vhost-user backend program as described in the
//! vhost-user specification, section "Backend program conventions": it takes
//! `--socket-path` or `--fd`, answers `--print-capabilities`, never
//! daemonizes, and exits cleanly on SIGTERM. That behaviour lives here once so
//! that every device binary only has to describe its device.
//!
//! The pieces, in the order a program uses them:
//! - [`cli::VhostUserArgs`]: the common command-line flags, flattened into
//!   each program's own clap parser;
//! - [`logger`]: `log` output to stderr or a file, and a rate limiter for
//!   lines a guest can trigger at will;
//! - [`daemon::prepare`]: signal handling (SIGTERM/SIGINT end the process);
//! - [`daemon::serve`]: connect, run the [`sandbox::Sandbox`] hook, serve one
//!   frontend connection until it goes away.
//! - [`inflight`] and [`chain`]: vhost-user inflight I/O tracking (through
//!   [`daemon::serve_tracked`]), so a restarted backend resubmits what its
//!   predecessor had in flight.

#![warn(missing_docs)]

#[cfg(feature = "daemon")]
pub mod chain;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod inflight;
pub mod jail;
#[cfg(feature = "daemon")]
pub mod logger;
#[cfg(feature = "daemon")]
mod relay;
#[cfg(feature = "daemon")]
pub mod sandbox;
pub mod socket;
#[cfg(feature = "test-support")]
pub mod test_support;

/// Re-exported for [`warn_limited!`], so callers need no `log` dependency of their own.
pub use log;

#[cfg(feature = "daemon")]
use std::io;
#[cfg(feature = "daemon")]
use std::path::PathBuf;

/// Errors of the shared backend code.
#[cfg(feature = "daemon")]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither or both of `--socket-path` and `--fd` were given.
    #[error("exactly one of --socket-path and --fd must be given")]
    ConnectionArgs,
    /// The fd given with `--fd` is not a usable unix socket.
    #[error("--fd {fd}: {source}")]
    BadFd {
        /// The fd number from the command line.
        fd: i32,
        /// Why it cannot be used.
        source: io::Error,
    },
    /// Opening the log file failed.
    #[error("cannot open log file {path}: {source}")]
    LogFile {
        /// The path from `--log-file`.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A logger was already installed in this process.
    #[error("cannot install logger: {0}")]
    Logger(#[from] log::SetLoggerError),
    /// Blocking the termination signals or starting the signal thread failed.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// Building the fd relay for an already-connected socket failed.
    #[error("cannot set up the relay for the inherited socket: {0}")]
    Relay(io::Error),
    /// Creating the vhost-user listener failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The device-specific setup hook failed.
    #[error("backend setup: {0}")]
    Setup(String),
    /// The sandbox could not be entered.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// An inflight-tracking message could not be served, and the relay
    /// ended the connection.
    #[error("inflight tracking: {0}")]
    Inflight(String),
    /// The first half of the jail (namespaces) failed.
    #[error("sandbox: {0}")]
    Jail(#[from] jail::Error),
}

/// Result alias of this crate.
#[cfg(feature = "daemon")]
pub type Result<T> = std::result::Result<T, Error>;
