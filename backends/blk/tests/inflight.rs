//! Crash-restart of flotilla-blk with vhost-user inflight I/O tracking, no VM.
//!
//! A hand-built frontend (the role flotilla's core plays) drives one queue,
//! kills the backend at random moments, starts a new one on a new
//! socketpair, replays the set-up the way the core does (SET_INFLIGHT_FD
//! with the region the first backend allocated, SET_VRING_BASE = the used
//! index in guest memory), kicks, and carries on. At the end every request
//! must have completed exactly once and the image must hold exactly what
//! was written.
//!
//! Two drivers:
//! - busy: a few hundred writes in flight, the used ring polled (interrupts
//!   ignored). The same run without the feature must lose or duplicate
//!   requests, which shows the check can fail.
//! - one at a time (like `dd`), VIRTIO_RING_F_EVENT_IDX negotiated, and the
//!   used ring read only when the call eventfd fires, as Linux's virtio_ring
//!   does: it checks the backend *signals* every completion it owes after a
//!   restart, not only that it completes it.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Rng, TempDir, BIN};
use nix::sys::signal::Signal;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// The driver's `used_event`, right after the avail ring's entries.
const USED_EVENT: u64 = AVAIL + 4 + 2 * QSIZE as u64;
/// The device's `avail_event`, right after the used ring's entries.
const AVAIL_EVENT: u64 = USED + 4 + 8 * QSIZE as u64;
/// Indirect tables, 64 bytes per slot.
const TABLES: u64 = 0x1_0000;
/// Request headers, 16 bytes per slot.
const HEADERS: u64 = 0x2_0000;
/// Status bytes, one per slot.
const STATUS: u64 = 0x3_0000;
/// Data buffers, one sector per slot.
const DATA: u64 = 0x10_0000;

const SECTOR: usize = 512;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const VERSION_1: u64 = 1 << 32;
const INDIRECT_DESC: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Slots whose request is one indirect descriptor (heads 0..INDIRECT_SLOTS).
const INDIRECT_SLOTS: u16 = 200;
/// Slots whose request is a three-descriptor chain, after the indirect ones.
const CHAIN_SLOTS: u16 = 18;

/// How long the one-at-a-time driver waits for an interrupt before it calls
/// the run stalled.
const INTERRUPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a request sits in the descriptor table.
#[derive(Clone, Copy)]
struct Slot {
    /// Index of the slot (for its header, status and data areas).
    n: u16,
    /// Head descriptor.
    head: u16,
    indirect: bool,
}

fn slots() -> Vec<Slot> {
    let mut v: Vec<Slot> = (0..INDIRECT_SLOTS)
        .map(|n| Slot {
            n,
            head: n,
            indirect: true,
        })
        .collect();
    v.extend((0..CHAIN_SLOTS).map(|j| Slot {
        n: INDIRECT_SLOTS + j,
        head: INDIRECT_SLOTS + 3 * j,
        indirect: false,
    }));
    v
}

/// Every 25th request is a flush instead of a write. A flush (fdatasync of
/// dirty data) takes milliseconds while the writes around it complete in
/// microseconds, so completions overtake older requests all the time: the
/// case the used index alone cannot describe.
fn is_flush(r: usize) -> bool {
    r % 25 == 24
}

/// The data request `r` writes: distinct for every request.
fn payload(r: usize) -> Vec<u8> {
    let mut v = vec![0u8; SECTOR];
    Rng(0x9e37_79b9_7f4a_7c15 ^ (r as u64 + 1)).fill(&mut v);
    v
}

/// `vring_need_event` of the virtio spec (and Linux): whether moving an
/// index from `old` to `new` passes `event`, so the other side asked to be
/// notified.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest memory shared with the backend through a memfd.
struct Guest {
    mem: GuestMemoryMmap<()>,
    file: File,
    host: u64,
}

impl Guest {
    fn new() -> Guest {
        let (mem, file) =
            flotilla_backend::test_support::memfd_guest_memory(c"flotilla-test-guest", MEM_SIZE);
        let host = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;
        Guest { mem, file, host }
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn read_u16(&self, at: u64) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(USED + 2)
    }

    fn avail_idx(&self) -> u16 {
        self.read_u16(AVAIL + 2)
    }

    /// Where the backend wants the next kick (EVENT_IDX).
    fn avail_event(&self) -> u16 {
        self.read_u16(AVAIL_EVENT)
    }

    fn used_event(&self) -> u16 {
        self.read_u16(USED_EVENT)
    }

    /// Asks for an interrupt once the used index passes `idx` (EVENT_IDX),
    /// with a full barrier after it, as Linux's `virtio_store_mb`.
    fn set_used_event(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(USED_EVENT)).unwrap();
        fence(Ordering::SeqCst);
    }
}

/// Whether `fd` is readable within `timeout`.
fn readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll on one pollfd for a descriptor borrowed for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Takes the interrupt pending on the call eventfd, if any.
fn take_interrupt(call: &EventFd) -> bool {
    readable(call, Duration::ZERO) && call.read().is_ok()
}

/// One flotilla-blk process and our end of its control socket.
struct Proc {
    child: Child,
    fe: Frontend,
    /// Our end of the socket again, to see the backend's end close.
    sock: UnixStream,
    /// The process serving the rings: the jailed child when the jail
    /// forked, else `child` (known once it answered a message).
    server: u32,
}

impl Proc {
    /// Kills the backend with `sig` and waits until it is gone, the way the
    /// core waits before it attaches the next one.
    ///
    /// The signal goes to the process that serves the rings: the jailed
    /// child when the jail forked (its keeper then ends by the same signal),
    /// else the process itself.
    fn kill(&mut self, sig: Signal) {
        let target = nix::unistd::Pid::from_raw(self.server as i32);
        nix::sys::signal::kill(target, sig).expect("kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            // A pid namespace's init (the jailed backend with the default
            // sandbox) never gets a signal it does not handle from outside,
            // SIGKILL aside.
            assert!(Instant::now() < deadline, "the backend survived {sig}");
            std::thread::sleep(Duration::from_micros(200));
        };
        assert_eq!(
            status.signal(),
            Some(sig as i32),
            "backend ended by {status}"
        );
        // Its end of the socket is closed once nothing of it runs any more.
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one pollfd for a descriptor we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert!(n > 0, "the killed backend's socket stayed open");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts flotilla-blk on one end of a fresh socketpair, inherited as fd 3.
fn spawn(image: &Path, args: &[&str]) -> Proc {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let raw: RawFd = theirs.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--image"])
        .arg(image)
        .args(["--log-level", "warn"])
        .args(args)
        .stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2,
    // fcntl) on fds this process owns.
    unsafe {
        cmd.pre_exec(move || {
            let ret = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if ret < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn flotilla-blk");
    drop(theirs);
    Proc {
        child,
        sock: ours.try_clone().expect("dup socket"),
        fe: Frontend::from_stream(ours, 1),
        server: 0,
    }
}

/// What a run saw.
#[derive(Debug, Default)]
struct Report {
    /// Requests completed (first completion each).
    completed: usize,
    /// Used elements for a head with no request outstanding, or a second
    /// completion of the same request.
    duplicates: usize,
    /// Requests never completed (the run stalled with them outstanding).
    lost: usize,
    /// Completions whose status or length was wrong.
    bad_status: usize,
    /// Kills done.
    kills: usize,
    /// Kills after which the region showed requests in flight.
    kills_mid_flight: usize,
    /// Sectors whose content is not what was written last.
    bad_sectors: usize,
    /// Busy, out of order: kills that waited a whole kill interval for an
    /// out-of-order completion and were done after a kick instead.
    late_kills: usize,
    /// One at a time: kicks sent, and requests the backend's avail_event
    /// said needed none (the attach kicks not counted).
    kicks: usize,
    kicks_suppressed: usize,
    /// One at a time: kills after which the used ring held a completion the
    /// driver had not taken yet.
    kills_after_completion: usize,
    /// One at a time: kills after which the used ring held a completion no
    /// interrupt had announced (the backend died between add_used and
    /// signalling; the look after the attach must find it).
    kills_before_signal: usize,
    /// One at a time: completions the one look after an attach found.
    found_after_attach: usize,
    /// One at a time: why the run stopped waiting for an interrupt.
    stall: Option<String>,
}

/// The frontend: guest memory, one queue, the inflight region, the driver.
struct Harness {
    guest: Guest,
    kick: EventFd,
    call: EventFd,
    inflight: Option<(VhostUserInflight, File)>,
    use_inflight: bool,
    event_idx: bool,
    image: std::path::PathBuf,
    args: Vec<String>,
}

impl Harness {
    /// Replays the set-up on a new backend the way flotilla's core does.
    fn attach(&mut self, first: bool) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut p = spawn(&self.image, &args);
        let fe = &mut p.fe;
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let mut want = VERSION_1 | INDIRECT_DESC | PROTOCOL_FEATURES;
        if self.event_idx {
            want |= EVENT_IDX;
        }
        assert_eq!(offered & want, want);
        fe.set_features(want).expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        let mut acked = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if self.use_inflight {
            acked |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        fe.set_protocol_features(acked)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.guest.host,
            mmap_offset: 0,
            mmap_handle: self.guest.file.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        if self.use_inflight {
            if first {
                let (info, file) = fe
                    .get_inflight_fd(&VhostUserInflight {
                        num_queues: 1,
                        queue_size: QSIZE,
                        ..Default::default()
                    })
                    .expect("GET_INFLIGHT_FD");
                self.inflight = Some((info, file));
            }
            let (info, file) = self.inflight.as_ref().expect("region");
            // With NEED_REPLY, to check the backend acknowledges it.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            fe.set_inflight_fd(info, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
            fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: self.guest.host + DESC,
                used_ring_addr: self.guest.host + USED,
                avail_ring_addr: self.guest.host + AVAIL,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(0, self.guest.used_idx())
            .expect("SET_VRING_BASE");
        fe.set_vring_call(0, &self.call).expect("SET_VRING_CALL");
        fe.set_vring_kick(0, &self.kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        self.kick.write(1).expect("kick");
        let keeper = p.child.id();
        p.server = common::process_tree(keeper)
            .get(1)
            .copied()
            .unwrap_or(keeper);
        p
    }

    /// Whether `head` is marked in flight in the region.
    fn is_marked(&self, head: u16) -> bool {
        let Some((_, file)) = &self.inflight else {
            return false;
        };
        let mut b = [0u8];
        file.read_exact_at(&mut b, 16 + 16 * u64::from(head))
            .expect("read region");
        b[0] != 0
    }

    /// Heads marked in flight in the region (read through the fd).
    fn marked_in_flight(&self) -> usize {
        let Some((_, file)) = &self.inflight else {
            return 0;
        };
        let mut buf = vec![0u8; 16 + 16 * usize::from(QSIZE)];
        file.read_exact_at(&mut buf, 0).expect("read region");
        (0..usize::from(QSIZE))
            .filter(|i| buf[16 + 16 * i] != 0)
            .count()
    }
}

/// The driver's books: where each request is, and what the run saw.
///
/// Request `r` writes sector `order[r]` (a random permutation), or is a
/// flush; requests are posted in order.
struct Requests {
    order: Vec<usize>,
    free: Vec<Slot>,
    /// The request outstanding in each head, and its slot.
    outstanding: Vec<Option<(usize, Slot)>>,
    in_flight: usize,
    /// Completions of each request.
    done: Vec<u32>,
    next_req: usize,
    avail_idx: u16,
    /// Used entries taken (Linux's `last_used_idx`).
    used_seen: u16,
    report: Report,
}

impl Requests {
    fn new(total: usize, rng: &mut Rng) -> Requests {
        let mut order: Vec<usize> = (0..total).collect();
        for i in (1..total).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        Requests {
            order,
            free: slots(),
            outstanding: vec![None; usize::from(QSIZE)],
            in_flight: 0,
            done: vec![0; total],
            next_req: 0,
            avail_idx: 0,
            used_seen: 0,
            report: Report::default(),
        }
    }

    fn total(&self) -> usize {
        self.order.len()
    }

    /// Builds the next request in a free slot and publishes it in the avail
    /// ring (no kick); false if all are posted or no slot is free.
    fn post(&mut self, g: &Guest) -> bool {
        if self.next_req == self.total() {
            return false;
        }
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let r = self.next_req;
        self.next_req += 1;
        let hdr = HEADERS + 16 * u64::from(slot.n);
        let st = STATUS + u64::from(slot.n);
        let data = DATA + SECTOR as u64 * u64::from(slot.n);
        let flush = is_flush(r);
        let kind = if flush { T_FLUSH } else { T_OUT };
        g.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        g.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        g.mem
            .write_obj(self.order[r] as u64, GuestAddress(hdr + 8))
            .unwrap();
        g.mem.write_slice(&payload(r), GuestAddress(data)).unwrap();
        g.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        if slot.indirect {
            let table = TABLES + 64 * u64::from(slot.n);
            g.desc(table, 0, hdr, 16, F_NEXT, 1);
            if flush {
                g.desc(table, 1, st, 1, F_WRITE, 0);
                g.desc(DESC, slot.head, table, 32, F_INDIRECT, 0);
            } else {
                g.desc(table, 1, data, SECTOR as u32, F_NEXT, 2);
                g.desc(table, 2, st, 1, F_WRITE, 0);
                g.desc(DESC, slot.head, table, 48, F_INDIRECT, 0);
            }
        } else if flush {
            g.desc(DESC, slot.head, hdr, 16, F_NEXT, slot.head + 2);
            g.desc(DESC, slot.head + 2, st, 1, F_WRITE, 0);
        } else {
            g.desc(DESC, slot.head, hdr, 16, F_NEXT, slot.head + 1);
            g.desc(
                DESC,
                slot.head + 1,
                data,
                SECTOR as u32,
                F_NEXT,
                slot.head + 2,
            );
            g.desc(DESC, slot.head + 2, st, 1, F_WRITE, 0);
        }
        self.outstanding[usize::from(slot.head)] = Some((r, slot));
        self.in_flight += 1;
        let ring_slot = u64::from(self.avail_idx % QSIZE);
        g.mem
            .write_obj(slot.head, GuestAddress(AVAIL + 4 + 2 * ring_slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        true
    }

    /// Takes every completion in the used ring; returns the newest request
    /// completed, if any.
    fn reap(&mut self, g: &Guest) -> Option<usize> {
        let mut newest = None;
        let used = g.used_idx();
        while self.used_seen != used {
            let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            self.used_seen = self.used_seen.wrapping_add(1);
            let id: u32 = g.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = g.mem.read_obj(GuestAddress(at + 4)).unwrap();
            let Some((r, slot)) = self.outstanding.get_mut(id as usize).and_then(Option::take)
            else {
                self.report.duplicates += 1;
                continue;
            };
            self.in_flight -= 1;
            let status: u8 = g
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(slot.n)))
                .unwrap();
            if (status, len) != (0, 1) {
                self.report.bad_status += 1;
            }
            self.done[r] += 1;
            newest = newest.max(Some(r));
            if self.done[r] == 1 {
                self.report.completed += 1;
            } else {
                self.report.duplicates += 1;
            }
            self.free.push(slot);
        }
        newest
    }

    /// What Linux's virtio_ring does on an interrupt with EVENT_IDX: take
    /// every completion, re-enable the callback by publishing `used_event` =
    /// the used entries taken, and take completions again if more arrived
    /// meanwhile (`virtqueue_enable_cb`). Returns how many it took.
    fn on_interrupt(&mut self, g: &Guest) -> usize {
        let before = self.report.completed + self.report.duplicates;
        loop {
            self.reap(g);
            g.set_used_event(self.used_seen);
            if g.used_idx() == self.used_seen {
                return self.report.completed + self.report.duplicates - before;
            }
        }
    }

    /// Ends the run: notes what is lost, waits for late duplicates, and
    /// compares the image with what completed.
    fn finish(mut self, g: &Guest, image: &Path) -> Report {
        self.report.lost = self.in_flight;
        if self.report.lost == 0 {
            // Nothing more may arrive: a late duplicate would show here.
            std::thread::sleep(Duration::from_millis(100));
            let late = g.used_idx().wrapping_sub(self.used_seen);
            self.report.duplicates += usize::from(late);
        }
        let disk = std::fs::read(image).expect("read image");
        for (r, &sector) in self.order.iter().enumerate() {
            let got = &disk[sector * SECTOR..(sector + 1) * SECTOR];
            let expected = if is_flush(r) || self.done[r] == 0 {
                vec![0u8; SECTOR]
            } else {
                payload(r)
            };
            if got != expected.as_slice() {
                self.report.bad_sectors += 1;
            }
        }
        self.report
    }
}

/// When the busy driver kills the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// Right after posting and kicking (plus up to 200 µs).
    AfterKick,
    /// Right after seeing a completion overtake an older request.
    OutOfOrder,
}

/// How the frontend drives the queue.
#[derive(Clone, Copy)]
enum Driver {
    /// Every slot busy, the used ring polled; kills at `Kill` moments.
    Busy(Kill),
    /// One request at a time (like `dd`), EVENT_IDX negotiated, the used
    /// ring read only on an interrupt (and once after every attach); half
    /// the kills at a random point of a request's life (before the pop, in
    /// flight, after the completion), half just after the backend popped it.
    /// `look_after_attach`: the frontend raises an interrupt after every
    /// attach (flotilla's core does; a frontend that does not must still see
    /// every completion, from the interrupt the backend raises on recovery).
    OneAtATime { look_after_attach: bool },
}

/// What one crash-restart run does.
struct Plan<'a> {
    tag: &'a str,
    use_inflight: bool,
    kills: usize,
    driver: Driver,
    /// The kills use these signals, picked at random.
    signals: &'a [Signal],
    total: usize,
    backend_args: &'a [&'a str],
    seed: u64,
}

/// When the kill after `completed` requests comes: on average every half
/// interval, so that all of them land even when a kill has to wait a while
/// for its moment (an out-of-order completion) on a busy machine.
fn next_kill(plan: &Plan, completed: usize, kills_done: usize, rng: &mut Rng) -> usize {
    if kills_done == plan.kills {
        return usize::MAX;
    }
    let every = plan.total / (plan.kills + 1);
    completed + every / 4 + rng.below(every as u64 / 2) as usize
}

fn run(plan: &Plan) -> Report {
    let dir = TempDir::new(plan.tag);
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; plan.total * SECTOR]).expect("image");
    let mut h = Harness {
        guest: Guest::new(),
        kick: EventFd::new(0).expect("eventfd"),
        call: EventFd::new(0).expect("eventfd"),
        inflight: None,
        use_inflight: plan.use_inflight,
        event_idx: matches!(plan.driver, Driver::OneAtATime { .. }),
        image: image.clone(),
        args: plan.backend_args.iter().map(|s| s.to_string()).collect(),
    };
    let mut rng = Rng(plan.seed);
    let mut q = Requests::new(plan.total, &mut rng);
    let proc = match plan.driver {
        Driver::Busy(policy) => drive_busy(&mut h, &mut q, plan, policy, &mut rng),
        Driver::OneAtATime { look_after_attach } => {
            drive_one_at_a_time(&mut h, &mut q, plan, look_after_attach, &mut rng)
        }
    };
    drop(proc);
    q.finish(&h.guest, &image)
}

/// Kills the backend with one of the plan's signals and waits until it is
/// gone.
fn kill_backend(h: &Harness, q: &mut Requests, proc: &mut Proc, plan: &Plan, rng: &mut Rng) {
    let sig = plan.signals[rng.below(plan.signals.len() as u64) as usize];
    proc.kill(sig);
    q.report.kills += 1;
    if h.marked_in_flight() > 0 {
        q.report.kills_mid_flight += 1;
    }
}

/// Keeps every slot busy and polls the used ring; kills at `policy` moments.
fn drive_busy(h: &mut Harness, q: &mut Requests, plan: &Plan, policy: Kill, rng: &mut Rng) -> Proc {
    let mut proc = h.attach(true);
    let mut next_kill = next_kill(plan, 0, 0, rng);
    // The oldest request not completed yet.
    let mut oldest = 0usize;
    let mut last_progress = Instant::now();
    let stall = Duration::from_secs(if plan.use_inflight { 10 } else { 2 });
    while q.report.completed < plan.total {
        let mut posted = false;
        while q.post(&h.guest) {
            posted = true;
        }
        if posted {
            fence(Ordering::SeqCst);
            h.kick.write(1).unwrap();
        }

        let newest_done = q.reap(&h.guest);
        if newest_done.is_some() {
            last_progress = Instant::now();
        }
        while oldest < q.next_req && q.done[oldest] > 0 {
            oldest += 1;
        }
        let out_of_order = newest_done.is_some_and(|n| n > oldest);

        let due = q.report.completed >= next_kill;
        let now = match policy {
            // Just after a kick the backend is popping and starting
            // requests; kill it somewhere in that work.
            Kill::AfterKick => due && posted,
            // A request completed while an older one is still in flight:
            // exactly the state the used index alone cannot describe. When
            // completions keep coming in whole batches (every request posted
            // is done by the next look), such a moment can take the rest of
            // the run to come: after a kill interval of waiting, a kick will do.
            Kill::OutOfOrder => {
                let late =
                    q.report.completed >= next_kill.saturating_add(plan.total / (plan.kills + 1));
                if due && !out_of_order && late && posted {
                    q.report.late_kills += 1;
                }
                due && (out_of_order || (late && posted))
            }
        };
        if now {
            if policy == Kill::AfterKick {
                spin(Duration::from_micros(rng.below(200)));
            }
            kill_backend(h, q, &mut proc, plan, rng);
            proc = h.attach(false);
            next_kill = self::next_kill(plan, q.report.completed, q.report.kills, rng);
            last_progress = Instant::now();
        }

        if last_progress.elapsed() > stall {
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    proc
}

fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Drives the queue like `dd` on a Linux guest: one request at a time,
/// EVENT_IDX, the used ring read only on interrupts. After every attach it
/// looks at the used ring once, as the guest does on the interrupt the core
/// raises then; apart from that, only the call eventfd makes it look.
fn drive_one_at_a_time(
    h: &mut Harness,
    q: &mut Requests,
    plan: &Plan,
    look_after_attach: bool,
    rng: &mut Rng,
) -> Proc {
    let mut proc = h.attach(true);
    q.on_interrupt(&h.guest);
    let mut next_kill = next_kill(plan, 0, 0, rng);
    // Running estimate of a request's life, kick to interrupt.
    let mut latency = Duration::from_micros(100);
    let mut attached_at = Instant::now();
    let mut kicked_at = Instant::now();
    let mut clean = false;
    while q.report.completed < plan.total {
        if q.in_flight == 0 {
            let old = q.avail_idx;
            assert!(q.post(&h.guest));
            // Linux's virtqueue_kick_prepare: a full barrier, then avail_event.
            fence(Ordering::SeqCst);
            if need_event(h.guest.avail_event(), q.avail_idx, old) {
                h.kick.write(1).unwrap();
                q.report.kicks += 1;
            } else {
                q.report.kicks_suppressed += 1;
            }
            kicked_at = Instant::now();
            clean = true;
            if q.report.completed >= next_kill {
                let window = latency.as_micros() as u64 + 1;
                if rng.below(2) == 0 {
                    // Anywhere in the request's life: before the pop, in
                    // flight, between add_used and the signal, or after it.
                    spin(Duration::from_micros(rng.below(window)));
                } else {
                    // Just after the backend popped it: the resubmission case.
                    let head = q.outstanding.iter().flatten().map(|(_, s)| s.head).next();
                    let until = Instant::now() + Duration::from_millis(20);
                    while head.is_some_and(|head| !h.is_marked(head))
                        && !readable(&h.call, Duration::ZERO)
                        && Instant::now() < until
                    {
                        // Leave the CPU to the backend on a small machine.
                        std::thread::yield_now();
                    }
                    spin(Duration::from_micros(rng.below(window / 8 + 1)));
                }
                kill_backend(h, q, &mut proc, plan, rng);
                // An interrupt the dead backend raised is still delivered...
                let signalled = take_interrupt(&h.call);
                if h.guest.used_idx() != q.used_seen {
                    q.report.kills_after_completion += 1;
                    if !signalled {
                        q.report.kills_before_signal += 1;
                    }
                }
                if signalled {
                    q.on_interrupt(&h.guest);
                }
                // ...and the core raises one after the attach: look once.
                proc = h.attach(false);
                attached_at = Instant::now();
                if look_after_attach {
                    q.report.found_after_attach += q.on_interrupt(&h.guest);
                }
                next_kill = self::next_kill(plan, q.report.completed, q.report.kills, rng);
                clean = false;
                continue;
            }
        }
        if !readable(&h.call, INTERRUPT_TIMEOUT) {
            q.report.stall = Some(stall_details(h, q, &mut proc, attached_at));
            break;
        }
        h.call.read().expect("read call eventfd");
        if q.on_interrupt(&h.guest) > 0 && clean {
            latency = (latency * 7 + kicked_at.elapsed()) / 8;
        }
    }
    proc
}

/// Why the one-at-a-time driver gave up waiting for an interrupt.
fn stall_details(h: &Harness, q: &Requests, proc: &mut Proc, attached_at: Instant) -> String {
    let g = &h.guest;
    let waiting: Vec<String> = q
        .outstanding
        .iter()
        .flatten()
        .map(|(r, slot)| format!("request {r} in head {}", slot.head))
        .collect();
    let alive = match proc.child.try_wait() {
        Ok(None) => "running".to_string(),
        Ok(Some(status)) => format!("gone ({status})"),
        Err(e) => format!("unknown ({e})"),
    };
    format!(
        "no interrupt for {INTERRUPT_TIMEOUT:?} waiting for {waiting:?}: used idx {} \
         (driver took {}), used_event {}, avail idx {} (driver published {}), avail_event {}, \
         {} head(s) marked in flight in the inflight region, {} kill(s) so far, last attach \
         {:?} ago, backend {alive}",
        g.used_idx(),
        q.used_seen,
        g.used_event(),
        g.avail_idx(),
        q.avail_idx,
        g.avail_event(),
        h.marked_in_flight(),
        q.report.kills,
        attached_at.elapsed(),
    )
}

/// Asserts a run with tracking was exact and that at least `mid_flight` of
/// the kills hit requests in flight.
fn check_exact(report: &Report, total: usize, kills: usize, mid_flight: usize) {
    eprintln!("{report:?}");
    assert_eq!(report.stall, None, "{report:?}");
    assert_eq!(report.kills, kills);
    assert_eq!(report.lost, 0, "requests lost: {report:?}");
    assert_eq!(report.duplicates, 0, "requests completed twice: {report:?}");
    assert_eq!(report.completed, total, "{report:?}");
    assert_eq!(report.bad_status, 0, "{report:?}");
    assert_eq!(report.bad_sectors, 0, "{report:?}");
    assert!(
        report.kills_mid_flight >= mid_flight,
        "too few kills landed with requests in flight: {report:?}"
    );
}

/// Four I/O threads complete requests out of order; every kill lands right
/// after a completion overtook an older request.
#[test]
fn crash_restart_with_inflight_out_of_order_completions_loses_and_repeats_nothing() {
    let (total, kills) = (6000, 12);
    let report = run(&Plan {
        tag: "inflight-threads",
        use_inflight: true,
        kills,
        driver: Driver::Busy(Kill::OutOfOrder),
        signals: &[Signal::SIGKILL],
        total,
        backend_args: &["--aio", "threads"],
        seed: 1,
    });
    check_exact(&report, total, kills, kills / 2);
}

/// io_uring (the default engine); kills land while the backend pops and
/// submits after a kick.
#[test]
fn crash_restart_with_inflight_io_uring_loses_and_repeats_nothing() {
    let (total, kills) = (6000, 12);
    let report = run(&Plan {
        tag: "inflight-uring",
        use_inflight: true,
        kills,
        driver: Driver::Busy(Kill::AfterKick),
        signals: &[Signal::SIGKILL],
        total,
        backend_args: &[],
        seed: 2,
    });
    check_exact(&report, total, kills, kills / 2);
}

/// The same run without INFLIGHT_SHMFD: SET_VRING_BASE = used index alone
/// makes the new backend redo requests that completed ahead of older ones
/// (completed twice) and never redo the older ones (lost). The check must
/// see that, or it could not see a broken backend either.
#[test]
fn crash_restart_without_inflight_tracking_is_caught_by_the_check() {
    let report = run(&Plan {
        tag: "no-inflight",
        use_inflight: false,
        kills: 12,
        driver: Driver::Busy(Kill::OutOfOrder),
        signals: &[Signal::SIGKILL],
        total: 6000,
        backend_args: &["--aio", "threads"],
        seed: 3,
    });
    eprintln!("{report:?}");
    assert!(
        report.lost + report.duplicates > 0,
        "the check did not notice requests lost or repeated: {report:?}"
    );
}

/// One request at a time with EVENT_IDX, the used ring read only on an
/// interrupt (and once per attach, for the interrupt the core raises then):
/// every completion the restarted backend owes, a resubmitted request's
/// included, must come with its interrupt, or the driver waits forever —
/// the restart stall of a Linux guest running `dd`.
#[test]
fn crash_restart_one_request_at_a_time_with_event_idx_signals_every_completion() {
    let (total, kills) = (4000, 40);
    let report = run(&Plan {
        tag: "inflight-event-idx",
        use_inflight: true,
        kills,
        driver: Driver::OneAtATime {
            look_after_attach: true,
        },
        signals: &[Signal::SIGKILL],
        total,
        backend_args: &[],
        seed: 4,
    });
    // Many kills land before the pop or after the completion; on a busy
    // machine only a few catch the request popped.
    check_exact(&report, total, kills, 2);
}

/// The same as a crash: the backend dies of SIGSEGV or SIGABRT. (Sent from
/// outside, these reach the backend only outside a pid namespace, whose
/// init ignores them: hence the chroot sandbox.) With the thread-pool
/// engine, whose completions come from other threads.
#[test]
fn crash_restart_one_request_at_a_time_with_event_idx_survives_fault_signals() {
    let (total, kills) = (4000, 40);
    let report = run(&Plan {
        tag: "inflight-event-idx-fault",
        use_inflight: true,
        kills,
        driver: Driver::OneAtATime {
            look_after_attach: true,
        },
        signals: &[Signal::SIGSEGV, Signal::SIGABRT],
        total,
        backend_args: &["--sandbox", "chroot", "--aio", "threads"],
        seed: 5,
    });
    // Many kills land before the pop or after the completion; on a busy
    // machine only a few catch the request popped.
    check_exact(&report, total, kills, 2);
}

/// A frontend that raises no interrupt after reattaching (QEMU does not)
/// still gets one: a backend that died between putting a completion in the
/// used ring and signalling it leaves the driver waiting otherwise, and the
/// restarted backend cannot tell whether that happened. So it raises the
/// interrupt once when it takes up the inflight region of a restarted ring.
#[test]
fn a_restarted_backend_raises_the_used_ring_interrupt_once() {
    let dir = TempDir::new("inflight-attach-irq");
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; 64 * SECTOR]).expect("image");
    let mut h = Harness {
        guest: Guest::new(),
        kick: EventFd::new(0).expect("eventfd"),
        call: EventFd::new(0).expect("eventfd"),
        inflight: None,
        use_inflight: true,
        event_idx: true,
        image,
        args: Vec::new(),
    };
    let mut first = h.attach(true);
    // Nothing queued: whatever the first start raised is consumed.
    readable(&h.call, Duration::from_millis(200));
    while take_interrupt(&h.call) {}
    first.kill(Signal::SIGKILL);
    while take_interrupt(&h.call) {}
    let _second = h.attach(false);
    assert!(
        readable(&h.call, Duration::from_secs(5)),
        "the restarted backend raised no interrupt for completions its predecessor may owe"
    );
}

#[test]
fn socket_path_offers_inflight_and_validates_the_region() {
    let backend = Backend::spawn("inflight-sock", &vec![0u8; 1 << 20], &[]);
    let mut fe = Frontend::connect(&backend.sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let _ = fe.get_features().unwrap();
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    fe.set_protocol_features(
        VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    let ask = |queue_size| VhostUserInflight {
        num_queues: 1,
        queue_size,
        ..Default::default()
    };
    let (info, file) = fe.get_inflight_fd(&ask(128)).expect("GET_INFLIGHT_FD");
    assert_eq!(info.mmap_offset, 0);
    assert_eq!(info.mmap_size, 16 + 16 * 128 + 48);
    assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // A region too small for what the message claims is refused; the
    // connection lives on, and the right one is accepted.
    let mut wrong = info;
    wrong.queue_size = 256;
    assert!(fe.set_inflight_fd(&wrong, file.as_raw_fd()).is_err());
    fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    // Without NEED_REPLY a refused region ends the connection, with the reason.
    fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    let _ = fe.set_inflight_fd(&wrong, file.as_raw_fd());
    let mut backend = backend;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = backend.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "backend kept serving");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
}
