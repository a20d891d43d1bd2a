//! Giving inflated pages back to the host.
//!
//! Guest memory is the core's memfd, which the backend received (one fd per
//! region) in SET_MEM_TABLE. Unmapping or madvising the backend's own
//! mapping would free nothing: the core maps the same pages. Punching a
//! hole in the file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) frees the pages
//! themselves, for every process mapping them; the next guest access reads
//! zeroes from a freshly allocated page. The core seals the memfd against
//! shrinking and growing only; F_SEAL_WRITE would forbid punching.
//!
//! [`release_range`] maps a run of PFNs onto the regions of the memory
//! table, punches what lies inside and reports the pages that lie outside,
//! which the caller refuses.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::fcntl::FallocateFlags;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::device::{PAGE_SIZE, PFN_SHIFT};
use crate::pfn::PfnRange;
use crate::GuestMem;

/// Why part of a run was not released.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// Pages outside every region of guest memory.
    #[error("{pages} page(s) from PFN {first:#x} are outside guest memory")]
    OutsideMemory {
        /// First refused PFN.
        first: u64,
        /// Number of pages refused from there.
        pages: u64,
    },
    /// A region whose guest address or file offset is not page aligned:
    /// punching there would clear parts of neighbouring pages the guest
    /// still uses, so nothing in it is released.
    #[error("{pages} page(s) from PFN {first:#x} are in a region not aligned to 4 KiB")]
    Misaligned {
        /// First refused PFN.
        first: u64,
        /// Number of pages refused from there.
        pages: u64,
    },
    /// A region without a file (not possible with vhost-user, which always
    /// passes an fd; kept so that such memory is refused, not misused).
    #[error("{pages} page(s) from PFN {first:#x} are in a region without a backing file")]
    NoFile {
        /// First refused PFN.
        first: u64,
        /// Number of pages refused from there.
        pages: u64,
    },
    /// fallocate failed (e.g. a file system without hole punching).
    #[error("releasing {pages} page(s) from PFN {first:#x}: {errno}")]
    Punch {
        /// First PFN of the failed call.
        first: u64,
        /// Pages the call covered.
        pages: u64,
        /// The error fallocate returned.
        errno: nix::errno::Errno,
    },
}

impl Refusal {
    /// Pages this refusal covers.
    pub fn pages(&self) -> u64 {
        match self {
            Refusal::OutsideMemory { pages, .. }
            | Refusal::Misaligned { pages, .. }
            | Refusal::NoFile { pages, .. }
            | Refusal::Punch { pages, .. } => *pages,
        }
    }
}

/// Frees one page-aligned byte range of a guest memory file.
pub trait Punch {
    /// Deallocates `len` bytes of `file` from `offset`, keeping its size.
    fn punch(&mut self, file: &File, offset: u64, len: u64) -> nix::Result<()>;
}

/// The real thing: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct PunchHole;

impl Punch for PunchHole {
    fn punch(&mut self, file: &File, offset: u64, len: u64) -> nix::Result<()> {
        let offset = i64::try_from(offset).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
        let len = i64::try_from(len).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
        nix::fcntl::fallocate(
            file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
}

/// Punches nothing: walks a run only to find the pages outside guest
/// memory (deflate, which frees nothing, still reports bad PFNs).
#[derive(Debug, Default, Clone, Copy)]
pub struct CheckOnly;

impl Punch for CheckOnly {
    fn punch(&mut self, _file: &File, _offset: u64, _len: u64) -> nix::Result<()> {
        Ok(())
    }
}

/// Releases every page of `range` that lies in guest memory; returns the
/// pages released and calls `refuse` for each part that was not.
///
/// A run may span several regions (the x86 MMIO hole splits RAM in two) and
/// may start or end outside them; each region's part is one fallocate call.
pub fn release_range(
    mem: &GuestMem,
    range: PfnRange,
    punch: &mut dyn Punch,
    refuse: &mut dyn FnMut(Refusal),
) -> u64 {
    let mut released = 0;
    let mut pfn = range.first;
    while pfn < range.end() {
        let gpa = GuestAddress(pfn << PFN_SHIFT);
        let Some(region) = mem.find_region(gpa) else {
            // Jump to the next region that starts inside the run, if any.
            let next = next_region_pfn(mem, gpa).map_or(range.end(), |p| p.min(range.end()));
            refuse(Refusal::OutsideMemory {
                first: pfn,
                pages: next - pfn,
            });
            pfn = next;
            continue;
        };
        let start = region.start_addr().0;
        let in_region = gpa.0 - start;
        // Whole pages of the run inside this region; a page straddling the
        // region's end is refused below as outside memory.
        let room = (region.len() - in_region) / PAGE_SIZE;
        let pages = room.min(range.end() - pfn);
        if pages == 0 {
            refuse(Refusal::OutsideMemory {
                first: pfn,
                pages: 1,
            });
            pfn += 1;
            continue;
        }
        match region.file_offset() {
            None => refuse(Refusal::NoFile { first: pfn, pages }),
            Some(fo) => {
                let offset = fo.start().checked_add(in_region);
                match offset {
                    Some(offset) if start % PAGE_SIZE == 0 && offset % PAGE_SIZE == 0 => {
                        match punch.punch(fo.file(), offset, pages * PAGE_SIZE) {
                            Ok(()) => released += pages,
                            Err(errno) => refuse(Refusal::Punch {
                                first: pfn,
                                pages,
                                errno,
                            }),
                        }
                    }
                    _ => refuse(Refusal::Misaligned { first: pfn, pages }),
                }
            }
        }
        pfn += pages;
    }
    released
}

/// The PFN of the lowest region start above `gpa` (rounded up to a page).
fn next_region_pfn(mem: &GuestMem, gpa: GuestAddress) -> Option<u64> {
    mem.iter()
        .map(|r| r.start_addr().0)
        .filter(|&s| s > gpa.0)
        .min()
        .map(|s| s.div_ceil(PAGE_SIZE))
}

/// Warns about regions on hugetlbfs: punching 4 KiB there frees nothing
/// (a huge page is freed only whole) and clears the rest of the range
/// inside a huge page, which the guest gave up anyway. Returns how many
/// such regions there are.
pub fn warn_hugepage_regions(mem: &GuestMem) -> usize {
    let mut huge = 0;
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        if let Ok(fs) = nix::sys::statfs::fstatfs(fo.file()) {
            if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC {
                log::warn!(
                    "guest memory at {:#x} is on hugetlbfs: inflating the balloon there \
                     gives no memory back",
                    region.start_addr().0
                );
                huge += 1;
            }
        }
    }
    huge
}

/// Refuses to run on a host whose page size is not the balloon's 4 KiB: the
/// guest's pages would not line up with the host pages a hole can free
/// (and the reference requires guest and host page sizes to match).
pub fn check_host_page_size() -> Result<(), crate::Error> {
    let host = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(0);
    if u64::try_from(host).ok() == Some(PAGE_SIZE) {
        Ok(())
    } else {
        Err(crate::Error::PageSize(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::MemFdCreateFlag;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::FileOffset;

    /// Records calls instead of punching.
    #[derive(Default)]
    struct Recorder(Vec<(u64, u64)>);

    impl Punch for Recorder {
        fn punch(&mut self, _file: &File, offset: u64, len: u64) -> nix::Result<()> {
            self.0.push((offset, len));
            Ok(())
        }
    }

    fn memfd(size: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(
            c"balloon-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let f = File::from(fd);
        f.set_len(size).unwrap();
        f
    }

    /// Two regions like x86 guest RAM around a hole: [0, 64K) at file
    /// offset 0 and [1M, 1M+64K) at file offset 64K.
    fn split_memory(file: &File) -> GuestMem {
        GuestMem::from_ranges_with_files(&[
            (
                GuestAddress(0),
                0x1_0000,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            ),
            (
                GuestAddress(0x10_0000),
                0x1_0000,
                Some(FileOffset::new(file.try_clone().unwrap(), 0x1_0000)),
            ),
        ])
        .unwrap()
    }

    fn run(mem: &GuestMem, first: u64, count: u64) -> (u64, Vec<(u64, u64)>, Vec<Refusal>) {
        let mut rec = Recorder::default();
        let mut refused = Vec::new();
        let n = release_range(mem, PfnRange { first, count }, &mut rec, &mut |r| {
            refused.push(r)
        });
        (n, rec.0, refused)
    }

    #[test]
    fn a_run_inside_one_region_is_one_punch_at_its_file_offset() {
        let f = memfd(0x2_0000);
        let mem = split_memory(&f);
        assert_eq!(run(&mem, 2, 3), (3, vec![(0x2000, 0x3000)], vec![]));
        // Second region: PFN 0x100 is file offset 64K.
        assert_eq!(run(&mem, 0x101, 2), (2, vec![(0x1_1000, 0x2000)], vec![]));
    }

    #[test]
    fn pages_outside_memory_are_refused_the_rest_released() {
        let f = memfd(0x2_0000);
        let mem = split_memory(&f);
        // PFNs 0xe..0x102: 2 pages in region 0, the hole 0x10..0x100, 2 pages in region 1.
        let (n, punched, refused) = run(&mem, 0xe, 0x102 - 0xe);
        assert_eq!(n, 4);
        assert_eq!(punched, vec![(0xe000, 0x2000), (0x1_0000, 0x2000)]);
        assert_eq!(
            refused,
            vec![Refusal::OutsideMemory {
                first: 0x10,
                pages: 0xf0
            }]
        );
        // Entirely beyond the end, up to the largest PFN.
        let (n, punched, refused) = run(&mem, u64::from(u32::MAX) - 9, 10);
        assert_eq!((n, punched.len()), (0, 0));
        assert_eq!(refused[0].pages(), 10);
    }

    #[test]
    fn a_misaligned_region_is_never_punched() {
        let f = memfd(0x2_0000);
        let mem = GuestMem::from_ranges_with_files(&[(
            GuestAddress(0x800),
            0x8000,
            Some(FileOffset::new(f.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let (n, punched, refused) = run(&mem, 1, 2);
        assert_eq!((n, punched.len()), (0, 0));
        assert_eq!(refused, vec![Refusal::Misaligned { first: 1, pages: 2 }]);
        // The page straddling the region's end [0x8000, 0x9000) is outside.
        let (_, _, refused) = run(&mem, 8, 1);
        assert_eq!(refused, vec![Refusal::OutsideMemory { first: 8, pages: 1 }]);
    }

    #[test]
    fn punching_frees_the_memfd_blocks() {
        let f = memfd(0x2_0000);
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xaa; 0x2_0000], 0).unwrap();
        let before = f.metadata().unwrap().blocks();
        let mem = split_memory(&f);
        let n = release_range(
            &mem,
            PfnRange {
                first: 0x100,
                count: 16,
            },
            &mut PunchHole,
            &mut |r| panic!("{r}"),
        );
        assert_eq!(n, 16);
        let after = f.metadata().unwrap().blocks();
        assert_eq!(before - after, 0x1_0000 / 512);
        // The other region's data is untouched; the hole reads as zeroes.
        let mut buf = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0xffff).unwrap();
        assert_eq!(buf, [0xaa, 0]);
    }

    /// A memfd sealed the way the core seals guest memory
    /// (vmm/src/vstate/memory.rs), plus `extra` seals.
    fn sealed_memfd(extra: SealFlag) -> File {
        let fd = nix::sys::memfd::memfd_create(
            c"balloon-sealed",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let f = File::from(fd);
        f.set_len(0x4000).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1; 0x4000], 0).unwrap();
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | extra;
        fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).unwrap();
        fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SEAL)).unwrap();
        f
    }

    #[test]
    fn the_cores_seals_allow_punching_and_a_write_seal_would_not() {
        let f = sealed_memfd(SealFlag::empty());
        PunchHole.punch(&f, 0x1000, 0x2000).unwrap();
        assert_eq!(f.metadata().unwrap().blocks(), 0x2000 / 512);
        // F_SEAL_WRITE is the seal that must never be added.
        let f = sealed_memfd(SealFlag::F_SEAL_WRITE);
        assert_eq!(
            PunchHole.punch(&f, 0x1000, 0x1000),
            Err(nix::errno::Errno::EPERM)
        );
    }

    #[test]
    fn memfd_memory_is_not_hugetlbfs() {
        let f = memfd(0x2_0000);
        assert_eq!(warn_hugepage_regions(&split_memory(&f)), 0);
    }

    #[test]
    fn this_host_has_4k_pages() {
        check_host_page_size().unwrap();
    }
}
