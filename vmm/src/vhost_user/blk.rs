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

/// The config space of an empty block slot: a disk of capacity 0 whose limits match what
/// flotilla-blk reports, because the guest driver reads the limits once, at probe time, and a
/// disk plugged later keeps them.
pub fn empty_config() -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(8, &(1u32 << 20).to_le_bytes()); // size_max
    put(12, &254u32.to_le_bytes()); // seg_max
    put(20, &512u32.to_le_bytes()); // blk_size
    put(26, &1u16.to_le_bytes()); // min_io_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &(1u32 << 22).to_le_bytes()); // max_discard_sectors
    put(40, &32u32.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &(1u32 << 22).to_le_bytes()); // max_write_zeroes_sectors
    put(52, &32u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

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
        empty_config(),
        memory.clone(),
        table.clone(),
    )
    .map(|device| device.with_empty_features(OFFERED_FEATURES & !VIRTIO_BLK_F_RO))
}
