//! Memory statistics from the guest (VIRTIO_BALLOON_F_STATS_VQ).
//!
//! The protocol has one buffer in play: the driver fills it and makes it
//! available once at start-up; the device keeps it, and to ask for fresh
//! numbers it returns the buffer (used length 0); the driver refills it
//! and makes it available again. [`StatsQueue`] holds that buffer between
//! updates and the latest [`Stats`] it carried. The backend asks for an
//! update `--stats-interval` seconds after each buffer arrives.

use std::io::Read;
use std::time::Instant;

use vhost_user_backend::{VringRwLock, VringT};

/// Bytes of one statistic on the wire: `le16 tag; le64 val;`, packed.
pub const STAT_BYTES: usize = 10;

/// Most statistics kept from one buffer. The specification defines 16
/// tags; a driver repeating tags or sending unknown ones cannot make the
/// backend keep more than this.
pub const MAX_STATS: usize = 64;

/// The names the specification gives the tags (VIRTIO_BALLOON_S_*), by tag.
const TAG_NAMES: [&str; 16] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
];

/// The name of a statistics tag, or `None` for a tag the specification
/// does not define.
pub fn tag_name(tag: u16) -> Option<&'static str> {
    TAG_NAMES.get(usize::from(tag)).copied()
}

/// One statistics update as the guest sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// `(tag, value)` in buffer order (at most [`MAX_STATS`]).
    pub values: Vec<(u16, u64)>,
    /// When the buffer arrived.
    pub received: Instant,
}

impl Stats {
    /// The value of `tag`, if the guest reported it (the last one wins).
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values
            .iter()
            .rev()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| *v)
    }

    /// Reads the statistics of a `len`-byte buffer from `src`.
    pub fn parse<R: Read>(src: &mut R, len: usize) -> std::io::Result<Stats> {
        let mut values = Vec::new();
        let mut raw = [0u8; STAT_BYTES];
        for _ in 0..(len / STAT_BYTES).min(MAX_STATS) {
            src.read_exact(&mut raw)?;
            let tag = u16::from_le_bytes([raw[0], raw[1]]);
            let mut val = [0u8; 8];
            val.copy_from_slice(&raw[2..]);
            values.push((tag, u64::from_le_bytes(val)));
        }
        Ok(Stats {
            values,
            received: Instant::now(),
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (tag, val)) in self.values.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match tag_name(*tag) {
                Some(name) => write!(f, "{name}={val}")?,
                None => write!(f, "tag{tag}={val}")?,
            }
        }
        Ok(())
    }
}

/// The buffer the device is holding: its head, and the ring it came from
/// (kept so that stopping the ring can hand the buffer back, see
/// [`StatsQueue::rewind`]).
struct Held {
    head: u16,
    vring: VringRwLock,
}

/// The statistics queue's state between events.
#[derive(Default)]
pub struct StatsQueue {
    held: Option<Held>,
    latest: Option<Stats>,
    updates: u64,
}

impl StatsQueue {
    /// Keeps the buffer `head` just popped from `vring`, with its `stats`.
    /// Returns the head of the buffer held before, which the caller must
    /// give back (only a driver posting two buffers causes that).
    pub fn take(&mut self, head: u16, vring: &VringRwLock, stats: Option<Stats>) -> Option<u16> {
        if let Some(stats) = stats {
            self.latest = Some(stats);
            self.updates += 1;
        }
        self.held
            .replace(Held {
                head,
                vring: vring.clone(),
            })
            .map(|h| h.head)
    }

    /// Gives up the held buffer to request an update; returns its head.
    pub fn request_update(&mut self) -> Option<u16> {
        self.held.take().map(|h| h.head)
    }

    /// Whether a buffer is held.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// The latest statistics and how many updates arrived so far.
    pub fn latest(&self) -> (Option<&Stats>, u64) {
        (self.latest.as_ref(), self.updates)
    }

    /// The ring is being stopped (GET_VRING_BASE): the held buffer was
    /// popped but never used, so move the ring's next-avail index back over
    /// it. The frontend then gets a base at which a successor (or this
    /// backend, after SET_VRING_BASE) pops the same buffer again, instead
    /// of a base past a buffer the driver is still waiting for.
    ///
    /// The held buffer is always the last one popped: every kick pops all
    /// available buffers and keeps the newest.
    pub fn rewind(&mut self) {
        if let Some(h) = self.held.take() {
            let next = h.vring.queue_next_avail();
            h.vring.set_queue_next_avail(next.wrapping_sub(1));
        }
    }

    /// Forgets the held buffer without touching the ring (device reset:
    /// the ring it belongs to is gone).
    pub fn forget(&mut self) {
        self.held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(stats: &[(u16, u64)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (t, val) in stats {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&val.to_le_bytes());
        }
        v
    }

    #[test]
    fn parses_packed_tag_value_pairs() {
        let data = buffer(&[(4, 1 << 30), (5, 2 << 30), (99, 7)]);
        let s = Stats::parse(&mut &data[..], data.len()).unwrap();
        assert_eq!(s.values, vec![(4, 1 << 30), (5, 2 << 30), (99, 7)]);
        assert_eq!(s.get(5), Some(2 << 30));
        assert_eq!(s.get(6), None);
        assert_eq!(
            s.to_string(),
            "free-memory=1073741824 total-memory=2147483648 tag99=7"
        );
    }

    #[test]
    fn a_partial_entry_is_dropped_and_the_count_is_bounded() {
        let mut data = buffer(&[(0, 1)]);
        data.extend_from_slice(&[1, 2, 3]);
        let s = Stats::parse(&mut &data[..], data.len()).unwrap();
        assert_eq!(s.values, vec![(0, 1)]);
        let many: Vec<(u16, u64)> = (0..200).map(|i| (4, i)).collect();
        let data = buffer(&many);
        let s = Stats::parse(&mut &data[..], data.len()).unwrap();
        assert_eq!(s.values.len(), MAX_STATS);
        assert_eq!(s.get(4), Some(MAX_STATS as u64 - 1));
    }

    #[test]
    fn tag_names_cover_the_specification() {
        assert_eq!(tag_name(0), Some("swap-in"));
        assert_eq!(tag_name(15), Some("direct-reclaims"));
        assert_eq!(tag_name(16), None);
    }
}
