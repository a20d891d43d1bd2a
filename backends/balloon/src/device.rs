//! What the virtio-balloon device is on the wire: its queues, the feature
//! bits it offers and the page size its PFNs count in (virtio 1.2, section
//! 5.5 "Traditional Memory Balloon Device").
//!
//! `virtio-bindings` 0.2 has no balloon header, so the few numbers the
//! device needs are written down here, each with the name the specification
//! gives it.

/// Virtio device id of the traditional memory balloon.
pub const DEVICE_ID: u32 = 5;

/// Index of the inflate queue (`inflateq`): PFNs the guest gives up.
pub const INFLATE_QUEUE: usize = 0;
/// Index of the deflate queue (`deflateq`): PFNs the guest takes back.
pub const DEFLATE_QUEUE: usize = 1;
/// Index of the statistics queue (`statsq`), present with
/// [`VIRTIO_BALLOON_F_STATS_VQ`].
pub const STATS_QUEUE: usize = 2;
/// Queues the backend serves. Free page hinting and free page reporting
/// would add queues 3 and 4; they are not offered.
pub const NUM_QUEUES: usize = 3;

/// Largest ring the backend accepts, for every queue. The Linux driver puts
/// at most 256 PFNs (one buffer) in flight per request and one stats buffer,
/// so any size works; 256 matches Firecracker and leaves room for drivers
/// that batch.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// VIRTIO_BALLOON_F_STATS_VQ: the statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate the balloon by
/// itself when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// VIRTIO_F_VERSION_1: modern device (flotilla's transports are modern only).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Balloon PFNs count pages of this size whatever the guest's page size
/// (VIRTIO_BALLOON_PFN_SHIFT).
pub const PFN_SHIFT: u32 = 12;
/// Size of the page one PFN names.
pub const PAGE_SIZE: u64 = 1 << PFN_SHIFT;

/// The virtio feature bits the device offers (without the vhost-user
/// PROTOCOL_FEATURES bit, which the backend adds).
pub fn offered_features(deflate_on_oom: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BALLOON_F_STATS_VQ);
    if deflate_on_oom {
        f |= 1u64 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_the_flag() {
        assert_eq!(offered_features(false), 0x1_0000_0002);
        assert_eq!(offered_features(true), 0x1_0000_0006);
    }
}
