//! One request queue: [`QueueWorker`] pops chains, parses them, starts the
//! I/O and completes it, all on the queue's own worker thread.
//!
//! Three events drive it (dispatched by [`crate::backend::BlockBackend`]):
//! the guest's kick, the I/O engine's completion fd, and the throttle
//! timer. Requests complete in whatever order the disk finishes them;
//! virtio-blk does not require in-order completion.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use flotilla_backend::chain::{self, ChainError};
use flotilla_backend::inflight::InflightQueue;
use flotilla_backend::logger::RateLimiter;
use flotilla_backend::warn_limited;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use crate::aio::{Completion, Engine, Op};
use crate::disk::{AlignedBuf, Disk};
use crate::request::{self, Kind, Limits, Request, Segment};
use crate::throttle::TokenBucket;
use crate::{Error, GuestMem, Result};

/// How long a queue busy-polls its avail ring after running dry, with
/// `--poll`: long enough to catch the next request of a busy guest without a
/// kick (a kick costs a VM exit and an eventfd wakeup), short enough that an
/// idle queue gives its CPU back almost at once.
const POLL_TIME: Duration = Duration::from_micros(50);

/// Most bytes of O_DIRECT bounce buffers one queue holds at a time. A guest
/// choosing misaligned buffers could otherwise make us allocate up to the
/// transfer limit for every request in flight; past the budget a queue
/// stops taking new requests until earlier ones complete.
const BOUNCE_BUDGET: usize = 32 << 20;

/// Guest-triggered warnings per queue: at most this many per second.
const WARN_BURST: u32 = 10;

/// Counts a queue's requests in flight so that stopping the ring can wait
/// for them (the library calls `stop_vring` for GET_VRING_BASE and expects
/// asynchronous backends to drain there).
#[derive(Debug, Default)]
pub struct InflightCount {
    n: Mutex<usize>,
    zero: Condvar,
}

impl InflightCount {
    fn add(&self, delta: isize) {
        let mut n = self.n.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.zero.notify_all();
        }
    }

    /// Waits until nothing is in flight; false if `timeout` passed first.
    pub fn wait_zero(&self, timeout: Duration) -> bool {
        let n = self.n.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .zero
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *n == 0
    }
}

/// What a queue worker needs besides its engine.
pub struct QueueConfig {
    /// Queue index (for messages).
    pub index: usize,
    /// The image.
    pub disk: Arc<Disk>,
    /// Limits requests are checked against.
    pub limits: Limits,
    /// GET_ID answer.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Shared request-rate bucket, if `--iops-total`.
    pub throttle: Option<Arc<Mutex<TokenBucket>>>,
    /// Busy-poll after running dry.
    pub poll: bool,
    /// This queue's inflight tracking (a no-op until the frontend sets a region).
    pub tracking: InflightQueue,
}

/// A request handed to the engine and not yet completed.
struct Pending {
    head: u16,
    status: GuestAddress,
    /// Keeps the guest mapping the iovecs point into alive until completion,
    /// even if the frontend replaces the memory table meanwhile.
    mem: Arc<GuestMem>,
    expected: usize,
    is_read: bool,
    /// O_DIRECT bounce buffer; for reads, the guest buffers to copy into.
    bounce: Option<(AlignedBuf, Vec<Segment>)>,
}

/// A request popped but not started, waiting for bounce-buffer budget.
struct Deferred {
    req: Request,
    head: u16,
    mem: Arc<GuestMem>,
}

/// One queue's state, only touched from its own worker thread (and
/// `listeners` at setup).
pub struct QueueWorker {
    index: usize,
    disk: Arc<Disk>,
    engine: Box<dyn Engine>,
    limits: Limits,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pending: HashMap<u64, Pending>,
    next_token: u64,
    count: Arc<InflightCount>,
    throttle: Option<Arc<Mutex<TokenBucket>>>,
    timer: TimerFd,
    throttled: bool,
    poll: bool,
    /// Bytes of bounce buffers held by requests in flight.
    bounce_bytes: usize,
    /// At most one request waiting for bounce budget; while it waits the
    /// queue pops nothing else, so requests still start in ring order.
    deferred: Option<Deferred>,
    completions: Vec<Completion>,
    warn: Mutex<RateLimiter>,
    /// Records popped heads in the inflight region so that a backend
    /// started after a crash can resubmit them.
    tracking: InflightQueue,
    /// Heads a previous backend had in flight, oldest first; served before
    /// anything new is popped.
    resubmit: VecDeque<u16>,
}

/// Outcome of starting a request.
enum Started {
    /// Done already: status byte and used length.
    Done(u8, u32),
    /// In the engine; completes later.
    InFlight,
    /// Parked in `QueueWorker::deferred` until bounce budget frees up.
    Deferred,
}

impl QueueWorker {
    /// A worker for one queue doing its I/O through `engine`.
    pub fn new(cfg: QueueConfig, engine: Box<dyn Engine>) -> Result<Self> {
        let timer = TimerFd::new().map_err(|e| Error::Engine {
            queue: cfg.index,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        Ok(QueueWorker {
            index: cfg.index,
            disk: cfg.disk,
            engine,
            limits: cfg.limits,
            serial: cfg.serial,
            pending: HashMap::new(),
            next_token: 0,
            count: Arc::new(InflightCount::default()),
            throttle: cfg.throttle,
            timer,
            throttled: false,
            poll: cfg.poll,
            bounce_bytes: 0,
            deferred: None,
            completions: Vec::new(),
            warn: Mutex::new(RateLimiter::new(WARN_BURST, Duration::from_secs(1))),
            tracking: cfg.tracking,
            resubmit: VecDeque::new(),
        })
    }

    /// The in-flight counter `stop_vring` waits on.
    pub fn inflight(&self) -> Arc<InflightCount> {
        self.count.clone()
    }

    /// The engine's completion fd (if it has one) and the throttle timer fd,
    /// for the worker thread's epoll.
    pub fn fds(&self) -> (Option<RawFd>, RawFd) {
        (self.engine.completion_fd(), self.timer.as_raw_fd())
    }

    /// The guest (or, after a backend restart, the frontend) kicked the
    /// queue.
    ///
    /// The first kick after the ring (re)started takes up the inflight
    /// region: the library only watches the kick fd once SET_VRING_BASE and
    /// SET_VRING_KICK are applied, so the ring state recovery adjusts is
    /// final here.
    pub fn on_kick(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        event_idx: bool,
    ) {
        if self.tracking.recovery_pending() {
            match self.tracking.recover(vring) {
                Ok(heads) => self.resubmit = heads.into(),
                Err(e) => log::error!("queue {}: {e}", self.index),
            }
            if self.tracking.is_tracking() {
                // A previous backend may have died between adding a completion and raising
                // the interrupt, and not every frontend raises it for us on reconnect: one
                // spurious interrupt makes the driver look at its used ring.
                if let Err(e) = vring.signal_used_queue() {
                    log::error!("queue {}: signalling the guest: {e}", self.index);
                }
            }
        }
        self.process_queue(vring, mem, event_idx);
    }

    /// The ring stopped (GET_VRING_BASE): run recovery again before popping
    /// once it restarts, and forget resubmissions the frontend no longer
    /// expects (it restarts the ring from the used index it read).
    pub fn ring_stopped(&mut self) {
        self.tracking.ring_stopped();
        self.resubmit.clear();
    }

    /// The engine has completions.
    pub fn on_completion(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        event_idx: bool,
    ) {
        self.complete(vring, event_idx);
        if self.deferred.is_some() {
            // Completions freed bounce budget: resume the queue.
            self.process_queue(vring, mem, event_idx);
        }
    }

    /// The throttle timer fired: a token is due.
    pub fn on_timer(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        event_idx: bool,
    ) {
        // A failed read only means the timer was re-armed meanwhile.
        let _ = self.timer.wait();
        self.throttled = false;
        self.process_queue(vring, mem, event_idx);
    }

    /// Serves the avail ring until it is empty (or the throttle says
    /// stop); with `--poll`, keeps watching it for [`POLL_TIME`] more.
    fn process_queue(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        event_idx: bool,
    ) {
        if self.tracking.recovery_pending() {
            // Stopped, or restarted and not kicked yet: the kick recovers
            // first and then serves the ring.
            return;
        }
        loop {
            self.process_pass(vring, mem, event_idx);
            if !self.poll || self.throttled || !self.poll_avail(vring, mem) {
                return;
            }
        }
    }

    /// Spins until the driver makes a request available or [`POLL_TIME`]
    /// passes; returns whether there is work.
    fn poll_avail(&self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>) -> bool {
        if self.deferred.is_some() {
            return false;
        }
        let deadline = Instant::now() + POLL_TIME;
        let guard = mem.memory();
        loop {
            match avail_pending(vring, &guard) {
                Some(0) => {}
                Some(_) => return true,
                None => return false,
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// One pass over the avail ring, re-checking after re-enabling
    /// notifications (EVENT_IDX) so that no request is left behind.
    fn process_pass(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
        event_idx: bool,
    ) {
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    log::error!("queue {}: disable notification: {e}", self.index);
                }
            }
            let used = self.drain_avail(vring, mem);
            if let Err(e) = self.engine.commit() {
                log::error!("queue {}: submitting I/O: {e}", self.index);
            }
            // Engines that finished synchronously have completions already.
            self.complete(vring, event_idx);
            if used {
                signal(vring, event_idx, self.index);
            }
            // Throttled or waiting for bounce budget: the timer or the next
            // completion resumes the queue, not the avail ring.
            if self.throttled || self.deferred.is_some() || !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => {
                    // More requests arrived meanwhile, unless the driver
                    // published an impossible avail index: then popping
                    // fails forever and looping would spin this thread.
                    if avail_pending(vring, &mem.memory()).is_some() {
                        continue;
                    }
                    warn_limited!(
                        self.warn,
                        "queue {}: invalid avail ring index; waiting for the next kick",
                        self.index
                    );
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::error!("queue {}: enable notification: {e}", self.index);
                    break;
                }
            }
        }
    }

    /// Pops and starts requests; returns whether any was completed on the spot.
    fn drain_avail(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>) -> bool {
        let mut used_any = false;
        // A parked request goes first (even on a stopped ring: it was
        // popped, so it must complete before GET_VRING_BASE answers).
        if let Some(d) = self.deferred.take() {
            self.count.add(-1);
            let status_at = d.req.status;
            match self.start(d.req, d.head, d.mem.clone()) {
                Started::Done(status, len) => {
                    write_status(&d.mem, status_at, status);
                    self.add_used(vring, d.head, len);
                    used_any = true;
                }
                Started::InFlight => {}
                Started::Deferred => return used_any,
            }
        }
        loop {
            // Until the ring's first kick after a (re)start has run
            // recovery, the next avail index is not known.
            if self.tracking.recovery_pending() {
                break;
            }
            let guard = mem.memory();
            let resubmit = self.resubmit.front().copied();
            let (head, segs) = match resubmit {
                Some(head) => (head, resubmitted_chain(vring, &guard, head)),
                None => {
                    let chain = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(guard.clone());
                    let Some(chain) = chain else { break };
                    let head = chain.head_index();
                    let segs = chain
                        .map(|d| Segment {
                            addr: d.addr(),
                            len: d.len(),
                            writable: d.is_write_only(),
                        })
                        .collect();
                    (head, Ok(segs))
                }
            };
            if let Some(bucket) = &self.throttle {
                let verdict = bucket
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_take(Instant::now());
                if let Err(wait) = verdict {
                    // Leave the chain in the ring (or the resubmission list)
                    // and come back when a token is due.
                    if resubmit.is_none() {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                    }
                    self.throttled = true;
                    if let Err(e) = self.timer.reset(wait, None) {
                        log::error!("queue {}: arming throttle timer: {e}", self.index);
                    }
                    break;
                }
            }
            if resubmit.is_some() {
                // Still marked in flight, with its original counter.
                self.resubmit.pop_front();
            } else {
                self.tracking.start(head);
            }
            let segs = match segs {
                Ok(segs) => segs,
                Err(e) => {
                    warn_limited!(
                        self.warn,
                        "queue {}: in-flight request {head} not resubmitted: {e}",
                        self.index
                    );
                    self.add_used(vring, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let mem = guard.into_inner();
            match request::parse(&segs, &mem, &self.limits) {
                Err(rejected) => {
                    warn_limited!(
                        self.warn,
                        "queue {}: request refused: {}",
                        self.index,
                        rejected.error
                    );
                    let len = match rejected.status {
                        Some(at) => {
                            write_status(&mem, at, rejected.error.status());
                            1
                        }
                        None => 0,
                    };
                    self.add_used(vring, head, len);
                    used_any = true;
                }
                Ok(req) => {
                    let status_at = req.status;
                    match self.start(req, head, mem.clone()) {
                        Started::Done(status, len) => {
                            write_status(&mem, status_at, status);
                            self.add_used(vring, head, len);
                            used_any = true;
                        }
                        Started::InFlight => {}
                        Started::Deferred => break,
                    }
                }
            }
        }
        used_any
    }

    fn add_used(&self, vring: &VringRwLock, head: u16, len: u32) {
        if let Err(e) = self.tracking.add_used(vring, head, len) {
            log::error!("queue {}: add_used({head}): {e}", self.index);
        }
    }

    fn ioerr(&self, what: std::fmt::Arguments) -> Started {
        warn_limited!(self.warn, "queue {}: {}", self.index, what);
        Started::Done(VIRTIO_BLK_S_IOERR as u8, 1)
    }

    /// Starts a parsed request.
    fn start(&mut self, req: Request, head: u16, mem: Arc<GuestMem>) -> Started {
        let status = req.status;
        match req.kind {
            Kind::GetId { segs } => {
                let mut written = 0usize;
                for s in segs {
                    if written == self.serial.len() {
                        break;
                    }
                    let n = (s.len as usize).min(self.serial.len() - written);
                    if mem
                        .write_slice(&self.serial[written..written + n], s.addr)
                        .is_err()
                    {
                        return self.ioerr(format_args!("GET_ID buffer vanished"));
                    }
                    written += n;
                }
                Started::Done(VIRTIO_BLK_S_OK as u8, written as u32 + 1)
            }
            Kind::Discard(ranges) | Kind::WriteZeroes(ranges) if self.disk.readonly() => {
                let _ = ranges;
                self.ioerr(format_args!("discard/write-zeroes on a read-only disk"))
            }
            Kind::Discard(ranges) => {
                // An empty range is a no-op, not an fallocate EINVAL.
                for r in ranges.into_iter().filter(|r| r.len > 0) {
                    if let Err(e) = self.disk.discard(r.offset, r.len) {
                        return self.ioerr(format_args!(
                            "discard {}+{} on {}: {e}",
                            r.offset,
                            r.len,
                            self.disk.path().display()
                        ));
                    }
                }
                Started::Done(VIRTIO_BLK_S_OK as u8, 1)
            }
            Kind::WriteZeroes(ranges) => {
                for r in ranges.into_iter().filter(|r| r.len > 0) {
                    if let Err(e) = self.disk.write_zeroes(r.offset, r.len, r.unmap) {
                        return self.ioerr(format_args!(
                            "write-zeroes {}+{} on {}: {e}",
                            r.offset,
                            r.len,
                            self.disk.path().display()
                        ));
                    }
                }
                Started::Done(VIRTIO_BLK_S_OK as u8, 1)
            }
            Kind::Flush => self.submit(
                Op::Flush,
                Pending {
                    head,
                    status,
                    mem,
                    expected: 0,
                    is_read: false,
                    bounce: None,
                },
            ),
            Kind::Write { .. } if self.disk.readonly() => {
                self.ioerr(format_args!("write to a read-only disk"))
            }
            Kind::Read { offset, segs } | Kind::Write { offset, segs } => {
                let is_read = req_is_read(&segs);
                let expected: usize = segs.iter().map(|s| s.len as usize).sum();
                let align = self.disk.align();
                if self.disk.direct() && (offset % align as u64 != 0 || expected % align != 0) {
                    return self.ioerr(format_args!(
                        "request {offset}+{expected} not aligned to the {align}-byte block size"
                    ));
                }
                let iov = match guest_iovecs(&mem, &segs) {
                    Ok(iov) => iov,
                    Err(e) => return self.ioerr(format_args!("{e}")),
                };
                let aligned = iov
                    .iter()
                    .all(|v| v.iov_base as usize % align == 0 && v.iov_len % align == 0);
                let (iov, bounce) = if self.disk.direct() && !aligned {
                    if self.bounce_bytes > 0 && self.bounce_bytes + expected > BOUNCE_BUDGET {
                        log::debug!(
                            "queue {}: bounce budget in use ({} bytes), request deferred",
                            self.index,
                            self.bounce_bytes
                        );
                        let kind = if is_read {
                            Kind::Read { offset, segs }
                        } else {
                            Kind::Write { offset, segs }
                        };
                        self.deferred = Some(Deferred {
                            req: Request { kind, status },
                            head,
                            mem,
                        });
                        // Counts as in flight for stop_vring.
                        self.count.add(1);
                        return Started::Deferred;
                    }
                    let mut buf = AlignedBuf::new(expected, align);
                    if !is_read {
                        let mut at = 0;
                        for s in &segs {
                            let dst = &mut buf.as_mut_slice()[at..at + s.len as usize];
                            if mem.read_slice(dst, s.addr).is_err() {
                                return self.ioerr(format_args!("write buffer vanished"));
                            }
                            at += s.len as usize;
                        }
                    }
                    let one = vec![libc::iovec {
                        iov_base: buf.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
                        iov_len: expected,
                    }];
                    (one, Some((buf, segs)))
                } else {
                    (iov, None)
                };
                let op = if is_read {
                    Op::Read { offset, iov }
                } else {
                    Op::Write { offset, iov }
                };
                self.submit(
                    op,
                    Pending {
                        head,
                        status,
                        mem,
                        expected,
                        is_read,
                        bounce,
                    },
                )
            }
        }
    }

    /// Returns a finished request's bounce buffer to the budget.
    fn release(&mut self, p: &Pending) {
        if let Some((buf, _)) = &p.bounce {
            self.bounce_bytes = self.bounce_bytes.saturating_sub(buf.len());
        }
    }

    fn submit(&mut self, op: Op, pending: Pending) -> Started {
        if let Some((buf, _)) = &pending.bounce {
            self.bounce_bytes += buf.len();
        }
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        self.pending.insert(token, pending);
        self.count.add(1);
        match self.engine.submit(token, op) {
            Ok(()) => Started::InFlight,
            Err(e) => {
                if let Some(p) = self.pending.remove(&token) {
                    self.release(&p);
                }
                self.count.add(-1);
                self.ioerr(format_args!("cannot submit I/O: {e}"))
            }
        }
    }

    /// Finishes whatever the engine has completed.
    fn complete(&mut self, vring: &VringRwLock, event_idx: bool) {
        self.engine.reap(&mut self.completions);
        if self.completions.is_empty() {
            return;
        }
        let done = std::mem::take(&mut self.completions);
        for c in &done {
            let Some(p) = self.pending.remove(&c.token) else {
                log::error!(
                    "queue {}: completion for unknown token {}",
                    self.index,
                    c.token
                );
                continue;
            };
            let ok = match &c.result {
                Ok(n) if *n == p.expected => true,
                Ok(n) => {
                    warn_limited!(
                        self.warn,
                        "queue {}: short transfer {n} of {}",
                        self.index,
                        p.expected
                    );
                    false
                }
                Err(e) => {
                    warn_limited!(
                        self.warn,
                        "queue {}: I/O error on {}: {e}",
                        self.index,
                        self.disk.path().display()
                    );
                    false
                }
            };
            let mut ok = ok;
            if ok && p.is_read {
                if let Some((buf, segs)) = &p.bounce {
                    let mut at = 0;
                    for s in segs {
                        let src = &buf.as_slice()[at..at + s.len as usize];
                        ok &= p.mem.write_slice(src, s.addr).is_ok();
                        at += s.len as usize;
                    }
                }
            }
            let (status, len) = match (ok, p.is_read) {
                (true, true) => (VIRTIO_BLK_S_OK, p.expected as u32 + 1),
                (true, false) => (VIRTIO_BLK_S_OK, 1),
                (false, _) => (VIRTIO_BLK_S_IOERR, 1),
            };
            write_status(&p.mem, p.status, status as u8);
            self.add_used(vring, p.head, len);
            self.release(&p);
            self.count.add(-1);
        }
        self.completions = done;
        self.completions.clear();
        signal(vring, event_idx, self.index);
    }
}

/// The chain of an in-flight `head`, read from the descriptor table (it is
/// not in the avail ring's unpopped part any more).
fn resubmitted_chain(
    vring: &VringRwLock,
    mem: &GuestMem,
    head: u16,
) -> std::result::Result<Vec<Segment>, ChainError> {
    let (table, size) = {
        let state = vring.get_ref();
        let queue = state.get_queue();
        (GuestAddress(queue.desc_table()), queue.size())
    };
    Ok(chain::read_chain(mem, table, size, head)?
        .into_iter()
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
            writable: d.writable,
        })
        .collect())
}

fn req_is_read(segs: &[Segment]) -> bool {
    // The parser guarantees all data buffers of a read are device-writable
    // and all of a write device-readable; an empty request is a no-op either way.
    segs.first().is_some_and(|s| s.writable)
}

/// The host addresses of the guest buffers, split where they cross regions.
fn guest_iovecs(mem: &GuestMem, segs: &[Segment]) -> std::result::Result<Vec<libc::iovec>, String> {
    let mut iov = Vec::with_capacity(segs.len());
    for s in segs {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|e| format!("buffer {:#x}+{}: {e}", s.addr.0, s.len))?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    Ok(iov)
}

/// Requests the driver has made available and we have not popped; `None`
/// if the queue is not ready or its avail index is impossible (more than a
/// ring ahead of us), which a well-behaved driver never publishes.
fn avail_pending(vring: &VringRwLock, mem: &GuestMem) -> Option<u16> {
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.ready() {
        return None;
    }
    flotilla_backend::chain::avail_pending(mem, queue)
}

fn write_status(mem: &GuestMem, at: GuestAddress, status: u8) {
    if let Err(e) = mem.write_obj(status, at) {
        log::warn!("cannot write status byte at {:#x}: {e}", at.0);
    }
}

fn signal(vring: &VringRwLock, event_idx: bool, queue: usize) {
    let needed = if event_idx {
        vring.needs_notification().unwrap_or(true)
    } else {
        true
    };
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            log::error!("queue {queue}: signalling the guest: {e}");
        }
    }
}
