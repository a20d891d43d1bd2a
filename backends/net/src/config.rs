//! What the device offers: virtio feature bits, the virtio-net config space,
//! and how acked features map onto tap offloads.

use std::fmt;
use std::str::FromStr;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Largest queue the device accepts (QEMU's virtio-mmio offers 1024 whatever
/// `queue-size` says, as for flotilla-blk).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queues of the device: receive queue 0, transmit queue 1. No control
/// queue (docs/decisions/net-control-queue.md) and no multiqueue.
pub const NUM_QUEUES: usize = 2;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// One bit.
const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The virtio feature bits offered (without the vhost-user bit).
///
/// UFO is left out on purpose: Linux guests stopped offering HOST_UFO in
/// 4.14 and the kernel no longer produces UFO packets for a tap to hand us,
/// so it would only be surface to validate. No CTRL_VQ, MQ or MTU either.
pub const fn device_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
}

/// The features the driver acked, as the data path needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Raw acked feature bits.
    pub bits: u64,
}

impl Negotiated {
    /// Wraps the bits of SET_FEATURES.
    pub fn new(bits: u64) -> Self {
        Negotiated { bits }
    }

    fn has(&self, b: u32) -> bool {
        self.bits & bit(b) != 0
    }

    /// Receive buffers may be merged (one frame over several chains).
    pub fn mrg_rxbuf(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// The driver accepts partially checksummed frames.
    pub fn guest_csum(&self) -> bool {
        self.has(VIRTIO_NET_F_GUEST_CSUM)
    }

    /// The driver accepts frames needing segmentation (any GSO kind).
    pub fn guest_gso(&self) -> bool {
        self.has(VIRTIO_NET_F_GUEST_TSO4) || self.has(VIRTIO_NET_F_GUEST_TSO6)
    }

    /// The driver may send partially checksummed frames.
    pub fn host_csum(&self) -> bool {
        self.has(VIRTIO_NET_F_CSUM)
    }

    /// The driver may send TCPv4 segmentation offload frames.
    pub fn host_tso4(&self) -> bool {
        self.has(VIRTIO_NET_F_HOST_TSO4)
    }

    /// The driver may send TCPv6 segmentation offload frames.
    pub fn host_tso6(&self) -> bool {
        self.has(VIRTIO_NET_F_HOST_TSO6)
    }

    /// The driver may send TSO frames with the ECN (CWR) bit.
    pub fn host_ecn(&self) -> bool {
        self.has(VIRTIO_NET_F_HOST_ECN)
    }

    /// The TUNSETOFFLOAD flags these features allow: what the tap may hand
    /// us unsegmented or without a checksum, i.e. what the guest takes.
    ///
    /// The kernel refuses TSO without CSUM, and the spec makes GUEST_TSO*
    /// depend on GUEST_CSUM, so segmentation is only enabled with it.
    pub fn tap_offload(&self) -> u32 {
        if !self.guest_csum() {
            return 0;
        }
        let mut f = libc::TUN_F_CSUM;
        if self.has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= libc::TUN_F_TSO4;
        }
        if self.has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= libc::TUN_F_TSO6;
        }
        if self.has(VIRTIO_NET_F_GUEST_ECN) && f & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            f |= libc::TUN_F_TSO_ECN;
        }
        f
    }
}

/// A MAC address; parsed from `XX:XX:XX:XX:XX:XX`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address under QEMU's 52:54:00
    /// prefix, for standalone use without `--mac`.
    pub fn random() -> Self {
        let mut b = [0u8; 3];
        // SAFETY: getrandom writes at most b.len() bytes into b, which is
        // valid for writes of that length.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // No entropy source: fall back on the pid, still unique per host.
            b.copy_from_slice(&std::process::id().to_le_bytes()[..3]);
        }
        MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a `--mac` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six colon-separated hex bytes.
    #[error("{0:?} is not a MAC address (XX:XX:XX:XX:XX:XX)")]
    Syntax(String),
    /// Multicast bit set: a NIC address must be unicast.
    #[error("{0} is a multicast address")]
    Multicast(String),
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(|| MacError::Syntax(s.into()))?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(MacError::Syntax(s.into()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax(s.into()));
        }
        if out[0] & 1 != 0 {
            return Err(MacError::Multicast(s.into()));
        }
        Ok(MacAddr(out))
    }
}

/// `struct virtio_net_config` up to `max_virtqueue_pairs` (10 bytes),
/// little-endian as VERSION_1 requires. MTU and later fields belong to
/// features we do not offer and read as zero.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioNetConfig {
    /// MAC (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// Link status (VIRTIO_NET_F_STATUS).
    pub status: u16,
    /// Queue pairs (only meaningful with MQ; 1).
    pub max_virtqueue_pairs: u16,
}

// SAFETY: plain old data made only of integers, packed so it has no padding
// bytes; every bit pattern is a valid value.
unsafe impl ByteValued for VirtioNetConfig {}

impl VirtioNetConfig {
    /// The config of a device with `mac` whose link is up: a backend only
    /// exists while it serves, and the core reports "link down" itself
    /// while no backend is attached.
    pub fn new(mac: MacAddr) -> Self {
        VirtioNetConfig {
            mac: mac.0,
            status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
            max_virtqueue_pairs: 1u16.to_le(),
        }
    }

    /// `size` bytes from `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(cfg.len());
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert_eq!("52:54:00:AB:cd:EF".parse::<MacAddr>().unwrap().0[3], 0xab);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
            "+1:54:00:12:34:56",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
        let r = MacAddr::random();
        assert_eq!(&r.0[..3], &[0x52, 0x54, 0x00]);
    }

    #[test]
    fn config_layout() {
        assert_eq!(std::mem::size_of::<VirtioNetConfig>(), 10);
        let c = VirtioNetConfig::new(MacAddr([1, 2, 3, 4, 5, 6]));
        assert_eq!(c.read(0, 6), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(c.read(6, 2), vec![1, 0], "LINK_UP");
        assert_eq!(c.read(8, 2), vec![1, 0], "one queue pair");
        assert_eq!(c.read(8, 6), vec![1, 0, 0, 0, 0, 0], "zero past the end");
        assert_eq!(c.read(100, 4), vec![0; 4]);
        assert_eq!(c.read(u32::MAX, 2), vec![0; 2]);
    }

    #[test]
    fn offloads_follow_the_acked_guest_features() {
        let f = |bits: &[u32]| Negotiated::new(bits.iter().fold(0, |a, b| a | bit(*b)));
        assert_eq!(f(&[]).tap_offload(), 0);
        // TSO without GUEST_CSUM is not a valid combination: nothing.
        assert_eq!(f(&[VIRTIO_NET_F_GUEST_TSO4]).tap_offload(), 0);
        assert_eq!(
            f(&[VIRTIO_NET_F_GUEST_CSUM]).tap_offload(),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN
            ])
            .tap_offload(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // ECN alone means nothing without a TSO kind.
        assert_eq!(
            f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN]).tap_offload(),
            libc::TUN_F_CSUM
        );
        // Host-side (TX) features do not change what the tap hands us.
        assert_eq!(
            f(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]).tap_offload(),
            0
        );
    }

    #[test]
    fn offered_features() {
        let f = device_features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        for b in [
            virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ,
            virtio_bindings::virtio_net::VIRTIO_NET_F_MQ,
            virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO,
            virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_UFO,
        ] {
            assert_eq!(f & bit(b), 0, "bit {b}");
        }
    }
}
