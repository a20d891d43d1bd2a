//! Guest-physical address map of the x86_64 microvm.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA            RAM (e820 usable up to the EBDA)
//! 0x0000_0500  GDT, IDT                      boot structures written by the VMM
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB                 e820 reserved; ACPI tables at 0xe_0000
//! 0x0010_0000  kernel (bzImage protected-mode part / ELF segments)
//!   ...        RAM, initrd at its top end
//! 0xc000_0000  32-bit MMIO gap (virtio-mmio windows, IOAPIC, LAPIC)
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

/// Start of the GDT the vCPU boots with.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the vCPU boots with.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the kernel accepts (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI RSDP lives, inside the BIOS area the kernel also scans.
pub const RSDP_START: u64 = 0xe0000;
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// First byte above the legacy 1 MiB area: kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (registers + config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio windows the machine has.
pub const VIRTIO_MMIO_MAX: u64 = 32;
/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC register window.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// KVM's TSS (three pages) sits just below the identity-map page, at the top of the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// IRQ of the 8250 UART (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQ of the ACPI Generic Event Device (the IOAPIC's last pin).
pub const GED_IRQ: u32 = 23;
/// Last IRQ virtio-mmio devices may use.
pub const IRQ_MAX: u32 = GED_IRQ - 1;

/// I/O port of the ACPI sleep control / status and reset registers (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u16 = 0x600;
/// Value the guest writes to [`ACPI_PM_PORT`] + 1 (reset register) to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// I/O port of the Generic Event Device's event selector (4 bytes).
pub const GED_PORT: u16 = 0x604;
/// `SLP_TYP` of the S5 (soft-off) state, as written in `\_S5`.
pub const ACPI_S5_SLP_TYP: u8 = 5;
