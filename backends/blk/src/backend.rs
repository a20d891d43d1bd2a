//! The vhost-user device: [`BlockBackend`] implements `VhostUserBackend`,
//! and each queue is served by its own worker thread through a
//! [`QueueWorker`].
//!
//! The library gives every queue its own epoll thread (`queues_per_thread`
//! returns one bit per thread). On that thread three events drive a queue:
//! the guest's kick (event 0 of the thread), the I/O engine's completion fd,
//! and the throttle timer. Requests are popped, parsed, started, and
//! completed when the engine reports them, in whatever order the disk
//! finishes them; virtio-blk does not require in-order completion.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_backend::inflight::InflightTracker;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::{ByteValued, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::aio::{self, AioMode};
use crate::config::{DeviceParams, VirtioBlkConfig, MAX_QUEUE_SIZE};
use crate::disk::Disk;
use crate::queue::{InflightCount, QueueConfig, QueueWorker};
use crate::throttle::TokenBucket;
use crate::{Error, GuestMem, Result};

/// How long `GET_VRING_BASE` waits for a queue's requests to finish before
/// giving up (and letting the frontend see the ring as it is).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the device serves, besides the image.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Request queues (and worker threads).
    pub num_queues: u16,
    /// The GET_ID answer (truncated to 20 bytes).
    pub serial: String,
    /// I/O engine.
    pub aio: AioMode,
    /// Requests per second over all queues; `None` is unlimited.
    pub iops_total: Option<u64>,
    /// Busy-poll each queue for a short time (50 µs) after it runs dry.
    pub poll: bool,
}

/// The virtio-blk vhost-user device.
pub struct BlockBackend {
    params: DeviceParams,
    config: VirtioBlkConfig,
    workers: Vec<Mutex<QueueWorker>>,
    inflight: Vec<Arc<InflightCount>>,
    tracker: Arc<InflightTracker>,
    event_idx: AtomicBool,
    mem: Mutex<GuestMemoryAtomic<GuestMem>>,
}

impl BlockBackend {
    /// Builds the device and one worker per queue for `disk`.
    pub fn new(
        disk: Arc<Disk>,
        opts: &BackendOptions,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> Result<Self> {
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(Error::Options(format!(
                "--num-queues {} is outside 1..=64",
                opts.num_queues
            )));
        }
        let params = DeviceParams {
            capacity_sectors: disk.sectors(),
            block_size: disk.align() as u32,
            num_queues: opts.num_queues,
            readonly: disk.readonly(),
        };
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let id = opts.serial.as_bytes();
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id[..n]);
        let throttle = opts
            .iops_total
            .map(|rate| Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now()))));
        let mode = opts.aio.resolve();
        log::info!(
            "{}: {} sectors, block size {}, {} queue(s), aio {:?}{}{}",
            disk.path().display(),
            params.capacity_sectors,
            params.block_size,
            opts.num_queues,
            mode,
            if disk.readonly() { ", read-only" } else { "" },
            if disk.direct() { ", direct" } else { "" },
        );
        let tracker = InflightTracker::new(opts.num_queues, MAX_QUEUE_SIZE);
        let mut workers = Vec::new();
        let mut inflight = Vec::new();
        for index in 0..usize::from(opts.num_queues) {
            let engine =
                aio::new_engine(mode, disk.fd(), u32::from(MAX_QUEUE_SIZE)).map_err(|source| {
                    Error::Engine {
                        queue: index,
                        source,
                    }
                })?;
            let worker = QueueWorker::new(
                QueueConfig {
                    index,
                    disk: disk.clone(),
                    limits: params.limits(),
                    serial,
                    throttle: throttle.clone(),
                    poll: opts.poll,
                    tracking: tracker.queue(index as u16),
                },
                engine,
            )?;
            inflight.push(worker.inflight());
            workers.push(Mutex::new(worker));
        }
        Ok(BlockBackend {
            config: params.config(),
            params,
            workers,
            inflight,
            tracker,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(mem),
        })
    }

    /// Event id of the engine completion fd on every worker's epoll.
    pub fn completion_event(&self) -> u64 {
        u64::from(self.params.num_queues) + 1
    }

    /// Event id of the throttle timer on every worker's epoll.
    pub fn timer_event(&self) -> u64 {
        u64::from(self.params.num_queues) + 2
    }

    /// The extra fds each worker thread must watch: `(thread, fd, event id)`.
    /// Register them with `VringEpollHandler::register_listener`.
    pub fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        let mut out = Vec::new();
        for (thread, w) in self.workers.iter().enumerate() {
            let (completion, timer) = w.lock().unwrap_or_else(|e| e.into_inner()).fds();
            if let Some(fd) = completion {
                out.push((thread, fd, self.completion_event()));
            }
            out.push((thread, timer, self.timer_event()));
        }
        out
    }

    /// The inflight tracking shared with the relay (pass it to
    /// `flotilla_backend::daemon::serve_tracked`).
    pub fn inflight_tracker(&self) -> Arc<InflightTracker> {
        self.tracker.clone()
    }

    fn memory(&self) -> GuestMemoryAtomic<GuestMem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.params.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.params.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Out-of-range bytes read as zero rather than failing the message.
        let cfg = self.config.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(cfg.len());
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> std::io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.params.num_queues).map(|q| 1u64 << q).collect()
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
        let index = queue_index as usize;
        if let (Some(worker), Some(count)) = (self.workers.get(index), self.inflight.get(index)) {
            // The library marked the queue not ready before calling us, so
            // once the worker is between events it pops nothing more; taking
            // its lock waits for a pass that may still be popping. Then wait
            // for what it started, without the lock, which completions need.
            drop(worker.lock().unwrap_or_else(|e| e.into_inner()));
            if !count.wait_zero(DRAIN_TIMEOUT) {
                log::error!(
                    "queue {queue_index}: requests still in flight after {DRAIN_TIMEOUT:?}"
                );
            }
            // Drained: from now on nothing is popped until the ring restarts
            // and inflight recovery has run again.
            worker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ring_stopped();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("unexpected event set {evset:?} for event {device_event}");
        }
        let (Some(vring), Some(worker)) = (vrings.first(), self.workers.get(thread_id)) else {
            return Err(std::io::Error::other(format!(
                "no queue for worker thread {thread_id}"
            )));
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mem = self.memory();
        match u64::from(device_event) {
            0 => worker.on_kick(vring, &mem, event_idx),
            e if e == self.completion_event() => worker.on_completion(vring, &mem, event_idx),
            e if e == self.timer_event() => worker.on_timer(vring, &mem, event_idx),
            other => log::warn!("queue {thread_id}: unknown event {other}"),
        }
        Ok(())
    }
}
