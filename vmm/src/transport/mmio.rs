//! The virtio-mmio transport, version 2 ("modern"), per the virtio 1.2 specification §4.2.2.
//!
//! Each device gets a 4 KiB window: registers below 0x100, device configuration space above.
//! The model enforces the register semantics the spec puts on the device side: features are
//! accepted only before FEATURES_OK and only as a subset of the offer, queue registers only
//! while the queue is not ready, and DRIVER_OK activates the device exactly once.

use std::sync::Arc;

use super::{QueueConfig, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("FLOT").
pub const VENDOR_ID: u32 = 0x544f_4c46;

/// Register offsets (names as in the specification).
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
#[allow(missing_docs)]
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueConfig>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
}

impl MmioTransport {
    /// Wraps `device`, raising `interrupt` on its behalf.
    pub fn new(device: Box<dyn VirtioDevice>, interrupt: Arc<VirtioInterrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect();
        MmioTransport {
            device,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
        }
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The queue state the driver programmed.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only while the queue is off and the device not yet live.
    fn queue_writable(&mut self) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.selected_queue().filter(|q| !q.ready)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let set_low = |v: &mut u64| *v = (*v & !0xffff_ffff) | u64::from(value);
        let set_high = |v: &mut u64| *v = (*v & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
                    log::warn!("virtio-mmio: driver features written after FEATURES_OK; ignored");
                    return;
                }
                match self.driver_features_select {
                    0 => set_low(&mut self.driver_features),
                    1 => set_high(&mut self.driver_features),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_writable() {
                    q.size = value as u16;
                }
            }
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => {
                if self.status & status::DRIVER_OK != 0 && (value as usize) < self.queues.len() {
                    self.device.queue_notify(value as u16);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_low(&mut q.desc_table)),
            reg::QUEUE_DESC_HIGH => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_high(&mut q.desc_table)),
            reg::QUEUE_DRIVER_LOW => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_low(&mut q.avail_ring)),
            reg::QUEUE_DRIVER_HIGH => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_high(&mut q.avail_ring)),
            reg::QUEUE_DEVICE_LOW => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_low(&mut q.used_ring)),
            reg::QUEUE_DEVICE_HIGH => self
                .queue_writable()
                .into_iter()
                .for_each(|q| set_high(&mut q.used_ring)),
            reg::SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        match value {
            0 => q.ready = false,
            1 if q.is_valid() => q.ready = true,
            1 => log::warn!("virtio-mmio: queue set ready with invalid settings {q:?}; refused"),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (§3.1.1); anything else is a driver bug.
        if value & self.status != self.status {
            log::warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut accepted = value;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver the subset was refused.
            accepted &= !status::FEATURES_OK;
        }
        if added & status::FEATURES_OK != 0 && accepted & status::FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        if added & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                log::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK; refused");
                return;
            }
            self.status = accepted;
            if let Err(e) = self.device.activate(&self.queues) {
                log::error!("virtio-mmio: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
            return;
        }
        self.status = accepted;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        let extra = self.driver_features & !offered;
        if extra != 0 {
            log::warn!("virtio-mmio: driver accepted features {extra:#x} that were not offered");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            log::warn!("virtio-mmio: legacy driver (no VIRTIO_F_VERSION_1); refused");
            return false;
        }
        true
    }

    fn reset(&mut self) {
        if self.status != 0 {
            self.device.reset();
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such (§4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{ActivateError, INT_CONFIG, INT_VRING};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    struct Log {
        acked: Option<u64>,
        activated: Vec<Vec<QueueConfig>>,
        resets: u32,
        notified: Vec<u16>,
        config: Vec<u8>,
    }

    struct Dummy {
        log: Arc<Mutex<Log>>,
        fail_activate: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 128]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn ack_features(&mut self, features: u64) {
            self.log.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let log = self.log.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = log.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut log = self.log.lock().unwrap();
            let end = offset as usize + data.len();
            if log.config.len() < end {
                log.config.resize(end, 0);
            }
            log.config[offset as usize..end].copy_from_slice(data);
        }
        fn activate(&mut self, queues: &[QueueConfig]) -> Result<(), ActivateError> {
            self.log.lock().unwrap().activated.push(queues.to_vec());
            if self.fail_activate {
                return Err(ActivateError("backend gone".into()));
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
        fn queue_notify(&mut self, queue: u16) {
            self.log.lock().unwrap().notified.push(queue);
        }
    }

    fn transport(fail_activate: bool) -> (MmioTransport, Arc<Mutex<Log>>, EventFd) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy {
                log: log.clone(),
                fail_activate,
            }),
            Arc::new(VirtioInterrupt::new(irq)),
        );
        (t, log, probe)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, ((base + 0x1000) >> 32) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, ((base + 0x2000) >> 32) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport(false);
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0b101);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 128);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "absent queue");
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn full_negotiation_activates_once_with_queue_state() {
        let (mut t, log, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!(
            r(&mut t, reg::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        assert_eq!(log.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1 | 0b100));
        setup_queue(&mut t, 0, 256, 0x1_0000_0000);
        setup_queue(&mut t, 1, 64, 0x20000);
        w(&mut t, reg::STATUS, ALL);
        let log = log.lock().unwrap();
        assert_eq!(log.activated.len(), 1);
        let q = log.activated[0][0];
        assert_eq!(
            (q.size, q.ready, q.desc_table, q.avail_ring),
            (256, true, 0x1_0000_0000, 0x1_0000_1000)
        );
        assert_eq!(log.activated[0][1].size, 64);
    }

    #[test]
    fn features_not_offered_or_legacy_are_refused() {
        let (mut t, log, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not activate.
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(log.lock().unwrap().activated.is_empty());
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 0b1);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(log.lock().unwrap().acked.is_none());
    }

    #[test]
    fn features_are_frozen_after_features_ok() {
        let (mut t, log, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0b1);
        w(&mut t, reg::STATUS, ALL);
        assert_eq!(log.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1));
    }

    #[test]
    fn invalid_queues_cannot_become_ready() {
        let (mut t, _, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        for (size, base) in [(0, 0x1000), (100, 0x1000), (512, 0x1000), (256, 0x1001)] {
            setup_queue(&mut t, 0, size, base);
            assert_eq!(r(&mut t, reg::QUEUE_READY), 0, "size {size} base {base:#x}");
        }
        setup_queue(&mut t, 0, 128, 0x1000);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // A ready queue's registers are frozen.
        w(&mut t, reg::QUEUE_NUM, 16);
        assert_eq!(t.queues()[0].size, 128);
    }

    #[test]
    fn reset_clears_everything_and_tells_the_device() {
        let (mut t, log, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1000);
        w(&mut t, reg::STATUS, ALL);
        t.interrupt().signal(INT_VRING);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // The device can be brought up again.
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1000);
        w(&mut t, reg::STATUS, ALL);
        assert_eq!(log.lock().unwrap().activated.len(), 2);
    }

    #[test]
    fn status_bits_cannot_be_cleared_piecemeal() {
        let (mut t, _, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
    }

    #[test]
    fn failed_activation_asks_for_reset() {
        let (mut t, _, irq) = transport(true);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1000);
        w(&mut t, reg::STATUS, ALL);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn interrupt_ack_and_notify() {
        let (mut t, log, _) = transport(false);
        t.interrupt().signal(INT_VRING | INT_CONFIG);
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(
            log.lock().unwrap().notified.is_empty(),
            "no notify before DRIVER_OK"
        );
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1000);
        w(&mut t, reg::STATUS, ALL);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9);
        assert_eq!(log.lock().unwrap().notified, vec![1]);
    }

    #[test]
    fn config_space_and_bad_widths() {
        let (mut t, log, _) = transport(false);
        t.write(reg::CONFIG + 2, &[0xaa, 0xbb]);
        let mut b = [0u8; 4];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [0, 0, 0xaa, 0xbb]);
        assert_eq!(log.lock().unwrap().config, vec![0, 0, 0xaa, 0xbb]);
        // Byte-wide or unaligned register accesses are ignored / read as zero.
        let mut one = [0xffu8];
        t.read(reg::MAGIC_VALUE, &mut one);
        assert_eq!(one, [0]);
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }
}
