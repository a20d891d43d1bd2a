//! Restart and hotplug latency of the supervision machinery, natively (no VM): the gateway's
//! real `Supervisor` and `Hotplug` drive real flotilla-blk processes, attached to the core's
//! real slot frontends in this process (the "core" is a `Slots` table plus a guest driver
//! playing the guest against the virtio-mmio transport, as in tests/tests/frontend.rs).
//!
//! - restart: SIGKILL of the backend → the first request queued after the kill completes
//!   (pidfd wake-up, LOST, detach, spawn, vhost-user negotiation and replay, kick, I/O).
//! - device_add: blockdev-add done → device_add returns (spawn + attach + config interrupt).
//!
//! Usage: cargo run --release -p flotilla-tests --example bench_supervision [-- ROUNDS]
//! (build flotilla-blk in the same profile first: cargo build --release -p flotilla-blk).

#[path = "../tests/driver/mod.rs"]
mod driver;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driver::*;
use qmp_gateway::hotplug::Hotplug;
use qmp_gateway::qmp::EventBus;
use qmp_gateway::supervisor::{CoreOps, EventSink, Supervisor};
use serde_json::{json, Map, Value};
use vmm::device_manager::MmioDeviceInfo;
use vmm::hotplug::{SlotDevice, SlotKind, Slots};
use vmm::transport::mmio::MmioTransport;
use vmm::transport::{VirtioDevice, VirtioInterrupt};
use vmm::vhost_user::{blk, memory::MemoryTable};
use vmm::vstate::memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The core's side of attach/detach, in this process.
struct LocalCore(Slots);

impl CoreOps for LocalCore {
    fn attach(&self, slot: &str, socket: &UnixStream) -> Result<(), String> {
        let stream = socket.try_clone().map_err(|e| e.to_string())?;
        self.0.attach(slot, stream).map_err(|e| e.to_string())
    }
    fn detach(&self, slot: &str, unplug: bool) -> Result<(), String> {
        self.0.detach(slot, unplug).map_err(|e| e.to_string())
    }
}

struct Quiet;
impl EventSink for Quiet {
    fn emit(&self, _: &str, _: Value) {}
}

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |p: usize| v[(v.len() - 1) * p / 100].as_secs_f64() * 1e3;
    println!(
        "{name}: median {:.2} ms, p90 {:.2} ms, max {:.2} ms ({} rounds)",
        at(50),
        at(90),
        at(100),
        v.len()
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let profile = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|p| p.to_path_buf()))
        .expect("profile directory");
    let blk = profile.join("flotilla-blk");
    assert!(blk.exists(), "build flotilla-blk first ({})", blk.display());
    let dir = std::env::temp_dir().join(format!("flotilla-bench-sup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();

    let ram = GuestRam::new(256 << 20).unwrap();
    let frontend = blk::vhost_user_blk("blk0", 1, &ram.memory, &MemoryTable::new(&ram)).unwrap();
    let shared = Arc::new(Mutex::new(frontend));
    let mut device = SlotDevice::new(shared.clone()).unwrap();
    let mut slots = Slots::default();
    let info = MmioDeviceInfo {
        base: 0xd000_0000,
        len: 0x1000,
        irq: 5,
    };
    slots.push("blk0".into(), SlotKind::Blk, info, shared);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    device.set_interrupt(Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap())));
    let kick = device.queue_events()[0].try_clone().unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq));
    let mut t = MmioTransport::new(Box::new(device), interrupt);
    bring_up(&mut t);

    let core = Arc::new(LocalCore(slots));
    let sup = Supervisor::new(core.clone(), Arc::new(Quiet));
    let hp = Hotplug::new(sup.clone(), core, EventBus::new(), blk.clone(), blk);
    hp.blockdev_add(&args(
        json!({"node-name": "d0", "file": {"filename": image.to_str()}}),
    ))
    .unwrap();

    let mut adds = Vec::new();
    let mut n = 0u16;
    for _ in 0..rounds {
        let t0 = Instant::now();
        hp.device_add(&args(
            json!({"id": "d0", "driver": "virtio-blk-mmio", "addr": "0x0"}),
        ))
        .unwrap();
        adds.push(t0.elapsed());
        n = n.wrapping_add(1);
        assert_eq!(read_sector_n(&ram, &kick, n)[0], 7);
        hp.device_del(&args(json!({"id": "d0"}))).unwrap();
    }
    hp.device_add(&args(
        json!({"id": "d0", "driver": "virtio-blk-mmio", "addr": "0x0"}),
    ))
    .unwrap();
    let mut restarts = Vec::new();
    for _ in 0..rounds {
        n = n.wrapping_add(1);
        assert_eq!(read_sector_n(&ram, &kick, n)[0], 7);
        let pid = sup.list()[0].pid.unwrap();
        let t0 = Instant::now();
        // SAFETY: signalling a backend process of this benchmark.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        n = n.wrapping_add(1);
        submit_read(&ram, &kick, 0, n);
        wait_read(&ram, n);
        restarts.push(t0.elapsed());
        // Let the supervisor settle (the restarted backend counts as healthy after 1 s,
        // but the benchmark measures the immediate first retry only).
        while sup.list()[0].pid == Some(pid) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    percentiles("device_add return (native)", adds);
    percentiles(
        "restart: SIGKILL -> first request completed by the new backend (native)",
        restarts,
    );
    sup.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

fn read_sector_n(ram: &GuestRam, kick: &EventFd, n: u16) -> Vec<u8> {
    submit_read(ram, kick, 0, n);
    wait_read(ram, n)
}
