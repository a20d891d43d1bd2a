//! The test frontend: a flotilla-balloon child process, and a "guest" made
//! of a memfd split into two regions like x86 RAM around the MMIO hole,
//! with the three balloon rings written by hand.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

pub use flotilla_backend::test_support::{wait_for, TempDir};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla-balloon");

pub const INFLATE: usize = 0;
pub const DEFLATE: usize = 1;
pub const STATS: usize = 2;

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
/// Low region: guest-physical [0, 16 MiB) at memfd offset 0; rings and
/// buffers live here.
pub const LOW_SIZE: u64 = 16 * MIB;
/// High region: guest-physical [4 GiB, 4 GiB + 72 MiB) at memfd offset
/// 16 MiB; the pages the tests balloon live here.
pub const HIGH_BASE: u64 = 4 << 30;
pub const HIGH_SIZE: u64 = 72 * MIB;
/// First PFN of the high region.
pub const HIGH_PFN: u32 = (HIGH_BASE / PAGE) as u32;

pub const QSIZE: u16 = 256;
/// Scratch space for PFN arrays and stats buffers (low region).
const BUFFERS: u64 = MIB;
const BUFFERS_END: u64 = 12 * MIB;

pub const VERSION_1: u64 = 1 << 32;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
pub const STATS_VQ: u64 = 1 << 1;
pub const DEFLATE_ON_OOM: u64 = 1 << 2;

/// A running flotilla-balloon listening on a socket in `dir`, logging at
/// debug level to `dir/<name>.log`.
pub struct Backend {
    pub child: Child,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Backend {
    pub fn spawn(dir: &TempDir, name: &str, args: &[&str]) -> Backend {
        let sock = dir.0.join(format!("{name}.sock"));
        let log = dir.0.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--log-file")
            .arg(&log)
            .args(["--log-level", "debug"])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn flotilla-balloon");
        wait_for(&sock);
        Backend { child, sock, log }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit by itself and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        flotilla_backend::test_support::wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One split virtqueue as the driver sees it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    kick: EventFd,
}

/// The guest: memory, rings and interrupt eventfds, which outlive any one
/// backend (as they do in the core), plus the current connection.
pub struct Guest {
    pub file: File,
    pub mem: GuestMemoryMmap<()>,
    rings: Vec<Ring>,
    call: EventFd,
    next_buffer: u64,
    pub features: u64,
    pub fe: Option<Frontend>,
}

impl Guest {
    pub fn new() -> Guest {
        let memfd = nix::sys::memfd::memfd_create(
            c"flotilla-balloon-test-guest",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        let file = File::from(memfd);
        file.set_len(LOW_SIZE + HIGH_SIZE).expect("ftruncate");
        // Allocate the whole low region now, so that writing rings and
        // buffers later does not change the memfd's allocated size.
        file.write_all_at(&vec![0u8; LOW_SIZE as usize], 0)
            .expect("populate the low region");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[
            (
                GuestAddress(0),
                LOW_SIZE as usize,
                Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
            ),
            (
                GuestAddress(HIGH_BASE),
                HIGH_SIZE as usize,
                Some(FileOffset::new(file.try_clone().expect("dup"), LOW_SIZE)),
            ),
        ])
        .expect("map guest memory");
        let rings = (0..3u64)
            .map(|q| Ring {
                desc: 0x1_0000 * (q + 1),
                avail: 0x1_0000 * (q + 1) + 0x1000,
                used: 0x1_0000 * (q + 1) + 0x2000,
                avail_idx: 0,
                used_seen: 0,
                kick: EventFd::new(0).expect("eventfd"),
            })
            .collect();
        Guest {
            file,
            mem,
            rings,
            call: EventFd::new(0).expect("eventfd"),
            next_buffer: BUFFERS,
            features: 0,
            fe: None,
        }
    }

    /// Connects to `backend` and negotiates VERSION_1 + STATS_VQ +
    /// `extra` (the driver features of a fresh guest).
    pub fn connect(&mut self, backend: &Backend, extra: u64) -> u64 {
        let fe = Frontend::connect(&backend.sock, 3).expect("connect");
        self.attach(fe, VERSION_1 | STATS_VQ | extra)
    }

    /// Negotiates `features` on `fe` and starts all three rings where the
    /// device left off (base = used index in guest memory), as the core
    /// does for a fresh or a restarted backend. Returns the offered
    /// features.
    pub fn attach(&mut self, mut fe: Frontend, features: u64) -> u64 {
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_eq!(offered & features, features, "features offered");
        fe.set_features(features | PROTOCOL_FEATURES)
            .expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            !pf.contains(VhostUserProtocolFeatures::CONFIG),
            "the core serves the config space"
        );
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::MQ)
            .expect("SET_PROTOCOL_FEATURES");
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(|r| {
                use vm_memory::GuestMemoryRegion;
                VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: r.file_offset().unwrap().start(),
                    mmap_handle: self.file.as_raw_fd(),
                }
            })
            .collect();
        fe.set_mem_table(&regions).expect("SET_MEM_TABLE");
        for (q, ring) in self.rings.iter().enumerate() {
            let host = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            fe.set_vring_num(q, QSIZE).expect("SET_VRING_NUM");
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host(ring.desc),
                    used_ring_addr: host(ring.used),
                    avail_ring_addr: host(ring.avail),
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            let used: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
            fe.set_vring_base(q, used).expect("SET_VRING_BASE");
            fe.set_vring_call(q, &self.call).expect("SET_VRING_CALL");
            fe.set_vring_kick(q, &ring.kick).expect("SET_VRING_KICK");
            fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        }
        // Work that piled up while no backend was there.
        for ring in &self.rings {
            ring.kick.write(1).unwrap();
        }
        self.features = features;
        self.fe = Some(fe);
        offered
    }

    /// Scratch guest memory for one buffer of `len` bytes.
    fn buffer(&mut self, len: u64) -> u64 {
        let len = len.div_ceil(64) * 64;
        if self.next_buffer + len > BUFFERS_END {
            self.next_buffer = BUFFERS;
        }
        let at = self.next_buffer;
        self.next_buffer += len;
        at
    }

    /// Makes one single-descriptor buffer at `addr` available on queue `q`,
    /// without kicking; returns its head.
    pub fn add(&mut self, q: usize, addr: u64, len: u32) -> u16 {
        let ring = &mut self.rings[q];
        let head = ring.avail_idx % QSIZE;
        let d = GuestAddress(ring.desc + 16 * u64::from(head));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(d.0 + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(d.0 + 14)).unwrap();
        let slot = u64::from(ring.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(ring.avail + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).unwrap();
    }

    /// Queues one PFN array on `q` (no kick); returns its head.
    pub fn add_pfns(&mut self, q: usize, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.add_bytes(q, &bytes)
    }

    /// Queues `bytes` as one buffer on `q` (no kick); returns its head.
    pub fn add_bytes(&mut self, q: usize, bytes: &[u8]) -> u16 {
        let at = self.buffer(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.add(q, at, bytes.len() as u32)
    }

    /// Sends one PFN array on `q` and waits for it to come back.
    pub fn send_pfns(&mut self, q: usize, pfns: &[u32]) {
        let head = self.add_pfns(q, pfns);
        self.kick(q);
        assert_eq!(self.wait_used(q), (u32::from(head), 0));
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        fence(Ordering::SeqCst);
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    pub fn pending(&self, q: usize) -> u16 {
        self.rings[q].avail_idx.wrapping_sub(self.used_idx(q))
    }

    /// Waits for the next used element of `q`: (descriptor id, length).
    pub fn wait_used(&mut self, q: usize) -> (u32, u32) {
        self.wait_used_for(q, Duration::from_secs(10))
            .expect("backend did not return the buffer")
    }

    /// Like [`Guest::wait_used`], `None` after `timeout`.
    pub fn wait_used_for(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.used_idx(q) == self.rings[q].used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let ring = &mut self.rings[q];
        let slot = u64::from(ring.used_seen % QSIZE);
        ring.used_seen = ring.used_seen.wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(ring.used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(ring.used + 8 + 8 * slot))
            .unwrap();
        Some((id, len))
    }

    /// Waits until every buffer made available on `q` has come back.
    pub fn wait_all_used(&mut self, q: usize) {
        while self.rings[q].used_seen != self.rings[q].avail_idx {
            let (_, len) = self.wait_used(q);
            assert_eq!(len, 0, "balloon buffers come back with length 0");
        }
    }

    /// Bytes of the memfd that hold pages (st_blocks × 512).
    pub fn allocated(&self) -> u64 {
        self.file.metadata().unwrap().blocks() * 512
    }

    /// Writes a non-zero pattern over `len` bytes of the high region from
    /// `offset`, so that its pages are allocated.
    pub fn dirty_high(&self, offset: u64, len: u64) {
        let chunk = vec![0x5au8; MIB as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MIB);
            self.file
                .write_all_at(&chunk[..n as usize], LOW_SIZE + offset + done)
                .unwrap();
            done += n;
        }
    }

    /// One byte of the high region, read through the file.
    pub fn high_byte(&self, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        self.file.read_exact_at(&mut b, LOW_SIZE + offset).unwrap();
        b[0]
    }
}

/// PFNs of `pages` pages of the high region from page `first`.
pub fn high_pfns(first: u32, pages: u32) -> Vec<u32> {
    (0..pages).map(|i| HIGH_PFN + first + i).collect()
}
