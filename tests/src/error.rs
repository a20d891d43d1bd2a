//! The harness's error type: every failure says what it was doing and, for
//! timeouts, carries what the command printed so far (a hung guest's serial
//! log is the most useful thing to see).

use std::path::PathBuf;
use std::time::Duration;

use crate::host::Output;

/// Result with the harness [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the test harness (not of the VMM under test: its exit status
/// and output are returned as data).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// `tests/guest/build.sh` failed.
    #[error("building the boot images failed ({status}); build.sh said:\n{stderr}")]
    ImageBuild { status: String, stderr: String },

    /// An expected file is missing (e.g. the flotilla-vmm binary not built).
    #[error("{what} not found at {}{hint}", path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },

    /// A command ran longer than its timeout and was killed. `output` holds
    /// what it printed until then.
    #[error("command timed out after {timeout:?}: {command}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
        tail(&output.stdout), tail(&output.stderr))]
    Timeout {
        command: String,
        timeout: Duration,
        output: Output,
    },

    /// The L1 KVM host VM did not come up after all retries.
    #[error("the L1 KVM host VM did not boot after {attempts} attempt(s): {reason}")]
    L1Boot { attempts: u32, reason: String },

    /// The L1 VM booted but has no usable /dev/kvm.
    #[error("the L1 KVM host VM has no /dev/kvm (kvm-amd did not load); console log: {}", log.display())]
    L1NoKvm { log: PathBuf },

    /// The L1 agent stopped answering or broke the protocol; the VM was killed
    /// and the next command boots a fresh one.
    #[error("the L1 agent failed while running `{command}`: {reason} (console log: {})", log.display())]
    Agent {
        command: String,
        reason: String,
        log: PathBuf,
    },
}

impl Error {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Extension to add context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// Last ~4 KiB of some output, lossily decoded, for error messages.
pub(crate) fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let start = bytes.len().saturating_sub(MAX);
    let mut s = String::from_utf8_lossy(&bytes[start..]).into_owned();
    if start > 0 {
        s.insert_str(0, "[...]");
    }
    s
}
