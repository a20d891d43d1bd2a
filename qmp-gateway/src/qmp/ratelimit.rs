//! Leaky-bucket flow control for QMP commands.
//!
//! StratoVirt's QMP server accepts 100 commands per second through a leaky bucket. Here the
//! bucket drains continuously at `rate` commands per second and holds at most `rate`: a burst
//! of up to `rate` commands passes at once, a steady stream passes at `rate` per second, and
//! a command that would overflow the bucket is answered with an error at once. The server
//! never stalls a client to throttle it, so a flood costs the flooder, not the other clients.

use std::time::Instant;

/// StratoVirt's limit: commands per second per connection.
pub const DEFAULT_COMMANDS_PER_SECOND: u32 = 100;

/// A leaky bucket counting commands.
#[derive(Clone, Debug)]
pub struct LeakyBucket {
    rate: f64,
    level: f64,
    last: Instant,
}

impl LeakyBucket {
    /// A bucket admitting `per_second` commands per second (and bursts of that many).
    pub fn new(per_second: u32) -> Self {
        LeakyBucket {
            rate: f64::from(per_second.max(1)),
            level: 0.0,
            last: Instant::now(),
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> u32 {
        // The rate came from a u32, so the conversion back is exact.
        self.rate as u32
    }

    /// Whether one more command may pass now.
    pub fn admit(&mut self) -> bool {
        self.admit_at(Instant::now())
    }

    /// Whether one more command may pass at `now` (monotonic; earlier instants count as `last`).
    pub fn admit_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.level = (self.level - elapsed * self.rate).max(0.0);
        if self.level + 1.0 > self.rate {
            return false;
        }
        self.level += 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_steady_rate() {
        let start = Instant::now();
        let mut b = LeakyBucket::new(100);
        assert_eq!(b.rate(), 100);
        for i in 0..100 {
            assert!(b.admit_at(start), "command {i} of the burst");
        }
        assert!(!b.admit_at(start), "101st command in the same instant");
        // 10 ms drain one command's worth.
        assert!(!b.admit_at(start + Duration::from_millis(5)));
        assert!(b.admit_at(start + Duration::from_millis(15)));
        assert!(!b.admit_at(start + Duration::from_millis(15)));
        // After a full second the bucket is empty again.
        let later = start + Duration::from_secs(2);
        for _ in 0..100 {
            assert!(b.admit_at(later));
        }
        assert!(!b.admit_at(later));
    }

    #[test]
    fn steady_stream_at_the_rate_passes() {
        let start = Instant::now();
        let mut b = LeakyBucket::new(10);
        for i in 0..1000 {
            assert!(b.admit_at(start + Duration::from_millis(100 * i)));
        }
        // Time going backwards (it cannot with Instant, but be safe) changes nothing.
        assert!(b.admit_at(start));
    }
}
