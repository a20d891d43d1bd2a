//! A small `log` implementation for backend programs, and a rate limiter for
//! log lines a guest can provoke.
//!
//! Backends run under a supervisor that collects stderr, so the default sink
//! is stderr; `--log-file` exists for standalone use. Each line carries the
//! program name and thread name because a backend runs one thread per queue.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Error, Result};

struct Logger {
    program: &'static str,
    level: log::LevelFilter,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let line = format!(
            "{}.{:06} {} {}[{}] {}: {}\n",
            now.as_secs(),
            now.subsec_micros(),
            record.level(),
            self.program,
            thread.name().unwrap_or("?"),
            record.target(),
            record.args()
        );
        // A poisoned lock only means another thread panicked mid-write;
        // logging must go on regardless.
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        // Nowhere to report a failing log sink; drop the line.
        let _ = sink.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.flush();
    }
}

/// The log file's descriptor, -1 when logging to stderr.
static SINK_FD: AtomicI32 = AtomicI32::new(-1);

/// The descriptor of the `--log-file`, if one is open: the jail keeps it
/// and its SIGSYS report writes there too.
pub fn sink_fd() -> Option<RawFd> {
    Some(SINK_FD.load(Ordering::Relaxed)).filter(|&fd| fd >= 0)
}

/// Installs the process logger: lines at `level` or above go to `file`
/// (appended) or, without one, to stderr.
pub fn init(program: &'static str, level: log::LevelFilter, file: Option<&Path>) -> Result<()> {
    let sink: Box<dyn Write + Send> = match file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::LogFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            SINK_FD.store(file.as_raw_fd(), Ordering::Relaxed);
            Box::new(file)
        }
        None => Box::new(io::stderr()),
    };
    log::set_boxed_logger(Box::new(Logger {
        program,
        level,
        sink: Mutex::new(sink),
    }))?;
    log::set_max_level(level);
    Ok(())
}

/// Lets through at most `burst` events per `period` and counts the rest.
///
/// A guest can submit malformed requests as fast as it likes; logging each
/// one would let it fill the host's disk or drown real messages. Callers ask
/// [`RateLimiter::allow`] before logging and mention the suppressed count.
#[derive(Debug)]
pub struct RateLimiter {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter letting `burst` events through per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        RateLimiter {
            period,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(suppressed_since_last_allowed)` if this event may be
    /// logged now, `None` if it must be dropped.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= self.period {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Logs at warn level through a [`RateLimiter`] held in a `Mutex`.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {{
        let mut limiter = $limiter.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = limiter.allow() {
            if suppressed > 0 {
                $crate::log::warn!("({} similar messages suppressed)", suppressed);
            }
            $crate::log::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_bursts_then_suppresses_then_reopens() {
        let mut rl = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(rl.allow_at(t0), Some(0));
        assert_eq!(rl.allow_at(t0), Some(0));
        assert_eq!(rl.allow_at(t0), Some(0));
        assert_eq!(rl.allow_at(t0), None);
        assert_eq!(rl.allow_at(t0 + Duration::from_millis(500)), None);
        assert_eq!(rl.allow_at(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(rl.allow_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
