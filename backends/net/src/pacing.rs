//! Interrupt moderation on the receive queue: when, within a pass, to ask whether the
//! driver wants an interrupt (EVENT_IDX).
//!
//! A driver that has caught up asks for an interrupt at its next used buffer (NAPI) and
//! sleeps; each interrupt then wakes it, which costs the device's worker about as much as
//! receiving a 64 KB frame here (~10 µs: the wake is an IPI to an idle CPU). Asking rarely
//! keeps that cost down, asking too late leaves the driver asleep on filled buffers or the
//! device without buffers. So the queue asks after three quarters of the ring's buffers
//! (the last quarter covers the driver's wakeup and refill), and, because with a 1024-entry
//! ring three quarters of 1514-byte frames take ~1.3 ms to arrive here, also once
//! [`MAX_DELAY`] has passed since it last asked. The clock is read once per
//! [`CLOCK_EVERY`] buffers, not per frame.
//!
//! A pass that runs out of frames or buffers asks at its end whatever the pacing says, so
//! all this only spaces the interrupts of a saturated queue (whose frames already wait in
//! the tap's queue for milliseconds).
//!
//! The bound costs wakes: in the native benchmark's 1514-byte drain (docs/PERFORMANCE.md,
//! "Session 9") 500 µs cost ~4 points against no bound, 300 µs ~5.

use std::time::{Duration, Instant};

/// Longest a saturated receive queue goes without asking (give or take [`CLOCK_EVERY`]
/// buffers): a few hundred 1514-byte frames at the native benchmark's rate, where 192
/// buffers (three quarters of a 256-entry ring) took ~330 µs.
pub const MAX_DELAY: Duration = Duration::from_micros(500);

/// Buffers between two looks at the clock.
pub const CLOCK_EVERY: usize = 64;

/// The receive queue's interrupt pacing within one pass.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Buffers (used elements) completed since the queue last asked: a 64 KB frame over
    /// 4 KiB buffers counts 16, so a ring a few frames fill is still asked about before the
    /// driver runs out of buffers.
    completed: usize,
    /// `completed` at which the clock is read next.
    next_look: usize,
    /// When the queue last asked.
    asked_at: Instant,
}

impl Pacing {
    /// Pacing that last asked at `now`.
    pub fn new(now: Instant) -> Self {
        Pacing {
            completed: 0,
            next_look: CLOCK_EVERY,
            asked_at: now,
        }
    }

    /// Counts `buffers` more used elements.
    pub fn completed(&mut self, buffers: usize) {
        self.completed += buffers;
    }

    /// Whether to ask the driver now, on a ring of `ring_size` entries; `now` is called
    /// only when the clock is due a look.
    pub fn due(&mut self, ring_size: u16, now: impl FnOnce() -> Instant) -> bool {
        if self.completed >= every(ring_size) {
            return true;
        }
        if self.completed < self.next_look {
            return false;
        }
        self.next_look = self.completed + CLOCK_EVERY;
        now().saturating_duration_since(self.asked_at) >= MAX_DELAY
    }

    /// The queue asked at `now`.
    pub fn asked(&mut self, now: Instant) {
        *self = Pacing::new(now);
    }
}

/// Buffers after which the queue asks whatever the time: three quarters of the ring.
/// Half the ring measured ~4 points lower on live 64 KB receive at 256 entries
/// (docs/PERFORMANCE.md, session 8).
pub fn every(ring_size: u16) -> usize {
    usize::from(ring_size / 4 * 3).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_quarters_of_the_ring_asks_whatever_the_time() {
        let t0 = Instant::now();
        let mut p = Pacing::new(t0);
        p.completed(767);
        // 767 buffers in no time: the clock says no.
        assert!(!p.due(1024, || t0));
        p.completed(1);
        assert!(p.due(1024, || panic!("the count decides without the clock")));
        assert_eq!(every(256), 192);
        assert_eq!(every(2), 1);
    }

    #[test]
    fn a_slow_stream_is_asked_about_after_the_delay_looking_at_the_clock_rarely() {
        let t0 = Instant::now();
        let mut p = Pacing::new(t0);
        p.completed(CLOCK_EVERY - 1);
        assert!(
            !p.due(1024, || panic!("no look before CLOCK_EVERY buffers")),
            "too few buffers to look"
        );
        p.completed(1);
        // A look, too early: the next one is CLOCK_EVERY buffers on.
        assert!(!p.due(1024, || t0 + MAX_DELAY / 2));
        p.completed(CLOCK_EVERY - 1);
        assert!(!p.due(1024, || panic!("not yet due a look")));
        p.completed(1);
        assert!(p.due(1024, || t0 + MAX_DELAY));
        // Asking starts over.
        let t1 = t0 + MAX_DELAY;
        p.asked(t1);
        p.completed(CLOCK_EVERY);
        assert!(!p.due(1024, || t1 + MAX_DELAY / 3));
    }
}
