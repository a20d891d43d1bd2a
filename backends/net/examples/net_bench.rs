//! Host-level network benchmark: flotilla-net driven by a frontend harness
//! (memfd guest memory, split rings, no VM) through a tap in a private
//! network namespace, against reading and writing that tap directly.
//!
//! TX: the harness keeps the transmit ring full of the same frame; the raw
//! baseline `writev`s that frame to the tap in a loop. RX: a packet socket
//! in the namespace sends frames out of the tap as fast as it can; the
//! harness keeps the receive ring full of buffers and the raw baseline
//! `read`s the tap. Frame sizes: 1514-byte Ethernet frames and 64 KB TCP
//! TSO frames (vnet header with gso_type TCPV4, offloads on).
//!
//! Run as root, release build (the flotilla-net binary is taken from the
//! same target directory):
//!
//! ```text
//! cargo build --release -p flotilla-net --bin flotilla-net --example net_bench
//! target/release/examples/net_bench [--seconds N]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const TAP: &str = "fnb0";
/// TCP payload of the TSO frames: 64054-byte frames.
const TSO_PAYLOAD: usize = 64_000;
/// Receive buffer size offered by the harness (mergeable, like Linux's).
const RX_BUF: u32 = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Size {
    Mtu,
    Tso,
}

impl Size {
    fn frame(self) -> Vec<u8> {
        match self {
            Size::Mtu => test_frame(1514, 1),
            Size::Tso => tcp4_frame(TSO_PAYLOAD),
        }
    }

    fn hdr12(self) -> [u8; VNET_HDR] {
        let mut h = [0u8; VNET_HDR];
        if self == Size::Tso {
            h[..10].copy_from_slice(&tso4_hdr10(1448));
        }
        h
    }

    fn name(self) -> &'static str {
        match self {
            Size::Mtu => "1514 B",
            Size::Tso => "64 KB TSO",
        }
    }
}

struct Rate {
    packets: u64,
    bytes: u64,
    secs: f64,
}

impl Rate {
    fn show(&self) -> String {
        format!(
            "{:>9.0} pkt/s {:>7.2} Gbit/s",
            self.packets as f64 / self.secs,
            self.bytes as f64 * 8.0 / self.secs / 1e9
        )
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

fn main() {
    let mut secs = 5u64;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--seconds") {
        secs = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(5);
    }
    let d = Duration::from_secs(secs);
    println!("| direction | frames | raw tap | flotilla-net | ratio |");
    println!("|---|---|---|---|---|");
    for size in [Size::Mtu, Size::Tso] {
        let raw = tx_raw(size, d);
        let net = tx_backend(size, d);
        row("TX (guest → tap)", size, &raw, &net);
        let raw = rx_raw(size, d);
        let net = rx_backend(size, d);
        row("RX (tap → guest)", size, &raw, &net);
    }
}

fn row(dir: &str, size: Size, raw: &Rate, net: &Rate) {
    println!(
        "| {dir} | {} | {} | {} | {:.0} % |",
        size.name(),
        raw.show(),
        net.show(),
        100.0 * net.gbps() / raw.gbps()
    );
}

fn offload_for(size: Size) -> u32 {
    match size {
        Size::Mtu => 0,
        Size::Tso => libc::TUN_F_CSUM | libc::TUN_F_TSO4,
    }
}

fn set_tap(tap: &OwnedFd, size: Size) {
    let hdr: libc::c_int = VNET_HDR as libc::c_int;
    // SAFETY: plain ioctls on a tap fd we own, with valid arguments.
    unsafe {
        assert!(libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) == 0);
        assert!(
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offload_for(size) as libc::c_ulong
            ) == 0
        );
    }
}

fn features_for(size: Size) -> u64 {
    match size {
        Size::Mtu => F_MRG_RXBUF,
        Size::Tso => F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4,
    }
}

fn wait_call(d: &Driver, q: usize) {
    let mut pfd = libc::pollfd {
        fd: d.rings[q].call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 1) };
    let _ = d.rings[q].call.read();
}

fn tx_raw(size: Size, d: Duration) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    set_tap(&tap, size);
    let frame = size.frame();
    let hdr = size.hdr12();
    // As many distinct frames as the harness has ring slots, so that both
    // sides copy from the same amount of memory (not one cache-hot frame).
    let frames: Vec<Vec<u8>> = (0..QSIZE).map(|_| frame.clone()).collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for f in &frames {
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut _,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: f.as_ptr() as *mut _,
                    iov_len: f.len(),
                },
            ];
            // SAFETY: the iovecs point at live buffers.
            let r = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), 2) };
            if r > 0 {
                n += 1;
            }
        }
    }
    Rate {
        packets: n,
        bytes: n * frame.len() as u64,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn tx_backend(size: Size, d: Duration) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    let (_backend, stream) = Backend::spawn(&tap, &["--log-level", "warn"]);
    let mut drv = Driver::new(stream, features_for(size));
    let frame = size.frame();
    let hdr = size.hdr12();
    // One frame per scratch slot; chains reuse them.
    let slots = u64::from(QSIZE);
    for slot in 0..slots {
        let base = TX_BUFS + slot * TX_SLOT;
        use vm_memory::Bytes;
        drv.mem
            .write_slice(&hdr, vm_memory::GuestAddress(base))
            .unwrap();
        drv.mem
            .write_slice(&frame, vm_memory::GuestAddress(base + 0x40))
            .unwrap();
    }
    let post = |drv: &mut Driver, slot: u64| {
        let base = TX_BUFS + slot * TX_SLOT;
        drv.post(
            TX,
            &[
                rd(base, VNET_HDR as u32),
                rd(base + 0x40, frame.len() as u32),
            ],
            false,
        );
    };
    for slot in 0..slots / 2 {
        post(&mut drv, slot);
    }
    drv.kick(TX);
    let start = Instant::now();
    let mut n = 0u64;
    let mut slot = slots / 2;
    while start.elapsed() < d {
        wait_call(&drv, TX);
        let mut got = 0;
        while drv.try_used(TX).is_some() {
            got += 1;
        }
        n += got;
        for _ in 0..got {
            post(&mut drv, slot % slots);
            slot += 1;
        }
        if got > 0 {
            drv.kick(TX);
        }
    }
    Rate {
        packets: n,
        bytes: n * frame.len() as u64,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Sends frames out of the tap from inside the namespace until stopped.
fn generator(ns: &Netns, size: Size, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let sock = ns.packet_socket(TAP, size == Size::Tso);
    let mut msg = Vec::new();
    if size == Size::Tso {
        msg.extend_from_slice(&tso4_hdr10(1448));
    }
    msg.extend_from_slice(&size.frame());
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..32 {
                let _ = sock.send(&msg);
            }
        }
    })
}

fn rx_raw(size: Size, d: Duration) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    set_tap(&tap, size);
    let stop = Arc::new(AtomicBool::new(false));
    let gen = generator(&ns, size, stop.clone());
    // 1 MiB of receive buffers, as the harness's ring (256 x 4 KiB).
    let mut bufs = vec![vec![0u8; 70_000]; 16];
    let start = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    while start.elapsed() < d {
        let buf = &mut bufs[n as usize % 16];
        // SAFETY: buf is valid for writes of its length.
        let r = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r > 0 {
            n += 1;
            bytes += r as u64 - VNET_HDR as u64;
        } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap();
    Rate {
        packets: n,
        bytes,
        secs,
    }
}

fn rx_backend(size: Size, d: Duration) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    let (_backend, stream) = Backend::spawn(&tap, &["--log-level", "warn"]);
    let mut drv = Driver::new(stream, features_for(size));
    for _ in 0..QSIZE {
        drv.post_rx_slot(RX_BUF, false);
    }
    drv.kick(RX);
    let stop = Arc::new(AtomicBool::new(false));
    let gen = generator(&ns, size, stop.clone());
    let start = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut hdr = [0u8; VNET_HDR];
    let mut remaining = 0u16;
    while start.elapsed() < d {
        wait_call(&drv, RX);
        let mut got = 0;
        while let Some((head, len)) = drv.try_used(RX) {
            got += 1;
            if remaining == 0 {
                use vm_memory::Bytes;
                drv.mem
                    .read_slice(
                        &mut hdr,
                        vm_memory::GuestAddress(RX_BUFS + u64::from(head) * RX_SLOT),
                    )
                    .unwrap();
                remaining = u16::from_le_bytes([hdr[10], hdr[11]]).max(1);
                n += 1;
                bytes += u64::from(len) - VNET_HDR as u64;
            } else {
                bytes += u64::from(len);
            }
            remaining -= 1;
        }
        for _ in 0..got {
            drv.post_rx_slot(RX_BUF, false);
        }
        if got > 0 {
            drv.kick(RX);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap();
    Rate {
        packets: n,
        bytes,
        secs,
    }
}
