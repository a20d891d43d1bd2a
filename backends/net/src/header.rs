//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) that starts
//! every frame on both queues.
//!
//! The tap is set to the same 12-byte header (TUNSETVNETHDRSZ), so frames
//! pass between guest memory and the tap unchanged, header included: the
//! kernel parses the header of a transmitted frame itself and writes the
//! header of a received one. What is left for us is what the spec asks of
//! the device and the kernel cannot know: which offloads the driver
//! negotiated (a transmitted header may only use those; a received one may
//! only carry flags the driver accepts) and `num_buffers` on receive.
//!
//! The kernel validates a transmitted header again when it builds the skb,
//! so the checks here are about spec conformance, not memory safety (the
//! guest may even rewrite the header between our check and the write).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

use crate::config::Negotiated;

/// Size of `struct virtio_net_hdr_v1`: the header with VERSION_1, whether or
/// not MRG_RXBUF is negotiated.
pub const HEADER_LEN: usize = 12;
/// An Ethernet header; shorter frames are malformed.
pub const ETH_HLEN: usize = 14;
/// Largest frame (without the virtio-net header) either way: a 64 KiB
/// GSO packet plus its Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65535 + ETH_HLEN + 4;
/// Largest buffer a frame and its header need.
pub const MAX_BUFFER: usize = HEADER_LEN + MAX_FRAME;

/// Byte offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;

/// The header fields, decoded from little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// VIRTIO_NET_HDR_F_* bits.
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_* kind, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (NEEDS_CSUM).
    pub csum_start: u16,
    /// Where in it the checksum goes (NEEDS_CSUM).
    pub csum_offset: u16,
    /// Receive buffers this frame spans (receive only).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decodes the 12 header bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (at, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Why a transmitted header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Flags other than NEEDS_CSUM (DATA_VALID and RSC_INFO are receive-only).
    #[error("flags {0:#x} are not valid on transmit")]
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    #[error("partial checksum without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    /// The checksum field lies outside the frame.
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame")]
    CsumOutside {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A GSO kind the driver did not negotiate (or none we know).
    #[error("gso_type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    /// A GSO frame with a zero segment size.
    #[error("GSO frame with gso_size 0")]
    GsoSizeZero,
}

/// Checks a header the driver sent with a frame of `frame_len` bytes
/// (after the header) against what it negotiated.
pub fn check_tx(h: &NetHeader, neg: &Negotiated, frame_len: usize) -> Result<(), HeaderError> {
    let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    if h.flags & !needs_csum != 0 {
        return Err(HeaderError::Flags(h.flags));
    }
    if h.flags & needs_csum != 0 {
        if !neg.host_csum() {
            return Err(HeaderError::CsumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::CsumOutside {
                start: h.csum_start,
                offset: h.csum_offset,
                len: frame_len,
            });
        }
    }
    let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    let allowed = match u32::from(h.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => neg.host_tso4() && (!ecn || neg.host_ecn()),
        VIRTIO_NET_HDR_GSO_TCPV6 => neg.host_tso6() && (!ecn || neg.host_ecn()),
        _ => false,
    };
    if !allowed {
        return Err(HeaderError::GsoNotNegotiated(h.gso_type));
    }
    if u32::from(h.gso_type) != VIRTIO_NET_HDR_GSO_NONE && h.gso_size == 0 {
        return Err(HeaderError::GsoSizeZero);
    }
    Ok(())
}

/// Adjusts the header the tap wrote for a received frame before the
/// driver sees it: sets `num_buffers`, and clears the checksum flags if the
/// driver did not negotiate GUEST_CSUM (the spec then requires flags to be
/// zero; the tap, offloads off, has completed the checksum already but may
/// still set DATA_VALID).
pub fn fix_rx(bytes: &mut [u8; HEADER_LEN], neg: &Negotiated, num_buffers: u16) {
    if !neg.guest_csum() {
        bytes[0] = 0;
    }
    if !neg.guest_gso() {
        bytes[1] = VIRTIO_NET_HDR_GSO_NONE as u8;
    }
    bytes[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&num_buffers.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
        VIRTIO_NET_HDR_GSO_UDP,
    };

    fn neg(bits: &[u32]) -> Negotiated {
        Negotiated::new(bits.iter().fold(0, |a, b| a | (1u64 << b)))
    }

    #[test]
    fn header_round_trip_is_little_endian() {
        let h = NetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], &[1, 4, 0x02, 0x01]);
        assert_eq!(&b[10..], &[3, 0]);
        assert_eq!(NetHeader::from_bytes(&b), h);
    }

    #[test]
    fn plain_frames_need_nothing_negotiated() {
        assert_eq!(check_tx(&NetHeader::default(), &neg(&[]), 60), Ok(()));
    }

    #[test]
    fn tx_flags_and_checksums() {
        let partial = NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(
            check_tx(&partial, &neg(&[]), 100),
            Err(HeaderError::CsumNotNegotiated)
        );
        let csum = neg(&[VIRTIO_NET_F_CSUM]);
        assert_eq!(check_tx(&partial, &csum, 100), Ok(()));
        assert_eq!(check_tx(&partial, &csum, 52), Ok(()));
        assert!(matches!(
            check_tx(&partial, &csum, 51),
            Err(HeaderError::CsumOutside { .. })
        ));
        let far = NetHeader {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..partial
        };
        assert!(matches!(
            check_tx(&far, &csum, 70000),
            Err(HeaderError::CsumOutside { .. })
        ));
        let valid = NetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
            ..Default::default()
        };
        assert_eq!(check_tx(&valid, &csum, 100), Err(HeaderError::Flags(2)));
    }

    #[test]
    fn tx_gso_only_as_negotiated() {
        let tso4 = NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 54,
            num_buffers: 0,
        };
        let n = neg(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        assert_eq!(check_tx(&tso4, &n, 65000), Ok(()));
        assert_eq!(
            check_tx(&tso4, &neg(&[VIRTIO_NET_F_CSUM]), 65000),
            Err(HeaderError::GsoNotNegotiated(1))
        );
        let tso6 = NetHeader {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8,
            ..tso4
        };
        assert!(check_tx(&tso6, &n, 65000).is_err());
        let n6 = neg(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO6]);
        assert_eq!(check_tx(&tso6, &n6, 65000), Ok(()));
        let ecn = NetHeader {
            gso_type: (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8,
            ..tso4
        };
        assert!(check_tx(&ecn, &n, 65000).is_err());
        let ne = neg(&[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_ECN,
        ]);
        assert_eq!(check_tx(&ecn, &ne, 65000), Ok(()));
        let ecn_alone = NetHeader {
            gso_type: VIRTIO_NET_HDR_GSO_ECN as u8,
            ..Default::default()
        };
        assert!(check_tx(&ecn_alone, &ne, 100).is_err());
        let udp = NetHeader {
            gso_type: VIRTIO_NET_HDR_GSO_UDP as u8,
            ..tso4
        };
        assert!(check_tx(&udp, &ne, 65000).is_err());
        let zero = NetHeader {
            gso_size: 0,
            ..tso4
        };
        assert_eq!(check_tx(&zero, &n, 65000), Err(HeaderError::GsoSizeZero));
    }

    #[test]
    fn rx_header_fixups() {
        let tap_wrote = NetHeader {
            flags: (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            num_buffers: 0xffff,
            ..Default::default()
        }
        .to_bytes();
        let mut b = tap_wrote;
        fix_rx(&mut b, &neg(&[]), 1);
        let h = NetHeader::from_bytes(&b);
        assert_eq!((h.flags, h.gso_type, h.num_buffers), (0, 0, 1));
        let mut b = tap_wrote;
        fix_rx(
            &mut b,
            &neg(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]),
            7,
        );
        let h = NetHeader::from_bytes(&b);
        assert_eq!((h.flags, h.gso_type, h.num_buffers), (3, 1, 7));
        assert_eq!(h.gso_size, 1448);
    }
}
