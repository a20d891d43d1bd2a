//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! Everything here is guest-controlled, so every length and address is
//! checked with overflow-safe arithmetic before the request reaches the disk.
//! A chain that cannot be served becomes a [`Rejected`] carrying the status
//! the guest should see (IOERR, or UNSUPP for requests we do not implement)
//! and, when the status byte itself is usable, where to write it.
//!
//! The layout follows the spec without assuming descriptor boundaries
//! (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1): the 16-byte header is the
//! start of the first descriptor, the status is the last byte of the last
//! descriptor, and any bytes around them are data. Only a header split over
//! several descriptors is refused; no driver we know sends one.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMem;

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_LEN: usize = 16;

/// One descriptor as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device may write it (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// Device limits a request is checked against; they mirror what the config
/// space advertises, so a driver that honours the config never hits them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Largest read or write accepted, in bytes (seg_max * size_max).
    pub max_transfer: u64,
    /// Most ranges in one discard / write-zeroes request.
    pub max_ranges: u32,
    /// Largest discard / write-zeroes range, in sectors.
    pub max_range_sectors: u32,
}

/// One range of a discard or write-zeroes request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset into the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Write-zeroes only: the driver allows deallocating the range.
    pub unmap: bool,
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `segs` (all device-writable) from byte `offset`.
    Read {
        /// Byte offset into the disk.
        offset: u64,
        /// Guest buffers to fill.
        segs: Vec<Segment>,
    },
    /// Write `segs` (all device-readable) at byte `offset`.
    Write {
        /// Byte offset into the disk.
        offset: u64,
        /// Guest buffers to write.
        segs: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Return the serial number into `segs`.
    GetId {
        /// Guest buffers for the (up to 20-byte) id.
        segs: Vec<Segment>,
    },
    /// Deallocate these ranges.
    Discard(Vec<Range>),
    /// Zero these ranges.
    WriteZeroes(Vec<Range>),
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: Kind,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Too few descriptors for a header and a status.
    #[error("chain has {0} descriptors, a request needs at least 2")]
    TooFewDescriptors(usize),
    /// The last descriptor is not device-writable.
    #[error("status descriptor is device-readable")]
    StatusReadOnly,
    /// The last descriptor has length 0.
    #[error("status descriptor is empty")]
    StatusEmpty,
    /// The status byte is not in guest memory.
    #[error("status byte at {0:#x}+{1} is outside guest memory")]
    StatusOutOfMemory(u64, u32),
    /// The first descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    /// The first descriptor cannot hold the 16-byte header.
    #[error("header descriptor is {0} bytes, the header needs 16")]
    HeaderTooShort(u32),
    /// The header is not in guest memory.
    #[error("header at {0:#x} is outside guest memory")]
    HeaderOutOfMemory(u64),
    /// A data buffer is not (entirely) in guest memory.
    #[error("data buffer {addr:#x}+{len} is outside guest memory")]
    DataOutOfMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A data buffer has the wrong direction for the request type.
    #[error("data buffer direction does not match request type {0}")]
    DataDirection(u32),
    /// A read or write length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request is larger than the device accepts.
    #[error("request of {0} bytes exceeds the limit of {1}")]
    TooLarge(u64, u64),
    /// Sector arithmetic overflows 64 bits.
    #[error("sector {0} overflows")]
    SectorOverflow(u64),
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{bytes} bytes reach past the end ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A discard / write-zeroes payload is empty, ragged or has too many ranges.
    #[error("discard/write-zeroes payload of {0} bytes is malformed or too long")]
    BadRanges(u64),
    /// Flags the device does not support.
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The virtio-blk status byte reported for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where to write the status, if the status descriptor itself is sound;
    /// otherwise the chain is only returned to the driver with length 0.
    pub status: Option<GuestAddress>,
    /// Why it was refused.
    pub error: RequestError,
}

/// Parses the descriptors of one chain, in chain order.
pub fn parse(descs: &[Segment], mem: &GuestMem, limits: &Limits) -> Result<Request, Rejected> {
    let status = status_byte(descs, mem).map_err(|error| Rejected {
        status: None,
        error,
    })?;
    parse_body(descs, mem, limits)
        .map(|kind| Request { kind, status })
        .map_err(|error| Rejected {
            status: Some(status),
            error,
        })
}

fn status_byte(descs: &[Segment], mem: &GuestMem) -> Result<GuestAddress, RequestError> {
    if descs.len() < 2 {
        return Err(RequestError::TooFewDescriptors(descs.len()));
    }
    let last = descs[descs.len() - 1];
    if !last.writable {
        return Err(RequestError::StatusReadOnly);
    }
    if last.len == 0 {
        return Err(RequestError::StatusEmpty);
    }
    last.addr
        .checked_add(u64::from(last.len - 1))
        .filter(|a| mem.address_in_range(*a))
        .ok_or(RequestError::StatusOutOfMemory(last.addr.0, last.len))
}

fn parse_body(descs: &[Segment], mem: &GuestMem, limits: &Limits) -> Result<Kind, RequestError> {
    let first = descs[0];
    let last = descs[descs.len() - 1];
    if first.writable {
        return Err(RequestError::HeaderWritable);
    }
    if first.len < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(first.len));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut hdr, first.addr)
        .map_err(|_| RequestError::HeaderOutOfMemory(first.addr.0))?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    // Data: what follows the header in the first descriptor, the middle
    // descriptors, and what precedes the status byte in the last one.
    let mut segs = Vec::with_capacity(descs.len());
    if first.len > HEADER_LEN {
        segs.push(Segment {
            addr: GuestAddress(first.addr.0.wrapping_add(u64::from(HEADER_LEN))),
            len: first.len - HEADER_LEN,
            writable: false,
        });
    }
    segs.extend_from_slice(&descs[1..descs.len() - 1]);
    if last.len > 1 {
        segs.push(Segment {
            addr: last.addr,
            len: last.len - 1,
            writable: true,
        });
    }
    let mut total: u64 = 0;
    for s in segs.iter().filter(|s| s.len > 0) {
        let in_memory = s.addr.0.checked_add(u64::from(s.len)).is_some()
            && mem.check_range(s.addr, s.len as usize);
        if !in_memory {
            return Err(RequestError::DataOutOfMemory {
                addr: s.addr.0,
                len: s.len,
            });
        }
        total += u64::from(s.len);
    }
    segs.retain(|s| s.len > 0);
    let direction = |writable: bool| {
        if segs.iter().all(|s| s.writable == writable) {
            Ok(())
        } else {
            Err(RequestError::DataDirection(req_type))
        }
    };

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            direction(req_type == VIRTIO_BLK_T_IN)?;
            if total % SECTOR_SIZE != 0 {
                return Err(RequestError::UnalignedLength(total));
            }
            if total > limits.max_transfer {
                return Err(RequestError::TooLarge(total, limits.max_transfer));
            }
            let offset = check_range(sector, total, limits.capacity_sectors)?;
            Ok(if req_type == VIRTIO_BLK_T_IN {
                Kind::Read { offset, segs }
            } else {
                Kind::Write { offset, segs }
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Kind::Flush),
        VIRTIO_BLK_T_GET_ID => {
            direction(true)?;
            Ok(Kind::GetId { segs })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            direction(false)?;
            let max_bytes = u64::from(limits.max_ranges) * RANGE_LEN as u64;
            if total == 0 || total % RANGE_LEN as u64 != 0 || total > max_bytes {
                return Err(RequestError::BadRanges(total));
            }
            let mut payload = vec![0u8; total as usize];
            let mut at = 0usize;
            for s in &segs {
                let end = at + s.len as usize;
                mem.read_slice(&mut payload[at..end], s.addr).map_err(|_| {
                    RequestError::DataOutOfMemory {
                        addr: s.addr.0,
                        len: s.len,
                    }
                })?;
                at = end;
            }
            let write_zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
            let ranges = payload
                .chunks_exact(RANGE_LEN)
                .map(|r| parse_range(r, write_zeroes, limits))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if write_zeroes {
                Kind::WriteZeroes(ranges)
            } else {
                Kind::Discard(ranges)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks `bytes` at `sector` fit the disk; returns the byte offset.
fn check_range(sector: u64, bytes: u64, capacity_sectors: u64) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow(sector))?;
    let end = offset
        .checked_add(bytes)
        .ok_or(RequestError::SectorOverflow(sector))?;
    if end > capacity_sectors.saturating_mul(SECTOR_SIZE) {
        return Err(RequestError::OutOfRange {
            sector,
            bytes,
            capacity: capacity_sectors,
        });
    }
    Ok(offset)
}

fn parse_range(raw: &[u8], write_zeroes: bool, limits: &Limits) -> Result<Range, RequestError> {
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[0..8]);
    let sector = u64::from_le_bytes(sector);
    let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    let allowed = if write_zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    if flags & !allowed != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    if num_sectors > limits.max_range_sectors {
        return Err(RequestError::TooLarge(
            u64::from(num_sectors) * SECTOR_SIZE,
            u64::from(limits.max_range_sectors) * SECTOR_SIZE,
        ));
    }
    let len = u64::from(num_sectors) * SECTOR_SIZE;
    let offset = check_range(sector, len, limits.capacity_sectors)?;
    Ok(Range {
        offset,
        len,
        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    /// VIRTIO_BLK_T_GET_LIFETIME, which the device does not offer.
    const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;

    const MEM: u64 = 0x10_0000;
    const LIMITS: Limits = Limits {
        capacity_sectors: 2048,
        max_transfer: 1 << 20,
        max_ranges: 4,
        max_range_sectors: 1024,
    };

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn hdr(mem: &GuestMem, at: u64, req_type: u32, sector: u64) -> Segment {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        seg(at, 16, false)
    }

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn err(r: Result<Request, Rejected>) -> (Option<u64>, RequestError) {
        let rej = r.unwrap_err();
        (rej.status.map(|a| a.0), rej.error)
    }

    #[test]
    fn read_write_flush_getid_parse() {
        let m = mem();
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let r = parse(
            &[h, seg(0x2000, 1024, true), seg(0x3000, 1, true)],
            &m,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.status, GuestAddress(0x3000));
        assert_eq!(
            r.kind,
            Kind::Read {
                offset: 4096,
                segs: vec![seg(0x2000, 1024, true)]
            }
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let r = parse(
            &[h, seg(0x2000, 512, false), seg(0x3000, 1, true)],
            &m,
            &LIMITS,
        )
        .unwrap();
        assert!(matches!(r.kind, Kind::Write { offset: 0, .. }));
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            parse(&[h, seg(0x3000, 1, true)], &m, &LIMITS).unwrap().kind,
            Kind::Flush
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            &[h, seg(0x2000, 20, true), seg(0x3000, 1, true)],
            &m,
            &LIMITS,
        )
        .unwrap();
        assert!(matches!(r.kind, Kind::GetId { .. }));
    }

    #[test]
    fn any_layout_header_with_data_and_data_with_status() {
        let m = mem();
        let mut h = hdr(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        h.len = 16 + 512;
        let r = parse(&[h, seg(0x3000, 1, true)], &m, &LIMITS).unwrap();
        assert_eq!(
            r.kind,
            Kind::Write {
                offset: 512,
                segs: vec![seg(0x1010, 512, false)]
            }
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let r = parse(&[h, seg(0x2000, 513, true)], &m, &LIMITS).unwrap();
        assert_eq!(r.status, GuestAddress(0x2200));
        assert!(matches!(r.kind, Kind::Read { ref segs, .. } if segs == &[seg(0x2000, 512, true)]));
    }

    #[test]
    fn too_few_descriptors_has_no_status() {
        let m = mem();
        assert_eq!(
            err(parse(&[], &m, &LIMITS)),
            (None, RequestError::TooFewDescriptors(0))
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(parse(&[h], &m, &LIMITS)),
            (None, RequestError::TooFewDescriptors(1))
        );
    }

    #[test]
    fn bad_status_descriptor_has_no_status() {
        let m = mem();
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(parse(&[h, seg(0x3000, 1, false)], &m, &LIMITS)),
            (None, RequestError::StatusReadOnly)
        );
        assert_eq!(
            err(parse(&[h, seg(0x3000, 0, true)], &m, &LIMITS)),
            (None, RequestError::StatusEmpty)
        );
        assert_eq!(
            err(parse(&[h, seg(MEM, 1, true)], &m, &LIMITS)),
            (None, RequestError::StatusOutOfMemory(MEM, 1))
        );
        assert_eq!(
            err(parse(&[h, seg(u64::MAX, 2, true)], &m, &LIMITS)),
            (None, RequestError::StatusOutOfMemory(u64::MAX, 2))
        );
    }

    #[test]
    fn bad_header_reports_ioerr_in_status() {
        let m = mem();
        let st = seg(0x3000, 1, true);
        let mut h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        h.writable = true;
        assert_eq!(
            err(parse(&[h, st], &m, &LIMITS)),
            (Some(0x3000), RequestError::HeaderWritable)
        );
        let h = seg(0x1000, 8, false);
        let (at, e) = err(parse(&[h, st], &m, &LIMITS));
        assert_eq!((at, &e), (Some(0x3000), &RequestError::HeaderTooShort(8)));
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
        let h = seg(MEM - 8, 16, false);
        assert_eq!(
            err(parse(&[h, st], &m, &LIMITS)).1,
            RequestError::HeaderOutOfMemory(MEM - 8)
        );
    }

    #[test]
    fn data_outside_memory_or_huge_is_refused() {
        let m = mem();
        let st = seg(0x3000, 1, true);
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(parse(&[h, seg(MEM - 512, 1024, true), st], &m, &LIMITS)).1,
            RequestError::DataOutOfMemory {
                addr: MEM - 512,
                len: 1024
            }
        );
        assert!(matches!(
            err(parse(&[h, seg(u64::MAX - 10, 512, true), st], &m, &LIMITS)).1,
            RequestError::DataOutOfMemory { .. }
        ));
        // 4 GiB - 512 in one descriptor: outside memory long before the size check.
        assert!(matches!(
            err(parse(&[h, seg(0, u32::MAX - 511, true), st], &m, &LIMITS)).1,
            RequestError::DataOutOfMemory { .. }
        ));
        // In memory, but larger than the transfer limit.
        let limits = Limits {
            max_transfer: 4096,
            ..LIMITS
        };
        assert_eq!(
            err(parse(&[h, seg(0x4000, 8192, true), st], &m, &limits)).1,
            RequestError::TooLarge(8192, 4096)
        );
    }

    #[test]
    fn wrong_direction_and_ragged_length() {
        let m = mem();
        let st = seg(0x3000, 1, true);
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(parse(&[h, seg(0x2000, 512, false), st], &m, &LIMITS)).1,
            RequestError::DataDirection(VIRTIO_BLK_T_IN)
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            err(parse(&[h, seg(0x2000, 100, false), st], &m, &LIMITS)).1,
            RequestError::UnalignedLength(100)
        );
    }

    #[test]
    fn sector_overflow_and_past_the_end() {
        let m = mem();
        let st = seg(0x3000, 1, true);
        let d = seg(0x2000, 512, true);
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX / 256);
        assert_eq!(
            err(parse(&[h, d, st], &m, &LIMITS)).1,
            RequestError::SectorOverflow(u64::MAX / 256)
        );
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX >> 9);
        assert!(matches!(
            err(parse(&[h, seg(0x2000, 1024, true), st], &m, &LIMITS)).1,
            RequestError::SectorOverflow(_)
        ));
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 2047);
        assert!(parse(&[h, d, st], &m, &LIMITS).is_ok());
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 2048);
        assert!(matches!(
            err(parse(&[h, d, st], &m, &LIMITS)).1,
            RequestError::OutOfRange { sector: 2048, .. }
        ));
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_GET_LIFETIME, 0);
        let (at, e) = err(parse(&[h, seg(0x3000, 1, true)], &m, &LIMITS));
        assert_eq!(at, Some(0x3000));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    fn range_bytes(sector: u64, n: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let m = mem();
        let st = seg(0x3000, 1, true);
        let mut payload = range_bytes(8, 8, 0);
        payload.extend(range_bytes(100, 1, 0));
        m.write_slice(&payload, GuestAddress(0x2000)).unwrap();
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let r = parse(&[h, seg(0x2000, 32, false), st], &m, &LIMITS).unwrap();
        assert_eq!(
            r.kind,
            Kind::Discard(vec![
                Range {
                    offset: 4096,
                    len: 4096,
                    unmap: false
                },
                Range {
                    offset: 51200,
                    len: 512,
                    unmap: false
                }
            ])
        );
        m.write_slice(&range_bytes(0, 4, 1), GuestAddress(0x2000))
            .unwrap();
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let r = parse(&[h, seg(0x2000, 16, false), st], &m, &LIMITS).unwrap();
        assert!(matches!(&r.kind, Kind::WriteZeroes(v) if v[0].unmap && v[0].len == 2048));
        // The unmap flag is not defined for discard.
        let h = hdr(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let (_, e) = err(parse(&[h, seg(0x2000, 16, false), st], &m, &LIMITS));
        assert_eq!(e, RequestError::UnsupportedFlags(1));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Ragged, empty, too many ranges, too long, past the end.
        assert_eq!(
            err(parse(&[h, seg(0x2000, 15, false), st], &m, &LIMITS)).1,
            RequestError::BadRanges(15)
        );
        assert_eq!(
            err(parse(&[h, st], &m, &LIMITS)).1,
            RequestError::BadRanges(0)
        );
        assert_eq!(
            err(parse(&[h, seg(0x2000, 80, false), st], &m, &LIMITS)).1,
            RequestError::BadRanges(80)
        );
        m.write_slice(&range_bytes(0, 4096, 0), GuestAddress(0x2000))
            .unwrap();
        assert!(matches!(
            err(parse(&[h, seg(0x2000, 16, false), st], &m, &LIMITS)).1,
            RequestError::TooLarge(..)
        ));
        m.write_slice(&range_bytes(u64::MAX, 1, 0), GuestAddress(0x2000))
            .unwrap();
        assert!(matches!(
            err(parse(&[h, seg(0x2000, 16, false), st], &m, &LIMITS)).1,
            RequestError::SectorOverflow(_)
        ));
    }
}
