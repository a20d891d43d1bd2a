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

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn generic_frontend_serves_requests_and_survives_a_guest_reset() {
    let dir = std::env::temp_dir().join(format!("flotilla-frontend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::File::create(&image)
        .unwrap()
        .write_all(&pattern)
        .unwrap();
    let sock = dir.join("blk.sock");
    let blk_bin = flotilla_tests::paths::program("flotilla-blk");
    let mut backend = Backend(
        Command::new(&blk_bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(&image)
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
