//! A snapshot of a device's virtqueues for operators: QMP `x-flotilla-query-virtqueues`
//! (flotilla's counterpart of QEMU's `x-query-virtio-queue-status`).
//!
//! Why it exists: the core is off the data path. Guest kicks reach the backend through
//! ioeventfds and completions reach the guest through the irqfd, so when a device stalls the
//! core has no counter that says which side stopped. The split rings in guest memory do
//! (virtio 1.2 §2.7): the driver publishes `avail.idx` and, with `VIRTIO_RING_F_EVENT_IDX`,
//! `used_event` (the used index it wants an interrupt for); the device publishes `used.idx`
//! and `avail_event` (the avail index it wants the next kick for, written when the backend
//! goes back to waiting: how far it had looked when it last went idle). Comparing them tells
//! "the backend is not taking requests" from "the backend is not completing them" from "the
//! guest is not seeing completions" (docs/qmp.md has the table).
//!
//! The addresses are the guest's, so every field is read on its own and may be missing (a ring
//! partly or wholly outside RAM reads as `None`) instead of failing the query. The values race
//! with the guest and the backend: they are a picture for diagnosis, never an input to the
//! device model.

use vm_memory::{Bytes, GuestAddress};

use crate::transport::QueueConfig;
use crate::vstate::memory::GuestMemory;

use super::frontend::BackendState;

/// `VIRTIO_RING_F_EVENT_IDX`: `used_event` and `avail_event` are in use. Without it they are
/// whatever the memory holds.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The indices of one split virtqueue as found in guest memory; `None` where the memory could
/// not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingIndices {
    /// `avail.flags` (bit 0: the driver asks for no interrupts).
    pub avail_flags: Option<u16>,
    /// `avail.idx`: requests the driver has made available, modulo 2^16.
    pub avail_idx: Option<u16>,
    /// `used_event`, the u16 after the available ring's entries: the driver wants an interrupt
    /// once `used.idx` passes it.
    pub used_event: Option<u16>,
    /// `used.flags` (bit 0: the device asks for no kicks).
    pub used_flags: Option<u16>,
    /// `used.idx`: requests the device has completed, modulo 2^16.
    pub used_idx: Option<u16>,
    /// `avail_event`, the u16 after the used ring's entries: the device wants a kick once
    /// `avail.idx` passes it.
    pub avail_event: Option<u16>,
}

/// Reads the little-endian u16 at `base + offset`; `None` outside guest memory or on overflow.
fn read_u16(memory: &GuestMemory, base: u64, offset: u64) -> Option<u16> {
    let gpa = base.checked_add(offset)?;
    let mut bytes = [0u8; 2];
    memory.read_slice(&mut bytes, GuestAddress(gpa)).ok()?;
    Some(u16::from_le_bytes(bytes))
}

impl RingIndices {
    /// Reads the indices of the split ring `queue` describes.
    pub fn read(memory: &GuestMemory, queue: &QueueConfig) -> Self {
        let size = u64::from(queue.size);
        RingIndices {
            avail_flags: read_u16(memory, queue.avail_ring, 0),
            avail_idx: read_u16(memory, queue.avail_ring, 2),
            // flags, idx, then `size` u16 entries.
            used_event: read_u16(memory, queue.avail_ring, 4 + 2 * size),
            used_flags: read_u16(memory, queue.used_ring, 0),
            used_idx: read_u16(memory, queue.used_ring, 2),
            // flags, idx, then `size` entries of {u32 id, u32 len}.
            avail_event: read_u16(memory, queue.used_ring, 4 + 8 * size),
        }
    }

    /// Requests made available and not yet completed: `avail.idx - used.idx`, wrapping (the
    /// indices are free-running u16s). `None` when either could not be read.
    pub fn inflight(&self) -> Option<u16> {
        Some(self.avail_idx?.wrapping_sub(self.used_idx?))
    }
}

/// A queue the guest set up and made ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyQueue {
    /// What the guest programmed: size and the guest-physical ring addresses.
    pub config: QueueConfig,
    /// What the rings hold now.
    pub rings: RingIndices,
}

/// One virtqueue of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueStatus {
    /// Queue index.
    pub index: usize,
    /// `None` while the guest has not activated the device or did not make this queue ready:
    /// its addresses mean nothing then, and no ring is read.
    pub ready: Option<ReadyQueue>,
}

impl QueueStatus {
    /// Queue `index` with the configuration the device was activated with (`None`: not
    /// activated); the rings of a ready queue are read from `memory`.
    pub fn read(memory: &GuestMemory, index: usize, config: Option<&QueueConfig>) -> Self {
        QueueStatus {
            index,
            ready: config.filter(|q| q.ready).map(|q| ReadyQueue {
                config: *q,
                rings: RingIndices::read(memory, q),
            }),
        }
    }
}

/// A device's queues and the state around them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtqueueStatus {
    /// Attached, waiting for a restarted backend, or an empty slot.
    pub state: BackendState,
    /// The guest set DRIVER_OK and has not reset the device since.
    pub activated: bool,
    /// The guest negotiated `VIRTIO_RING_F_EVENT_IDX` (`used_event`/`avail_event` are live).
    pub event_idx: bool,
    /// The transport's InterruptStatus bits as the guest would read them (`None` before the
    /// transport handed the device its interrupt). For vhost-user devices the "used ring"
    /// bit is always set: the backend raises the irqfd directly and the core cannot know.
    pub interrupt_status: Option<u32>,
    /// Every queue, by index.
    pub queues: Vec<QueueStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x10_000;
    const AVAIL: u64 = 0x11_000;
    const USED: u64 = 0x12_000;

    fn put(ram: &GuestRam, gpa: u64, value: u16) {
        ram.memory
            .write_slice(&value.to_le_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    fn queue(avail: u64, used: u64) -> QueueConfig {
        QueueConfig {
            max_size: 256,
            size: SIZE,
            ready: true,
            desc_table: DESC,
            avail_ring: avail,
            used_ring: used,
        }
    }

    #[test]
    fn indices_are_read_where_the_split_ring_layout_puts_them() {
        let ram = GuestRam::new(16 << 20).unwrap();
        put(&ram, AVAIL, 1); // NO_INTERRUPT
        put(&ram, AVAIL + 2, 3);
        put(&ram, AVAIL + 4 + 2 * u64::from(SIZE), 65534);
        put(&ram, USED, 1); // NO_NOTIFY
        put(&ram, USED + 2, 65535);
        put(&ram, USED + 4 + 8 * u64::from(SIZE), 2);
        let rings = RingIndices::read(&ram.memory, &queue(AVAIL, USED));
        assert_eq!(
            rings,
            RingIndices {
                avail_flags: Some(1),
                avail_idx: Some(3),
                used_event: Some(65534),
                used_flags: Some(1),
                used_idx: Some(65535),
                avail_event: Some(2),
            }
        );
        // The indices are free-running: 3 - 65535 = 4 requests outstanding.
        assert_eq!(rings.inflight(), Some(4));
    }

    #[test]
    fn rings_outside_memory_read_as_missing_fields() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let end = 16u64 << 20;
        // Wholly outside RAM, and at the very top of the address space (no overflow).
        for (avail, used) in [(1 << 40, 1 << 41), (u64::MAX - 1, u64::MAX - 3)] {
            let rings = RingIndices::read(&ram.memory, &queue(avail, used));
            assert_eq!(rings, RingIndices::default());
            assert_eq!(rings.inflight(), None);
        }
        // The avail ring's header is the last word of RAM: flags and idx are there, its
        // used_event is not; the used ring is outside altogether.
        put(&ram, end - 2, 9);
        let rings = RingIndices::read(&ram.memory, &queue(end - 4, end));
        assert_eq!(rings.avail_flags, Some(0));
        assert_eq!(rings.avail_idx, Some(9));
        assert_eq!(rings.used_event, None);
        assert_eq!((rings.used_idx, rings.avail_event), (None, None));
        assert_eq!(rings.inflight(), None);
    }

    #[test]
    fn queues_not_ready_or_not_activated_have_no_indices() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert_eq!(QueueStatus::read(&ram.memory, 0, None).ready, None);
        let mut q = queue(AVAIL, USED);
        q.ready = false;
        assert_eq!(QueueStatus::read(&ram.memory, 1, Some(&q)).ready, None);
        q.ready = true;
        let status = QueueStatus::read(&ram.memory, 1, Some(&q));
        assert_eq!(status.index, 1);
        assert_eq!(status.ready.map(|r| r.config), Some(q));
        assert_eq!(status.ready.and_then(|r| r.rings.inflight()), Some(0));
    }
}
