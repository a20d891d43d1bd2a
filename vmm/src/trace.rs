//! Trace points that can be switched on and off at run time (QMP `trace-get-state` /
//! `trace-set-state`). An enabled trace point writes one log line per event under the
//! `trace` target, so traces land in the `-D` log next to everything else. A disabled one
//! costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

/// A named trace point.
pub struct TracePoint {
    name: &'static str,
    enabled: AtomicBool,
}

impl TracePoint {
    const fn new(name: &'static str) -> Self {
        TracePoint {
            name,
            enabled: AtomicBool::new(false),
        }
    }

    /// Its name, as QMP shows it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether it is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switches it on or off.
    pub fn set(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }
}

/// Every vCPU exit the core handles (port/MMIO accesses, system events).
pub static VCPU_EXIT: TracePoint = TracePoint::new("vcpu_exit");
/// Every vhost-user request the core's frontends send.
pub static VHOST_USER_MESSAGE: TracePoint = TracePoint::new("vhost_user_message");
/// Every QMP command the gateway executes or forwards.
pub static QMP_COMMAND: TracePoint = TracePoint::new("qmp_command");
/// Every command on the core's control socket.
pub static CONTROL_COMMAND: TracePoint = TracePoint::new("control_command");

/// The trace points of the core process.
pub static CORE_POINTS: &[&TracePoint] = &[&VCPU_EXIT, &VHOST_USER_MESSAGE, &CONTROL_COMMAND];
/// The trace points of the gateway process.
pub static GATEWAY_POINTS: &[&TracePoint] = &[&QMP_COMMAND];

/// Logs an event of `point` if it is enabled.
#[macro_export]
macro_rules! trace_event {
    ($point:expr, $($arg:tt)*) => {
        if $point.enabled() {
            log::info!(target: "trace", "{}: {}", $point.name(), format_args!($($arg)*));
        }
    };
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (QEMU's trace
/// patterns).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && matches(rest, &tail[i..]))
        }
    }
}

/// `(name, enabled)` of every point in `points` matching `pattern`.
pub fn states(points: &[&TracePoint], pattern: &str) -> Vec<(&'static str, bool)> {
    points
        .iter()
        .filter(|p| matches(pattern, p.name))
        .map(|p| (p.name, p.enabled()))
        .collect()
}

/// Switches every point in `points` matching `pattern`; returns how many matched.
pub fn set_state(points: &[&TracePoint], pattern: &str, on: bool) -> usize {
    points
        .iter()
        .filter(|p| matches(pattern, p.name))
        .map(|p| p.set(on))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("vcpu_exit", "vcpu_exit"));
        assert!(matches("*", "vcpu_exit"));
        assert!(matches("vhost_*", "vhost_user_message"));
        assert!(matches("*_exit", "vcpu_exit"));
        assert!(matches("v*u*e", "vhost_user_message"));
        assert!(!matches("vcpu", "vcpu_exit"));
        assert!(!matches("qmp*x", "qmp_command"));
    }

    #[test]
    fn switching() {
        static A: TracePoint = TracePoint::new("a_one");
        static B: TracePoint = TracePoint::new("b_two");
        let points: &[&TracePoint] = &[&A, &B];
        assert_eq!(set_state(points, "a_*", true), 1);
        assert_eq!(states(points, "*"), vec![("a_one", true), ("b_two", false)]);
        assert_eq!(set_state(points, "nothing", true), 0);
    }
}
