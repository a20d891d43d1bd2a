//! The command-line flags every vhost-user backend program accepts.
//!
//! They follow the vhost-user specification's "Backend program conventions"
//! so that QEMU, Cloud Hypervisor and libvirt can start our backends the same
//! way they start virtiofsd or qemu-storage-daemon.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::jail::{SandboxMode, SeccompMode};
use crate::{Error, Result};

/// Flags common to all flotilla backends; `#[command(flatten)]` them into the
/// device program's own parser.
#[derive(Debug, Clone, clap::Args)]
pub struct VhostUserArgs {
    /// Listen on this unix socket path and serve the first frontend that connects.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Serve the vhost-user socket inherited as this file descriptor: either an
    /// already-connected socket (a socketpair end from a parent) or a listening one.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON on stdout and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Write log lines to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Minimum level of the log lines written (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Confinement: namespaces + pivot_root into an empty root (default),
    /// chroot + Landlock (no namespaces), or none (debugging).
    #[arg(long, value_enum, value_name = "MODE", default_value = "namespace")]
    pub sandbox: SandboxMode,

    /// Syscalls outside the backend's allowlist: kill the process (default),
    /// log them (audit) and let them run, or no filter (-disable-seccomp).
    #[arg(long, value_enum, value_name = "MODE", default_value = "kill")]
    pub seccomp: SeccompMode,
}

/// Where the frontend connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Bind and listen on this path.
    SocketPath(PathBuf),
    /// Use this inherited file descriptor.
    Fd(RawFd),
}

impl VhostUserArgs {
    /// Resolves `--socket-path` / `--fd`; exactly one must be present.
    ///
    /// Checked here rather than with clap's `conflicts_with` because
    /// `--print-capabilities` needs neither.
    pub fn connection(&self) -> Result<Connection> {
        match (&self.socket_path, self.fd) {
            (Some(path), None) => Ok(Connection::SocketPath(path.clone())),
            (None, Some(fd)) => Ok(Connection::Fd(fd)),
            _ => Err(Error::ConnectionArgs),
        }
    }
}

/// The JSON document `--print-capabilities` prints.
///
/// `device_type` is the vhost-user device type string of the specification
/// ("block", "net", ...); `features` lists optional features a management
/// tool may look for (the specification defines none for block; we keep the
/// array so that callers can add their own).
pub fn capabilities(device_type: &str, features: &[&str]) -> String {
    let mut doc = serde_json::json!({ "type": device_type });
    if !features.is_empty() {
        doc["features"] = serde_json::json!(features);
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Prog {
        #[command(flatten)]
        vu: VhostUserArgs,
    }

    #[test]
    fn socket_path_xor_fd() {
        let p = Prog::try_parse_from(["x", "--socket-path", "/tmp/s"]).unwrap();
        assert_eq!(
            p.vu.connection().unwrap(),
            Connection::SocketPath("/tmp/s".into())
        );
        let p = Prog::try_parse_from(["x", "--fd", "3"]).unwrap();
        assert_eq!(p.vu.connection().unwrap(), Connection::Fd(3));
        let p = Prog::try_parse_from(["x", "--fd", "3", "--socket-path", "/s"]).unwrap();
        assert!(matches!(p.vu.connection(), Err(Error::ConnectionArgs)));
        assert_eq!(p.vu.sandbox, SandboxMode::Namespace);
        assert_eq!(p.vu.seccomp, SeccompMode::Kill);
        let p = Prog::try_parse_from(["x", "--sandbox", "chroot", "--seccomp", "log"]).unwrap();
        assert_eq!(p.vu.sandbox, SandboxMode::Chroot);
        assert_eq!(p.vu.seccomp, SeccompMode::Log);
        let p = Prog::try_parse_from(["x", "--sandbox=none", "--seccomp=none"]).unwrap();
        assert_eq!(p.vu.sandbox, SandboxMode::None);
        assert_eq!(p.vu.seccomp, SeccompMode::None);
        assert!(Prog::try_parse_from(["x", "--seccomp", "trap"]).is_err());
        let p = Prog::try_parse_from(["x", "--print-capabilities"]).unwrap();
        assert!(p.vu.print_capabilities);
        assert!(matches!(p.vu.connection(), Err(Error::ConnectionArgs)));
    }

    #[test]
    fn capabilities_json() {
        assert_eq!(capabilities("block", &[]), r#"{"type":"block"}"#);
        let v: serde_json::Value = serde_json::from_str(&capabilities("net", &["a"])).unwrap();
        assert_eq!(v["type"], "net");
        assert_eq!(v["features"][0], "a");
    }
}
