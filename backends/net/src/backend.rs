//! The vhost-user device: [`NetBackend`] implements `VhostUserBackend`.
//!
//! Two worker threads, one per queue, as the library runs them
//! (`queues_per_thread`): thread 0 serves the receive queue and watches the
//! tap for readability, thread 1 serves the transmit queue and watches the
//! tap for writability (only needed after EAGAIN). Both tap watches are
//! edge-triggered, so a tap the guest has no room for does not wake the
//! thread over and over.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{
    device_features, MacAddr, Negotiated, VirtioNetConfig, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE,
    TX_QUEUE,
};
use crate::rx::RxQueue;
use crate::stats::Stats;
use crate::tap::Tap;
use crate::tx::TxQueue;
use crate::GuestMem;

/// Event id of "the tap is readable" on the receive thread's epoll. Ids up
/// to the number of queues are the library's (kicks, exit).
pub const TAP_READABLE: u64 = NUM_QUEUES as u64 + 1;
/// Event id of "the tap is writable" on the transmit thread's epoll.
pub const TAP_WRITABLE: u64 = NUM_QUEUES as u64 + 2;

/// The virtio-net vhost-user device on one tap.
pub struct NetBackend {
    tap: Arc<Tap>,
    config: VirtioNetConfig,
    rx: Mutex<RxQueue>,
    tx: Mutex<TxQueue>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    mem: Mutex<GuestMemoryAtomic<GuestMem>>,
    stats: Arc<Stats>,
}

impl NetBackend {
    /// The device for `tap`, offering `mac`; with `poll`, both queues
    /// busy-poll for a short while after running dry (`--poll`).
    pub fn new(tap: Tap, mac: MacAddr, mem: GuestMemoryAtomic<GuestMem>, poll: bool) -> Self {
        let tap = Arc::new(tap);
        let stats = Arc::new(Stats::default());
        NetBackend {
            rx: Mutex::new(RxQueue::new(tap.clone(), stats.clone(), poll)),
            tx: Mutex::new(TxQueue::new(tap.clone(), stats.clone(), poll)),
            tap,
            config: VirtioNetConfig::new(mac),
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(mem),
            stats,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The fds each worker thread must watch: `(thread, fd, events, id)`.
    /// Register them with `VringEpollHandler::register_listener`.
    pub fn listeners(&self) -> Vec<(usize, RawFd, EventSet, u64)> {
        let fd = self.tap.as_raw_fd();
        vec![
            (
                RX_QUEUE,
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TAP_READABLE,
            ),
            (
                TX_QUEUE,
                fd,
                EventSet::OUT | EventSet::EDGE_TRIGGERED,
                TAP_WRITABLE,
            ),
        ]
    }

    fn memory(&self) -> GuestMemoryAtomic<GuestMem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated::new(self.acked.load(Ordering::Acquire))
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Not INFLIGHT_SHMFD: both queues complete in order, so the used index
    /// the core replays as SET_VRING_BASE is exactly where to resume, and a
    /// frame sent twice after a crash is harmless.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        let neg = Negotiated::new(features);
        let offload = neg.tap_offload();
        match self.tap.set_offload(offload) {
            Ok(()) => log::info!("features {features:#x} acked, tap offloads {offload:#x}"),
            Err(e) => log::error!("features {features:#x}: {e}"),
        }
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).reset();
    }

    fn reset_device(&self) {
        self.acked.store(0, Ordering::Release);
        if let Err(e) = self.tap.set_offload(0) {
            log::error!("reset: {e}");
        }
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> std::io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![1 << RX_QUEUE, 1 << TX_QUEUE]
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

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Err(std::io::Error::other(format!(
                "no queue for worker thread {thread_id}"
            )));
        };
        let neg = self.negotiated();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mem = self.memory();
        match (thread_id, u64::from(device_event)) {
            (RX_QUEUE, 0 | TAP_READABLE) => self
                .rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .process(vring, &mem, neg, event_idx),
            (TX_QUEUE, 0 | TAP_WRITABLE) => self
                .tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .process(vring, &mem, neg, event_idx),
            (t, e) => log::warn!("worker {t}: unknown event {e}"),
        }
        Ok(())
    }
}
