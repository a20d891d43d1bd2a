//! PFN lists: what the inflate and deflate queues carry.
//!
//! A buffer on either queue is an array of 32-bit little-endian page frame
//! numbers, each naming one 4 KiB page of guest-physical memory. Drivers
//! hand over pages in runs (Linux takes them from the buddy allocator, so
//! neighbours are common, ascending or descending), and one fallocate per
//! run is much cheaper than one per page, so [`Coalescer`] merges
//! consecutive PFNs into [`PfnRange`]s as they stream in, with bounded
//! memory whatever the buffer size.

use std::io::Read;

use vm_memory::GuestAddress;

use crate::device::PFN_SHIFT;

/// Bytes of one PFN on the wire.
pub const PFN_BYTES: usize = 4;

/// A run of consecutive guest pages: `first`, `first + 1`, ... `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnRange {
    /// The lowest PFN of the run.
    pub first: u64,
    /// Number of pages, at least 1.
    pub count: u64,
}

impl PfnRange {
    /// Guest-physical address of the first page.
    pub fn gpa(&self) -> GuestAddress {
        GuestAddress(self.first << PFN_SHIFT)
    }

    /// One past the last PFN.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Merges a stream of PFNs into maximal runs of neighbours, in arrival order.
///
/// A PFN extends the current run when it is the page right after its end or
/// right before its start; anything else (a gap, a repeat) closes the run.
/// Repeats are harmless downstream: releasing a page twice is a no-op.
#[derive(Debug, Default)]
pub struct Coalescer {
    current: Option<PfnRange>,
}

impl Coalescer {
    /// Adds one PFN; returns the run it closed, if any.
    pub fn push(&mut self, pfn: u32) -> Option<PfnRange> {
        let pfn = u64::from(pfn);
        match &mut self.current {
            Some(run) if pfn == run.end() => {
                run.count += 1;
                None
            }
            Some(run) if run.first > 0 && pfn == run.first - 1 => {
                run.first = pfn;
                run.count += 1;
                None
            }
            _ => self.current.replace(PfnRange {
                first: pfn,
                count: 1,
            }),
        }
    }

    /// Closes and returns the open run, if any.
    pub fn finish(&mut self) -> Option<PfnRange> {
        self.current.take()
    }
}

/// What [`for_each_range`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ListSummary {
    /// PFNs read.
    pub pfns: u64,
    /// Bytes at the end of the buffer too few to form a PFN (a malformed buffer).
    pub trailing_bytes: usize,
}

/// Reads a PFN array of `len` bytes from `src` and calls `f` once per run.
///
/// Reads in chunks, so a buffer of any size costs a fixed amount of memory.
/// Stops early if `src` fails (a buffer shorter than it claimed); the runs
/// already delivered stay delivered.
pub fn for_each_range<R: Read>(
    src: &mut R,
    len: usize,
    mut f: impl FnMut(PfnRange),
) -> std::io::Result<ListSummary> {
    const CHUNK: usize = 1024 * PFN_BYTES;
    let mut buf = [0u8; CHUNK];
    let whole = len - len % PFN_BYTES;
    let mut summary = ListSummary {
        pfns: 0,
        trailing_bytes: len % PFN_BYTES,
    };
    let mut coalescer = Coalescer::default();
    let mut done = 0;
    let result = loop {
        if done == whole {
            break Ok(());
        }
        let n = (whole - done).min(CHUNK);
        if let Err(e) = src.read_exact(&mut buf[..n]) {
            break Err(e);
        }
        done += n;
        for raw in buf[..n].chunks_exact(PFN_BYTES) {
            let pfn = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            summary.pfns += 1;
            if let Some(run) = coalescer.push(pfn) {
                f(run);
            }
        }
    };
    if let Some(run) = coalescer.finish() {
        f(run);
    }
    result.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalesce(pfns: &[u32]) -> Vec<(u64, u64)> {
        let mut c = Coalescer::default();
        let mut out: Vec<_> = pfns.iter().filter_map(|&p| c.push(p)).collect();
        out.extend(c.finish());
        out.iter().map(|r| (r.first, r.count)).collect()
    }

    #[test]
    fn empty_list_has_no_runs() {
        assert!(coalesce(&[]).is_empty());
    }

    #[test]
    fn ascending_and_descending_neighbours_merge() {
        assert_eq!(coalesce(&[5, 6, 7, 8]), [(5, 4)]);
        assert_eq!(coalesce(&[8, 7, 6, 5]), [(5, 4)]);
        // A run can grow at both ends.
        assert_eq!(coalesce(&[10, 11, 9, 12, 8]), [(8, 5)]);
    }

    #[test]
    fn gaps_and_repeats_close_a_run() {
        assert_eq!(
            coalesce(&[1, 2, 4, 5, 5, 9]),
            [(1, 2), (4, 2), (5, 1), (9, 1)]
        );
        assert_eq!(coalesce(&[3, 1]), [(3, 1), (1, 1)]);
    }

    #[test]
    fn pfn_zero_and_the_largest_pfn_are_ordinary() {
        assert_eq!(coalesce(&[1, 0]), [(0, 2)]);
        assert_eq!(coalesce(&[0, 1]), [(0, 2)]);
        assert_eq!(
            coalesce(&[u32::MAX - 1, u32::MAX]),
            [(u64::from(u32::MAX) - 1, 2)]
        );
        // No wrap-around from the largest PFN to 0.
        assert_eq!(coalesce(&[u32::MAX, 0]), [(u64::from(u32::MAX), 1), (0, 1)]);
        let r = PfnRange {
            first: u64::from(u32::MAX),
            count: 1,
        };
        assert_eq!(r.gpa(), GuestAddress(0x0fff_ffff_f000));
    }

    fn bytes(pfns: &[u32]) -> Vec<u8> {
        pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    #[test]
    fn reads_a_list_across_chunks() {
        // 3000 consecutive PFNs span three read chunks but form one run.
        let pfns: Vec<u32> = (100..3100).collect();
        let data = bytes(&pfns);
        let mut runs = Vec::new();
        let s = for_each_range(&mut &data[..], data.len(), |r| runs.push(r)).unwrap();
        assert_eq!(s.pfns, 3000);
        assert_eq!(s.trailing_bytes, 0);
        assert_eq!(
            runs,
            [PfnRange {
                first: 100,
                count: 3000
            }]
        );
    }

    #[test]
    fn trailing_bytes_are_counted_not_read() {
        let mut data = bytes(&[7, 8]);
        data.extend_from_slice(&[1, 2, 3]);
        let mut runs = Vec::new();
        let s = for_each_range(&mut &data[..], data.len(), |r| runs.push(r)).unwrap();
        assert_eq!(
            s,
            ListSummary {
                pfns: 2,
                trailing_bytes: 3
            }
        );
        assert_eq!(runs, [PfnRange { first: 7, count: 2 }]);
    }

    #[test]
    fn a_short_source_delivers_what_it_had_then_fails() {
        let data = bytes(&[1, 2, 3]);
        let mut runs = Vec::new();
        // Claims 8 PFNs, has 3: within one chunk the read fails before any run.
        let r = for_each_range(&mut &data[..], 32, |r| runs.push(r));
        assert!(r.is_err());
        assert!(runs.is_empty());
    }
}
