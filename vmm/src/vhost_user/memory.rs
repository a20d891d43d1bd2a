//! Guest memory as a vhost-user memory table: one entry per RAM region, each pointing at its
//! offset in the guest memfd.

use std::os::fd::AsRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::vstate::memory::GuestRam;

/// The regions a backend maps, in `VHOST_USER_SET_MEM_TABLE` form. The descriptor inside
/// stays valid as long as the [`GuestRam`] it was built from lives.
#[derive(Clone)]
pub struct MemoryTable(Vec<VhostUserMemoryRegionInfo>);

impl MemoryTable {
    /// Describes `ram`.
    pub fn new(ram: &GuestRam) -> Self {
        let fd = ram.memfd.as_raw_fd();
        let regions = ram
            .memory
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r
                    .get_host_address(MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or(0),
                mmap_offset: r.file_offset().map(|f| f.start()).unwrap_or(0),
                mmap_handle: fd,
            })
            .collect();
        MemoryTable(regions)
    }

    /// The table entries.
    pub fn regions(&self) -> &[VhostUserMemoryRegionInfo] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_carry_memfd_offsets() {
        let ram = GuestRam::new(4 << 30).unwrap();
        let t = MemoryTable::new(&ram);
        assert_eq!(t.regions().len(), 2);
        assert_eq!(t.regions()[1].guest_phys_addr, 4 << 30);
        assert_eq!(t.regions()[1].mmap_offset, 3 << 30);
        assert_eq!(t.regions()[1].memory_size, 1 << 30);
        assert!(t
            .regions()
            .iter()
            .all(|r| r.mmap_handle == ram.memfd.as_raw_fd() && r.userspace_addr != 0));
    }
}
