//! Crash-restart of flotilla-blk with vhost-user inflight I/O tracking, no VM.
//!
//! A hand-built frontend (the role flotilla's core plays) keeps a few hundred
//! writes in flight on one queue, SIGKILLs the backend at random moments,
//! starts a new one on a new socketpair, replays the set-up the way the core
//! does (SET_INFLIGHT_FD with the region the first backend allocated,
//! SET_VRING_BASE = the used index in guest memory), kicks, and carries on.
//! At the end every request must have completed exactly once and the image
//! must hold exactly what was written. The same run without the feature
//! must lose or duplicate requests, which shows the check can fail.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Rng, TempDir, BIN};
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
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Slots whose request is one indirect descriptor (heads 0..INDIRECT_SLOTS).
const INDIRECT_SLOTS: u16 = 200;
/// Slots whose request is a three-descriptor chain, after the indirect ones.
const CHAIN_SLOTS: u16 = 18;

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

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

/// One flotilla-blk process and our end of its control socket.
struct Proc {
    child: Child,
    fe: Frontend,
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
        fe: Frontend::from_stream(ours, 1),
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
}

/// The frontend: guest memory, one queue, the inflight region, the driver.
struct Harness {
    guest: Guest,
    kick: EventFd,
    call: EventFd,
    inflight: Option<(VhostUserInflight, File)>,
    use_inflight: bool,
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
        let want = VERSION_1 | INDIRECT_DESC | PROTOCOL_FEATURES;
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
        p
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

/// Sends `total` requests (request r writes sector `order[r]`, or is a
/// flush), keeping every slot busy, and SIGKILLs the backend `plan.kills`
/// times at moments `plan.policy` picks.
/// When the harness kills the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// Right after posting and kicking (plus up to 200 µs).
    AfterKick,
    /// Right after seeing a completion overtake an older request.
    OutOfOrder,
}

/// What one crash-restart run does.
struct Plan<'a> {
    tag: &'a str,
    use_inflight: bool,
    kills: usize,
    policy: Kill,
    total: usize,
    backend_args: &'a [&'a str],
    seed: u64,
}

fn run(plan: &Plan) -> Report {
    let Plan {
        tag,
        use_inflight,
        kills,
        policy,
        total,
        backend_args: extra,
        seed,
    } = *plan;
    let dir = TempDir::new(tag);
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; total * SECTOR]).expect("image");
    let mut h = Harness {
        guest: Guest::new(),
        kick: EventFd::new(0).expect("eventfd"),
        call: EventFd::new(0).expect("eventfd"),
        inflight: None,
        use_inflight,
        image: image.clone(),
        args: extra.iter().map(|s| s.to_string()).collect(),
    };
    let mut rng = Rng(seed);
    // A random permutation: request r writes sector order[r].
    let mut order: Vec<usize> = (0..total).collect();
    for i in (1..total).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let all = slots();
    let mut free: Vec<Slot> = all.clone();
    // The request outstanding in each head, and its slot.
    let mut outstanding: Vec<Option<(usize, Slot)>> = vec![None; usize::from(QSIZE)];
    let mut done = vec![0u32; total];
    let mut report = Report::default();
    let mut next_req = 0usize;
    // The oldest request not completed yet (requests are posted in order).
    let mut oldest = 0usize;
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;

    let mut proc = h.attach(true);
    let kill_every = total / (kills + 1);
    // Kills come on average every half interval, so that all of them land even when a kill
    // has to wait a while for its moment (an out-of-order completion) on a busy machine.
    let mut next_kill = if kills > 0 {
        kill_every / 4 + rng.below(kill_every as u64 / 2) as usize
    } else {
        usize::MAX
    };
    let mut last_progress = Instant::now();
    let stall = Duration::from_secs(if use_inflight { 10 } else { 2 });
    while report.completed < total {
        // Post as many requests as there are free slots.
        let mut posted = false;
        while next_req < total {
            let Some(slot) = free.pop() else { break };
            let r = next_req;
            next_req += 1;
            let g = &h.guest;
            let hdr = HEADERS + 16 * u64::from(slot.n);
            let st = STATUS + u64::from(slot.n);
            let data = DATA + SECTOR as u64 * u64::from(slot.n);
            let flush = is_flush(r);
            let kind = if flush { T_FLUSH } else { T_OUT };
            g.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
            g.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            g.mem
                .write_obj(order[r] as u64, GuestAddress(hdr + 8))
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
            outstanding[usize::from(slot.head)] = Some((r, slot));
            let ring_slot = u64::from(avail_idx % QSIZE);
            g.mem
                .write_obj(slot.head, GuestAddress(AVAIL + 4 + 2 * ring_slot))
                .unwrap();
            fence(Ordering::SeqCst);
            avail_idx = avail_idx.wrapping_add(1);
            g.mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
            posted = true;
        }
        if posted {
            fence(Ordering::SeqCst);
            h.kick.write(1).unwrap();
        }

        // Take completions.
        let mut newest_done = None;
        let used = h.guest.used_idx();
        while used_seen != used {
            let at = USED + 4 + 8 * u64::from(used_seen % QSIZE);
            used_seen = used_seen.wrapping_add(1);
            let id: u32 = h.guest.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = h.guest.mem.read_obj(GuestAddress(at + 4)).unwrap();
            let Some((r, slot)) = outstanding.get_mut(id as usize).and_then(Option::take) else {
                report.duplicates += 1;
                continue;
            };
            let status: u8 = h
                .guest
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(slot.n)))
                .unwrap();
            if (status, len) != (0, 1) {
                report.bad_status += 1;
            }
            done[r] += 1;
            newest_done = newest_done.max(Some(r));
            if done[r] == 1 {
                report.completed += 1;
            } else {
                report.duplicates += 1;
            }
            free.push(slot);
            last_progress = Instant::now();
        }
        while oldest < next_req && done[oldest] > 0 {
            oldest += 1;
        }
        let out_of_order = newest_done.is_some_and(|n| n > oldest);

        let due = report.completed >= next_kill && report.kills < kills;
        let now = match policy {
            // Just after a kick the backend is popping and starting
            // requests; kill it somewhere in that work.
            Kill::AfterKick => due && posted,
            // A request completed while an older one is still in flight:
            // exactly the state the used index alone cannot describe.
            Kill::OutOfOrder => due && out_of_order,
        };
        if now {
            if policy == Kill::AfterKick {
                let spin = Instant::now() + Duration::from_micros(rng.below(200));
                while Instant::now() < spin {
                    std::hint::spin_loop();
                }
            }
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            report.kills += 1;
            if h.marked_in_flight() > 0 {
                report.kills_mid_flight += 1;
            }
            drop(proc);
            proc = h.attach(false);
            next_kill =
                report.completed + kill_every / 4 + rng.below(kill_every as u64 / 2) as usize;
            last_progress = Instant::now();
        }

        if last_progress.elapsed() > stall {
            report.lost = outstanding.iter().filter(|o| o.is_some()).count();
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    if report.lost == 0 {
        // Nothing more may arrive: a late duplicate would show here.
        std::thread::sleep(Duration::from_millis(100));
        if h.guest.used_idx() != used_seen {
            report.duplicates += usize::from(h.guest.used_idx().wrapping_sub(used_seen));
        }
    }
    drop(proc);

    let disk = std::fs::read(&image).expect("read image");
    for (r, &sector) in order.iter().enumerate() {
        let got = &disk[sector * SECTOR..(sector + 1) * SECTOR];
        let expected = if is_flush(r) || done[r] == 0 {
            vec![0u8; SECTOR]
        } else {
            payload(r)
        };
        if got != expected.as_slice() {
            report.bad_sectors += 1;
        }
    }
    report
}

/// Asserts a run with tracking was exact and that kills hit requests in flight.
fn check_exact(report: &Report, total: usize, kills: usize) {
    eprintln!("{report:?}");
    assert_eq!(report.kills, kills);
    assert_eq!(report.lost, 0, "requests lost: {report:?}");
    assert_eq!(report.duplicates, 0, "requests completed twice: {report:?}");
    assert_eq!(report.completed, total, "{report:?}");
    assert_eq!(report.bad_status, 0, "{report:?}");
    assert_eq!(report.bad_sectors, 0, "{report:?}");
    assert!(
        report.kills_mid_flight * 2 >= kills,
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
        policy: Kill::OutOfOrder,
        total,
        backend_args: &["--aio", "threads"],
        seed: 1,
    });
    check_exact(&report, total, kills);
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
        policy: Kill::AfterKick,
        total,
        backend_args: &[],
        seed: 2,
    });
    check_exact(&report, total, kills);
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
        policy: Kill::OutOfOrder,
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
