//! Helpers shared by the integration tests and the benchmark: a network
//! namespace with a tap in it, packet sockets on that tap, a flotilla-net
//! child process, and a hand-driven vhost-user frontend with one receive
//! and one transmit ring in memfd guest memory.
//!
//! All traffic stays inside the namespace the test creates: the tap lives
//! there, the packet sockets are opened there, and the namespace is deleted
//! when the [`Netns`] is dropped (also when a test fails).

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The flotilla-net binary: cargo names it for tests; an example (the
/// benchmark) finds it next to its own directory (target/<profile>/).
pub fn bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_flotilla-net") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("flotilla-net")
}

/// Our test ethertype (IEEE 802 local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
pub const VNET_HDR: usize = 12;

/// Feature bits.
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

// ---------------------------------------------------------------- netns

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "flotnet-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        // No IPv6 autoconfiguration chatter on the tap: only our frames.
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        ns
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args);
    }

    /// Runs `f` on a thread that has entered the namespace (setns affects
    /// only the calling thread, so the test thread stays where it is).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Creates tap `name` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) in the namespace,
    /// brings it up, and returns its fd, as the gateway would hand it over.
    pub fn tap(&self, name: &str) -> OwnedFd {
        let n = name.to_string();
        let fd = self.run(move || open_tap(&n, true).expect("create tap"));
        ip(&["-n", &self.name, "link", "set", name, "up"]);
        fd
    }

    /// A packet socket bound to `ifname` in the namespace.
    pub fn packet_socket(&self, ifname: &str, vnet_hdr: bool) -> PacketSocket {
        let n = ifname.to_string();
        self.run(move || PacketSocket::new(&n, vnet_hdr).expect("packet socket"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Opens a tap through /dev/net/tun (in the caller's namespace).
pub fn open_tap(name: &str, vnet_hdr: bool) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// An AF_PACKET socket on one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    pub vnet_hdr: bool,
}

impl PacketSocket {
    fn new(ifname: &str, vnet_hdr: bool) -> io::Result<PacketSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls with valid arguments.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        if vnet_hdr {
            let one: libc::c_int = 1;
            setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
        }
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        let big: libc::c_int = 8 << 20;
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &big)?;
        Ok(PacketSocket {
            fd,
            ifindex,
            vnet_hdr,
        })
    }

    /// Sends one frame out of the interface (towards the tap reader).
    /// With `vnet_hdr`, `frame` starts with a 10-byte virtio_net_hdr.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Receives the next frame that came *in* from the tap with our
    /// ethertype (or any ethertype if `any`), waiting up to `timeout`.
    pub fn recv_from_tap(&self, timeout: Duration, any: bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        let skip = if self.vnet_hdr { 10 } else { 0 };
        while Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain old data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and sll are valid for writes of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            let frame = &buf[..n as usize];
            if sll.sll_pkttype == libc::PACKET_OUTGOING || frame.len() < skip + 14 {
                continue;
            }
            if any || frame[skip + 12..skip + 14] == ETHERTYPE.to_be_bytes() {
                return Some(frame.to_vec());
            }
        }
        None
    }

    /// Sets the send buffer (SO_SNDBUFFORCE): how many bytes of frames
    /// the socket may have queued on the interface before `send` blocks.
    pub fn set_sndbuf(&self, bytes: i32) -> io::Result<()> {
        setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &bytes)
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: v is a valid T for reads of its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An Ethernet frame of `len` bytes with our ethertype and a recognisable
/// payload (`seed` in every byte after the header).
pub fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![seed; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, seed]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f
}

/// A TCP/IPv4 frame of `payload` bytes (headers 54 bytes), checksum left
/// partial, as a GSO sender hands it over.
pub fn tcp4_frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 20 + payload) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&5001u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5002u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// The 10-byte legacy virtio_net_hdr for a TCPv4 GSO frame (AF_PACKET's
/// PACKET_VNET_HDR format); `gso_size` 0 means a plain partial-checksum frame.
pub fn tso4_hdr10(gso_size: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 1; // NEEDS_CSUM
    h[1] = if gso_size > 0 { 1 } else { 0 };
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

// ---------------------------------------------------------------- backend

/// A running flotilla-net child, given `--fd 3 --tap-fd 4` as a supervisor would.
pub struct Backend {
    pub child: Child,
    pub log: PathBuf,
}

impl Backend {
    /// Spawns flotilla-net on one end of a fresh socketpair and `tap`;
    /// returns it and our end of the socket.
    pub fn spawn(tap: &OwnedFd, extra: &[&str]) -> (Backend, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let log = std::env::temp_dir().join(format!(
            "flotilla-net-test-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let (sock, tapfd) = (theirs.as_raw_fd(), tap.as_raw_fd());
        let mut cmd = Command::new(bin());
        cmd.args(["--fd", "3", "--tap-fd", "4", "--log-level", "info"])
            .arg("--log-file")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec; the fds stay close-on-exec in the parent, so concurrent
        // tests do not leak them into each other's children.
        unsafe {
            cmd.pre_exec(move || {
                let s = libc::fcntl(sock, libc::F_DUPFD_CLOEXEC, 10);
                let t = libc::fcntl(tapfd, libc::F_DUPFD_CLOEXEC, 10);
                if s < 0 || t < 0 || libc::dup2(s, 3) < 0 || libc::dup2(t, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn flotilla-net");
        drop(theirs);
        (Backend { child, log }, ours)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the child to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        flotilla_backend::test_support::wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- flotilla-net log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// CPU time (user + system, clock ticks) a process has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// CPU time of a process and all its descendants (the backend program may
/// serve from a child of the process we started).
pub fn tree_cpu_ticks(pid: u32) -> u64 {
    let mut total = cpu_ticks(pid);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            total += tree_cpu_ticks(child);
        }
    }
    total
}

// ---------------------------------------------------------------- driver

pub const MEM_SIZE: usize = 64 << 20;
/// Ring size unless a test asks for another (Linux uses the device's maximum).
pub const QSIZE: u16 = 256;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Receive buffers: slot i at RX_BUFS + i * RX_SLOT.
pub const RX_BUFS: u64 = 0x10_0000;
pub const RX_SLOT: u64 = 0x1_0000;
/// Transmit scratch: slot i at TX_BUFS + i * TX_SLOT.
pub const TX_BUFS: u64 = 0x120_0000;
pub const TX_SLOT: u64 = 0x1_2000;

/// A descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

pub fn rd(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: 0,
    }
}

pub fn wr(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: F_WRITE,
    }
}

/// One split virtqueue as the driver sees it.
pub struct Ring {
    pub index: usize,
    /// Entries (a power of two).
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub used_seen: u16,
    /// The device's used index as last read.
    used_shadow: u16,
    pub kick: EventFd,
    pub call: EventFd,
    free: Vec<u16>,
    /// Descriptors of the chain headed by each index (empty: not posted);
    /// the vectors are reused, so steady posting allocates nothing.
    chains: Vec<Vec<u16>>,
}

impl Ring {
    /// A ring of `size` entries laid out from `base` (table, avail ring,
    /// then the used ring on the next page; under 40 KiB for 1024 entries).
    fn new(index: usize, base: u64, size: u16) -> Ring {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        Ring {
            index,
            size,
            desc: base,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            used_shadow: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
        }
    }
}

/// A minimal virtio-net driver on a vhost-user connection.
pub struct Driver {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    file: File,
    pub rings: [Ring; 2],
    pub features: u64,
}

pub const RX: usize = 0;
pub const TX: usize = 1;

impl Driver {
    /// Connects over `stream` and negotiates `features` (virtio bits; VERSION_1
    /// and PROTOCOL_FEATURES are added).
    pub fn new(stream: UnixStream, features: u64) -> Driver {
        Self::with_ring_size(stream, features, QSIZE)
    }

    /// The same with rings of `size` entries (at most 1024).
    pub fn with_ring_size(stream: UnixStream, features: u64, size: u16) -> Driver {
        assert!(size.is_power_of_two() && size <= 1024, "ring size {size}");
        let (mem, file) =
            flotilla_backend::test_support::memfd_guest_memory(c"flotilla-net-guest", MEM_SIZE);
        let mut d = Driver {
            fe: Frontend::from_stream(stream, 2),
            mem,
            file,
            rings: [Ring::new(RX, 0x1_0000, size), Ring::new(TX, 0x2_0000, size)],
            features: features | F_VERSION_1 | F_PROTOCOL,
        };
        d.setup(true);
        d
    }

    /// Replaces the backend connection (after a crash) and replays the
    /// setup as the core does: same features, memory, rings; SET_VRING_BASE
    /// is the used index; then every queue is kicked once.
    pub fn reconnect(&mut self, stream: UnixStream) {
        self.fe = Frontend::from_stream(stream, 2);
        self.setup(false);
        for r in &self.rings {
            r.kick.write(1).unwrap();
        }
    }

    fn setup(&mut self, first: bool) {
        let host = self.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let fe = &mut self.fe;
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_eq!(
            offered & self.features,
            self.features,
            "features offered: {offered:#x}"
        );
        fe.set_features(self.features).expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            !pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "flotilla-net must not offer inflight tracking"
        );
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .expect("SET_PROTOCOL_FEATURES");
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        for r in &self.rings {
            let q = r.index;
            fe.set_vring_num(q, r.size).expect("SET_VRING_NUM");
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: r.size,
                    queue_size: r.size,
                    flags: 0,
                    desc_table_addr: host + r.desc,
                    used_ring_addr: host + r.used,
                    avail_ring_addr: host + r.avail,
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            let base = if first {
                0
            } else {
                self.mem.read_obj::<u16>(GuestAddress(r.used + 2)).unwrap()
            };
            fe.set_vring_base(q, base).expect("SET_VRING_BASE");
            fe.set_vring_call(q, &r.call).expect("SET_VRING_CALL");
            fe.set_vring_kick(q, &r.kick).expect("SET_VRING_KICK");
            fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        }
    }

    /// Writes `descs` as one chain into free descriptors and makes it
    /// available (kicking if `kick`); returns the head.
    pub fn post(&mut self, q: usize, descs: &[D], kick: bool) -> u16 {
        let head = self.add(q, descs);
        if kick {
            fence(Ordering::SeqCst);
            self.rings[q].kick.write(1).unwrap();
        }
        head
    }

    /// Writes `descs` as one chain and publishes the new avail index (as a
    /// driver's `virtqueue_add` does); no kick. Returns the head.
    pub fn add(&mut self, q: usize, descs: &[D]) -> u16 {
        let r = &mut self.rings[q];
        let head = r.free.pop().expect("free descriptor");
        let mut ids = std::mem::take(&mut r.chains[usize::from(head)]);
        ids.clear();
        ids.push(head);
        for _ in 1..descs.len() {
            ids.push(r.free.pop().expect("free descriptor"));
        }
        for (i, d) in descs.iter().enumerate() {
            let at = GuestAddress(r.desc + 16 * u64::from(ids[i]));
            let more = i + 1 < descs.len();
            let flags = d.flags | if more { F_NEXT } else { 0 };
            let next = if more { ids[i + 1] } else { 0 };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, at).unwrap();
        }
        r.chains[usize::from(head)] = ids;
        let slot = u64::from(r.avail_idx % r.size);
        self.mem
            .write_obj(head, GuestAddress(r.avail + 4 + 2 * slot))
            .unwrap();
        // The descriptors and the ring entry before the index.
        fence(Ordering::Release);
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail + 2))
            .unwrap();
        head
    }

    /// Free descriptors of ring `q`.
    pub fn free_descriptors(&self, q: usize) -> usize {
        self.rings[q].free.len()
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }

    /// Kicks `q` if the device asked to hear about the chains made
    /// available since the avail index was `old` (`virtqueue_kick_prepare`:
    /// always without EVENT_IDX, else per the device's avail_event).
    /// Returns whether it kicked.
    pub fn kick_if_needed(&self, q: usize, old: u16) -> bool {
        let r = &self.rings[q];
        let new = r.avail_idx;
        if new == old {
            return false;
        }
        // The avail index store before reading avail_event.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx() {
            let event: u16 = self
                .mem
                .read_obj(GuestAddress(r.used + 4 + 8 * u64::from(r.size)))
                .unwrap();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            true
        };
        if needed {
            r.kick.write(1).unwrap();
        }
        needed
    }

    /// Asks the device (EVENT_IDX) for an interrupt once used index `idx`
    /// is passed, i.e. when used element `idx` is published.
    pub fn set_used_event(&self, q: usize, idx: u16) {
        let r = &self.rings[q];
        self.mem
            .write_obj(idx, GuestAddress(r.avail + 4 + 2 * u64::from(r.size)))
            .unwrap();
        // Before the caller re-reads the used index.
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        fence(Ordering::SeqCst);
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// The next used element if there is one: (head, length); its
    /// descriptors are freed.
    pub fn try_used(&mut self, q: usize) -> Option<(u16, u32)> {
        if self.rings[q].used_shadow == self.rings[q].used_seen {
            // Read the index only when the elements seen so far are used up.
            let idx = self.used_idx(q);
            self.rings[q].used_shadow = idx;
            if idx == self.rings[q].used_seen {
                return None;
            }
        }
        let r = &mut self.rings[q];
        let slot = u64::from(r.used_seen % r.size);
        r.used_seen = r.used_seen.wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(r.used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(r.used + 8 + 8 * slot))
            .unwrap();
        let head = id as u16;
        let ids = r
            .chains
            .get_mut(usize::from(head))
            .filter(|c| !c.is_empty())
            .expect("used id is a posted head");
        r.free.append(ids);
        Some((head, len))
    }

    /// Waits for the next used element.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.try_used(q) {
                return Some(u);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Posts a one-descriptor receive buffer of `len` bytes in the slot
    /// of its own head (buffer of head h at RX_BUFS + h * RX_SLOT).
    pub fn post_rx_slot(&mut self, len: u32, kick: bool) -> u16 {
        let id = *self.rings[RX].free.last().expect("free descriptor");
        self.post(RX, &[wr(RX_BUFS + u64::from(id) * RX_SLOT, len)], kick)
    }

    /// The head the next posted chain of ring `q` gets.
    pub fn next_head(&self, q: usize) -> u16 {
        *self.rings[q].free.last().expect("free descriptor")
    }

    /// Posts a one-descriptor receive buffer for slot `slot` of `len` bytes.
    pub fn post_rx(&mut self, slot: u64, len: u32, kick: bool) -> u16 {
        self.post(RX, &[wr(RX_BUFS + slot * RX_SLOT, len)], kick)
    }

    /// Sends `frame` (with a zero vnet header unless `hdr`) as one chain,
    /// header and frame in separate descriptors, from scratch slot `slot`.
    pub fn send(&mut self, slot: u64, hdr: Option<[u8; VNET_HDR]>, frame: &[u8]) -> u16 {
        let base = TX_BUFS + slot * TX_SLOT;
        self.mem
            .write_slice(&hdr.unwrap_or([0; VNET_HDR]), GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(base + 0x40))
            .unwrap();
        self.post(
            TX,
            &[
                rd(base, VNET_HDR as u32),
                rd(base + 0x40, frame.len() as u32),
            ],
            true,
        )
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// Raw fd of an owned fd, for messages.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}
