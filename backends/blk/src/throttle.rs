//! Request-rate limiting (`--iops-total`).
//!
//! A token bucket shared by all queues of the device: one token per request,
//! refilled continuously at `rate` tokens per second, holding at most one
//! second's worth so an idle disk can absorb a short burst. A queue that
//! finds the bucket empty stops taking requests off its ring (they stay in
//! the avail ring, so the guest just sees latency) and arms a timer for the
//! moment the next token is due.

use std::time::{Duration, Instant};

/// A token bucket counting requests.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens scaled by 1e9 so refill arithmetic stays in integers.
    nano_tokens: u128,
    last: Instant,
}

const NANOS: u128 = 1_000_000_000;

impl TokenBucket {
    /// A full bucket refilled at `rate` (> 0) tokens per second.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        TokenBucket {
            rate,
            capacity: rate,
            nano_tokens: u128::from(rate) * NANOS,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let cap = u128::from(self.capacity) * NANOS;
        self.nano_tokens = self
            .nano_tokens
            .saturating_add(elapsed.saturating_mul(u128::from(self.rate)))
            .min(cap);
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.nano_tokens >= NANOS {
            self.nano_tokens -= NANOS;
            Ok(())
        } else {
            let missing = NANOS - self.nano_tokens;
            let wait_ns = missing.div_ceil(u128::from(self.rate));
            Err(Duration::from_nanos(
                u64::try_from(wait_ns).unwrap_or(u64::MAX).max(1),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        for _ in 0..100 {
            assert!(b.try_take(t0).is_ok());
        }
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
        // 10 ms later exactly one more token.
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.try_take(t1).is_ok());
        assert!(b.try_take(t1).is_err());
        // Half a token after 5 more ms: still waiting, for the other 5 ms.
        let t2 = t1 + Duration::from_millis(5);
        assert_eq!(b.try_take(t2).unwrap_err(), Duration::from_millis(5));
    }

    #[test]
    fn never_exceeds_one_second_of_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        let later = t0 + Duration::from_secs(3600);
        let mut n = 0;
        while b.try_take(later).is_ok() {
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn rate_over_a_simulated_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        while b.try_take(t0).is_ok() {}
        // Poll every 100 µs for one second: about 1000 requests get through.
        let mut n = 0;
        for i in 1..=10_000u64 {
            if b.try_take(t0 + Duration::from_micros(100 * i)).is_ok() {
                n += 1;
            }
        }
        assert!((999..=1001).contains(&n), "{n}");
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = TokenBucket::new(1, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0 - Duration::from_millis(500)).is_err());
    }
}
