//! The transmit queue: frames from the guest's chains onto the tap.
//!
//! Each chain is one frame, header first; it goes to the tap with one
//! `writev` over iovecs into guest memory, no copy. Chains complete in
//! the order they were popped (used length 0: the device writes nothing),
//! so the core may restart the ring at the used index after a crash; a
//! frame written just before a crash is then sent twice, which a network
//! tolerates.
//!
//! A malformed chain (a device-writable descriptor, a buffer outside guest
//! memory, too many pieces, shorter than a header and an Ethernet header,
//! longer than any frame, or a header using offloads the driver did not
//! negotiate) is completed without being sent and counted. If the tap
//! cannot take a frame (EAGAIN), the chain goes back to the ring and the
//! queue waits for the tap to become writable.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_backend::chain::{avail_pending, ChainDescriptor};
use flotilla_backend::logger::RateLimiter;
use flotilla_backend::warn_limited;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::chain::{self, Direction, Limits, Segment, MAX_CHAIN_SEGMENTS};
use crate::config::Negotiated;
use crate::header::{check_tx, NetHeader, ETH_HLEN, HEADER_LEN};
use crate::ring::{self, POLL_TIME, SIGNAL_EVERY};
use crate::stats::Stats;
use crate::tap::Tap;
use crate::GuestMem;

/// Chains per pass; between passes the vring lock is released.
const BATCH: usize = 256;
/// Guest-triggered warnings: at most this many per second.
const WARN_BURST: u32 = 10;

/// Why a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The avail ring is empty.
    Empty,
    /// The tap is full: wait until it is writable.
    TapFull,
    /// The pass did [`BATCH`] chains: run another.
    BatchFull,
    /// The queue is stopped or disabled.
    NotReady,
}

/// Why a transmit chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The descriptors themselves.
    #[error(transparent)]
    Chain(#[from] chain::ChainError),
    /// Too short for a header and an Ethernet header.
    #[error("{0} bytes is too short for a frame")]
    TooShort(usize),
    /// The header asks for something not negotiated.
    #[error(transparent)]
    Header(#[from] crate::header::HeaderError),
    /// The header could not be read.
    #[error("header unreadable")]
    HeaderUnreadable,
}

/// Checks one transmit chain (already gathered into `segs`, `len` bytes).
pub fn check_chain(
    m: &GuestMem,
    segs: &[Segment],
    len: usize,
    neg: &Negotiated,
) -> Result<(), TxError> {
    if len < HEADER_LEN + ETH_HLEN {
        return Err(TxError::TooShort(len));
    }
    let mut hdr = [0u8; HEADER_LEN];
    if !chain::read_prefix(m, segs, &mut hdr) {
        return Err(TxError::HeaderUnreadable);
    }
    check_tx(&NetHeader::from_bytes(&hdr), neg, len - HEADER_LEN)?;
    Ok(())
}

/// The transmit queue's worker state.
pub struct TxQueue {
    tap: Arc<Tap>,
    stats: Arc<Stats>,
    warn: Mutex<RateLimiter>,
    /// Busy-poll the avail ring for [`POLL_TIME`] after it runs dry.
    poll: bool,
}

impl TxQueue {
    /// A transmit queue writing to `tap`; with `poll`, the queue busy-polls
    /// its avail ring for a while after running dry before sleeping.
    pub fn new(tap: Arc<Tap>, stats: Arc<Stats>, poll: bool) -> Self {
        TxQueue {
            tap,
            stats,
            warn: Mutex::new(RateLimiter::new(WARN_BURST, Duration::from_secs(1))),
            poll,
        }
    }

    /// Sends what the guest queued until the ring is empty or the tap full.
    ///
    /// With `--poll`, an empty ring is watched for [`POLL_TIME`] with
    /// notifications still off (a guest posting meanwhile does not kick)
    /// before they are turned back on and the worker sleeps.
    pub fn process(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        neg: Negotiated,
        event_idx: bool,
    ) {
        loop {
            match self.pass(vring, mem, neg, event_idx, !self.poll) {
                Stop::BatchFull => continue,
                Stop::Empty if self.poll => {
                    if ring::poll_avail(vring, mem, POLL_TIME) {
                        continue;
                    }
                    // Nothing came: notifications on (and one more look).
                    if self.pass(vring, mem, neg, event_idx, true) != Stop::Empty {
                        continue;
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// Sends up to [`BATCH`] chains. With `rearm`, an empty ring turns
    /// guest notifications back on (EVENT_IDX) before the pass ends.
    ///
    /// Chains are read through an [`RingView`](ring::RingView) when the rings allow it
    /// (one lookup of the ring addresses per pass instead of one per avail entry and
    /// descriptor), and completed [`SIGNAL_EVERY`] at a time with one used-index update.
    fn pass(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        neg: Negotiated,
        event_idx: bool,
        rearm: bool,
    ) -> Stop {
        let guard = mem.memory();
        let m: &GuestMem = &guard;
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Stop::NotReady;
        }
        let view = ring::RingView::new(m, state.get_queue());
        // The driver's avail index as last read through the view.
        let mut avail_idx = view.as_ref().map_or(0, |v| v.avail_idx());
        let mut descs = [ChainDescriptor::default(); ring::VIEW_CHAIN];
        let mut frame = Frame {
            iov: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
            segs: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
        };
        let mut used: Vec<(u16, u32)> = Vec::with_capacity(SIGNAL_EVERY);
        let mut signalled_at = state.get_queue().next_used();
        let mut done = 0;
        let stop = loop {
            if done == BATCH {
                break Stop::BatchFull;
            }
            if used.len() == SIGNAL_EVERY {
                complete(&mut state, m, view.as_ref(), &mut used);
                if event_idx {
                    // A driver waiting for completions (its used_event) hears
                    // about them while the pass goes on, not only at its end.
                    signal(&state, m, view.as_ref(), event_idx, &mut signalled_at);
                }
            }
            let q = state.get_queue_mut();
            let at = q.next_avail();
            let fast = match &view {
                Some(v) => {
                    // The index read last is stale once the ring looks empty, or if
                    // `virtio-queue` popped past it below.
                    if avail_idx == at || avail_idx.wrapping_sub(at) > q.size() {
                        avail_idx = v.avail_idx();
                    }
                    if avail_idx.wrapping_sub(at) > q.size() {
                        warn_limited!(
                            self.warn,
                            "tx: avail index {avail_idx} is more than a ring ahead of {at}"
                        );
                        break Stop::Empty;
                    }
                    if avail_idx == at {
                        None
                    } else {
                        v.chain(at, &mut descs)
                    }
                }
                None => None,
            };
            let outcome = match fast {
                Some((head, chain)) => {
                    q.set_next_avail(at.wrapping_add(1));
                    let descs = chain.iter().map(|d| (d.addr, d.len, d.writable));
                    (head, self.transmit(m, &neg, head, descs, &mut frame))
                }
                // Not a chain the view reads, an empty ring, or no view: `virtio-queue`
                // pops it, or finds the ring empty.
                None => match q.pop_descriptor_chain(m) {
                    Some(chain) => {
                        let head = chain.head_index();
                        let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
                        (head, self.transmit(m, &neg, head, descs, &mut frame))
                    }
                    None => {
                        // Notifications back on; the index moved meanwhile: pop again, unless
                        // it moved more than a ring (nothing to pop: this would spin).
                        if rearm
                            && event_idx
                            && matches!(q.enable_notification(m), Ok(true))
                            && matches!(avail_pending(m, q), Some(n) if n > 0)
                        {
                            continue;
                        }
                        break Stop::Empty;
                    }
                },
            };
            match outcome {
                (head, Sent::Done) => {
                    used.push((head, 0));
                    done += 1;
                }
                (_, Sent::TapFull) => {
                    let q = state.get_queue_mut();
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                    break Stop::TapFull;
                }
            }
        };
        complete(&mut state, m, view.as_ref(), &mut used);
        signal(&state, m, view.as_ref(), event_idx, &mut signalled_at);
        stop
    }

    /// Checks chain `head` (its descriptors `descs`) and writes its frame to the tap; a bad
    /// chain is counted and dropped.
    fn transmit<I>(
        &self,
        m: &GuestMem,
        neg: &Negotiated,
        head: u16,
        descs: I,
        frame: &mut Frame,
    ) -> Sent
    where
        I: IntoIterator<Item = (GuestAddress, u32, bool)>,
    {
        frame.iov.clear();
        frame.segs.clear();
        let checked = chain::gather(
            descs,
            m,
            Direction::DeviceReads,
            &Limits::frame(Direction::DeviceReads),
            &mut frame.iov,
            &mut frame.segs,
        )
        .map_err(TxError::from)
        .and_then(|g| check_chain(m, &frame.segs, g.len, neg).map(|()| g.len));
        match checked {
            Err(e) => {
                Stats::add(&self.stats.tx_bad_chains, 1);
                warn_limited!(self.warn, "tx: chain {head} dropped: {e}");
            }
            Ok(len) => match self.send(&frame.iov) {
                Ok(()) => {
                    Stats::add(&self.stats.tx_packets, 1);
                    Stats::add(&self.stats.tx_bytes, (len - HEADER_LEN) as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::TapFull,
                Err(e) => {
                    Stats::add(&self.stats.tx_errors, 1);
                    warn_limited!(self.warn, "tx: the tap refused a frame: {e}");
                }
            },
        }
        Sent::Done
    }

    fn send(&self, iov: &[libc::iovec]) -> io::Result<()> {
        loop {
            match self.tap.writev(iov) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(|_| ()),
            }
        }
    }
}

/// Buffers for one frame's iovecs and segments, reused across a pass.
struct Frame {
    iov: Vec<libc::iovec>,
    segs: Vec<Segment>,
}

/// What became of one chain.
enum Sent {
    /// Sent, or dropped as malformed: complete it.
    Done,
    /// The tap is full: the chain goes back to the ring.
    TapFull,
}

/// Publishes the chains in `used` (used length 0: the device writes nothing) and empties it.
fn complete(
    state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    m: &GuestMem,
    view: Option<&ring::RingView<'_>>,
    used: &mut Vec<(u16, u32)>,
) {
    if used.is_empty() {
        return;
    }
    if let Err(e) = ring::add_used(m, view, state.get_queue_mut(), used) {
        log::error!("tx: writing the used ring: {e}");
    }
    used.clear();
}

/// Signals the guest for the chains published since `signalled_at`, if it wants to hear
/// about them (always without EVENT_IDX, if there are any).
fn signal(
    state: &VringState<GuestMemoryAtomic<GuestMem>>,
    m: &GuestMem,
    view: Option<&ring::RingView<'_>>,
    event_idx: bool,
    signalled_at: &mut u16,
) {
    if ring::needs_signal(m, view, state.get_queue(), *signalled_at, event_idx) {
        if let Err(e) = state.signal_used_queue() {
            log::error!("tx: signalling the guest: {e}");
        }
    }
    *signalled_at = state.get_queue().next_used();
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn seg(addr: u64, len: usize) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn frames_need_a_header_and_an_ethernet_header() {
        let m = mem();
        let neg = Negotiated::default();
        let r = check_chain(&m, &[seg(0, 25)], 25, &neg);
        assert!(matches!(r, Err(TxError::TooShort(25))));
        assert!(check_chain(&m, &[seg(0, 26)], 26, &neg).is_ok());
    }

    #[test]
    fn header_split_over_descriptors_is_read_whole() {
        let m = mem();
        // NEEDS_CSUM in byte 0 of a header split 1 + 11.
        m.write_obj(1u8, GuestAddress(0x100)).unwrap();
        let segs = [seg(0x100, 1), seg(0x200, 11), seg(0x300, 60)];
        let r = check_chain(&m, &segs, 72, &Negotiated::default());
        assert!(matches!(
            r,
            Err(TxError::Header(
                crate::header::HeaderError::CsumNotNegotiated
            ))
        ));
    }
}
