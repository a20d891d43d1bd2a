//! The KVM VM: memory slots, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::vstate::memory::GuestMemory;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host KVM lacks something the core needs.
    #[error("KVM lacks a required capability: {0}")]
    Capability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A KVM VM with its irqchip and PIT created.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with the in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
            (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::Capability(name));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // The speaker port (0x61) is handled in the kernel too: guests poke it while
        // calibrating and a userspace exit per access would only slow boot down.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd })
    }

    /// The system-level KVM handle (for CPUID and MSR queries).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The interrupt controllers' and PIT's state, taken before the guest runs and restored
    /// on a VM reset (pending interrupts and IOAPIC routes from the old kernel must go).
    pub fn irqchip_snapshot(&self) -> Result<IrqchipSnapshot, VmError> {
        let mut chips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(ioctl("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        let pit = self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?;
        Ok(IrqchipSnapshot { chips, pit })
    }

    /// Restores a state from [`irqchip_snapshot`](Self::irqchip_snapshot).
    pub fn restore_irqchip(&self, snapshot: &IrqchipSnapshot) -> Result<(), VmError> {
        for chip in &snapshot.chips {
            self.fd
                .set_irqchip(chip)
                .map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&snapshot.pit)
            .map_err(ioctl("KVM_SET_PIT2"))
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, memory: &GuestMemory) -> Result<(), VmError> {
        let max_slots = self.kvm.get_nr_memslots();
        for (slot, region) in memory.iter().enumerate() {
            if slot >= max_slots {
                return Err(VmError::Capability("enough KVM memory slots"));
            }
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::Capability("host-mapped guest memory"))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region stays mapped for the life of the VM: `GuestMemory` is kept
            // by the VMM until the process exits, and the slot covers exactly the mapping.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}

/// Saved PIC, IOAPIC and PIT state.
pub struct IrqchipSnapshot {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}
