//! Turning a guest descriptor chain into host iovecs, with every check a
//! guest-controlled chain needs.
//!
//! Frames never pass through a bounce buffer on the fast path: the
//! iovecs point straight into the shared guest mapping and go to
//! `readv`/`writev` on the tap. So each descriptor is checked here for
//! direction (the device only reads transmit buffers and only writes
//! receive buffers), for lying inside guest memory (split where it crosses
//! regions), and the chain for its segment count and total length.
//!
//! The iovecs are only valid while the caller holds the guest memory
//! snapshot the chain was resolved against.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::header::MAX_BUFFER;
use crate::GuestMem;

/// Which way the device moves data through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Transmit: every descriptor must be device-readable.
    DeviceReads,
    /// Receive: every descriptor must be device-writable.
    DeviceWrites,
}

/// Bounds for one chain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most host segments (after splitting at region boundaries).
    pub max_segments: usize,
    /// Most bytes used.
    pub max_len: usize,
    /// Receive buffers larger than `max_len` are fine (the rest stays
    /// unused); a transmit chain longer than a frame can be is refused.
    pub truncate: bool,
}

/// Most pieces of one chain (Linux uses up to MAX_SKB_FRAGS + 2).
pub const MAX_CHAIN_SEGMENTS: usize = 64;

impl Limits {
    /// One NIC chain moving data `dir`: at most [`MAX_CHAIN_SEGMENTS`] pieces and a
    /// frame's [`MAX_BUFFER`] bytes. A receive buffer may be longer (the rest stays
    /// unused); a transmit chain longer than any frame is refused.
    pub fn frame(dir: Direction) -> Limits {
        Limits {
            max_segments: MAX_CHAIN_SEGMENTS,
            max_len: MAX_BUFFER,
            truncate: dir == Direction::DeviceWrites,
        }
    }
}

/// One piece of a chain in guest-physical terms, parallel to its iovec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor points the wrong way for the queue.
    #[error("descriptor {0} has the wrong direction")]
    WrongDirection(usize),
    /// A descriptor is not (entirely) inside guest memory.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// More pieces than the device takes.
    #[error("chain has more than {0} segments")]
    TooManySegments(usize),
    /// A transmit chain longer than any frame.
    #[error("chain of more than {0} bytes")]
    TooLong(usize),
}

/// What [`gather`] appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gathered {
    /// iovecs (and segments) appended.
    pub segments: usize,
    /// Bytes they cover.
    pub len: usize,
}

/// Copies `iov` into `out` with neighbours that touch in host memory
/// merged into one iovec.
///
/// The bytes a `readv`/`writev` moves and where each lands do not depend on
/// how a contiguous range is cut into iovecs, but the kernel's cost does:
/// it imports every iovec (allocating past 8) and steps its copy per
/// segment. A Linux guest carves receive buffers from large page
/// fragments, so the buffers of one big frame are often back to back.
pub fn coalesce(iov: &[libc::iovec], out: &mut Vec<libc::iovec>) {
    out.clear();
    for v in iov {
        if let Some(last) = out.last_mut() {
            if (last.iov_base as usize).checked_add(last.iov_len) == Some(v.iov_base as usize) {
                last.iov_len += v.iov_len;
                continue;
            }
        }
        out.push(*v);
    }
}

/// Appends the host iovecs and guest segments of `descs` (address, length,
/// device-writable) to `iov` and `segs`. On error nothing is appended.
pub fn gather<I>(
    descs: I,
    mem: &GuestMem,
    dir: Direction,
    limits: &Limits,
    iov: &mut Vec<libc::iovec>,
    segs: &mut Vec<Segment>,
) -> Result<Gathered, ChainError>
where
    I: IntoIterator<Item = (GuestAddress, u32, bool)>,
{
    let (iov_start, seg_start) = (iov.len(), segs.len());
    let result = gather_inner(descs, mem, dir, limits, iov, segs);
    if result.is_err() {
        iov.truncate(iov_start);
        segs.truncate(seg_start);
    }
    result
}

fn gather_inner<I>(
    descs: I,
    mem: &GuestMem,
    dir: Direction,
    limits: &Limits,
    iov: &mut Vec<libc::iovec>,
    segs: &mut Vec<Segment>,
) -> Result<Gathered, ChainError>
where
    I: IntoIterator<Item = (GuestAddress, u32, bool)>,
{
    let mut out = Gathered {
        segments: 0,
        len: 0,
    };
    for (i, (addr, len, writable)) in descs.into_iter().enumerate() {
        if writable != (dir == Direction::DeviceWrites) {
            return Err(ChainError::WrongDirection(i));
        }
        if len == 0 {
            continue;
        }
        let outside = || ChainError::OutsideMemory { addr: addr.0, len };
        // Check the whole descriptor, even a part a receive cap leaves unused.
        let host = within_one_region(mem, addr, len as usize);
        if host.is_none() && !mem.check_range(addr, len as usize) {
            return Err(outside());
        }
        let mut want = len as usize;
        if out.len + want > limits.max_len {
            if !limits.truncate {
                return Err(ChainError::TooLong(limits.max_len));
            }
            want = limits.max_len - out.len;
            if want == 0 {
                continue;
            }
        }
        if let Some(ptr) = host {
            // The common case: the whole descriptor lies in one region,
            // one iovec, no slice iterator.
            if out.segments == limits.max_segments {
                return Err(ChainError::TooManySegments(limits.max_segments));
            }
            iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: want,
            });
            segs.push(Segment { addr, len: want });
            out.segments += 1;
            out.len += want;
            continue;
        }
        let mut at = addr;
        for slice in GuestMemoryBackend::get_slices(mem, addr, want) {
            let slice = slice.map_err(|_| outside())?;
            if out.segments == limits.max_segments {
                return Err(ChainError::TooManySegments(limits.max_segments));
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            segs.push(Segment {
                addr: at,
                len: slice.len(),
            });
            at = GuestAddress(at.0 + slice.len() as u64);
            out.segments += 1;
            out.len += slice.len();
        }
    }
    Ok(out)
}

/// The host address of `addr` if `addr..addr + len` lies inside one
/// region (the check [`GuestMemoryBackend::check_range`] makes, without
/// walking slices); None if it crosses regions or leaves guest memory.
pub(crate) fn within_one_region(mem: &GuestMem, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = addr.0 - region.start_addr().0;
    let end = offset.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Reads the first `buf.len()` bytes of a chain; false if it is shorter.
pub fn read_prefix(mem: &GuestMem, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = s.len.min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Writes `data` over the first bytes of a chain; false if it is shorter.
pub fn write_prefix(mem: &GuestMem, segs: &[Segment], data: &[u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = s.len.min(data.len() - done);
        if mem.write_slice(&data[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// Copies `data` into the chain from its start; false if it does not fit.
pub fn copy_in(mem: &GuestMem, segs: &[Segment], data: &[u8]) -> bool {
    write_prefix(mem, segs, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        // Two regions with a hole between them: 0..64 KiB and 128..192 KiB.
        GuestMem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    const TX: Limits = Limits {
        max_segments: 4,
        max_len: 1000,
        truncate: false,
    };
    const RX: Limits = Limits {
        max_segments: 4,
        max_len: 1000,
        truncate: true,
    };

    fn run(
        descs: &[(u64, u32, bool)],
        dir: Direction,
        limits: &Limits,
    ) -> (Result<Gathered, ChainError>, Vec<libc::iovec>, Vec<Segment>) {
        let m = mem();
        let mut iov = Vec::new();
        let mut segs = Vec::new();
        let r = gather(
            descs.iter().map(|&(a, l, w)| (GuestAddress(a), l, w)),
            &m,
            dir,
            limits,
            &mut iov,
            &mut segs,
        );
        (r, iov, segs)
    }

    #[test]
    fn well_formed_chains() {
        let (r, iov, segs) = run(
            &[(0x100, 12, false), (0x1000, 500, false)],
            Direction::DeviceReads,
            &TX,
        );
        assert_eq!(
            r,
            Ok(Gathered {
                segments: 2,
                len: 512
            })
        );
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[1].iov_len, 500);
        assert_eq!(segs[1].addr, GuestAddress(0x1000));
        // Zero-length descriptors take no segment.
        let (r, _, _) = run(
            &[(0x100, 0, true), (0x200, 100, true)],
            Direction::DeviceWrites,
            &RX,
        );
        assert_eq!(r.unwrap().segments, 1);
    }

    #[test]
    fn wrong_direction_is_refused() {
        let (r, iov, _) = run(
            &[(0x100, 12, false), (0x1000, 100, true)],
            Direction::DeviceReads,
            &TX,
        );
        assert_eq!(r, Err(ChainError::WrongDirection(1)));
        assert!(iov.is_empty(), "nothing appended on error");
        let (r, _, _) = run(&[(0x100, 100, false)], Direction::DeviceWrites, &RX);
        assert_eq!(r, Err(ChainError::WrongDirection(0)));
    }

    #[test]
    fn buffers_outside_memory_are_refused() {
        for (addr, len) in [
            (0x1_0000, 10),     // in the hole
            (0xff00, 0x200),    // runs into the hole
            (0x3_0000, 1),      // past the end
            (u64::MAX - 4, 10), // wraps
        ] {
            let (r, _, _) = run(&[(addr, len, true)], Direction::DeviceWrites, &RX);
            assert!(
                matches!(r, Err(ChainError::OutsideMemory { .. })),
                "{addr:#x}+{len}: {r:?}"
            );
        }
        // A buffer beyond a receive cap is still checked.
        let (r, _, _) = run(
            &[(0, 1000, true), (0x3_0000, 100, true)],
            Direction::DeviceWrites,
            &RX,
        );
        assert!(matches!(r, Err(ChainError::OutsideMemory { .. })));
    }

    #[test]
    fn length_and_segment_limits() {
        let (r, _, _) = run(
            &[(0, 600, false), (0x1000, 600, false)],
            Direction::DeviceReads,
            &TX,
        );
        assert_eq!(r, Err(ChainError::TooLong(1000)));
        // Receive buffers beyond the cap are used only up to it.
        let (r, iov, _) = run(
            &[(0, 600, true), (0x1000, 600, true), (0x2000, 600, true)],
            Direction::DeviceWrites,
            &RX,
        );
        assert_eq!(
            r,
            Ok(Gathered {
                segments: 2,
                len: 1000
            })
        );
        assert_eq!(iov[1].iov_len, 400);
        let five: Vec<_> = (0..5).map(|i| (i * 0x100, 10, false)).collect();
        let (r, _, _) = run(&five, Direction::DeviceReads, &TX);
        assert_eq!(r, Err(ChainError::TooManySegments(4)));
    }

    #[test]
    fn touching_iovecs_are_merged_and_gaps_kept() {
        let mut buf = vec![0u8; 64];
        let base = buf.as_mut_ptr();
        let at = |off: usize, len: usize| libc::iovec {
            // SAFETY: in bounds of `buf` (only the addresses are compared).
            iov_base: unsafe { base.add(off) }.cast(),
            iov_len: len,
        };
        let iov = [
            at(0, 8),
            at(8, 8),
            at(16, 4),
            at(24, 8),
            at(32, 0),
            at(32, 16),
        ];
        let mut out = Vec::new();
        coalesce(&iov, &mut out);
        let got: Vec<(usize, usize)> = out
            .iter()
            .map(|v| (v.iov_base as usize - base as usize, v.iov_len))
            .collect();
        assert_eq!(got, vec![(0, 20), (24, 24)]);
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        assert_eq!(out.iter().map(|v| v.iov_len).sum::<usize>(), total);
        coalesce(&[], &mut out);
        assert!(out.is_empty(), "cleared first");
    }

    #[test]
    fn prefixes_span_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 5,
            },
            Segment {
                addr: GuestAddress(0x2_0000),
                len: 20,
            },
        ];
        let hdr: Vec<u8> = (1..=12).collect();
        assert!(write_prefix(&m, &segs, &hdr));
        let mut back = [0u8; 12];
        assert!(read_prefix(&m, &segs, &mut back));
        assert_eq!(back.to_vec(), hdr);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2_0000)).unwrap(), 6);
        assert!(!read_prefix(&m, &segs[..1], &mut back), "too short");
        assert!(!copy_in(&m, &segs, &[0u8; 26]));
    }
}
