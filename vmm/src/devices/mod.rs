//! Devices the core emulates itself: the bus, legacy PC devices and ACPI power management.
//! Virtio devices live behind [`crate::transport`].

pub mod acpi_pm;
pub mod bus;
pub mod ged;
pub mod legacy;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
