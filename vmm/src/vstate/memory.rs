//! Guest RAM: one memfd, mapped MAP_SHARED, split around the x86 MMIO gap.
//!
//! Every region carries its file offset so the same memfd can later be handed to vhost-user
//! backends in `VHOST_USER_SET_MEM_TABLE`: they map exactly what the guest sees, and the
//! core never copies guest data.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as used throughout the core.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Sealing the memfd failed.
    #[error("cannot seal the guest memory memfd: {0}")]
    Seal(#[source] std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// A size that does not fit the address space.
    #[error("guest memory size {0} bytes is too large")]
    TooLarge(u64),
}

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of `start` in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the 32-bit MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![RamRange {
        start: 0,
        len: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            len: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Guest RAM plus the memfd backing it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemory,
    /// The backing memfd; shared with vhost-user backends.
    pub memfd: Arc<File>,
    /// The layout `memory` was built from.
    pub ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM backed by a fresh, sealed-size memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let memfd = Arc::new(create_memfd(size)?);
        let ranges = ram_ranges(size);
        let regions = ranges
            .iter()
            .map(|r| {
                let len = usize::try_from(r.len).map_err(|_| MemoryError::TooLarge(size))?;
                Ok((
                    GuestAddress(r.start),
                    len,
                    Some(FileOffset::from_arc(memfd.clone(), r.file_offset)),
                ))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let memory = GuestMemoryMmap::from_ranges_with_files(regions)?;
        Ok(GuestRam {
            memory,
            memfd,
            ranges,
        })
    }
}

/// A memfd of `size` bytes whose size is sealed: a backend sharing it cannot shrink it and
/// make the core fault (SIGBUS) on guest memory accesses.
fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = CString::new("flotilla-guest-ram").map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd flags.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we own with a valid command and argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(
            ram_ranges(256 * MIB),
            vec![RamRange {
                start: 0,
                len: 256 * MIB,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let r = ram_ranges(8 * GIB);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRange {
                start: 0,
                len: 3 * GIB,
                file_offset: 0
            }
        );
        assert_eq!(
            r[1],
            RamRange {
                start: 4 * GIB,
                len: 5 * GIB,
                file_offset: 3 * GIB
            }
        );
    }

    #[test]
    fn regions_share_one_memfd_at_their_offsets() {
        let ram = GuestRam::new(4 * GIB).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        let high = ram.memory.find_region(GuestAddress(4 * GIB)).unwrap();
        assert_eq!(high.file_offset().unwrap().start(), 3 * GIB);
        // A write through the high region lands at its file offset in the memfd.
        ram.memory
            .write_obj(0xfeed_u32, GuestAddress(4 * GIB))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.memfd, &mut buf, 3 * GIB).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert!(ram
            .memory
            .check_address(GuestAddress(MMIO_GAP_START))
            .is_none());
    }

    #[test]
    fn memfd_size_is_sealed() {
        let ram = GuestRam::new(256 * MIB).unwrap();
        assert!(ram.memfd.set_len(MIB).is_err());
    }

    #[test]
    fn the_largest_memory_maps_without_touching_it() {
        let ram = GuestRam::new(512 * GIB).unwrap();
        assert_eq!(ram.memory.iter().map(|r| r.len()).sum::<u64>(), 512 * GIB);
    }
}
