//! The ACPI Generic Event Device (hardware-reduced ACPI's replacement for GPEs): one
//! interrupt plus an event selector register the guest's `_EVT` method reads to learn what
//! happened. Today the only event is the power button, which is how QMP `system_powerdown`
//! asks the guest to shut down cleanly.

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Size of the selector register in ports.
pub const LEN: u64 = 4;

/// The GED's event selector register.
pub struct Ged {
    pending: u32,
    irq: EventFd,
}

impl Ged {
    /// A GED raising `irq` (an irqfd) when an event is posted.
    pub fn new(irq: EventFd) -> Self {
        Ged { pending: 0, irq }
    }

    /// Posts `event` and interrupts the guest.
    pub fn notify(&mut self, event: u32) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    /// Reading the selector returns the pending events and clears them, so each press is
    /// delivered once.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn events_are_read_once() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.notify(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut v = [0u8; 4];
        ged.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), EVENT_POWER_BUTTON);
        ged.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0);
        let mut narrow = [0xffu8; 1];
        ged.read(0, &mut narrow);
        assert_eq!(narrow, [0]);
    }
}
