//! Host-level network benchmark: flotilla-net driven by a frontend harness
//! (memfd guest memory, split rings, no VM) through a tap in a private
//! network namespace, against reading and writing that tap directly.
//!
//! TX: the harness keeps the transmit ring full of the same frame; the raw
//! baseline `writev`s that frame to the tap in a loop. RX: a packet socket
//! in the namespace sends frames out of the tap as fast as it can; the
//! harness keeps the receive ring full of buffers and the raw baseline
//! `read`s the tap. Frame sizes: 1514-byte Ethernet frames and 64 KB TCP
//! TSO frames (vnet header with gso_type TCPV4, offloads on). Drain: the tap is
//! filled first and the raw reader and flotilla-net each read half of the same
//! fill, back to back, with no generator competing for the CPUs.
//!
//! The harness's ring is 1024 entries by default, as flotilla's VMM offers a
//! guest (`--ring 256` for the size most VMMs offer).
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
/// Receive buffer size offered by the harness (mergeable: Linux posts at
/// most a page per buffer).
const RX_BUF: u32 = 4096;
/// Distinct frames both transmit sides cycle over (the harness's scratch
/// slots, shared by chains whatever the ring size: the device only reads).
const TX_FRAMES: u64 = 256;

/// Posts the receive buffer of the next head: buffer h at RX_BUFS + h *
/// RX_BUF, so that the 256 buffers are 1 MiB of contiguous memory, as a
/// guest carves them from page fragments (and as the raw reader's buffers).
fn post_rx(drv: &mut Driver) {
    let head = drv.next_head(RX);
    drv.add(RX, &[wr(rx_addr(head), RX_BUF)]);
}

fn rx_addr(head: u16) -> u64 {
    RX_BUFS + u64::from(head) * u64::from(RX_BUF)
}

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
            self.gbps()
        )
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

/// Send buffer of the receive generator's packet socket: frames it may have
/// queued on the tap before `send` blocks. With the kernel default (about
/// 200 KB: three 64 KB frames) the generator and the reader run in lock
/// step and the benchmark measures wakeup latency rather than throughput;
/// a TCP sender feeding a guest has a window of megabytes. Both the raw
/// reader and flotilla-net get the same generator.
const DEFAULT_SNDBUF: i32 = 4 << 20;

/// The harness's default ring size: what flotilla's VMM offers a NIC's queues
/// (`vmm/src/vhost_user/net.rs` `QUEUE_SIZE`), which a Linux driver takes whole.
const GUEST_RING: u16 = 1024;

/// Command-line options.
struct Opts {
    secs: Duration,
    runs: usize,
    only: Vec<String>,
    /// Extra flags for flotilla-net (`--poll`).
    backend_args: Vec<String>,
    /// Offer EVENT_IDX from the harness (a Linux guest does).
    event_idx: bool,
    /// Send buffer of the receive-side generator (None: the kernel default).
    sndbuf: Option<i32>,
    /// Ring size the harness uses (a Linux guest takes the device's maximum).
    ring: u16,
    /// How long the harness polls for an interrupt before sleeping, as KVM
    /// polls a halted vCPU (`halt_poll_ns`) before it schedules it out.
    halt_poll: Duration,
    /// Pin the drain rows' sides to CPUs ([`FILL_CPU`], [`READ_CPU`]).
    pin: bool,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            secs: Duration::from_secs(5),
            runs: 1,
            only: Vec::new(),
            backend_args: Vec::new(),
            event_idx: true,
            sndbuf: Some(DEFAULT_SNDBUF),
            ring: GUEST_RING,
            halt_poll: Duration::ZERO,
            pin: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().unwrap_or_else(|| usage(&a));
            match a.as_str() {
                "--seconds" => o.secs = Duration::from_secs(val().parse().unwrap_or(5)),
                "--runs" => o.runs = val().parse().unwrap_or(1).max(1),
                "--only" => o.only = val().split(',').map(String::from).collect(),
                "--poll" => o.backend_args.push("--poll".into()),
                "--no-event-idx" => o.event_idx = false,
                "--pin" => o.pin = true,
                "--ring" => {
                    o.ring = val()
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two() && *n <= 1024)
                        .unwrap_or_else(|| usage("--ring"));
                }
                "--halt-poll-us" => {
                    let us = val().parse().unwrap_or_else(|_| usage("--halt-poll-us"));
                    o.halt_poll = Duration::from_micros(us);
                }
                "--sndbuf" => {
                    let bytes: i32 = val().parse().unwrap_or_else(|_| usage("--sndbuf"));
                    o.sndbuf = (bytes > 0).then_some(bytes);
                }
                _ => usage(&a),
            }
        }
        o
    }

    fn wants(&self, row: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|r| r == row)
    }
}

fn usage(arg: &str) -> ! {
    eprintln!(
        "net_bench: bad argument {arg}\n\
         usage: net_bench [--seconds N] [--runs N] [--only tx-mtu,rx-mtu,tx-tso,rx-tso,drain-mtu,drain-tso] \
         [--poll] [--no-event-idx] [--sndbuf BYTES (0: kernel default)] [--ring 256|512|1024] [--halt-poll-us N] [--pin]"
    );
    std::process::exit(2)
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Tx,
    Rx,
    /// Receive from a tap filled beforehand: the read rate with no
    /// generator competing for the CPUs.
    Drain,
}

fn main() {
    let o = Opts::parse();
    println!(
        "# {} s per measurement, {} run(s), ring {}, harness EVENT_IDX {}, backend args {:?}, \
         generator sndbuf {}; loadavg {}",
        o.secs.as_secs(),
        o.runs,
        o.ring,
        if o.event_idx { "on" } else { "off" },
        o.backend_args,
        o.sndbuf.map_or("kernel default".into(), |b| b.to_string()),
        loadavg()
    );
    let rows = [
        ("tx-mtu", Dir::Tx, Size::Mtu),
        ("rx-mtu", Dir::Rx, Size::Mtu),
        ("tx-tso", Dir::Tx, Size::Tso),
        ("rx-tso", Dir::Rx, Size::Tso),
        ("drain-mtu", Dir::Drain, Size::Mtu),
        ("drain-tso", Dir::Drain, Size::Tso),
    ];
    let mut table = Vec::new();
    for (name, dir, size) in rows {
        if !o.wants(name) {
            continue;
        }
        let mut runs = Vec::new();
        // Raw and backend alternate, so that load from elsewhere on the
        // machine hits both sides alike.
        for i in 0..o.runs {
            let (raw, net) = match dir {
                Dir::Tx => (tx_raw(size, o.secs), tx_backend(size, &o)),
                Dir::Rx => (rx_raw(size, &o), rx_backend(size, &o)),
                Dir::Drain => drain_pair(size, &o, i),
            };
            let ratio = 100.0 * net.gbps() / raw.gbps();
            println!(
                "# {name} run {}: raw {} | flotilla-net {} | {ratio:.0} %",
                i + 1,
                raw.show(),
                net.show()
            );
            runs.push((raw, net, ratio));
        }
        table.push((dir, size, runs));
    }
    println!("# loadavg {}", loadavg());
    println!("| direction | frames | raw tap (median) | flotilla-net (median) | ratio (median, min–max) |");
    println!("|---|---|---|---|---|");
    for (dir, size, runs) in &table {
        let raw = median(runs.iter().map(|r| r.0.gbps()).collect());
        let net = median(runs.iter().map(|r| r.1.gbps()).collect());
        let rawp = median(runs.iter().map(|r| r.0.packets as f64 / r.0.secs).collect());
        let netp = median(runs.iter().map(|r| r.1.packets as f64 / r.1.secs).collect());
        let ratios: Vec<f64> = runs.iter().map(|r| r.2).collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let dir = match dir {
            Dir::Tx => "TX (guest → tap)",
            Dir::Rx => "RX (tap → guest)",
            Dir::Drain => "RX, pre-filled tap",
        };
        println!(
            "| {dir} | {} | {:.0} K pkt/s, {raw:.1} Gbit/s | {:.0} K pkt/s, {net:.1} Gbit/s | {:.0} % ({lo:.0}–{hi:.0}) |",
            size.name(),
            rawp / 1e3,
            netp / 1e3,
            median(ratios),
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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

fn features_for(size: Size, o: &Opts) -> u64 {
    let base = match size {
        Size::Mtu => F_MRG_RXBUF,
        Size::Tso => F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4,
    };
    if o.event_idx {
        base | F_EVENT_IDX
    } else {
        base
    }
}

/// Waits until the device signals queue `q` (or 1 ms passes), as a guest
/// waits for its interrupt: polls for up to `halt_poll` first, then sleeps.
///
/// KVM polls a halted vCPU for up to `halt_poll_ns` (200 µs on x86) before it
/// schedules the vCPU thread out, and stops as soon as another task wants the
/// CPU (`single_task_running`). The harness yields between looks and stops
/// polling once a yield let another task run.
fn wait_call(d: &Driver, q: usize, halt_poll: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: d.rings[q].call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let start = Instant::now();
    // SAFETY (each poll): one valid pollfd.
    while !halt_poll.is_zero() && unsafe { libc::poll(&mut pfd, 1, 0) } == 0 {
        let before = Instant::now();
        if before - start >= halt_poll {
            break;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
        if before.elapsed() > OTHER_TASK_RAN {
            break;
        }
    }
    // SAFETY: one valid pollfd.
    let signalled = unsafe { libc::poll(&mut pfd, 1, 1) } > 0;
    let _ = d.rings[q].call.read();
    signalled
}

/// A `sched_yield` that took longer than this ran another task.
const OTHER_TASK_RAN: Duration = Duration::from_micros(5);

fn spawn_backend(tap: &OwnedFd, o: &Opts) -> (Backend, std::os::unix::net::UnixStream) {
    let mut args = vec!["--log-level", "warn"];
    args.extend(o.backend_args.iter().map(String::as_str));
    Backend::spawn(tap, &args)
}

fn tx_raw(size: Size, d: Duration) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    set_tap(&tap, size);
    let frame = size.frame();
    let hdr = size.hdr12();
    // As many distinct frames as the harness has ring slots, so that both
    // sides copy from the same amount of memory (not one cache-hot frame).
    let frames: Vec<Vec<u8>> = (0..TX_FRAMES).map(|_| frame.clone()).collect();
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

/// The harness transmits as a Linux virtio-net driver does: it frees
/// completed chains and posts new frames while there is room, kicks only
/// when the device asked for it (EVENT_IDX avail_event), and with a full
/// ring asks for an interrupt after 3/4 of the chains in flight complete
/// (`virtqueue_enable_cb_delayed`) and sleeps until then.
fn tx_backend(size: Size, o: &Opts) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    let (_backend, stream) = spawn_backend(&tap, o);
    let mut drv = Driver::with_ring_size(stream, features_for(size, o), o.ring);
    let frame = size.frame();
    let hdr = size.hdr12();
    // One frame per scratch slot, header and frame in two descriptors (the
    // raw baseline's two iovecs); chains reuse the slots.
    let slots = TX_FRAMES;
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
    let flen = frame.len() as u32;
    let start = Instant::now();
    let mut n = 0u64;
    let mut slot = 0u64;
    let mut in_flight = 0u16;
    while start.elapsed() < o.secs {
        while drv.try_used(TX).is_some() {
            n += 1;
            in_flight -= 1;
        }
        let old = drv.rings[TX].avail_idx;
        while drv.free_descriptors(TX) >= 2 {
            let base = TX_BUFS + (slot % slots) * TX_SLOT;
            drv.add(TX, &[rd(base, VNET_HDR as u32), rd(base + 0x40, flen)]);
            slot += 1;
            in_flight += 1;
        }
        if drv.rings[TX].avail_idx != old {
            drv.kick_if_needed(TX, old);
            continue;
        }
        // Ring full: interrupt after 3/4 of what is in flight.
        let seen = drv.rings[TX].used_seen;
        drv.set_used_event(TX, seen.wrapping_add(in_flight * 3 / 4));
        if drv.used_idx(TX) == seen {
            let _ = wait_call(&drv, TX, o.halt_poll);
        }
    }
    Rate {
        packets: n,
        bytes: n * frame.len() as u64,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Sends frames out of the tap from inside the namespace until stopped.
fn generator(
    ns: &Netns,
    size: Size,
    sndbuf: Option<i32>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let sock = ns.packet_socket(TAP, size == Size::Tso);
    if let Some(bytes) = sndbuf {
        sock.set_sndbuf(bytes).expect("SO_SNDBUFFORCE");
    }
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

/// Where the raw reader puts frames: the harness's receive buffers, laid
/// out the same (`ring` buffers of [`RX_BUF`] bytes, page-aligned, in
/// memfd memory), each frame read whole at the buffer flotilla-net would
/// start it in and taking as many buffers as it fills.
///
/// So the raw and flotilla-net sides copy frames to the same addresses.
/// That matters: a tap read into the start of a page (the header takes
/// its first 12 bytes) ran at about 70 % of the rate of one into a buffer
/// 20–60 bytes further on, here, and the raw reader's own heap buffers
/// measured that faster copy (docs/PERFORMANCE.md, "Same buffers for both
/// sides").
struct RawRing {
    mem: vm_memory::GuestMemoryMmap<()>,
    /// Buffers in the ring, and the one the next frame starts in.
    len: u64,
    at: u64,
}

impl RawRing {
    fn new(ring: u16) -> Self {
        let len = u64::from(ring);
        // One largest read of slack past the last buffer: a frame is read
        // whole wherever it starts.
        let size = (len * u64::from(RX_BUF)) as usize + MAX_READ;
        let (mem, _file) = flotilla_backend::test_support::memfd_guest_memory(c"raw-ring", size);
        RawRing { mem, len, at: 0 }
    }

    /// Reads one frame from `tap` into the next buffers.
    fn read(&mut self, tap: &OwnedFd) -> isize {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let addr = GuestAddress(self.at * u64::from(RX_BUF));
        let slice = self
            .mem
            .get_slice(addr, MAX_READ)
            .expect("inside the raw ring");
        let buf = slice.ptr_guard_mut().as_ptr();
        // SAFETY: buf is MAX_READ bytes of our own mapping.
        let r = unsafe { libc::read(tap.as_raw_fd(), buf.cast(), MAX_READ) };
        if r > 0 {
            self.at = (self.at + (r as u64).div_ceil(u64::from(RX_BUF))) % self.len;
        }
        r
    }
}

/// Largest read the raw side makes (a 64 KB GSO frame and its header).
const MAX_READ: usize = 70_000;

fn rx_raw(size: Size, o: &Opts) -> Rate {
    let (d, sndbuf) = (o.secs, o.sndbuf);
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    set_tap(&tap, size);
    let stop = Arc::new(AtomicBool::new(false));
    let gen = generator(&ns, size, sndbuf, stop.clone());
    let mut ring = RawRing::new(o.ring);
    let start = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    while start.elapsed() < d {
        let r = ring.read(&tap);
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

/// The harness receives as a Linux virtio-net driver's NAPI poll does: it
/// takes what the device used (reading each frame's header), gives the
/// buffers back at once, kicks only when the device asked for it, and when
/// nothing is left asks for an interrupt at the next used element and
/// sleeps.
fn rx_backend(size: Size, o: &Opts) -> Rate {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    let (_backend, stream) = spawn_backend(&tap, o);
    let sndbuf = o.sndbuf;
    let mut drv = Driver::with_ring_size(stream, features_for(size, o), o.ring);
    for _ in 0..o.ring {
        post_rx(&mut drv);
    }
    drv.kick(RX);
    let stop = Arc::new(AtomicBool::new(false));
    let gen = generator(&ns, size, sndbuf, stop.clone());
    let start = Instant::now();
    let mut rx = Receiver::default();
    while start.elapsed() < o.secs {
        if rx.take_used(&mut drv) == 0 {
            let _ = sleep_until_used(&drv, o.halt_poll);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap();
    Rate {
        packets: rx.frames,
        bytes: rx.bytes,
        secs,
    }
}

/// The harness's receive side: counts frames (a mergeable frame spans the
/// number of buffers its header says) and bytes.
struct Receiver {
    frames: u64,
    bytes: u64,
    /// Buffers still to come of the current frame.
    remaining: u16,
    /// Give taken buffers back to the device (a drain stops at its limit).
    repost: bool,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            frames: 0,
            bytes: 0,
            remaining: 0,
            repost: true,
        }
    }
}

impl Receiver {
    /// Takes every used buffer, reading each frame's header, gives the
    /// buffers back at once and kicks if the device asked. Returns how many
    /// buffers it took.
    fn take_used(&mut self, drv: &mut Driver) -> usize {
        let old = drv.rings[RX].avail_idx;
        let mut got = 0;
        let mut hdr = [0u8; VNET_HDR];
        while let Some((head, len)) = drv.try_used(RX) {
            got += 1;
            if self.remaining == 0 {
                use vm_memory::Bytes;
                drv.mem
                    .read_slice(&mut hdr, vm_memory::GuestAddress(rx_addr(head)))
                    .unwrap();
                self.remaining = u16::from_le_bytes([hdr[10], hdr[11]]).max(1);
                self.frames += 1;
                self.bytes += u64::from(len) - VNET_HDR as u64;
            } else {
                self.bytes += u64::from(len);
            }
            self.remaining -= 1;
            if self.repost {
                post_rx(drv);
            }
        }
        if got > 0 {
            drv.kick_if_needed(RX, old);
        }
        got
    }
}

/// Nothing left: asks for an interrupt at the next used buffer and sleeps
/// until it comes (NAPI's re-enable and wait).
/// Returns false if the wait timed out with no interrupt (a device that stalls shows as
/// many of these).
fn sleep_until_used(drv: &Driver, halt_poll: Duration) -> bool {
    let seen = drv.rings[RX].used_seen;
    drv.set_used_event(RX, seen);
    drv.used_idx(RX) != seen || wait_call(drv, RX, halt_poll)
}

/// Frames each side of a drain reads: about 0.3–0.5 s of reading on this machine. The
/// tap is filled with twice as many (it queues at most 2^19 frames; 2 × 40,000 TSO frames
/// are 5 GB of kernel memory while queued).
fn drain_frames(size: Size) -> usize {
    match size {
        Size::Mtu => 250_000,
        Size::Tso => 40_000,
    }
}

/// How long a drain waits for one more frame before it counts the tap as
/// empty (the end time is the last frame's, not this timeout's).
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// Queues `frames` frames on the tap (its queue lengthened to hold them all;
/// the tap orphans queued frames, so the socket's send buffer does not limit
/// them) before anyone reads it. Returns how many went out.
fn fill_tap(ns: &Netns, size: Size, frames: usize) -> usize {
    ns.exec(&["ip", "link", "set", TAP, "txqueuelen", &frames.to_string()]);
    let sock = ns.packet_socket(TAP, size == Size::Tso);
    let mut msg = Vec::new();
    if size == Size::Tso {
        msg.extend_from_slice(&tso4_hdr10(1448));
    }
    msg.extend_from_slice(&size.frame());
    (0..frames).filter(|_| sock.send(&msg).is_ok()).count()
}

/// One drain run: the tap is filled once with twice [`drain_frames`] frames, and the raw
/// reader and flotilla-net take half each, back to back, from the same fill (the frames'
/// kernel buffers were made together, so where they landed in memory, which moves the copy
/// rate by tens of percent from one fill to the next on this machine, is the same for
/// both). Who goes first alternates with `run`. Returns (raw, flotilla-net).
fn drain_pair(size: Size, o: &Opts, run: usize) -> (Rate, Rate) {
    let ns = Netns::new();
    let tap = ns.tap(TAP);
    pin(o.pin.then_some(READ_CPU));
    let (backend, stream) = spawn_backend(&tap, o);
    pin(o.pin.then_some(FILL_CPU));
    let mut drv = Driver::with_ring_size(stream, features_for(size, o), o.ring);
    // The backend set the same offloads when the features were negotiated; the raw
    // reader's settings are the same.
    set_tap(&tap, size);
    let half = drain_frames(size);
    fill_tap(&ns, size, 2 * half);
    let (raw, net) = if run % 2 == 0 {
        let raw = drain_raw(&tap, o, Some(half));
        (raw, drain_backend(&mut drv, &backend, o, None))
    } else {
        let net = drain_backend(&mut drv, &backend, o, Some(half));
        (drain_raw(&tap, o, None), net)
    };
    pin(None);
    (raw, net)
}

/// The raw reader drains the tap (at most `limit` frames), from its own CPU.
fn drain_raw(tap: &OwnedFd, o: &Opts, limit: Option<usize>) -> Rate {
    pin(o.pin.then_some(READ_CPU));
    // SAFETY: fcntl on a tap fd we own (flotilla-net's copy is non-blocking already).
    unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut ring = RawRing::new(o.ring);
    let window = monotonic_secs();
    let start = Instant::now();
    let mut last = start;
    let (mut n, mut bytes) = (0u64, 0u64);
    while limit.is_none_or(|l| n < l as u64) {
        let r = ring.read(tap);
        if r > 0 {
            n += 1;
            bytes += r as u64 - VNET_HDR as u64;
            last = Instant::now();
        } else if last.elapsed() >= DRAIN_IDLE {
            break;
        }
    }
    pin(o.pin.then_some(FILL_CPU));
    println!(
        "#   raw drain: window {window:.3},{:.3} (CLOCK_MONOTONIC)",
        window + (last - start).as_secs_f64()
    );
    Rate {
        packets: n,
        bytes,
        secs: (last - start).as_secs_f64(),
    }
}

/// flotilla-net drains the tap: the harness posts the receive ring (empty until now) and
/// kicks, and receives as in [`rx_backend`] until the frames stop or `limit` frames are
/// in. After `limit` it stops giving buffers back and waits for the backend to fill the
/// ones it still has, so that the raw reader then has the tap to itself.
fn drain_backend(drv: &mut Driver, backend: &Backend, o: &Opts, limit: Option<usize>) -> Rate {
    let ticks = tree_cpu_ticks(backend.child.id());
    let harness = thread_cpu();
    let window = monotonic_secs();
    let start = Instant::now();
    for _ in 0..o.ring {
        post_rx(drv);
    }
    drv.kick(RX);
    let mut last = start;
    let mut rx = Receiver::default();
    // Waits for an interrupt that timed out (1 ms) with buffers used meanwhile: the device
    // spaces its interrupts by buffers (3/4 of the ring), which at 1024 entries of 1514-B
    // frames is longer than the harness's timeout.
    let (mut late, mut timed_out) = (0u64, false);
    while last.elapsed() < DRAIN_IDLE && limit.is_none_or(|l| rx.frames < l as u64) {
        if rx.take_used(drv) > 0 {
            late += u64::from(timed_out);
            timed_out = false;
            last = Instant::now();
        } else {
            timed_out = !sleep_until_used(drv, o.halt_poll);
        }
    }
    let secs = (last - start).as_secs_f64();
    let (packets, bytes) = (rx.frames, rx.bytes);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let backend_cpu = (tree_cpu_ticks(backend.child.id()) - ticks) as f64 / hz;
    let harness_cpu = (thread_cpu() - harness).as_secs_f64();
    if limit.is_some() {
        rx.repost = false;
        let mut quiet = Instant::now();
        while quiet.elapsed() < DRAIN_IDLE {
            if rx.take_used(drv) > 0 {
                quiet = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!(
        "#   flotilla-net drain: backend {:.0} % of a CPU, harness {:.0} %, {late} waits for an \
         interrupt timed out with buffers used; window {window:.3},{:.3} (CLOCK_MONOTONIC, for `perf record -k 1` + `perf report --time`)",
        100.0 * backend_cpu / secs,
        100.0 * harness_cpu / secs,
        window + secs,
    );
    Rate {
        packets,
        bytes,
        secs,
    }
}

/// Where a pinned drain makes its frames (and runs the harness) and where it reads them:
/// both sides free the same kernel buffers from the same other CPU, as a host's softirq
/// and a backend on different CPUs do. Unpinned, the raw reader frees them on the CPU
/// that allocated them, and the backend wherever the scheduler put it.
const FILL_CPU: usize = 1;
const READ_CPU: usize = 0;

/// Pins the calling thread (and what it spawns from now on) to `cpu`; None: every CPU.
fn pin(cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain old data; CPU_SET / sched_setaffinity get a valid set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(c) => libc::CPU_SET(c, &mut set),
            None => (0..libc::CPU_SETSIZE as usize).for_each(|c| libc::CPU_SET(c, &mut set)),
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CLOCK_MONOTONIC in seconds: the clock `perf record -k 1` stamps samples with.
fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    // SAFETY: rusage is plain old data, filled by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
