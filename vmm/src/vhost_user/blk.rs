//! virtio-blk over vhost-user: the device type, queue size, config layout and the fixed
//! feature offer. Everything else is the generic frontend.

use super::frontend::{FrontendError, VhostUserDevice};
use super::memory::MemoryTable;
use crate::transport::VIRTIO_F_VERSION_1;
use crate::vstate::memory::GuestMemory;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Ring size offered per queue (what flotilla-blk supports).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` up to and including the write-zeroes fields.
pub const CONFIG_LEN: usize = 60;

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The features a block slot offers the guest. Fixed, so that a slot negotiated at boot with
/// no backend (hotplug) and any later backend agree; a backend is intersected with it.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_RO
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_TOPOLOGY
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES;

/// A vhost-user block device with `num_queues` queues.
pub fn vhost_user_blk(
    id: &str,
    num_queues: u16,
    memory: &GuestMemory,
    table: &MemoryTable,
) -> Result<VhostUserDevice, FrontendError> {
    VhostUserDevice::new(
        id,
        VIRTIO_ID_BLOCK,
        vec![QUEUE_SIZE; usize::from(num_queues.max(1))],
        OFFERED_FEATURES,
        CONFIG_LEN,
        memory.clone(),
        table.clone(),
    )
}
