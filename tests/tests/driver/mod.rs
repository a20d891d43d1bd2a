//! A minimal virtio-blk guest driver for host-level tests and benchmarks: it plays the
//! guest against a virtio-mmio transport (registers, one queue in guest memory, kicks on the
//! kick eventfd as KVM's ioeventfd would). Shared by tests/tests/frontend.rs and
//! tests/examples/bench_supervision.rs.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::transport::mmio::{reg, status, MmioTransport};
use vmm::transport::VIRTIO_F_VERSION_1;
use vmm::vstate::memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;

pub const DESC: u64 = 0x10000;
pub const AVAIL: u64 = 0x11000;
pub const USED: u64 = 0x12000;
pub const HDR: u64 = 0x20000;
pub const DATA: u64 = 0x21000;
pub const STATUS: u64 = 0x22000;
pub const QSIZE: u16 = 16;

pub fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The driver's bring-up sequence: negotiate VERSION_1 only, one queue, DRIVER_OK.
pub fn bring_up(t: &mut MmioTransport) {
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
pub fn read_sector(ram: &GuestRam, kick: &EventFd, sector: u64, n: u16) -> Vec<u8> {
    submit_read(ram, kick, sector, n);
    wait_read(ram, n)
}

/// Publishes request `n` (a read of `sector`) and kicks.
pub fn submit_read(ram: &GuestRam, kick: &EventFd, sector: u64, n: u16) {
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
pub fn wait_read(ram: &GuestRam, n: u16) -> Vec<u8> {
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
