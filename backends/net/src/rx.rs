//! The receive queue: frames from the tap into the guest's buffers.
//!
//! The tap fd sits in the worker's epoll edge-triggered, so the worker is
//! woken when frames arrive and reads until the tap says EAGAIN or the
//! guest runs out of buffers; it never spins on a tap it cannot empty. A
//! guest kick (new buffers) restarts reading.
//!
//! Frames go straight from the tap into guest memory with one `readv`
//! over the iovecs of the popped chains: with MRG_RXBUF over as many
//! chains as a 64 KiB frame could need, without it into one chain;
//! buffers that touch in memory go in as one iovec. Only
//! when the guest has posted less room than that does a frame go through a
//! bounce buffer, to be copied once its length is known (and kept until
//! the guest posts enough, or dropped if the whole ring cannot hold it).
//!
//! Chains are completed strictly in the order they were popped, good or
//! bad: after a backend crash the core restarts the ring at the used
//! index, which is only right if nothing was used ahead of an older chain.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_backend::chain::{avail_pending, ChainDescriptor};
use flotilla_backend::logger::RateLimiter;
use flotilla_backend::warn_limited;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::chain::{self, Direction, Limits, Segment, MAX_CHAIN_SEGMENTS};
use crate::config::Negotiated;
use crate::header::{fix_rx, HEADER_LEN, MAX_BUFFER};
use crate::pacing::Pacing;
use crate::ring::{self, POLL_TIME};
use crate::stats::Stats;
use crate::tap::Tap;
use crate::GuestMem;

/// Frames per pass; between passes the vring lock is released so that the
/// frontend's GET_VRING_BASE is not held off by a busy queue.
const BATCH: usize = 256;
/// Most iovecs one `readv` takes (UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Guest-triggered warnings: at most this many per second.
const WARN_BURST: u32 = 10;

/// A popped receive chain.
#[derive(Debug, Clone)]
struct RxChain {
    head: u16,
    /// Index range into the pass's `iov` / `segs`.
    start: usize,
    end: usize,
    /// Usable bytes (capped at [`MAX_BUFFER`]).
    len: usize,
    /// Malformed: returned with length 0 when it reaches the front.
    bad: bool,
}

/// The chains popped in one pass and not yet used, in pop order.
struct Popped {
    chains: VecDeque<RxChain>,
    iov: Vec<libc::iovec>,
    segs: Vec<Segment>,
    /// Usable bytes of the good chains before the first bad one.
    room: usize,
    /// A bad chain is queued: pop nothing more until it is at the front.
    blocked: bool,
    /// (head, length) of the frame being completed (scratch, reused).
    used: Vec<(u16, u32)>,
    /// The `readv`'s iovecs with touching buffers merged (scratch, reused).
    merged: Vec<libc::iovec>,
    /// Used index when the driver was last considered for an interrupt.
    signalled_at: u16,
    /// When to consider it next, within the pass.
    pacing: Pacing,
}

impl Default for Popped {
    fn default() -> Self {
        Popped {
            chains: VecDeque::new(),
            iov: Vec::new(),
            segs: Vec::new(),
            room: 0,
            blocked: false,
            used: Vec::new(),
            merged: Vec::new(),
            signalled_at: 0,
            pacing: Pacing::new(Instant::now()),
        }
    }
}

// SAFETY: the iovecs point into the guest memory snapshot of one pass; `finish` empties
// every vector before the pass lets the snapshot go, so only empty vectors (their
// capacity) ever move to another thread.
unsafe impl Send for Popped {}

impl Popped {
    /// Starts a pass whose used index is `next_used`, keeping the vectors' capacity (a
    /// pass of 64 KB frames gathers thousands of iovecs; growing them every pass was a
    /// visible share of the receive path).
    fn start(&mut self, next_used: u16) {
        self.finish();
        self.room = 0;
        self.blocked = false;
        self.signalled_at = next_used;
        self.pacing = Pacing::new(Instant::now());
    }

    /// Ends a pass: nothing that points into guest memory is kept.
    fn finish(&mut self) {
        self.chains.clear();
        self.iov.clear();
        self.segs.clear();
        self.merged.clear();
        self.used.clear();
    }

    /// iovecs of the chains not yet used (what the next `readv` may take).
    fn live_iovecs(&self) -> usize {
        self.chains
            .front()
            .map_or(0, |c| self.iov.len().saturating_sub(c.start))
    }

    /// Drops the iovecs of used chains once none is left, so that indices
    /// stay small over a long pass.
    fn compact(&mut self) {
        if self.chains.is_empty() {
            self.iov.clear();
            self.segs.clear();
        }
    }
}

/// Why a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The tap has nothing more (or failed): wait for its next edge.
    TapEmpty,
    /// Not enough guest buffers: wait for a kick.
    NoBuffers,
    /// The pass did [`BATCH`] frames: run another.
    BatchFull,
    /// The queue is stopped or disabled.
    NotReady,
}

/// The receive queue's worker state.
pub struct RxQueue {
    tap: Arc<Tap>,
    stats: Arc<Stats>,
    warn: Mutex<RateLimiter>,
    bounce: Vec<u8>,
    /// Length of a frame waiting in `bounce` for guest buffers.
    pending: Option<usize>,
    /// Busy-poll the tap (or the avail ring) for [`POLL_TIME`] when a
    /// pass runs dry, before sleeping.
    poll: bool,
    /// The pass's popped chains; kept between passes only for the vectors' capacity
    /// (taken out for the pass, so that it is not rebuilt every pass).
    popped: Option<Popped>,
}

impl RxQueue {
    /// A receive queue reading from `tap`; with `poll`, the queue
    /// busy-polls for a while after running dry before sleeping.
    pub fn new(tap: Arc<Tap>, stats: Arc<Stats>, poll: bool) -> Self {
        RxQueue {
            tap,
            stats,
            warn: Mutex::new(RateLimiter::new(WARN_BURST, Duration::from_secs(1))),
            bounce: vec![0u8; MAX_BUFFER],
            pending: None,
            poll,
            popped: None,
        }
    }

    /// Forgets a frame held for the guest (features renegotiated, reset).
    pub fn reset(&mut self) {
        self.pending = None;
    }

    /// Moves frames from the tap to the guest until one side runs dry.
    pub fn process(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        neg: Negotiated,
        event_idx: bool,
    ) {
        loop {
            match self.pass(vring, mem, neg, event_idx) {
                Stop::BatchFull => continue,
                Stop::TapEmpty if self.poll && self.poll_tap() => continue,
                Stop::NoBuffers if self.poll && ring::poll_avail(vring, mem, POLL_TIME) => continue,
                _ => return,
            }
        }
    }

    /// Spins until the tap has a frame or [`POLL_TIME`] passes (`poll(2)`
    /// with no timeout: the tap offers no cheaper way to look).
    fn poll_tap(&self) -> bool {
        let deadline = Instant::now() + POLL_TIME;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no timeout.
            if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn pass(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        neg: Negotiated,
        event_idx: bool,
    ) -> Stop {
        let guard = mem.memory();
        let m: &GuestMem = &guard;
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Stop::NotReady;
        }
        let mut p = self.popped.take().unwrap_or_default();
        p.start(state.get_queue().next_used());
        // The rings' host view, checked once for the pass (their addresses cannot change
        // while the vring lock is held).
        let view = ring::RingView::new(m, state.get_queue());
        let stop = self.fill(&mut state, m, view.as_ref(), neg, event_idx, &mut p);
        // Unused chains go back to the avail ring: they are the most
        // recently popped, so stepping next_avail back returns exactly them.
        let q = state.get_queue_mut();
        let back = p.chains.len() as u16;
        q.set_next_avail(q.next_avail().wrapping_sub(back));
        signal(&state, m, view.as_ref(), event_idx, &mut p);
        p.finish();
        self.popped = Some(p);
        stop
    }

    fn fill(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        neg: Negotiated,
        event_idx: bool,
        p: &mut Popped,
    ) -> Stop {
        let mrg = neg.mrg_rxbuf();
        let mut frames = 0;
        loop {
            if frames == BATCH {
                return Stop::BatchFull;
            }
            if event_idx && p.pacing.due(state.get_queue().size(), Instant::now) {
                // A driver waiting for frames hears about them while the
                // pass goes on, before its ring runs dry.
                signal(state, m, view, event_idx, p);
            }
            self.complete_bad_front(state, m, view, p);
            if let Some(len) = self.pending {
                self.top_up(state, m, view, mrg, len, p);
                if self.deliverable(mrg, len, p) {
                    self.deliver_bounce(state, m, view, neg, len, p);
                    self.pending = None;
                    frames += 1;
                    continue;
                }
                // More buffers cannot help if the ring is all popped, the
                // iovec budget is spent, a bad chain stops the popping, or
                // the frame must fit one chain (no MRG_RXBUF).
                let ring_size = usize::from(state.get_queue().size());
                let cannot_grow = p.chains.len() >= ring_size
                    || p.live_iovecs() + MAX_CHAIN_SEGMENTS > MAX_IOVECS
                    || p.blocked
                    || (!mrg && !p.chains.is_empty());
                if cannot_grow {
                    // Larger than everything the guest can post at once.
                    Stats::add(&self.stats.rx_dropped, 1);
                    warn_limited!(
                        self.warn,
                        "rx: {len}-byte frame larger than the guest's receive buffers; dropped"
                    );
                    self.pending = None;
                    continue;
                }
                if !self.wait_for_buffers(state, m, event_idx) {
                    return Stop::NoBuffers;
                }
                continue;
            }
            let want = if mrg { MAX_BUFFER } else { 1 };
            self.top_up(state, m, view, mrg, want, p);
            if p.room == 0 {
                if !p.chains.is_empty() {
                    // Only a bad chain: it is completed at the loop top.
                    continue;
                }
                if !self.wait_for_buffers(state, m, event_idx) {
                    return Stop::NoBuffers;
                }
                continue;
            }
            let direct = !mrg || p.room >= MAX_BUFFER;
            let result = if direct {
                let start = p.chains[0].start;
                let end = if mrg {
                    self.good_prefix_end(p)
                } else {
                    p.chains[0].end
                };
                chain::coalesce(&p.iov[start..end], &mut p.merged);
                self.tap.readv(&p.merged)
            } else {
                let iov = [libc::iovec {
                    iov_base: self.bounce.as_mut_ptr().cast(),
                    iov_len: self.bounce.len(),
                }];
                self.tap.readv(&iov)
            };
            let n = match result {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Stop::TapEmpty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    Stats::add(&self.stats.rx_errors, 1);
                    warn_limited!(self.warn, "rx: reading the tap: {e}");
                    return Stop::TapEmpty;
                }
            };
            let room = if direct {
                if mrg {
                    p.room
                } else {
                    p.chains[0].len
                }
            } else {
                self.bounce.len()
            };
            if n > room || n < HEADER_LEN {
                // The tap truncates a frame that does not fit (and reports
                // its full length): without MRG_RXBUF the guest posted
                // buffers smaller than its MTU allows.
                Stats::add(&self.stats.rx_dropped, 1);
                warn_limited!(
                    self.warn,
                    "rx: {n}-byte frame does not fit a {room}-byte receive buffer; dropped"
                );
                continue;
            }
            if direct {
                self.complete_frame(state, m, view, neg, n, p);
                frames += 1;
            } else {
                self.pending = Some(n);
            }
        }
    }

    /// Whether the chains popped so far can take a pending frame of `len`.
    fn deliverable(&self, mrg: bool, len: usize, p: &Popped) -> bool {
        if mrg {
            p.room >= len
        } else {
            p.chains.front().is_some_and(|c| !c.bad && c.len >= len)
        }
    }

    /// Asks the driver for a kick when it posts buffers; true if some
    /// arrived meanwhile (pop again), false to wait for the kick.
    ///
    /// Called with every available chain popped, so EVENT_IDX's
    /// avail_event lands on the driver's current index: its next post kicks.
    fn wait_for_buffers(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        event_idx: bool,
    ) -> bool {
        if !event_idx {
            // Notifications are never disabled without EVENT_IDX.
            return false;
        }
        if !matches!(state.get_queue_mut().enable_notification(m), Ok(true)) {
            return false;
        }
        // The index moved: buffers, unless it moved more than a ring (popping would find
        // none, and the caller would ask again forever).
        match avail_pending(m, state.get_queue()) {
            Some(n) => n > 0,
            None => {
                warn_limited!(
                    self.warn,
                    "rx: the driver's avail index is more than a ring ahead; waiting for a kick"
                );
                false
            }
        }
    }

    /// Pops chains until their room reaches `want` bytes, the ring is
    /// empty, a bad chain is queued, or the iovec budget is spent.
    fn top_up(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        mrg: bool,
        want: usize,
        p: &mut Popped,
    ) {
        // Without MRG_RXBUF a frame goes into one chain: one is enough.
        let enough = |p: &Popped| {
            if mrg {
                p.room >= want
            } else {
                !p.chains.is_empty()
            }
        };
        let wants_more = |p: &Popped| {
            !p.blocked && !enough(p) && p.live_iovecs() + MAX_CHAIN_SEGMENTS <= MAX_IOVECS
        };
        let Some(view) = view else {
            // Rings outside one memory region: every access through `virtio-queue`.
            return self.top_up_through_queue(state, m, p, wants_more);
        };
        // One look at the avail index for the whole top-up (a 64 KB frame
        // pops 16 chains); what the driver posts meanwhile is seen by the
        // next top-up or by the re-check after enabling notifications.
        let avail_idx = view.avail_idx();
        let q = state.get_queue_mut();
        if avail_idx.wrapping_sub(q.next_avail()) > q.size() {
            warn_limited!(
                self.warn,
                "rx: avail index {avail_idx} is more than a ring ahead of {}",
                q.next_avail()
            );
            return;
        }
        let mut descs = [ChainDescriptor::default(); ring::VIEW_CHAIN];
        while wants_more(p) {
            let at = q.next_avail();
            if at == avail_idx {
                return;
            }
            match view.chain(at, &mut descs) {
                Some((head, chain)) => {
                    q.set_next_avail(at.wrapping_add(1));
                    let descs = chain.iter().map(|d| (d.addr, d.len, d.writable));
                    self.take_chain(head, descs, m, p);
                }
                None => {
                    // Chained, indirect or a bad head: `virtio-queue` pops it (the
                    // same entry) and walks it with all its checks.
                    let Some(chain) = q.pop_descriptor_chain(m) else {
                        return;
                    };
                    let head = chain.head_index();
                    let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
                    self.take_chain(head, descs, m, p);
                }
            }
        }
    }

    /// [`top_up`](Self::top_up) with every ring access through `virtio-queue`.
    fn top_up_through_queue(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        p: &mut Popped,
        wants_more: impl Fn(&Popped) -> bool,
    ) {
        let mut avail = match state.get_queue_mut().iter(m) {
            Ok(avail) => avail,
            Err(e) => {
                warn_limited!(self.warn, "rx: reading the avail ring: {e}");
                return;
            }
        };
        while wants_more(p) {
            let Some(chain) = avail.next() else {
                return;
            };
            let head = chain.head_index();
            self.take_chain(
                head,
                chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
                m,
                p,
            );
        }
    }

    /// Checks the popped chain `head` (its descriptors `descs`) and queues it: its iovecs
    /// for the next `readv`, or as a bad chain to complete empty in its turn.
    fn take_chain<I>(&self, head: u16, descs: I, m: &GuestMem, p: &mut Popped)
    where
        I: IntoIterator<Item = (GuestAddress, u32, bool)>,
    {
        let start = p.iov.len();
        let gathered = chain::gather(
            descs,
            m,
            Direction::DeviceWrites,
            &Limits::frame(Direction::DeviceWrites),
            &mut p.iov,
            &mut p.segs,
        );
        let (len, bad) = match gathered {
            Ok(g) if g.len >= HEADER_LEN => (g.len, None),
            Ok(g) => {
                // Keep the (useless) segments out of the readv.
                p.iov.truncate(start);
                p.segs.truncate(start);
                (0, Some(format!("{} bytes cannot hold the header", g.len)))
            }
            Err(e) => (0, Some(e.to_string())),
        };
        if let Some(why) = &bad {
            Stats::add(&self.stats.rx_bad_buffers, 1);
            warn_limited!(self.warn, "rx: receive chain {head} refused: {why}");
        }
        let rx = RxChain {
            head,
            start,
            end: p.iov.len(),
            len,
            bad: bad.is_some(),
        };
        if rx.bad {
            p.blocked = true;
        } else {
            p.room += rx.len;
        }
        p.chains.push_back(rx);
    }

    /// End (in `iov`) of the good chains before the first bad one.
    fn good_prefix_end(&self, p: &Popped) -> usize {
        p.chains
            .iter()
            .take_while(|c| !c.bad)
            .last()
            .map(|c| c.end)
            .unwrap_or(0)
    }

    /// Completes bad chains that reached the front, with length 0.
    fn complete_bad_front(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        p: &mut Popped,
    ) {
        while p.chains.front().is_some_and(|c| c.bad) {
            if let Some(c) = p.chains.pop_front() {
                self.use_chains(state, m, view, &[(c.head, 0)]);
            }
            p.compact();
            p.blocked = p.chains.iter().any(|c| c.bad);
            p.room = p.chains.iter().take_while(|c| !c.bad).map(|c| c.len).sum();
        }
    }

    /// Completes the frame of `n` bytes the tap wrote over the front chains.
    fn complete_frame(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        neg: Negotiated,
        n: usize,
        p: &mut Popped,
    ) {
        let mut used = std::mem::take(&mut p.used);
        used.clear();
        let mut left = n;
        for c in p.chains.iter() {
            let take = c.len.min(left);
            used.push((c.head, take as u32));
            left -= take;
            if left == 0 {
                break;
            }
        }
        let first = &p.chains[0];
        let buffers = used.len() as u16;
        match p.iov.get(first.start) {
            Some(v) if first.end > first.start && v.iov_len >= HEADER_LEN => {
                // The header lies in the first buffer (always, with Linux's buffers): read
                // and write it through the host address `gather` checked, not a lookup each.
                let at = v.iov_base as *mut [u8; HEADER_LEN];
                // SAFETY: `gather` made this iovec from the memory snapshot `m`, held for
                // the whole pass: at least HEADER_LEN bytes of mapped guest memory (checked
                // above). Volatile: the guest owns the memory; byte arrays need no alignment.
                let mut hdr = unsafe { std::ptr::read_volatile(at) };
                fix_rx(&mut hdr, &neg, buffers);
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(at, hdr) };
            }
            _ => {
                let mut hdr = [0u8; HEADER_LEN];
                if chain::read_prefix(m, &p.segs[first.start..first.end], &mut hdr) {
                    fix_rx(&mut hdr, &neg, buffers);
                    chain::write_prefix(m, &p.segs[first.start..first.end], &hdr);
                }
            }
        }
        for c in p.chains.drain(..used.len()) {
            p.room -= c.len;
        }
        p.compact();
        self.use_chains(state, m, view, &used);
        p.pacing.completed(used.len());
        p.used = used;
        Stats::add(&self.stats.rx_packets, 1);
        Stats::add(&self.stats.rx_bytes, (n - HEADER_LEN) as u64);
    }

    /// Copies the bounced frame of `len` bytes into the front chains.
    fn deliver_bounce(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        neg: Negotiated,
        len: usize,
        p: &mut Popped,
    ) {
        let mut used = Vec::with_capacity(4);
        let mut at = 0;
        for c in p.chains.iter() {
            let take = c.len.min(len - at);
            let ok = chain::copy_in(m, &p.segs[c.start..c.end], &self.bounce[at..at + take]);
            if !ok {
                // Checked when popped; only a memory table change in
                // between could get here. The bytes are lost, not the chain.
                warn_limited!(self.warn, "rx: receive buffer vanished");
            }
            used.push((c.head, take as u32));
            at += take;
            if at == len {
                break;
            }
        }
        let first = &p.chains[0];
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&self.bounce[..HEADER_LEN]);
        fix_rx(&mut hdr, &neg, used.len() as u16);
        chain::write_prefix(m, &p.segs[first.start..first.end], &hdr);
        for c in p.chains.drain(..used.len()) {
            p.room -= c.len;
        }
        p.compact();
        self.use_chains(state, m, view, &used);
        p.pacing.completed(used.len());
        Stats::add(&self.stats.rx_packets, 1);
        Stats::add(&self.stats.rx_bytes, (len - HEADER_LEN) as u64);
    }

    /// Puts `used` (head, length) into the used ring and publishes them at once.
    fn use_chains(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        m: &GuestMem,
        view: Option<&ring::RingView<'_>>,
        used: &[(u16, u32)],
    ) {
        if let Err(e) = ring::add_used(m, view, state.get_queue_mut(), used) {
            log::error!("rx: writing the used ring: {e}");
        }
    }
}

/// Signals the guest if it wants to hear about the frames completed since
/// the last look (always without EVENT_IDX, if there are any).
fn signal(
    state: &VringState<GuestMemoryAtomic<GuestMem>>,
    m: &GuestMem,
    view: Option<&ring::RingView<'_>>,
    event_idx: bool,
    p: &mut Popped,
) {
    if ring::needs_signal(m, view, state.get_queue(), p.signalled_at, event_idx) {
        if let Err(e) = state.signal_used_queue() {
            log::error!("rx: signalling the guest: {e}");
        }
    }
    p.signalled_at = state.get_queue().next_used();
    p.pacing.asked(Instant::now());
}
