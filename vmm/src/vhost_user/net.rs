//! virtio-net over vhost-user: the device type, queues, fixed feature offer and the
//! core-owned config space (MAC and link status).
//!
//! flotilla-net moves the frames between the rings and a tap. The config space stays in the
//! core: the MAC is the slot's (fixed at boot, since a guest driver reads it only at probe)
//! and the link is up exactly while a backend is attached, so `device_add` shows the guest a
//! carrier coming up and `device_del` one going down, and a restarted backend needs no state.

use super::frontend::{ConfigPolicy, FrontendError, VhostUserDevice};
use super::memory::MemoryTable;
use crate::transport::VIRTIO_F_VERSION_1;
use crate::vstate::memory::GuestMemory;

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Most entries of the receive and the transmit queue (a Linux driver takes the maximum).
///
/// 1024, as QEMU users set with `rx_queue_size`/`tx_queue_size` for throughput. A receive
/// ring holds 16 64 KB frames per 256 entries (4 KiB mergeable buffers), and the driver is
/// woken about once per ring's worth of buffers: with 256 entries that wake cost flotilla-net
/// ~10 points of its receive rate in the native benchmark (docs/PERFORMANCE.md, "Session 9"),
/// with 1024 a quarter of that. The cost is guest memory for the posted buffers (up to
/// 4 MiB per receive queue). An earlier try was reverted when the network e2e lost its guest;
/// the same happened later with 256 (a platform failure, tests/README.md "Platform
/// failures"), so it was not the ring size. flotilla-net accepts up to 1024.
pub const QUEUE_SIZE: u16 = 1024;
/// `struct virtio_net_config` up to `mtu`.
pub const CONFIG_LEN: usize = 12;

const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// `VIRTIO_NET_S_LINK_UP` in the status field.
pub const LINK_UP: u16 = 1;
const STATUS: usize = 6;

/// What a NIC slot offers, with or without a backend: flotilla-net's feature set.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN;

/// Link up while a backend is attached; the MAC never changes.
struct NetConfig;

impl ConfigPolicy for NetConfig {
    fn backend_owns_config(&self) -> bool {
        false
    }

    fn on_attach(&self, config: &mut [u8]) {
        if let Some(status) = config.get_mut(STATUS..STATUS + 2) {
            status.copy_from_slice(&LINK_UP.to_le_bytes());
        }
    }
}

/// The config space of a NIC with `mac` and its link down.
pub fn empty_config(mac: [u8; 6]) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
    c
}

/// A vhost-user NIC in slot `name` with `mac`.
pub fn vhost_user_net(
    name: &str,
    mac: [u8; 6],
    memory: &GuestMemory,
    table: &MemoryTable,
) -> Result<VhostUserDevice, FrontendError> {
    Ok(VhostUserDevice::new(
        name,
        VIRTIO_ID_NET,
        vec![QUEUE_SIZE; 2],
        OFFERED_FEATURES,
        empty_config(mac),
        memory.clone(),
        table.clone(),
    )?
    .with_config_policy(Box::new(NetConfig)))
}

/// A locally administered unicast MAC for NIC slot `index` of a VM, different per VM (the
/// low bytes come from `seed`) so that two VMs on one bridge do not collide.
pub fn slot_mac(seed: u32, index: u8) -> [u8; 6] {
    let s = seed.to_le_bytes();
    [0x52, 0x54, s[0], s[1], s[2] ^ s[3], index]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{VirtioDevice, VirtioInterrupt, INT_CONFIG};
    use crate::vstate::memory::GuestRam;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn status(dev: &VhostUserDevice) -> u16 {
        let mut b = [0u8; 2];
        dev.read_config(STATUS as u64, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn an_empty_nic_has_its_mac_and_no_link() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mac = slot_mac(0x1234_5678, 1);
        assert_eq!(mac[0] & 1, 0, "unicast");
        assert_eq!(mac[0] & 2, 2, "locally administered");
        let mut dev = vhost_user_net("net1", mac, &ram.memory, &MemoryTable::new(&ram)).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.set_interrupt(interrupt.clone());
        let mut got = [0u8; 6];
        dev.read_config(0, &mut got);
        assert_eq!(got, mac);
        assert_eq!(status(&dev), 0);
        assert_eq!(dev.device_features(), OFFERED_FEATURES);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        // A backend that fails the handshake leaves the link down and no interrupt.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(dev.attach(ours).is_err());
        assert_eq!(status(&dev), 0);
        assert_eq!(interrupt.status() & INT_CONFIG, 0);
        // Unplugging keeps the MAC.
        dev.detach(true);
        dev.read_config(0, &mut got);
        assert_eq!(got, mac);
    }
}
