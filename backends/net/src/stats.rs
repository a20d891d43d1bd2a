//! Per-device counters: what passed, what was dropped and why.
//!
//! Dropped frames are normal for a NIC, so they are counted rather than
//! logged one by one; warnings about them are rate-limited, and the totals
//! are logged when the frontend goes away (and on demand in tests).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the two queue workers.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered into receive buffers.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (vnet header excluded).
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap but not delivered (larger than the guest's
    /// buffers).
    pub rx_dropped: AtomicU64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_buffers: AtomicU64,
    /// Failed tap reads (other than "nothing to read").
    pub rx_errors: AtomicU64,
    /// Frames written to the tap.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (vnet header excluded).
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped because they were malformed.
    pub tx_bad_chains: AtomicU64,
    /// Frames the tap refused.
    pub tx_errors: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx {} packets {} bytes, {} dropped, {} bad buffers, {} errors; \
             tx {} packets {} bytes, {} bad chains, {} errors",
            get(&self.rx_packets),
            get(&self.rx_bytes),
            get(&self.rx_dropped),
            get(&self.rx_bad_buffers),
            get(&self.rx_errors),
            get(&self.tx_packets),
            get(&self.tx_bytes),
            get(&self.tx_bad_chains),
            get(&self.tx_errors),
        )
    }
}
