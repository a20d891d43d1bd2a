//! flotilla-balloon driven by a hand-built vhost-user frontend (`vhost`'s
//! `Frontend`, a memfd "guest" in two regions, rings written by hand): the
//! host really gets inflated pages back, bad PFNs are refused, stats make
//! the round trip, and a backend killed mid-inflate is replaced without
//! losing or repeating work.

mod common;

use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

/// The Linux driver's PFNs per buffer (VIRTIO_BALLOON_ARRAY_PFNS_MAX).
const PFNS_PER_BUFFER: usize = 256;

/// Sends `pfns` on `q` as buffers of 256, all made available at once.
fn queue_pfns(g: &mut Guest, q: usize, pfns: &[u32]) {
    for chunk in pfns.chunks(PFNS_PER_BUFFER) {
        g.add_pfns(q, chunk);
    }
    g.kick(q);
}

#[test]
fn inflating_64_mib_gives_64_mib_back_to_the_host() {
    let dir = TempDir::new("inflate");
    let backend = Backend::spawn(&dir, "b", &[]);
    let mut g = Guest::new();
    g.connect(&backend, 0);
    const PAGES: u32 = (64 * MIB / PAGE) as u32;
    // 64 MiB from page 8 of the high region, with a guard page either side.
    g.dirty_high(0, 66 * MIB);
    let before = g.allocated();
    assert!(before >= 66 * MIB, "dirtied memory is allocated");

    // Descending, as the guest's allocator often hands pages out.
    let mut pfns = high_pfns(8, PAGES);
    pfns.reverse();
    queue_pfns(&mut g, INFLATE, &pfns);
    g.wait_all_used(INFLATE);

    let freed = before - g.allocated();
    assert_eq!(freed, 64 * MIB, "exactly the inflated pages were freed");
    assert_eq!(g.high_byte(8 * PAGE), 0, "a released page reads as zero");
    assert_eq!(g.high_byte(8 * PAGE - 1), 0x5a, "the page before is intact");
    assert_eq!(
        g.high_byte(8 * PAGE + 64 * MIB),
        0x5a,
        "the page after is intact"
    );
    backend.wait_log("inflate buffer");
}

#[test]
fn pfns_outside_guest_memory_are_refused_and_the_device_keeps_serving() {
    let dir = TempDir::new("refuse");
    let mut backend = Backend::spawn(&dir, "b", &[]);
    let mut g = Guest::new();
    g.connect(&backend, 0);
    g.dirty_high(0, MIB);
    let before = g.allocated();

    // The hole between the regions, past the end, the largest PFN.
    let hole = (LOW_SIZE / PAGE) as u32 + 10;
    let end = HIGH_PFN + (HIGH_SIZE / PAGE) as u32;
    g.send_pfns(INFLATE, &[hole, hole + 1, end, end + 5, u32::MAX]);
    // A buffer whose descriptor points outside guest memory.
    let head = g.add(INFLATE, HIGH_BASE + HIGH_SIZE + 0x1000, 1024);
    g.kick(INFLATE);
    assert_eq!(g.wait_used(INFLATE), (u32::from(head), 0));
    // Trailing bytes after the last PFN; an empty buffer.
    let mut odd = HIGH_PFN.to_le_bytes().to_vec();
    odd.extend_from_slice(&[1, 2]);
    g.add_bytes(INFLATE, &odd);
    g.add_bytes(INFLATE, &[]);
    g.kick(INFLATE);
    g.wait_all_used(INFLATE);
    // Deflating PFNs that were never guest memory is refused the same way.
    g.send_pfns(DEFLATE, &[hole]);
    assert!(backend.running(), "backend survived bad buffers");
    backend.wait_log("page(s) refused; first:");
    backend.wait_log("outside guest memory");
    backend.wait_log("byte(s) after the last PFN");

    // The one valid PFN above was released; a good buffer still works.
    assert_eq!(before - g.allocated(), PAGE);
    g.send_pfns(INFLATE, &high_pfns(1, 255));
    assert_eq!(before - g.allocated(), MIB);
    assert!(backend.running());
}

#[test]
fn deflated_pages_are_the_guests_again() {
    let dir = TempDir::new("deflate");
    let backend = Backend::spawn(&dir, "b", &[]);
    let mut g = Guest::new();
    g.connect(&backend, 0);
    g.dirty_high(0, 4 * MIB);
    let before = g.allocated();
    let pfns = high_pfns(0, 1024);
    queue_pfns(&mut g, INFLATE, &pfns);
    g.wait_all_used(INFLATE);
    assert_eq!(before - g.allocated(), 4 * MIB);

    queue_pfns(&mut g, DEFLATE, &pfns);
    g.wait_all_used(DEFLATE);
    backend.wait_log("deflate buffer");
    // The guest touches its pages again: they are allocated anew.
    g.dirty_high(0, 4 * MIB);
    assert_eq!(g.allocated(), before);
    assert_eq!(g.high_byte(0), 0x5a);
}

/// A stats buffer with free-memory = `free` and total-memory = 1 GiB.
fn stats_buffer(free: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for (tag, val) in [(4u16, free), (5, 1 << 30)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&val.to_le_bytes());
    }
    v
}

#[test]
fn stats_buffer_is_kept_then_returned_to_ask_for_an_update() {
    let dir = TempDir::new("stats");
    let backend = Backend::spawn(&dir, "b", &["--stats-interval", "1"]);
    let mut g = Guest::new();
    g.connect(&backend, 0);

    let first = g.add_bytes(STATS, &stats_buffer(111_111));
    g.kick(STATS);
    backend.wait_log("free-memory=111111 total-memory=1073741824");
    // Held, not returned at once...
    let start = Instant::now();
    assert_eq!(g.wait_used_for(STATS, Duration::from_millis(500)), None);
    // ...but after about the interval.
    let (id, len) = g
        .wait_used_for(STATS, Duration::from_secs(5))
        .expect("stats buffer returned");
    assert_eq!((id, len), (u32::from(first), 0));
    assert!(start.elapsed() >= Duration::from_millis(400));

    // The driver refills and re-posts it: the next update is read.
    g.add_bytes(STATS, &stats_buffer(222_222));
    g.kick(STATS);
    backend.wait_log("free-memory=222222");
    assert!(g.wait_used_for(STATS, Duration::from_secs(5)).is_some());
}

#[test]
fn stopping_the_stats_ring_hands_the_held_buffer_back() {
    let dir = TempDir::new("stats-stop");
    let backend = Backend::spawn(&dir, "b", &["--stats-interval", "0"]);
    let mut g = Guest::new();
    g.connect(&backend, 0);
    g.add_bytes(STATS, &stats_buffer(5));
    g.kick(STATS);
    backend.wait_log("free-memory=5 ");
    // The buffer is held, not used: the ring's base must still point at it.
    let fe = g.fe.as_ref().unwrap();
    assert_eq!(fe.get_vring_base(STATS).expect("GET_VRING_BASE"), 0);
    assert_eq!(g.used_idx(STATS), 0);
}

#[test]
fn a_backend_killed_mid_inflate_is_replaced_and_the_rest_completes() {
    const PAGES: u32 = (64 * MIB / PAGE) as u32;
    let dir = TempDir::new("restart");
    // Every other page first, then the rest: no two neighbours in a row,
    // so every page is its own fallocate and the inflate takes a while.
    let mut pfns: Vec<u32> = high_pfns(0, PAGES).into_iter().step_by(2).collect();
    pfns.extend(high_pfns(1, PAGES).into_iter().step_by(2));
    let buffers = (pfns.len() / PFNS_PER_BUFFER) as u16;

    let mut killed_mid_way = false;
    for attempt in 0..5 {
        let mut g = Guest::new();
        let mut first =
            Backend::spawn(&dir, &format!("first{attempt}"), &["--stats-interval", "0"]);
        g.connect(&first, 0);
        g.add_bytes(STATS, &stats_buffer(777));
        g.kick(STATS);
        first.wait_log("free-memory=777");
        g.dirty_high(0, 64 * MIB);
        let before = g.allocated();

        // Freeze the backend, queue everything, let it run until the
        // first buffer comes back, then kill it.
        let pid = nix::unistd::Pid::from_raw(first.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        queue_pfns(&mut g, INFLATE, &pfns);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.used_idx(INFLATE) == 0 {
            assert!(Instant::now() < deadline, "no inflate buffer completed");
            std::hint::spin_loop();
        }
        first.kill();
        let done = g.used_idx(INFLATE);
        eprintln!("attempt {attempt}: backend killed after {done} of {buffers} buffers");
        killed_mid_way |= done < buffers;

        // The replacement resumes at the used index, as the core replays.
        let second = Backend::spawn(
            &dir,
            &format!("second{attempt}"),
            &["--stats-interval", "0"],
        );
        g.fe = None;
        let fe = Frontend::connect(&second.sock, 3).expect("connect");
        g.attach(fe, VERSION_1 | STATS_VQ);
        g.wait_all_used(INFLATE);
        assert_eq!(g.used_idx(INFLATE), buffers, "each buffer used once");
        assert_eq!(before - g.allocated(), 64 * MIB, "attempt {attempt}");
        // The stats buffer the first backend held was never used, so the
        // second one picks it up again.
        second.wait_log("free-memory=777");
        assert_eq!(g.used_idx(STATS), 0);
        if killed_mid_way {
            return;
        }
    }
    panic!("the backend always finished before it could be killed");
}

fn clear_cloexec(fd: RawFd) {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
}

#[test]
fn serves_an_inherited_socketpair_with_deflate_on_oom() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs = theirs.into_raw_fd();
    clear_cloexec(theirs);
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "--fd", &theirs.to_string()])
        .arg("--deflate-on-oom")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    // SAFETY: the fd is ours and no longer needed here.
    unsafe { libc::close(theirs) };

    let mut g = Guest::new();
    let offered = g.attach(
        Frontend::from_stream(ours, 3),
        VERSION_1 | STATS_VQ | DEFLATE_ON_OOM,
    );
    assert_eq!(
        offered,
        VERSION_1 | PROTOCOL_FEATURES | STATS_VQ | DEFLATE_ON_OOM
    );
    assert_eq!(g.fe.as_mut().unwrap().get_queue_num().unwrap(), 3);
    g.dirty_high(0, MIB);
    let before = g.allocated();
    g.send_pfns(INFLATE, &high_pfns(0, 256));
    assert_eq!(before - g.allocated(), MIB);

    // The frontend hangs up: the backend exits by itself, successfully.
    g.fe = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "backend did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn without_the_flag_deflate_on_oom_is_not_offered() {
    let dir = TempDir::new("features");
    let backend = Backend::spawn(&dir, "b", &[]);
    let fe = Frontend::connect(&backend.sock, 3).unwrap();
    fe.set_owner().unwrap();
    assert_eq!(
        fe.get_features().unwrap(),
        VERSION_1 | PROTOCOL_FEATURES | STATS_VQ
    );
}

#[test]
fn print_capabilities_and_refused_flags() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"features":["deflate-on-oom"],"type":"balloon"}"#
    );
    // Neither --socket-path nor --fd.
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket-path"));
}
