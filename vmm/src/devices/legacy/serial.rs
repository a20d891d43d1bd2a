//! The 8250 UART on COM1 (ttyS0), modelled by vm-superio; interrupts go to IRQ 4 through an
//! irqfd, output to stdout or a file, input from stdin.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::devices::bus::{lock, BusDevice};
use crate::devices::IrqTrigger;

/// Where guest output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1.
pub struct SerialDevice(Serial<IrqTrigger, NoEvents, SerialOut>);

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqTrigger, out: SerialOut) -> Self {
        SerialDevice(Serial::new(irq, out))
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.0.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.0.write(offset, value) {
                log::warn!("serial: {e}");
            }
        }
    }
}

/// Forwards `input` to the guest's UART until EOF, waiting while the 64-byte FIFO is full.
pub fn spawn_input_thread(
    device: Arc<Mutex<SerialDevice>>,
    mut input: impl Read + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            crate::jail::enter_thread(crate::jail::Role::SerialInput);
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("serial input: {e}");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = lock(&device).enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let out = SharedBuf::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq_probe = irq.try_clone().unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger(irq),
            Box::new(out.clone()),
        )));
        for b in b"hi" {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");

        // Enable the received-data interrupt, then feed input through the thread.
        dev.lock().unwrap().write(1, &[0x01]);
        spawn_input_thread(dev.clone(), &b"x"[..])
            .unwrap()
            .join()
            .unwrap();
        let mut lsr = [0u8];
        dev.lock().unwrap().read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x1, 1, "data ready");
        let mut rbr = [0u8];
        dev.lock().unwrap().read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        assert!(irq_probe.read().unwrap() >= 1);
    }
}
