//! The i8042 keyboard controller, kept for one command: 0xFE (pulse reset line), which is how
//! `reboot=k` guests reset the machine. The rest of the model comes from vm-superio.

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::exit::ExitTrigger;

/// i8042 on ports 0x60..=0x64.
pub struct I8042(I8042Device<ExitTrigger>);

impl I8042 {
    /// Creates the controller; a reset command fires `reset`.
    pub fn new(reset: ExitTrigger) -> Self {
        I8042(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), true) = (data.first_mut(), offset == 0 || offset == 4) {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), true) = (data.first(), offset == 0 || offset == 4) {
            if let Err(e) = self.0.write(offset as u8, value) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    #[test]
    fn reset_command_ends_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = I8042::new(ExitTrigger::new(tx, VmExit::Reset));
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        // The guest waits for "input buffer empty" (bit 1) before writing a command.
        assert_eq!(status[0] & 0x2, 0);
        assert!(rx.try_recv().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
        // Other offsets are inert.
        dev.write(2, &[0xfe]);
        assert!(rx.try_recv().is_err());
    }
}
