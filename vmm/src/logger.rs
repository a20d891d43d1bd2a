//! A small `log` backend: timestamped lines to stderr or to the `-D` file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let line = format!(
            "{}.{:06} {:<5} [{}] {}\n",
            now.as_secs(),
            now.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // Logging must never take the VMM down; a full disk loses log lines, not the guest.
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// Installs the logger. `file` = `-D` value: `Some(Some(path))` logs there at info level,
/// `Some(None)` to stderr at info, `None` to stderr warnings only. `FLOTILLA_LOG`
/// (error|warn|info|debug|trace) overrides the level.
pub fn init(file: Option<Option<&Path>>) -> std::io::Result<()> {
    let out: Box<dyn Write + Send> = match file {
        Some(Some(path)) => Box::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("log file '{}': {e}", path.display()))
                })?,
        ),
        _ => Box::new(std::io::stderr()),
    };
    let default = if file.is_some() {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let level = std::env::var("FLOTILLA_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    log::set_max_level(level);
    log::set_boxed_logger(Box::new(Logger {
        out: Mutex::new(out),
        level,
    }))
    .map_err(|e| std::io::Error::other(e.to_string()))
}
