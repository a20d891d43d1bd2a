//! The vhost-user device: [`BalloonBackend`] implements `VhostUserBackend`
//! for the three balloon queues, all served by one worker thread.
//!
//! Inflate and deflate buffers are handled start to finish within one
//! event, in ring order: pop, read the PFNs, release (inflate) or count
//! (deflate), return the buffer. So the used index in guest memory always
//! equals the number of buffers fully handled, and a successor backend
//! started at that index (the core's replay after a crash) redoes exactly
//! the buffers this one had not finished. Redoing a partly handled inflate
//! buffer only punches again what is already a hole.
//!
//! The config space (`num_pages`, `actual`) is not here: the core owns it
//! (see docs/backends/flotilla-balloon.md), so the backend does not offer
//! VHOST_USER_PROTOCOL_F_CONFIG and keeps no state a restart would lose.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use flotilla_backend::logger::RateLimiter;
use flotilla_backend::warn_limited;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{
    offered_features, DEFLATE_QUEUE, INFLATE_QUEUE, MAX_QUEUE_SIZE, NUM_QUEUES, STATS_QUEUE,
};
use crate::pfn;
use crate::release::{self, CheckOnly, PunchHole, Refusal};
use crate::stats::{Stats, StatsQueue};
use crate::{Error, GuestMem, Result};

/// Event id of the kick of queue `n` is `n`; `NUM_QUEUES` is the library's
/// exit event; the stats timer comes next.
pub const STATS_TIMER_EVENT: u64 = NUM_QUEUES as u64 + 1;

/// Guest-triggered warnings: at most this many per second.
const WARN_BURST: u32 = 10;

/// What the device offers besides its fixed queues.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Return the stats buffer this long after it arrives, to ask the guest
    /// for fresh numbers; `None` keeps the first buffer for good.
    pub stats_interval: Option<Duration>,
}

/// Running totals of this process (a restarted backend starts from zero;
/// the balloon's size proper is `actual` in the core's config space).
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages the guest put in the balloon and the host got back.
    pub released_pages: AtomicU64,
    /// Pages the guest took back out of the balloon.
    pub deflated_pages: AtomicU64,
    /// PFNs refused (outside guest memory, misaligned region, failed punch).
    pub refused_pages: AtomicU64,
    /// Inflate and deflate buffers handled.
    pub buffers: AtomicU64,
}

/// Worker-side state, locked for a whole event so that `stop_vring` (from
/// the frontend's thread) waits for a buffer being handled.
struct Worker {
    stats: StatsQueue,
    timer: TimerFd,
}

/// The virtio-balloon vhost-user device.
pub struct BalloonBackend {
    opts: BackendOptions,
    mem: Mutex<GuestMemoryAtomic<GuestMem>>,
    worker: Mutex<Worker>,
    timer_fd: RawFd,
    counters: Counters,
    warn: Mutex<RateLimiter>,
}

impl BalloonBackend {
    /// Builds the device; `mem` is the memory the daemon will fill in.
    pub fn new(opts: BackendOptions, mem: GuestMemoryAtomic<GuestMem>) -> Result<Self> {
        let timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        // Non-blocking, so that reading a timer re-armed after epoll saw it
        // fire returns EAGAIN instead of stalling the worker until the new
        // expiry.
        nix::fcntl::fcntl(
            timer.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::Timer(e.into()))?;
        Ok(BalloonBackend {
            opts,
            mem: Mutex::new(mem),
            timer_fd: timer.as_raw_fd(),
            worker: Mutex::new(Worker {
                stats: StatsQueue::default(),
                timer,
            }),
            counters: Counters::default(),
            warn: Mutex::new(RateLimiter::new(WARN_BURST, Duration::from_secs(1))),
        })
    }

    /// The stats timer's fd, to register on the worker epoll as
    /// [`STATS_TIMER_EVENT`].
    pub fn timer_fd(&self) -> RawFd {
        self.timer_fd
    }

    /// This process's running totals.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The latest statistics the guest sent, and how many updates came.
    pub fn stats(&self) -> (Option<Stats>, u64) {
        let worker = self.lock_worker();
        let (s, n) = worker.stats.latest();
        (s.cloned(), n)
    }

    fn lock_worker(&self) -> MutexGuard<'_, Worker> {
        self.worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memory(&self) -> GuestMemoryLoadGuard<GuestMem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).memory()
    }

    /// Pops every available buffer of `vring` and hands it to `f` with the
    /// memory it was popped from; `f` returns the head of the buffer to give
    /// back now, if any. Signals the driver once at the end.
    fn drain(
        &self,
        vring: &VringRwLock,
        mut f: impl FnMut(&GuestMem, DescriptorChain<&GuestMem>) -> Option<u16>,
    ) {
        let mem = self.memory();
        let mut used_any = false;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            if let Some(head) = f(&mem, chain) {
                add_used(vring, head);
                used_any = true;
            }
        }
        if used_any {
            notify(vring);
        }
    }

    /// Inflate: release every page of every buffer to the host.
    fn inflate(&self, vring: &VringRwLock) {
        self.drain(vring, |mem, chain| {
            let head = chain.head_index();
            let mut released = 0;
            let mut refused = Refused::default();
            let summary = read_pfns(mem, chain, |range| {
                released +=
                    release::release_range(mem, range, &mut PunchHole, &mut |r| refused.add(r));
            });
            self.counters
                .released_pages
                .fetch_add(released, Ordering::Relaxed);
            self.finish_buffer("inflate", head, summary, refused);
            log::debug!("inflate buffer {head}: {released} page(s) released");
            Some(head)
        });
    }

    /// Deflate: the pages are the guest's again; a hole reads as zeroes and
    /// is filled on first touch, so there is nothing to do but count.
    /// PFNs outside guest memory are reported as on inflate.
    fn deflate(&self, vring: &VringRwLock) {
        self.drain(vring, |mem, chain| {
            let head = chain.head_index();
            let mut pages = 0;
            let mut refused = Refused::default();
            let summary = read_pfns(mem, chain, |range| {
                pages +=
                    release::release_range(mem, range, &mut CheckOnly, &mut |r| refused.add(r));
            });
            self.counters
                .deflated_pages
                .fetch_add(pages, Ordering::Relaxed);
            self.finish_buffer("deflate", head, summary, refused);
            log::debug!("deflate buffer {head}: {pages} page(s)");
            Some(head)
        });
    }

    /// Stats kick: keep the (newest) buffer and its numbers; arm the timer
    /// that will ask for the next update.
    fn stats_arrived(&self, vring: &VringRwLock, worker: &mut Worker) {
        let mut arrived = false;
        self.drain(vring, |mem, chain| {
            let head = chain.head_index();
            let stats = chain
                .reader(mem)
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    let len = r.available_bytes();
                    Stats::parse(&mut r, len).map_err(|e| e.to_string())
                });
            let stats = match stats {
                Ok(s) => {
                    log::debug!("guest memory statistics: {s}");
                    Some(s)
                }
                Err(e) => {
                    warn_limited!(self.warn, "stats buffer {head}: unreadable: {e}");
                    None
                }
            };
            arrived = true;
            // A driver posting a second buffer gets the older one back at once.
            worker.stats.take(head, vring, stats)
        });
        if arrived {
            self.arm_timer(worker);
        }
    }

    /// Stats timer: give the held buffer back, which asks the driver to
    /// refill it. A ring that is stopped or disabled keeps it; try later.
    fn stats_due(&self, vring: &VringRwLock, worker: &mut Worker) {
        // EAGAIN only means the timer was re-armed meanwhile; the held
        // buffer's age is what counts, and it is checked below.
        let _ = worker.timer.wait();
        if !worker.stats.holding() {
            return;
        }
        let live = {
            let state = vring.get_ref();
            state.get_queue().ready() && state.is_enabled()
        };
        if !live {
            self.arm_timer(worker);
            return;
        }
        if let Some(head) = worker.stats.request_update() {
            add_used(vring, head);
            notify(vring);
        }
    }

    fn arm_timer(&self, worker: &mut Worker) {
        if let Some(interval) = self.opts.stats_interval {
            if let Err(e) = worker.timer.reset(interval, None) {
                log::error!("arming the stats timer: {e}");
            }
        }
    }

    /// Counts a handled buffer and reports what was wrong with it, in one
    /// rate-limited line per problem.
    fn finish_buffer(
        &self,
        queue: &str,
        head: u16,
        summary: Result<pfn::ListSummary>,
        refused: Refused,
    ) {
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        self.counters
            .refused_pages
            .fetch_add(refused.pages, Ordering::Relaxed);
        if let Some(first) = &refused.first {
            warn_limited!(
                self.warn,
                "{queue} buffer {head}: {} page(s) refused; first: {first}",
                refused.pages
            );
        }
        match summary {
            Ok(s) if s.trailing_bytes != 0 => warn_limited!(
                self.warn,
                "{queue} buffer {head}: {} byte(s) after the last PFN",
                s.trailing_bytes
            ),
            Ok(_) => {}
            Err(e) => warn_limited!(self.warn, "{queue} buffer {head}: {e}"),
        }
    }
}

/// The pages of one buffer that were not released (or, on deflate, that
/// name no guest memory).
#[derive(Debug, Default)]
struct Refused {
    pages: u64,
    first: Option<Refusal>,
}

impl Refused {
    fn add(&mut self, r: Refusal) {
        self.pages += r.pages();
        self.first.get_or_insert(r);
    }
}

/// Reads the PFN array of `chain` (its device-readable part) run by run.
fn read_pfns(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    f: impl FnMut(pfn::PfnRange),
) -> Result<pfn::ListSummary> {
    let mut reader = chain
        .reader(mem)
        .map_err(|e| Error::Buffer(e.to_string()))?;
    let len = reader.available_bytes();
    pfn::for_each_range(&mut reader, len, f).map_err(|e| Error::Buffer(e.to_string()))
}

fn add_used(vring: &VringRwLock, head: u16) {
    // The device writes nothing into balloon buffers: used length 0.
    if let Err(e) = vring.add_used(head, 0) {
        log::error!("add_used({head}): {e}");
    }
}

fn notify(vring: &VringRwLock) {
    match vring.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = vring.signal_used_queue() {
                log::error!("signalling the guest: {e}");
            }
        }
    }
}

impl VhostUserBackend for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        offered_features(self.opts.deflate_on_oom)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        log::info!("driver features {features:#x}");
    }

    /// No CONFIG: the core serves the config space itself. No
    /// INFLIGHT_SHMFD: in-order, idempotent handling makes the used index
    /// enough to resume (module documentation).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> std::io::Result<()> {
        release::warn_hugepage_regions(&mem.memory());
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn reset_device(&self) {
        self.lock_worker().stats.forget();
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread: the queues are light, and one thread keeps them
        // strictly ordered with respect to each other.
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // Taking the lock waits for an event being handled; the library has
        // marked the queue not ready, so nothing more is popped after it.
        let mut worker = self.lock_worker();
        if queue_index as usize == STATS_QUEUE {
            worker.stats.rewind();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("unexpected event set {evset:?} for event {device_event}");
        }
        let vring = |q: usize| {
            vrings
                .get(q)
                .ok_or_else(|| std::io::Error::other(format!("no vring {q}")))
        };
        let mut worker = self.lock_worker();
        match u64::from(device_event) {
            e if e == INFLATE_QUEUE as u64 => self.inflate(vring(INFLATE_QUEUE)?),
            e if e == DEFLATE_QUEUE as u64 => self.deflate(vring(DEFLATE_QUEUE)?),
            e if e == STATS_QUEUE as u64 => self.stats_arrived(vring(STATS_QUEUE)?, &mut worker),
            STATS_TIMER_EVENT => self.stats_due(vring(STATS_QUEUE)?, &mut worker),
            other => log::warn!("unknown event {other}"),
        }
        Ok(())
    }
}
