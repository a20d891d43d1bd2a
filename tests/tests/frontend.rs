//! The core's generic vhost-user frontend behind a virtio-mmio transport, driven against a
//! real flotilla-blk process without a VM: this test plays the guest driver (registers, rings
//! in guest memory, kicks on the kick eventfd as KVM's ioeventfd would). It checks feature
//! negotiation, the config space read through GET_CONFIG, a request served through the
//! rings, and that a guest driver reset stops the rings but keeps the backend, which then
//! serves the renegotiated device.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod driver;

use driver::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::transport::mmio::{reg, MmioTransport};
use vmm::transport::{VirtioDevice, VirtioInterrupt};
use vmm::vhost_user::{blk, memory::MemoryTable};
use vmm::vstate::memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn zero_rings(ram: &GuestRam) {
    ram.memory
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
}

struct Backend(Child);

/// Starts flotilla-blk serving `image` on `sock` and waits for it to listen.
fn start_backend(sock: &std::path::Path, image: &std::path::Path) -> Backend {
    let _ = std::fs::remove_file(sock);
    let blk_bin = flotilla_tests::paths::program("flotilla-blk");
    let backend = Backend(
        Command::new(&blk_bin)
            .arg("--socket-path")
            .arg(sock)
            .arg("--image")
            .arg(image)
            .args(["--serial", "FRONTEND"])
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} (build it: cargo build -p flotilla-blk): {e}",
                    blk_bin.display()
                )
            }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "flotilla-blk never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    backend
}

/// A 1-MiB image whose every sector has its own pattern.
fn make_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("disk.img");
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::File::create(&image)
        .unwrap()
        .write_all(&pattern)
        .unwrap();
    (image, pattern)
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn generic_frontend_serves_requests_and_survives_a_guest_reset() {
    let dir = std::env::temp_dir().join(format!("flotilla-frontend-{}", std::process::id()));
    let (image, pattern) = make_image(&dir);
    let sock = dir.join("blk.sock");
    let mut backend = start_backend(&sock, &image);
    let ram = GuestRam::new(256 << 20).unwrap();
    let mut device = blk::vhost_user_blk("disk0", 1, &ram.memory, &MemoryTable::new(&ram)).unwrap();
    device.attach(UnixStream::connect(&sock).unwrap()).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    device.set_interrupt(interrupt.clone());
    let kick = device.queue_events()[0].try_clone().unwrap();
    let mut t = MmioTransport::new(Box::new(device), interrupt.clone());

    assert_eq!(r(&mut t, reg::DEVICE_ID), blk::VIRTIO_ID_BLOCK);
    // Capacity (sectors) through GET_CONFIG, before the driver even starts.
    let mut cap = [0u8; 8];
    t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);

    bring_up(&mut t);
    assert_eq!(read_sector(&ram, &kick, 3, 1), pattern[3 * 512..4 * 512]);
    assert!(
        irq.read().is_ok(),
        "the backend raised the interrupt through the call fd"
    );
    assert_ne!(
        interrupt.status() & 1,
        0,
        "vring bit reported for an external data path"
    );

    // Guest driver reset (e.g. the guest rebooted): rings stop, the backend stays.
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert!(
        backend.0.try_wait().unwrap().is_none(),
        "backend kept across a driver reset"
    );
    zero_rings(&ram);
    bring_up(&mut t);
    assert_eq!(read_sector(&ram, &kick, 7, 1), pattern[7 * 512..8 * 512]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn capacity(t: &mut MmioTransport) -> u64 {
    let mut cap = [0u8; 8];
    t.read(reg::CONFIG, &mut cap);
    u64::from_le_bytes(cap)
}

/// A slot as hotplug and crash restart use it: empty at boot (the driver still comes up),
/// filled by a backend (capacity appears with a config interrupt), the backend killed while
/// the guest queues a request, a new backend attached (the set-up replayed, the queued
/// request served), and the slot emptied again (capacity 0 with a config interrupt).
#[test]
fn a_slot_is_filled_replaced_and_emptied_under_a_running_driver() {
    use vmm::hotplug::{SlotDevice, SlotKind, Slots};
    use vmm::vhost_user::frontend::BackendState;
    let dir = std::env::temp_dir().join(format!("flotilla-slot-{}", std::process::id()));
    let (image, pattern) = make_image(&dir);
    let sock = dir.join("blk.sock");

    let ram = GuestRam::new(256 << 20).unwrap();
    let frontend = blk::vhost_user_blk("blk1", 1, &ram.memory, &MemoryTable::new(&ram)).unwrap();
    let shared = Arc::new(std::sync::Mutex::new(frontend));
    let device = SlotDevice::new(shared.clone()).unwrap();
    let mut slots = Slots::default();
    let info = vmm::device_manager::MmioDeviceInfo {
        base: 0xd000_1000,
        len: 0x1000,
        irq: 6,
    };
    slots.push("blk1".into(), SlotKind::Blk, info, shared);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    let mut device = device;
    device.set_interrupt(interrupt.clone());
    let kick = device.queue_events()[0].try_clone().unwrap();
    let mut t = MmioTransport::new(Box::new(device), interrupt.clone());

    // Empty: the driver comes up against the fixed offer and sees a disk of capacity 0.
    assert_eq!(capacity(&mut t), 0);
    bring_up(&mut t);
    assert_eq!(slots.status()[0].state, BackendState::Empty);

    // device_add: capacity appears, announced by a config-change interrupt.
    let mut first = start_backend(&sock, &image);
    slots
        .attach("blk1", UnixStream::connect(&sock).unwrap())
        .unwrap();
    assert_eq!(capacity(&mut t), 2048);
    assert_ne!(interrupt.status() & 2, 0, "config-change interrupt");
    assert_eq!(interrupt.config_generation(), 1);
    assert_eq!(read_sector(&ram, &kick, 5, 1), pattern[5 * 512..6 * 512]);

    // The backend dies; the guest queues a request meanwhile; a new backend takes over.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    slots.detach("blk1", false).unwrap();
    assert_eq!(slots.status()[0].state, BackendState::Waiting);
    assert_eq!(capacity(&mut t), 2048, "a waiting disk keeps its size");
    submit_read(&ram, &kick, 9, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        ram.memory.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(),
        1,
        "nothing serves the ring while the backend is away"
    );
    let mut second = start_backend(&sock, &image);
    slots
        .attach("blk1", UnixStream::connect(&sock).unwrap())
        .unwrap();
    assert_eq!(wait_read(&ram, 2), pattern[9 * 512..10 * 512]);
    assert_eq!(read_sector(&ram, &kick, 11, 3), pattern[11 * 512..12 * 512]);
    assert_eq!(interrupt.config_generation(), 1, "a restart is invisible");

    // A backend that put a completion in the used ring and died before raising the
    // interrupt: its successor has nothing to complete, so the core must raise it.
    while irq.read().is_ok() {}
    second.0.kill().unwrap();
    second.0.wait().unwrap();
    slots.detach("blk1", false).unwrap();
    assert!(
        irq.read().is_err(),
        "no interrupt while the backend is away"
    );
    let _third = start_backend(&sock, &image);
    slots
        .attach("blk1", UnixStream::connect(&sock).unwrap())
        .unwrap();
    assert!(
        irq.read().is_ok(),
        "attach raises the used-ring interrupt the dead backend may have owed"
    );
    assert_eq!(read_sector(&ram, &kick, 13, 4), pattern[13 * 512..14 * 512]);

    // device_del: capacity 0, announced.
    slots.detach("blk1", true).unwrap();
    assert_eq!(capacity(&mut t), 0);
    assert_eq!(interrupt.config_generation(), 2);
    assert_eq!(slots.status()[0].state, BackendState::Empty);
    let _ = std::fs::remove_dir_all(&dir);
}
