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

use vm_memory::{Address, Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::transport::mmio::{reg, status, MmioTransport};
use vmm::transport::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use vmm::vhost_user::{blk, memory::MemoryTable};
use vmm::vstate::memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x22000;
const QSIZE: u16 = 16;

fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The driver's bring-up sequence: negotiate VERSION_1 only, one queue, DRIVER_OK.
fn bring_up(t: &mut MmioTransport) {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DEVICE_FEATURES_SEL, 1);
    assert_ne!(r(t, reg::DEVICE_FEATURES) & 1, 0, "VERSION_1 offered");
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, 0);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(
        r(t, reg::STATUS) & status::FEATURES_OK,
        0,
        "features accepted"
    );
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_NUM, u32::from(QSIZE));
    w(t, reg::QUEUE_DESC_LOW, DESC as u32);
    w(t, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
    w(t, reg::QUEUE_DEVICE_LOW, USED as u32);
    w(t, reg::QUEUE_READY, 1);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(
        r(t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
        0,
        "activation succeeded"
    );
}

/// Reads `sector` through the ring (a fresh ring: request number `n` of it) and returns the
/// data once the used ring shows the completion.
fn read_sector(ram: &GuestRam, kick: &EventFd, sector: u64, n: u16) -> Vec<u8> {
    submit_read(ram, kick, sector, n);
    wait_read(ram, n)
}

/// Publishes request `n` (a read of `sector`) and kicks.
fn submit_read(ram: &GuestRam, kick: &EventFd, sector: u64, n: u16) {
    let m = &ram.memory;
    // virtio_blk_outhdr: type IN (0), reserved, sector.
    m.write_obj(0u32, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let base = GuestAddress(DESC + i * 16);
        m.write_obj(addr, base).unwrap();
        m.write_obj(len, base.unchecked_add(8)).unwrap();
        m.write_obj(flags, base.unchecked_add(12)).unwrap();
        m.write_obj(next, base.unchecked_add(14)).unwrap();
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    desc(0, HDR, 16, NEXT, 1);
    desc(1, DATA, 512, NEXT | WRITE, 2);
    desc(2, STATUS, 1, WRITE, 0);
    m.write_obj(
        0u16,
        GuestAddress(AVAIL + 4 + 2 * u64::from((n - 1) % QSIZE)),
    )
    .unwrap();
    m.write_obj(n, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
}

/// Waits until the used ring shows request `n` and returns the data it read.
fn wait_read(ram: &GuestRam, n: u16) -> Vec<u8> {
    let m = &ram.memory;
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != n {
        assert!(Instant::now() < deadline, "request {n} never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    let mut data = vec![0u8; 512];
    m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    data
}

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
    let _second = start_backend(&sock, &image);
    slots
        .attach("blk1", UnixStream::connect(&sock).unwrap())
        .unwrap();
    assert_eq!(wait_read(&ram, 2), pattern[9 * 512..10 * 512]);
    assert_eq!(read_sector(&ram, &kick, 11, 3), pattern[11 * 512..12 * 512]);
    assert_eq!(interrupt.config_generation(), 1, "a restart is invisible");

    // device_del: capacity 0, announced.
    slots.detach("blk1", true).unwrap();
    assert_eq!(capacity(&mut t), 0);
    assert_eq!(interrupt.config_generation(), 2);
    assert_eq!(slots.status()[0].state, BackendState::Empty);
    let _ = std::fs::remove_dir_all(&dir);
}
