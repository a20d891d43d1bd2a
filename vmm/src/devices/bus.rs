//! Port-I/O and MMIO buses: which device answers a guest access.
//!
//! The map is built before the vCPUs start and never changes afterwards (hotplug on microvm
//! fills pre-created slots), so vCPU threads share it without a lock; each device has its
//! own mutex.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it (input threads, QMP).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one, or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<u64, (u64, SharedDevice)>,
    unknown_accesses: AtomicU64,
}

impl Bus {
    /// An empty bus; `name` ("pio"/"mmio") appears in logs.
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ..Default::default()
        }
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if matches!(before, Some((&b, &(l, _))) if b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, device))
    }

    /// Dispatches a read; unclaimed addresses read as all ones, like an open bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => lock(device).read(offset, data),
            None => {
                data.fill(0xff);
                self.log_unknown("read", addr, data.len());
            }
        }
    }

    /// Dispatches a write; unclaimed addresses are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => lock(device).write(offset, data),
            None => self.log_unknown("write", addr, data.len()),
        }
    }

    /// Guests probe for hardware that is not there (PCI config ports, POST codes); that is
    /// normal, so the log shows the first few and then only every power of two.
    fn log_unknown(&self, what: &str, addr: u64, size: usize) {
        let n = self.unknown_accesses.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 16 || n.is_power_of_two() {
            log::debug!(
                "{} {what} of {size} bytes at {addr:#x}: no device (unknown access #{n})",
                self.name
            );
        }
    }

    /// How many accesses hit no device.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown_accesses.load(Ordering::Relaxed)
    }
}

/// Locks a device, recovering from a panicked holder: one device's bug must not wedge every
/// vCPU that touches the bus afterwards.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new("test");
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x110, 0x10, dev.clone()).unwrap();

        let mut data = [0u8; 2];
        bus.read(0x105, &mut data);
        assert_eq!(data, [5, 5]);
        bus.write(0x10f, &[1]);
        assert_eq!(lock(&dev).0, vec![(0xf, vec![1])]);

        // Past the end of a device, or straddling it, is unclaimed.
        bus.read(0x11f, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        bus.read(0x500, &mut data);
        assert_eq!(bus.unknown_accesses(), 2);
    }
}
