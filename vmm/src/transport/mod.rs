//! Virtio transports: how a guest driver finds and drives a virtio device. The device side is
//! the [`VirtioDevice`] trait; in flotilla every implementation is a vhost-user frontend whose
//! data path runs in a backend process, so the trait is about negotiation and state, not I/O.

pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Feature bit every modern (non-legacy) device and driver must agree on.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 0x2;

/// What the driver programmed for one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ("driver") ring address.
    pub avail_ring: u64,
    /// Used ("device") ring address.
    pub used_ring: u64,
}

impl QueueConfig {
    /// A queue of at most `max_size` entries, not yet set up.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// Whether the driver's settings describe a usable split ring.
    pub fn is_valid(&self) -> bool {
        self.size != 0
            && self.size <= self.max_size
            && self.size.is_power_of_two()
            && self.desc_table.is_multiple_of(16)
            && self.avail_ring.is_multiple_of(2)
            && self.used_ring.is_multiple_of(4)
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("device activation failed: {0}")]
pub struct ActivateError(pub String);

/// A virtio device as a transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 1 = net, 5 = balloon).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn device_features(&self) -> u64;
    /// The driver accepted `features` (a subset of the offer) with FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing `queues`.
    fn activate(&mut self, queues: &[QueueConfig]) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the rings, forget negotiated state.
    fn reset(&mut self);
    /// A queue notification that did not go through an ioeventfd.
    fn queue_notify(&mut self, _queue: u16) {}
    /// Eventfds to register as ioeventfds on the notify register, one per queue (matched on
    /// the queue index), so guest kicks bypass the core. Empty: notifications go through
    /// [`queue_notify`](Self::queue_notify).
    fn queue_events(&self) -> &[EventFd] {
        &[]
    }
    /// Tells the device which interrupt is its own, before the guest sees it.
    fn set_interrupt(&mut self, _interrupt: std::sync::Arc<VirtioInterrupt>) {}
}

/// A device's interrupt: the status bits the guest reads plus the irqfd that raises the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    external_vrings: std::sync::atomic::AtomicBool,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt raised through `irq` (registered with KVM as an irqfd).
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            external_vrings: std::sync::atomic::AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// The eventfd behind the line (handed to backends as the call fd).
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// Sets `bits` in the status and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Announces a configuration change: bumps the generation and signals [`INT_CONFIG`].
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INT_CONFIG);
    }

    /// Current interrupt status bits.
    pub fn status(&self) -> u32 {
        let vring = if self.external_vrings.load(Ordering::SeqCst) {
            INT_VRING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | vring
    }

    /// For devices whose backend raises the irqfd itself (vhost-user): the core cannot set
    /// the "used ring" status bit when that happens, so it always reports it, and the guest
    /// driver checks its rings on every interrupt (a ring without new entries costs a read).
    pub fn set_external_vrings(&self, on: bool) {
        self.external_vrings.store(on, Ordering::SeqCst);
    }

    /// The guest acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Configuration generation counter.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Clears the status on device reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}
