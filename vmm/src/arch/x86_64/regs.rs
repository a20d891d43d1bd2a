//! Boot-time register state: 64-bit long mode with an identity-mapped first GiB, a flat GDT,
//! the Linux zero page in RSI, and the MSR/FPU values firmware would leave behind.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestMemory;

/// Errors setting up boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// Boot structures could not be written to guest memory.
    #[error("cannot write the boot {0} into guest memory")]
    GuestWrite(&'static str),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Packs a GDT descriptor from its flags (access byte + flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Unpacks a GDT descriptor into the segment register KVM loads.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Null, 64-bit code, data, TSS.
const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the identity-mapped page tables (first 1 GiB, 2 MiB pages) and returns CR3.
fn write_page_tables(memory: &GuestMemory) -> Result<u64, RegsError> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|_| RegsError::GuestWrite("page tables"))
    };
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(PML4_START)
}

/// Sets up segments, paging and long mode.
pub fn setup_sregs(memory: &GuestMemory, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| RegsError::GuestWrite("GDT"))?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestWrite("IDT"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.cr3 = write_page_tables(memory)?;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))
}

/// Sets the general registers for the 64-bit boot protocol.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))
}

/// FPU state after reset: x87 control word and MXCSR defaults.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

/// The MSRs firmware would initialise.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Writes [`boot_msrs`]; an MSR the host refuses is logged, not fatal (nested hosts differ).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Ioctl {
        what: "KVM_SET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if written != entries.len() {
        log::warn!(
            "KVM accepted {written} of {} boot MSRs; first refused: {:#x}",
            entries.len(),
            entries[written].index
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.g, code.present),
            (8, 1, 0, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.l, data.db, data.type_), (16, 0, 1, 3));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let ram = crate::vstate::memory::GuestRam::new(256 << 20).unwrap();
        assert_eq!(write_page_tables(&ram.memory).unwrap(), PML4_START);
        let pde: u64 = ram
            .memory
            .read_obj(GuestAddress(PDE_START + 511 * 8))
            .unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
    }
}
