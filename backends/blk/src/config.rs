//! What the device offers: virtio feature bits and the virtio-blk config
//! space.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

use crate::request::{Limits, SECTOR_SIZE};

/// Largest queue the device accepts; also bounds requests in flight per queue. 1024 because
/// QEMU's virtio-mmio transport offers guests 1024-entry queues whatever `queue-size` says.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most data segments one request may have (SEG_MAX): what a 256-entry ring carries beside
/// header and status, so a request fits any queue size a frontend picks (flotilla offers 256).
pub const SEG_MAX: u32 = 254;
/// Largest single data segment advertised (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most ranges in one discard / write-zeroes request.
pub const MAX_RANGES: u32 = 32;
/// Largest discard / write-zeroes range: 2 GiB in sectors, well below the
/// u32 field and large enough that mkfs discards are few requests.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// `struct virtio_blk_config` up to the write-zeroes fields (60 bytes),
/// little-endian as the spec requires for VERSION_1 devices.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioBlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest single segment.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Legacy geometry: cylinders.
    pub cylinders: u16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// Writeback cache mode (CONFIG_WCE only; unused).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (MQ).
    pub num_queues: u16,
    /// Largest discard range in sectors.
    pub max_discard_sectors: u32,
    /// Most discard ranges per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes range in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes ranges per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: plain old data made only of integers, packed so it has no padding
// bytes; every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Device parameters the features and config derive from.
#[derive(Debug, Clone, Copy)]
pub struct DeviceParams {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512, or the O_DIRECT alignment).
    pub block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Read-only device.
    pub readonly: bool,
}

impl DeviceParams {
    /// seg_max: what one chain can carry beside header and status.
    pub fn seg_max(&self) -> u32 {
        SEG_MAX
    }

    /// The virtio feature bits offered (without the vhost-user bit).
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// The config space contents.
    pub fn config(&self) -> VirtioBlkConfig {
        let align_sectors = (u64::from(self.block_size) / SECTOR_SIZE).max(1) as u32;
        VirtioBlkConfig {
            capacity: self.capacity_sectors.to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: self.seg_max().to_le(),
            blk_size: self.block_size.to_le(),
            min_io_size: 1u16.to_le(),
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: MAX_RANGE_SECTORS.to_le(),
            max_discard_seg: MAX_RANGES.to_le(),
            discard_sector_alignment: align_sectors.to_le(),
            max_write_zeroes_sectors: MAX_RANGE_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_RANGES.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// The limits requests are checked against, matching [`Self::config`].
    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity_sectors,
            max_transfer: u64::from(self.seg_max()) * u64::from(SIZE_MAX),
            max_ranges: MAX_RANGES,
            max_range_sectors: MAX_RANGE_SECTORS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec() {
        assert_eq!(std::mem::size_of::<VirtioBlkConfig>(), 60);
        let p = DeviceParams {
            capacity_sectors: 0x1122,
            block_size: 4096,
            num_queues: 3,
            readonly: false,
        };
        let c = p.config();
        let b = c.as_slice();
        assert_eq!(&b[0..8], &0x1122u64.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes()); // blk_size
        assert_eq!(&b[34..36], &3u16.to_le_bytes()); // num_queues
        assert_eq!(&b[40..44], &32u32.to_le_bytes()); // max_discard_seg
        assert_eq!(&b[44..48], &8u32.to_le_bytes()); // discard alignment
        assert_eq!(b[56], 1); // write_zeroes_may_unmap
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let mut p = DeviceParams {
            capacity_sectors: 1,
            block_size: 512,
            num_queues: 1,
            readonly: true,
        };
        let f = p.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        p.readonly = false;
        let f = p.features();
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    }
}
