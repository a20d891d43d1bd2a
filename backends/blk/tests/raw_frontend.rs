//! flotilla-blk driven by a hand-built vhost-user frontend (`vhost`'s
//! `Frontend`, memfd guest memory, a split virtqueue written by hand), for
//! what a well-behaved client like libblkio never sends: malformed chains,
//! writes to a read-only device, and the program conventions (`--fd`,
//! `--image-fd`, SIGTERM, `--print-capabilities`).

mod common;

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use common::{random_image, Backend, TempDir, BIN};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 64;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Scratch area for headers, data and status bytes.
const DATA: u64 = 0x10000;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A descriptor as the driver writes it.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: 0,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: F_WRITE,
    }
}

/// A minimal virtio driver: one queue, one request at a time.
struct Driver {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn connect_stream(stream: UnixStream) -> Driver {
        Self::setup(Frontend::from_stream(stream, 1), 0)
    }

    fn connect(backend: &Backend) -> Driver {
        Self::connect_with(backend, 0)
    }

    /// Connects, also negotiating `extra_features` (virtio feature bits).
    fn connect_with(backend: &Backend, extra_features: u64) -> Driver {
        Self::setup(
            Frontend::connect(&backend.sock, 1).expect("connect"),
            extra_features,
        )
    }

    fn setup(mut fe: Frontend, extra_features: u64) -> Driver {
        let (mem, file) =
            flotilla_backend::test_support::memfd_guest_memory(c"flotilla-test-guest", MEM_SIZE);
        let host = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;

        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let protocol_bit = 1u64 << 30;
        let version_1 = 1u64 << 32;
        assert_ne!(offered & protocol_bit, 0, "PROTOCOL_FEATURES offered");
        assert_eq!(offered & extra_features, extra_features, "features offered");
        fe.set_features(protocol_bit | version_1 | extra_features)
            .expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let kick = EventFd::new(0).expect("eventfd");
        let call = EventFd::new(0).expect("eventfd");
        fe.set_vring_call(0, &call).expect("SET_VRING_CALL");
        fe.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        Driver {
            fe,
            mem,
            kick,
            _call: call,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes `descs` as one chain starting at descriptor 0 and makes it available.
    fn post(&mut self, descs: &[D]) {
        self.write_chain(descs, 0);
        self.make_available(0);
    }

    /// Writes a chain into the descriptor table from index `first` on.
    fn write_chain(&mut self, descs: &[D], first: u16) {
        for (i, d) in descs.iter().enumerate() {
            let index = first + i as u16;
            let at = GuestAddress(DESC + 16 * u64::from(index));
            let more = i + 1 < descs.len();
            let flags = d.flags | if more { F_NEXT } else { 0 };
            self.mem.write_obj(d.addr, at).unwrap();
            self.mem.write_obj(d.len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem
                .write_obj(if more { index + 1 } else { 0 }, GuestAddress(at.0 + 14))
                .unwrap();
        }
    }

    fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits for the next used element: (descriptor id, length).
    fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() == self.used_seen {
            assert!(
                Instant::now() < deadline,
                "backend did not complete the request"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let slot = u64::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 8 + 8 * slot))
            .unwrap();
        (id, len)
    }

    fn header(&self, at: u64, req_type: u32, sector: u64) {
        self.mem.write_obj(req_type, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Posts a well-formed request: header at DATA, buffer at DATA+0x1000,
    /// status at DATA+0x100; returns (status, used length).
    fn request(&mut self, req_type: u32, sector: u64, data: Option<D>) -> (u8, u32) {
        self.header(DATA, req_type, sector);
        self.mem
            .write_obj(0xffu8, GuestAddress(DATA + 0x100))
            .unwrap();
        let mut chain = vec![r(DATA, 16)];
        chain.extend(data);
        chain.push(w(DATA + 0x100, 1));
        self.post(&chain);
        let (_, len) = self.wait_used();
        (self.status(DATA + 0x100), len)
    }

    fn read(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let (st, used) = self.request(T_IN, sector, Some(w(DATA + 0x1000, len)));
        assert_eq!((st, used), (S_OK, len + 1));
        let mut buf = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
            .unwrap();
        buf
    }
}

fn status_of(d: &mut Driver, chain: &[D]) -> (u8, u32) {
    d.mem.write_obj(0xffu8, GuestAddress(DATA + 0x100)).unwrap();
    d.post(chain);
    let (_, len) = d.wait_used();
    (d.status(DATA + 0x100), len)
}

#[test]
fn malformed_chains_complete_with_errors_and_the_device_survives() {
    let image = random_image(1 << 20, 11);
    let mut backend = Backend::spawn("malformed", &image, &[]);
    let mut d = Driver::connect(&backend);
    let hdr = DATA;
    let st = DATA + 0x100;
    let buf = DATA + 0x1000;
    let outside = MEM_SIZE as u64 + 0x1000;

    // Header only: no status byte to write, chain returned with length 0.
    d.header(hdr, T_IN, 0);
    assert_eq!(status_of(&mut d, &[r(hdr, 16)]), (0xff, 0));
    // Status descriptor device-readable.
    assert_eq!(status_of(&mut d, &[r(hdr, 16), r(st, 1)]), (0xff, 0));
    // Status byte outside guest memory.
    assert_eq!(status_of(&mut d, &[r(hdr, 16), w(outside, 1)]), (0xff, 0));
    // Device-writable header.
    assert_eq!(status_of(&mut d, &[w(hdr, 16), w(st, 1)]), (S_IOERR, 1));
    // Header too short.
    assert_eq!(status_of(&mut d, &[r(hdr, 8), w(st, 1)]), (S_IOERR, 1));
    // Data buffer outside guest memory.
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), w(outside, 512), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Data buffer straddling the end of guest memory.
    assert_eq!(
        status_of(
            &mut d,
            &[r(hdr, 16), w(MEM_SIZE as u64 - 512, 1024), w(st, 1)]
        ),
        (S_IOERR, 1)
    );
    // Huge length.
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), w(0, u32::MAX - 511), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Address that wraps around.
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), w(u64::MAX - 100, 512), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Data in the wrong direction for a read.
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), r(buf, 512), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Sector overflow and past the end.
    d.header(hdr, T_IN, u64::MAX);
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), w(buf, 512), w(st, 1)]),
        (S_IOERR, 1)
    );
    d.header(hdr, T_IN, 2048);
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), w(buf, 512), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Length not a multiple of 512.
    d.header(hdr, T_OUT, 0);
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), r(buf, 100), w(st, 1)]),
        (S_IOERR, 1)
    );
    // Unknown request type.
    d.header(hdr, 99, 0);
    assert_eq!(status_of(&mut d, &[r(hdr, 16), w(st, 1)]), (S_UNSUPP, 1));
    // Discard with a flag discard does not define.
    d.header(hdr, T_DISCARD, 0);
    d.mem.write_obj(0u64, GuestAddress(buf)).unwrap();
    d.mem.write_obj(1u32, GuestAddress(buf + 8)).unwrap();
    d.mem.write_obj(1u32, GuestAddress(buf + 12)).unwrap();
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), r(buf, 16), w(st, 1)]),
        (S_UNSUPP, 1)
    );
    // A zero-length discard range is a no-op.
    d.mem.write_obj(0u32, GuestAddress(buf + 8)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(buf + 12)).unwrap();
    assert_eq!(
        status_of(&mut d, &[r(hdr, 16), r(buf, 16), w(st, 1)]),
        (S_OK, 1)
    );
    // A `next` index past the table end truncates the chain: no status.
    d.header(hdr, T_IN, 0);
    d.write_chain(&[r(hdr, 16), w(st, 1)], 0);
    // Rewrite descriptor 0 to point at a nonexistent descriptor 200.
    d.mem.write_obj(F_NEXT, GuestAddress(DESC + 12)).unwrap();
    d.mem.write_obj(200u16, GuestAddress(DESC + 14)).unwrap();
    d.make_available(0);
    assert_eq!(d.wait_used().1, 0);
    // An indirect table outside guest memory.
    d.post(&[D {
        addr: outside,
        len: 64,
        flags: F_INDIRECT,
    }]);
    assert_eq!(d.wait_used().1, 0);
    // A descriptor loop (0 -> 1 -> 0) ends when the chain's length budget runs out.
    d.header(hdr, T_IN, 0);
    d.post(&[r(hdr, 16), w(buf, 512)]);
    d.mem
        .write_obj(F_NEXT | F_WRITE, GuestAddress(DESC + 16 + 12))
        .unwrap();
    d.mem.write_obj(0u16, GuestAddress(DESC + 16 + 14)).unwrap();
    let _ = d.wait_used();

    // The device still serves a good request, and the image is intact.
    assert_eq!(d.read(4, 1024), image[2048..3072]);
    assert!(backend.image_bytes() == image);
    assert_eq!(
        backend.child.try_wait().unwrap(),
        None,
        "backend still running"
    );
    drop(d);
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn read_only_device_refuses_writes_discards_and_write_zeroes() {
    let image = random_image(1 << 20, 12);
    let backend = Backend::spawn("ro-raw", &image, &["--readonly"]);
    let mut d = Driver::connect(&backend);
    let features = d.fe.get_features().unwrap();
    assert_ne!(features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(features & (1 << 13), 0, "no DISCARD on a read-only device");
    d.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(
        d.request(T_OUT, 0, Some(r(DATA + 0x1000, 512))),
        (S_IOERR, 1)
    );
    d.mem.write_obj(0u64, GuestAddress(DATA + 0x1000)).unwrap();
    d.mem.write_obj(8u32, GuestAddress(DATA + 0x1008)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(DATA + 0x100c)).unwrap();
    assert_eq!(
        d.request(T_DISCARD, 0, Some(r(DATA + 0x1000, 16))),
        (S_IOERR, 1)
    );
    assert_eq!(d.request(T_FLUSH, 0, None), (S_OK, 1));
    assert_eq!(d.read(0, 512), image[..512]);
    assert!(backend.image_bytes() == image);
}

#[test]
fn get_id_returns_the_serial_and_config_space_describes_the_disk() {
    let image = random_image(3 << 20, 13);
    let backend = Backend::spawn(
        "getid",
        &image,
        &[
            "--serial",
            "flotilla-serial-0123456789",
            "--num-queues",
            "2",
        ],
    );
    let mut d = Driver::connect(&backend);
    let (st, len) = d.request(T_GET_ID, 0, Some(w(DATA + 0x1000, 20)));
    assert_eq!((st, len), (S_OK, 21));
    let mut id = [0u8; 20];
    d.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&id, b"flotilla-serial-0123");

    let (_, cfg) =
        d.fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .expect("GET_CONFIG");
    let u64_at = |o: usize| u64::from_le_bytes(cfg[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(cfg[o..o + 2].try_into().unwrap());
    assert_eq!(u64_at(0), (3 << 20) / 512, "capacity");
    assert_eq!(u32_at(12), 254, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16_at(34), 2, "num_queues");
    assert_eq!(d.fe.get_queue_num().unwrap(), 2);
}

#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let image = random_image(8 << 20, 14);
    let backend = Backend::spawn("drain", &image, &["--aio", "threads"]);
    let mut d = Driver::connect(&backend);
    // Eight 256 KiB reads in one go, each its own chain.
    for i in 0..8u64 {
        let base = DATA + i * 0x1000;
        d.header(base, T_IN, i * 512);
        let chain = [
            r(base, 16),
            w(0x10_0000 + i * 0x4_0000, 0x4_0000),
            w(base + 0x100, 1),
        ];
        d.write_chain(&chain, (i * 3) as u16);
        d.make_available((i * 3) as u16);
    }
    // Stop the ring as soon as the first request has completed, while the
    // others are still being read by the I/O threads.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.used_idx() == 0 {
        assert!(Instant::now() < deadline, "no request completed");
        std::hint::spin_loop();
    }
    let base = d.fe.get_vring_base(0).expect("GET_VRING_BASE");
    // Whatever the backend took off the ring it completed before answering.
    assert_eq!(u32::from(d.used_idx()), base, "requests left in flight");
    for i in 0..u64::from(d.used_idx()) {
        let id: u32 = d.mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
        let status = d.status(DATA + u64::from(id) / 3 * 0x1000 + 0x100);
        assert_eq!(status, S_OK);
    }
}

/// The backend exits by itself once its frontend hangs up (within 10 s).
fn wait_exit_after_hang_up(child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "backend did not exit after hang-up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn clear_cloexec(fd: RawFd) {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
}

#[test]
fn serves_an_inherited_socketpair_and_image_fd() {
    let dir = TempDir::new("fd");
    let image = random_image(1 << 20, 15);
    let path = dir.0.join("img");
    std::fs::write(&path, &image).unwrap();
    let image_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs = theirs.into_raw_fd();
    let image_fd = image_file.into_raw_fd();
    clear_cloexec(theirs);
    clear_cloexec(image_fd);
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "--fd", &theirs.to_string()])
        .args([
            "--image",
            "parent-opened",
            "--image-fd",
            &image_fd.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    // SAFETY: both fds are ours and no longer needed here.
    unsafe {
        libc::close(theirs);
        libc::close(image_fd);
    }
    // Move the image away: the backend must not need the path.
    std::fs::rename(&path, dir.0.join("moved")).unwrap();

    let mut d = Driver::connect_stream(ours);
    assert_eq!(d.read(0, 4096), image[..4096]);
    d.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(d.request(T_OUT, 2, Some(r(DATA + 0x1000, 1024))), (S_OK, 1));
    let (st, _) = d.request(T_GET_ID, 0, Some(w(DATA + 0x1000, 20)));
    assert_eq!(st, S_OK);
    let mut id = [0u8; 13];
    d.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&id, b"parent-opened", "default serial is the image name");
    drop(d);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "backend did not exit after hang-up"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    let data = std::fs::read(dir.0.join("moved")).unwrap();
    assert!(data[1024..2048].iter().all(|b| *b == 0x5a));
}

#[test]
fn serves_an_inherited_listening_socket() {
    let dir = TempDir::new("listen-fd");
    let image = random_image(1 << 20, 19);
    let img = dir.0.join("img");
    std::fs::write(&img, &image).unwrap();
    let sock = dir.0.join("listen.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.into_raw_fd();
    clear_cloexec(fd);
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "--fd", &fd.to_string(), "--image"])
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    // SAFETY: the listening fd is ours and no longer needed here.
    unsafe { libc::close(fd) };
    let mut d = Driver::setup(Frontend::connect(&sock, 1).expect("connect"), 0);
    assert_eq!(d.read(8, 4096), image[4096..8192]);
    drop(d);
    wait_exit_after_hang_up(&mut child);
}

#[test]
fn sigterm_ends_the_backend_cleanly() {
    let image = random_image(1 << 20, 16);
    // Idle, waiting for a frontend.
    let mut backend = Backend::spawn("term1", &image, &[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!backend.sock.exists(), "socket removed on exit");

    // Connected and serving.
    let mut backend = Backend::spawn("term2", &image, &[]);
    let mut d = Driver::connect(&backend);
    assert_eq!(d.read(0, 512), image[..512]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn spec_spellings_blk_file_and_read_only() {
    let dir = TempDir::new("spelling");
    let img = dir.0.join("img");
    let image = random_image(65536, 17);
    std::fs::write(&img, &image).unwrap();
    let sock = dir.0.join("s");
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "--read-only", "--blk-file"])
        .arg(&img)
        .arg("--socket-path")
        .arg(&sock)
        .spawn()
        .unwrap();
    common::wait_for(&sock);
    let fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 5), 0, "--read-only offers VIRTIO_BLK_F_RO");
    drop(fe);
    wait_exit_after_hang_up(&mut child);
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
        r#"{"features":["read-only","blk-file"],"type":"block"}"#
    );

    let dir = TempDir::new("flags");
    let img = dir.0.join("img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let sock = dir.0.join("s");
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(&img)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--num-queues", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["--iops-total", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(BIN)
        .args(["--image", "/nonexistent/x.img", "--socket-path"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.img"));
    // --socket-path and --fd together.
    let out = run(&["--fd", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!sock.exists());
}

/// CPU time (user + system, in clock ticks) the backend has used so far:
/// the process started and the jailed child it forked.
fn cpu_ticks(pid: u32) -> u64 {
    common::process_tree(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn impossible_avail_index_does_not_spin_the_queue_thread() {
    const EVENT_IDX: u64 = 1 << 29;
    let image = random_image(1 << 20, 18);
    for extra in [&[][..], &["--poll"][..]] {
        let backend = Backend::spawn("avail", &image, extra);
        let mut d = Driver::connect_with(&backend, EVENT_IDX);
        assert_eq!(d.read(0, 512), image[..512]);
        // Publish an avail index far more than a ring ahead, and kick.
        let bogus = d.avail_idx.wrapping_add(1000);
        d.mem.write_obj(bogus, GuestAddress(AVAIL + 2)).unwrap();
        d.kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let before = cpu_ticks(backend.child.id());
        std::thread::sleep(Duration::from_millis(500));
        let used = cpu_ticks(backend.child.id()) - before;
        assert!(used < 10, "backend burnt {used} ticks in 0.5 s: {extra:?}");
        // The driver repairs its index; the queue works again.
        d.mem
            .write_obj(d.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        assert_eq!(d.read(1, 512), image[512..1024]);
    }
}
