//! Who is attached where: the port-I/O and MMIO buses, legacy devices, and the virtio-mmio
//! windows and IRQs handed out to transports.

use std::sync::{mpsc::Sender, Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::*;
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::ged::{self, Ged};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialOut};
use crate::devices::legacy::{CMOS_PORT, I8042_PORT, SERIAL_PORT};
use crate::devices::IrqTrigger;
use crate::exit::{ExitTrigger, VmExit};
use crate::hotplug::Slots;
use crate::transport::mmio::MmioTransport;
use crate::transport::{VirtioDevice, VirtioInterrupt};
use crate::vhost_user::balloon::BalloonHandle;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Bus placement failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("cannot register irqfd for IRQ {irq}: {source}")]
    Irqfd {
        /// The IRQ.
        irq: u32,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused an ioeventfd.
    #[error("cannot register the queue-notify ioeventfd of the device at {addr:#x}: {source}")]
    Ioeventfd {
        /// Window base.
        addr: u64,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// No virtio-mmio window or IRQ left.
    #[error("no free virtio-mmio slot (at most {0})")]
    NoSlot(u64),
}

/// Where a virtio-mmio transport lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base of the register window.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// Its IRQ (GSI).
    pub irq: u32,
}

impl MmioDeviceInfo {
    /// The `virtio_mmio.device=` kernel parameter for this device (custom kernels).
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.irq
        )
    }
}

/// The buses and everything on them.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Virtio-mmio transports, in slot order.
    pub mmio_devices: Vec<MmioDeviceInfo>,
    /// COM1, shared with the stdin thread.
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The ACPI Generic Event Device (power button).
    pub ged: Option<Arc<Mutex<Ged>>>,
    /// Replaceable device slots (hotplug, backend restarts).
    pub slots: Slots,
    /// The balloon, for QMP.
    pub balloon: Option<BalloonHandle>,
}

impl DeviceManager {
    /// Empty buses.
    pub fn new() -> Self {
        DeviceManager {
            pio: Bus::new("pio"),
            mmio: Bus::new("mmio"),
            mmio_devices: Vec::new(),
            serial: None,
            ged: None,
            slots: Slots::default(),
            balloon: None,
        }
    }

    fn irqfd(vm: &VmFd, irq: u32) -> Result<EventFd, DeviceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&evt, irq)
            .map_err(|source| DeviceError::Irqfd { irq, source })?;
        Ok(evt)
    }

    /// Adds COM1 (writing to `out`), the i8042, the CMOS RTC and the ACPI PM registers.
    pub fn add_legacy_devices(
        &mut self,
        vm: &VmFd,
        serial_out: SerialOut,
        exit: Sender<VmExit>,
    ) -> Result<(), DeviceError> {
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger(Self::irqfd(vm, SERIAL_IRQ)?),
            serial_out,
        )));
        self.pio.insert(SERIAL_PORT, 8, serial.clone())?;
        self.serial = Some(serial);
        let i8042 = I8042::new(ExitTrigger::new(exit.clone(), VmExit::Reset));
        self.pio
            .insert(I8042_PORT, 5, Arc::new(Mutex::new(i8042)))?;
        self.pio
            .insert(CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::default())))?;
        self.pio.insert(
            u64::from(ACPI_PM_PORT),
            acpi_pm::LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit))),
        )?;
        let ged = Arc::new(Mutex::new(Ged::new(Self::irqfd(vm, GED_IRQ)?)));
        self.pio
            .insert(u64::from(GED_PORT), ged::LEN, ged.clone())?;
        self.ged = Some(ged);
        Ok(())
    }

    /// Places `device` behind a new virtio-mmio window with its own IRQ.
    pub fn add_virtio_mmio(
        &mut self,
        vm: &VmFd,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(MmioDeviceInfo, Arc<Mutex<MmioTransport>>), DeviceError> {
        let slot = self.mmio_devices.len() as u64;
        let irq = VIRTIO_IRQ_BASE + slot as u32;
        if slot >= VIRTIO_MMIO_MAX || irq > IRQ_MAX {
            return Err(DeviceError::NoSlot(
                VIRTIO_MMIO_MAX.min(u64::from(IRQ_MAX - VIRTIO_IRQ_BASE + 1)),
            ));
        }
        let info = MmioDeviceInfo {
            base: VIRTIO_MMIO_START + slot * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            irq,
        };
        let interrupt = Arc::new(VirtioInterrupt::new(Self::irqfd(vm, irq)?));
        let mut device = device;
        device.set_interrupt(interrupt.clone());
        let notify = IoEventAddress::Mmio(info.base + crate::transport::mmio::reg::QUEUE_NOTIFY);
        for (queue, evt) in device.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &notify, queue as u32)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: info.base,
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, interrupt)));
        let shared: SharedDevice = transport.clone();
        self.mmio.insert(info.base, info.len, shared)?;
        self.mmio_devices.push(info);
        Ok((info, transport))
    }

    /// `virtio_mmio.device=` parameters for every transport.
    pub fn mmio_cmdline(&self) -> String {
        self.mmio_devices
            .iter()
            .map(MmioDeviceInfo::cmdline_param)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_param_format() {
        let info = MmioDeviceInfo {
            base: 0xd000_1000,
            len: 0x1000,
            irq: 6,
        };
        assert_eq!(info.cmdline_param(), "virtio_mmio.device=4K@0xd0001000:6");
    }
}
