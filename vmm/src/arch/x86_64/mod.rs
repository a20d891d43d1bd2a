//! Everything specific to x86_64: the address map, CPUID, boot registers, the Linux boot
//! protocol and the interrupt controller set-up.

pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod regs;
