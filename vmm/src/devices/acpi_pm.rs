//! Hardware-reduced ACPI power management: the FADT's sleep control, sleep status and reset
//! registers. With `\_S5` in the DSDT, Linux powers off by writing `SLP_TYP(5) | SLP_EN` to
//! the sleep control register, and resets through the reset register.

use crate::arch::layout::{ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
use crate::devices::bus::BusDevice;
use crate::exit::VmExit;

/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// Ports the device occupies.
pub const LEN: u64 = 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;

/// The power-management register block.
pub struct AcpiPm {
    exit: std::sync::mpsc::Sender<VmExit>,
}

impl AcpiPm {
    /// A device that reports power-off and reset on `exit`.
    pub fn new(exit: std::sync::mpsc::Sender<VmExit>) -> Self {
        AcpiPm { exit }
    }

    fn send(&self, reason: VmExit) {
        if self.exit.send(reason).is_err() {
            log::error!("acpi: VM exit channel closed");
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events ever pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                if slp_typ == ACPI_S5_SLP_TYP {
                    log::info!("guest requested ACPI S5 (power off)");
                    self.send(VmExit::PowerOff);
                } else {
                    log::warn!("guest requested unsupported sleep type {slp_typ}");
                }
            }
            RESET if value == ACPI_RESET_VALUE => {
                log::info!("guest reset through the ACPI reset register");
                self.send(VmExit::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut pm = AcpiPm::new(tx);
        pm.write(SLEEP_STATUS, &[0x80]);
        pm.write(SLEEP_CONTROL, &[ACPI_S5_SLP_TYP << SLP_TYP_SHIFT]);
        pm.write(SLEEP_CONTROL, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        assert!(rx.try_recv().is_err(), "no exit without SLP_EN or for S3");
        pm.write(
            SLEEP_CONTROL,
            &[(ACPI_S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN],
        );
        assert_eq!(rx.try_recv().unwrap(), VmExit::PowerOff);
        pm.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
    }
}
