//! vhost-user inflight I/O tracking for split rings
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD; spec section "Inflight I/O
//! tracking").
//!
//! A backend that completes requests out of order cannot be restarted from
//! the ring indices alone: SET_VRING_BASE only says how many requests were
//! completed (the used index), not which of the popped ones are still
//! outstanding. So the backend records, in a memfd it shares with the
//! frontend, which heads it has popped and not yet completed. The frontend
//! keeps that memfd across a backend crash and hands it to the next backend
//! process with SET_INFLIGHT_FD, which resubmits those heads.
//!
//! Layout of the region, per queue (each queue's part starts on a 64-byte
//! boundary):
//!
//! ```text
//! QueueRegionSplit { features: u64, version: u16, desc_num: u16,
//!                    last_batch_head: u16, used_idx: u16,
//!                    desc: [DescStateSplit; desc_num] }
//! DescStateSplit   { inflight: u8, padding: [u8; 5], next: u16, counter: u64 }
//! ```
//!
//! The pieces:
//! - [`InflightTracker`]: one per device; answers GET_INFLIGHT_FD (allocates
//!   a sealed memfd) and SET_INFLIGHT_FD (validates and maps it). The relay
//!   calls these; the device only creates the tracker and hands it to
//!   [`crate::daemon::serve`].
//! - [`InflightQueue`]: one per queue, owned by the thread serving it. The
//!   device calls [`InflightQueue::start`] after popping a chain,
//!   [`InflightQueue::add_used`] instead of `add_used`, and
//!   [`InflightQueue::recover`] before popping after the ring (re)started.
//!
//! Region accesses are atomic stores and loads: the region outlives this
//! process, so the order in which stores reach it is what recovery relies
//! on, and the compiler must not merge or reorder them.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vhost_user_backend::VringT;
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestAddressSpace;

/// Bytes of a queue's header (`QueueRegionSplit` without `desc`).
const HEADER_LEN: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC_STATE_LEN: usize = 16;
/// Each queue's part of the region starts on this boundary (as in
/// libvhost-user, so a region is laid out the same by either backend).
const QUEUE_ALIGN: usize = 64;
/// Layout version written into a queue header on first use.
const VERSION: u16 = 1;

const OFF_FEATURES: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const OFF_INFLIGHT: usize = 0;
const OFF_NEXT: usize = 6;
const OFF_COUNTER: usize = 8;

/// Bytes the region holds for one queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_STATE_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Errors of inflight tracking; the relay logs them and reports them to the
/// frontend as far as the protocol allows.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The message payload is not a `VhostUserInflight`.
    #[error("inflight message payload of {0} bytes (expected 20 or 24)")]
    PayloadSize(usize),
    /// SET_INFLIGHT_FD came with no fd or more than one.
    #[error("SET_INFLIGHT_FD carries {0} fds, expected 1")]
    Fds(usize),
    /// The frontend did not negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
    #[error("INFLIGHT_SHMFD was not negotiated")]
    NotNegotiated,
    /// `num_queues` is zero or more than the device has.
    #[error("{num_queues} queues requested; the device has 1..={max}")]
    NumQueues {
        /// From the message.
        num_queues: u16,
        /// The device's queue count.
        max: u16,
    },
    /// `queue_size` is zero or more than the device supports.
    #[error("queue size {queue_size} requested; the device supports 1..={max}")]
    QueueSize {
        /// From the message.
        queue_size: u16,
        /// The device's largest queue.
        max: u16,
    },
    /// `mmap_size` cannot hold the queues the message describes.
    #[error("mmap_size {mmap_size} is less than the {needed} bytes the queues need")]
    TooSmall {
        /// From the message.
        mmap_size: u64,
        /// What `num_queues` × `queue_size` need.
        needed: u64,
    },
    /// `mmap_offset` is not a multiple of the page size.
    #[error("mmap_offset {0:#x} is not page-aligned")]
    Offset(u64),
    /// The fd is not a regular file (a memfd is one).
    #[error("the inflight fd is not a memfd or regular file")]
    NotAFile,
    /// The file is shorter than the mapping would be.
    #[error("the inflight fd holds {size} bytes, less than the {end} the message needs")]
    FileTooSmall {
        /// File size.
        size: u64,
        /// `mmap_offset` + the bytes needed.
        end: u64,
    },
    /// The file could shrink under the mapping (touching the lost pages
    /// would kill the backend with SIGBUS).
    #[error(
        "the inflight fd is not sealed against shrinking; pass the fd GET_INFLIGHT_FD returned"
    )]
    NotSealed,
    /// A queue header does not match the message.
    #[error("queue {queue}: region header has {found} descriptors, the message says {expected}")]
    Layout {
        /// Queue index.
        queue: u16,
        /// `desc_num` in the region.
        found: u16,
        /// `queue_size` from the message.
        expected: u16,
    },
    /// A system call failed.
    #[error("cannot {what} the inflight region: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The ring is larger than the region's descriptor array.
    #[error("queue {queue}: ring of {ring} descriptors, inflight region of {desc_num}; queue not tracked")]
    RingTooLarge {
        /// Queue index.
        queue: u16,
        /// Ring size (SET_VRING_NUM).
        ring: u16,
        /// Descriptors in the region.
        desc_num: u16,
    },
    /// The used ring index could not be read.
    #[error("queue {queue}: reading the used index: {source}")]
    UsedIdx {
        /// Queue index.
        queue: u16,
        /// The error.
        source: VirtQueError,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> InflightError {
    move |e| InflightError::Sys {
        what,
        source: e.into(),
    }
}

/// The payload of GET_INFLIGHT_FD and SET_INFLIGHT_FD (`VhostUserInflight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InflightMsg {
    /// Bytes of the region.
    pub mmap_size: u64,
    /// Where the region starts in the fd.
    pub mmap_offset: u64,
    /// Queues the region covers.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

impl InflightMsg {
    /// Size of the payload as QEMU sends it (the C struct with its tail padding).
    pub const LEN: usize = 24;

    /// Parses a payload; both the packed 20 bytes and the padded 24 are accepted.
    pub fn parse(payload: &[u8]) -> Result<Self, InflightError> {
        if payload.len() != 20 && payload.len() != Self::LEN {
            return Err(InflightError::PayloadSize(payload.len()));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let u16_at = |i: usize| u16::from_le_bytes([payload[i], payload[i + 1]]);
        Ok(InflightMsg {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }

    /// The 24-byte payload.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        out[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        out[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        out[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        out
    }
}

/// A shared read-write mapping of (part of) an inflight fd.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that is only accessed through
// atomics (see `Mapping::atomic`), so sharing it between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`. The caller has checked that
    /// the file covers the range and cannot shrink.
    fn new(fd: impl AsFd, offset: u64, len: usize) -> Result<Self, InflightError> {
        let length = NonZeroUsize::new(len).ok_or(InflightError::TooSmall {
            mmap_size: 0,
            needed: 1,
        })?;
        let offset = libc::off_t::try_from(offset).map_err(|_| InflightError::Offset(offset))?;
        // SAFETY: a new shared mapping at an address the kernel chooses, so
        // it aliases no Rust object; the file covers [offset, offset + len)
        // and is sealed against shrinking (checked by the callers), so
        // accesses cannot fault. It is unmapped only in Drop.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                offset,
            )
        }
        .map_err(sys("map"))?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The atomic of type `A` at byte `off`.
    ///
    /// # Panics
    /// If `off` is out of range or misaligned: offsets come from this
    /// module's layout arithmetic over validated sizes, never from the
    /// frontend, so that is a bug here.
    fn atomic<A>(&self, off: usize) -> &A {
        let size = std::mem::size_of::<A>();
        assert!(
            off.checked_add(size).is_some_and(|end| end <= self.len)
                && off % std::mem::align_of::<A>() == 0,
            "inflight region access at {off} outside {} bytes",
            self.len
        );
        // SAFETY: in bounds and aligned (asserted above; the mapping is
        // page-aligned). The atomic types have the size and alignment of
        // their integers, any bit pattern is valid, and the memory lives
        // as long as `self`. Other processes touching the same page is
        // what the shared region is for.
        unsafe { &*(self.ptr.as_ptr().add(off) as *const A) }
    }

    fn u8(&self, off: usize) -> &AtomicU8 {
        self.atomic(off)
    }
    fn u16(&self, off: usize) -> &AtomicU16 {
        self.atomic(off)
    }
    fn u64(&self, off: usize) -> &AtomicU64 {
        self.atomic(off)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no reference into
        // the mapping outlives `self` (accessors borrow it).
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of the inflight region: {e}");
        }
    }
}

/// One queue's part of a mapped region.
#[derive(Clone)]
struct QueueRegion {
    map: Arc<Mapping>,
    base: usize,
    /// Descriptors in this queue's array: `queue_size` of the validated
    /// message, never the (frontend-writable) header field.
    desc_num: u16,
}

impl QueueRegion {
    fn version(&self) -> &AtomicU16 {
        self.map.u16(self.base + OFF_VERSION)
    }
    fn desc_num_field(&self) -> &AtomicU16 {
        self.map.u16(self.base + OFF_DESC_NUM)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.map.u16(self.base + OFF_LAST_BATCH_HEAD)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.map.u16(self.base + OFF_USED_IDX)
    }
    fn desc(&self, head: u16) -> usize {
        self.base + HEADER_LEN + DESC_STATE_LEN * usize::from(head)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.map.u8(self.desc(head) + OFF_INFLIGHT)
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        self.map.u64(self.desc(head) + OFF_COUNTER)
    }

    /// Writes a fresh header (all descriptors idle).
    fn init(&self, used_idx: u16) {
        self.map
            .u64(self.base + OFF_FEATURES)
            .store(0, Ordering::Relaxed);
        self.desc_num_field()
            .store(self.desc_num, Ordering::Relaxed);
        self.last_batch_head().store(0, Ordering::Relaxed);
        self.used_idx().store(used_idx, Ordering::Relaxed);
        for head in 0..self.desc_num {
            self.inflight(head).store(0, Ordering::Relaxed);
            self.map
                .u16(self.desc(head) + OFF_NEXT)
                .store(0, Ordering::Relaxed);
            self.counter(head).store(0, Ordering::Relaxed);
        }
        self.version().store(VERSION, Ordering::Release);
    }
}

/// What a queue resumes with after [`recover_region`].
#[derive(Debug, PartialEq, Eq)]
struct Recovery {
    /// Heads to resubmit, oldest first.
    heads: Vec<u16>,
    /// The avail index to pop from next.
    next_avail: u16,
    /// The counter the next popped head gets.
    next_counter: u64,
}

/// Brings one queue's region in line with the ring and lists what was in
/// flight.
///
/// `ring_used_idx` is the used index in guest memory. If the region's
/// `used_idx` differs, the previous backend died after publishing a
/// completion and before clearing its head, so that head (its
/// `last_batch_head`) is done. What is still marked is what the guest has
/// not seen completed; it was popped from the avail ring, so popping
/// resumes after it: at `used_idx + number in flight`, the position the
/// previous backend had reached (every head it popped is either in the used
/// ring or marked here). SET_VRING_BASE alone cannot say this, as it only
/// carries the used index.
fn recover_region(region: &QueueRegion, ring_used_idx: u16, ring_size: u16) -> Recovery {
    if region.version().load(Ordering::Acquire) == 0 {
        region.init(ring_used_idx);
        return Recovery {
            heads: Vec::new(),
            next_avail: ring_used_idx,
            next_counter: 1,
        };
    }
    if region.used_idx().load(Ordering::Acquire) != ring_used_idx {
        let last = region.last_batch_head().load(Ordering::Acquire);
        if last < region.desc_num {
            region.inflight(last).store(0, Ordering::Release);
        }
        region.used_idx().store(ring_used_idx, Ordering::Release);
    }
    let mut found: Vec<(u64, u16)> = Vec::new();
    for head in 0..region.desc_num {
        if region.inflight(head).load(Ordering::Acquire) == 0 {
            continue;
        }
        if head >= ring_size {
            // Cannot be a chain of this ring; nothing to resubmit.
            log::warn!("inflight head {head} outside a ring of {ring_size}; dropped");
            region.inflight(head).store(0, Ordering::Release);
            continue;
        }
        found.push((region.counter(head).load(Ordering::Acquire), head));
    }
    found.sort_unstable();
    let next_counter = found
        .last()
        .map_or(1, |&(counter, _)| counter.wrapping_add(1));
    // At most `ring_size` distinct heads, so this fits in u16.
    let n = u16::try_from(found.len()).unwrap_or(u16::MAX);
    Recovery {
        heads: found.into_iter().map(|(_, head)| head).collect(),
        next_avail: ring_used_idx.wrapping_add(n),
        next_counter,
    }
}

/// A region installed by SET_INFLIGHT_FD.
struct Installed {
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
}

/// A device's inflight tracking state: the region the frontend gave us.
///
/// Created by the device (which then advertises INFLIGHT_SHMFD through the
/// relay) and shared with its queues through [`InflightTracker::queue`].
pub struct InflightTracker {
    num_queues: u16,
    max_queue_size: u16,
    installed: Mutex<Option<Arc<Installed>>>,
    /// Bumped by every SET_INFLIGHT_FD, so queue threads notice a new region
    /// with one atomic load per event.
    generation: AtomicU64,
}

impl InflightTracker {
    /// A tracker for a device of `num_queues` queues of at most
    /// `max_queue_size` descriptors.
    pub fn new(num_queues: u16, max_queue_size: u16) -> Arc<Self> {
        Arc::new(InflightTracker {
            num_queues,
            max_queue_size,
            installed: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    /// The handle queue `index` is served through.
    pub fn queue(self: &Arc<Self>, index: u16) -> InflightQueue {
        InflightQueue {
            tracker: self.clone(),
            index,
            seen: 0,
            restart: true,
            region: None,
            counter: 1,
        }
    }

    fn check(&self, msg: &InflightMsg) -> Result<u64, InflightError> {
        if msg.num_queues == 0 || msg.num_queues > self.num_queues {
            return Err(InflightError::NumQueues {
                num_queues: msg.num_queues,
                max: self.num_queues,
            });
        }
        if msg.queue_size == 0 || msg.queue_size > self.max_queue_size {
            return Err(InflightError::QueueSize {
                queue_size: msg.queue_size,
                max: self.max_queue_size,
            });
        }
        // At most 65535 × (16 + 16 × 65535) bytes: no overflow in u64.
        Ok(u64::from(msg.num_queues) * queue_region_size(msg.queue_size) as u64)
    }

    /// Answers GET_INFLIGHT_FD: a zeroed, sealed memfd laid out for
    /// `msg.num_queues` queues of `msg.queue_size`, and the reply payload.
    ///
    /// Sealed against growing and shrinking, so whoever maps it later (the
    /// next backend process) can trust its size.
    pub fn get_inflight_fd(
        &self,
        msg: &InflightMsg,
    ) -> Result<(InflightMsg, OwnedFd), InflightError> {
        let size = self.check(msg)?;
        let fd = memfd_create(
            c"flotilla-inflight",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(sys("create"))?;
        let len = libc::off_t::try_from(size).map_err(|_| InflightError::TooSmall {
            mmap_size: 0,
            needed: size,
        })?;
        nix::unistd::ftruncate(&fd, len).map_err(sys("size"))?;
        fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(sys("seal"))?;
        let map = Arc::new(Mapping::new(&fd, 0, size as usize)?);
        let stride = queue_region_size(msg.queue_size);
        for q in 0..usize::from(msg.num_queues) {
            let region = QueueRegion {
                map: map.clone(),
                base: q * stride,
                desc_num: msg.queue_size,
            };
            region.init(0);
        }
        log::info!(
            "inflight region allocated: {} queue(s) of {}, {size} bytes",
            msg.num_queues,
            msg.queue_size
        );
        Ok((
            InflightMsg {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            },
            fd,
        ))
    }

    /// Handles SET_INFLIGHT_FD: validates `fd` against `msg`, maps it, and
    /// makes every queue recover from it before it pops again.
    pub fn set_inflight_fd(&self, msg: &InflightMsg, fd: OwnedFd) -> Result<(), InflightError> {
        let needed = self.check(msg)?;
        if msg.mmap_size < needed {
            return Err(InflightError::TooSmall {
                mmap_size: msg.mmap_size,
                needed,
            });
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        if msg.mmap_offset % page != 0 {
            return Err(InflightError::Offset(msg.mmap_offset));
        }
        let stat =
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(sys("stat"))?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(InflightError::NotAFile);
        }
        let end = msg
            .mmap_offset
            .checked_add(needed)
            .ok_or(InflightError::Offset(msg.mmap_offset))?;
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if size < end {
            return Err(InflightError::FileTooSmall { size, end });
        }
        let seals = fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), FcntlArg::F_GET_SEALS)
            .map_err(|_| InflightError::NotSealed)?;
        if SealFlag::from_bits_truncate(seals) & SealFlag::F_SEAL_SHRINK != SealFlag::F_SEAL_SHRINK
        {
            return Err(InflightError::NotSealed);
        }
        let len = usize::try_from(needed).map_err(|_| InflightError::TooSmall {
            mmap_size: msg.mmap_size,
            needed,
        })?;
        let map = Arc::new(Mapping::new(&fd, msg.mmap_offset, len)?);
        let stride = queue_region_size(msg.queue_size);
        for q in 0..msg.num_queues {
            let header = QueueRegion {
                map: map.clone(),
                base: usize::from(q) * stride,
                desc_num: msg.queue_size,
            };
            let found = header.desc_num_field().load(Ordering::Acquire);
            let version = header.version().load(Ordering::Acquire);
            if version != 0 && found != msg.queue_size {
                return Err(InflightError::Layout {
                    queue: q,
                    found,
                    expected: msg.queue_size,
                });
            }
        }
        *self.installed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Installed {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        }));
        self.generation.fetch_add(1, Ordering::AcqRel);
        log::info!(
            "inflight region set: {} queue(s) of {}",
            msg.num_queues,
            msg.queue_size
        );
        Ok(())
    }
}

/// One queue's view of the inflight region, owned by the thread serving the
/// queue.
///
/// Without a region (the frontend did not negotiate the feature) every call
/// is a no-op besides the ring operation itself.
pub struct InflightQueue {
    tracker: Arc<InflightTracker>,
    index: u16,
    /// The tracker generation `region` comes from.
    seen: u64,
    /// The ring stopped (or never started) since the last recovery.
    restart: bool,
    region: Option<QueueRegion>,
    /// The counter the next popped head gets.
    counter: u64,
}

impl InflightQueue {
    /// Whether [`Self::recover`] must run before the next pop: the queue
    /// has not started since this handle was made or since
    /// [`Self::ring_stopped`], or the frontend sent a new region.
    pub fn recovery_pending(&self) -> bool {
        self.restart || self.tracker.generation.load(Ordering::Acquire) != self.seen
    }

    /// The ring was stopped (GET_VRING_BASE): recover again when it
    /// restarts, since the frontend may restart it at another index.
    pub fn ring_stopped(&mut self) {
        self.restart = true;
    }

    /// Whether a region is in use for this queue.
    pub fn is_tracking(&self) -> bool {
        self.region.is_some()
    }

    /// Takes up the current region at queue start: resynchronises it with
    /// the used ring, sets the vring's next avail index past what was in
    /// flight, and returns the heads to resubmit, oldest first. Call on the
    /// first kick after the ring started (the kick fd is only watched once
    /// SET_VRING_BASE has been applied), before popping.
    ///
    /// On error the queue runs untracked (the error says why).
    pub fn recover<M, V>(&mut self, vring: &V) -> Result<Vec<u16>, InflightError>
    where
        M: GuestAddressSpace,
        V: VringT<M>,
    {
        self.seen = self.tracker.generation.load(Ordering::Acquire);
        self.restart = false;
        self.region = None;
        let installed = self
            .tracker
            .installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(installed) = installed else {
            return Ok(Vec::new());
        };
        if self.index >= installed.num_queues {
            log::warn!(
                "queue {}: the inflight region covers {} queue(s); queue not tracked",
                self.index,
                installed.num_queues
            );
            return Ok(Vec::new());
        }
        let ring = vring.get_ref().get_queue().size();
        if ring > installed.queue_size {
            return Err(InflightError::RingTooLarge {
                queue: self.index,
                ring,
                desc_num: installed.queue_size,
            });
        }
        let used = vring
            .queue_used_idx()
            .map_err(|source| InflightError::UsedIdx {
                queue: self.index,
                source,
            })?;
        let region = QueueRegion {
            map: installed.map.clone(),
            base: usize::from(self.index) * queue_region_size(installed.queue_size),
            desc_num: installed.queue_size,
        };
        let r = recover_region(&region, used, ring);
        vring.set_queue_next_avail(r.next_avail);
        self.counter = r.next_counter;
        self.region = Some(region);
        if !r.heads.is_empty() {
            log::info!(
                "queue {}: resubmitting {} request(s) in flight at used index {used}",
                self.index,
                r.heads.len()
            );
        }
        Ok(r.heads)
    }

    /// Records that `head` was popped: call right after popping, before the
    /// request can complete.
    pub fn start(&mut self, head: u16) {
        if let Some(r) = &self.region {
            if head < r.desc_num {
                r.counter(head).store(self.counter, Ordering::Relaxed);
                r.inflight(head).store(1, Ordering::Release);
                self.counter = self.counter.wrapping_add(1);
            }
        }
    }

    /// Puts `head` in the used ring with `len` bytes written, recording
    /// around it what recovery needs: `last_batch_head` before, cleared
    /// `inflight` and the new used index after.
    pub fn add_used<M, V>(&self, vring: &V, head: u16, len: u32) -> Result<(), VirtQueError>
    where
        M: GuestAddressSpace,
        V: VringT<M>,
    {
        let Some(r) = self.region.as_ref().filter(|r| head < r.desc_num) else {
            return vring.add_used(head, len);
        };
        let mut state = vring.get_mut();
        r.last_batch_head().store(head, Ordering::Release);
        state.add_used(head, len)?;
        let used = state.get_queue().next_used();
        drop(state);
        r.inflight(head).store(0, Ordering::Release);
        r.used_idx().store(used, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn msg(num_queues: u16, queue_size: u16) -> InflightMsg {
        InflightMsg {
            num_queues,
            queue_size,
            ..Default::default()
        }
    }

    fn region_of(fd: &OwnedFd, reply: &InflightMsg, queue: u16) -> QueueRegion {
        let map = Arc::new(Mapping::new(fd, 0, reply.mmap_size as usize).unwrap());
        QueueRegion {
            map,
            base: usize::from(queue) * queue_region_size(reply.queue_size),
            desc_num: reply.queue_size,
        }
    }

    #[test]
    fn layout_sizes() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
        let m = InflightMsg {
            mmap_size: 1,
            mmap_offset: 2,
            num_queues: 3,
            queue_size: 4,
        };
        assert_eq!(InflightMsg::parse(&m.to_bytes()).unwrap(), m);
        assert_eq!(InflightMsg::parse(&m.to_bytes()[..20]).unwrap(), m);
        assert!(InflightMsg::parse(&[0; 16]).is_err());
    }

    #[test]
    fn get_allocates_a_sealed_initialised_region() {
        let t = InflightTracker::new(2, 256);
        let (reply, fd) = t.get_inflight_fd(&msg(2, 128)).unwrap();
        assert_eq!(reply.mmap_offset, 0);
        assert_eq!(reply.mmap_size, 2 * queue_region_size(128) as u64);
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        assert!(SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK));
        let q1 = region_of(&fd, &reply, 1);
        assert_eq!(q1.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(q1.desc_num_field().load(Ordering::Relaxed), 128);
        // Grows and shrinks are refused.
        assert!(nix::unistd::ftruncate(&fd, 1).is_err());
    }

    #[test]
    fn bad_requests_are_refused() {
        let t = InflightTracker::new(2, 256);
        assert!(matches!(
            t.get_inflight_fd(&msg(3, 128)),
            Err(InflightError::NumQueues { .. })
        ));
        assert!(matches!(
            t.get_inflight_fd(&msg(0, 128)),
            Err(InflightError::NumQueues { .. })
        ));
        assert!(matches!(
            t.get_inflight_fd(&msg(1, 512)),
            Err(InflightError::QueueSize { .. })
        ));
        assert!(matches!(
            t.get_inflight_fd(&msg(1, 0)),
            Err(InflightError::QueueSize { .. })
        ));

        let (reply, fd) = t.get_inflight_fd(&msg(2, 128)).unwrap();
        let dup = |fd: &OwnedFd| fd.try_clone().unwrap();
        let mut m = reply;
        m.mmap_size -= 1;
        assert!(matches!(
            t.set_inflight_fd(&m, dup(&fd)),
            Err(InflightError::TooSmall { .. })
        ));
        let mut m = reply;
        m.mmap_offset = 100;
        assert!(matches!(
            t.set_inflight_fd(&m, dup(&fd)),
            Err(InflightError::Offset(100))
        ));
        let mut m = reply;
        m.mmap_offset = 4096;
        assert!(matches!(
            t.set_inflight_fd(&m, dup(&fd)),
            Err(InflightError::FileTooSmall { .. })
        ));
        let mut m = reply;
        m.queue_size = 64;
        assert!(matches!(
            t.set_inflight_fd(&m, dup(&fd)),
            Err(InflightError::Layout { .. })
        ));
        // A socket is not a file; an unsealed memfd could shrink under us.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            t.set_inflight_fd(&reply, OwnedFd::from(a)),
            Err(InflightError::NotAFile)
        ));
        let unsealed = memfd_create(c"t", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&unsealed, reply.mmap_size as i64).unwrap();
        assert!(matches!(
            t.set_inflight_fd(&reply, unsealed),
            Err(InflightError::NotSealed)
        ));
        assert_eq!(t.generation.load(Ordering::Relaxed), 0);
        t.set_inflight_fd(&reply, fd).unwrap();
        assert_eq!(t.generation.load(Ordering::Relaxed), 1);
    }

    fn fresh(queue_size: u16) -> QueueRegion {
        let t = InflightTracker::new(1, queue_size);
        let (reply, fd) = t.get_inflight_fd(&msg(1, queue_size)).unwrap();
        region_of(&fd, &reply, 0)
    }

    /// Marks `head` the way `InflightQueue::start` does.
    fn mark(r: &QueueRegion, head: u16, counter: u64) {
        r.counter(head).store(counter, Ordering::Relaxed);
        r.inflight(head).store(1, Ordering::Release);
    }

    #[test]
    fn recovery_lists_heads_in_counter_order() {
        let r = fresh(16);
        // Used index 4 and heads 3, 9, 1 still in flight: 7 were popped.
        r.used_idx().store(4, Ordering::Relaxed);
        mark(&r, 9, 12);
        mark(&r, 3, 10);
        mark(&r, 1, 11);
        let rec = recover_region(&r, 4, 16);
        assert_eq!(rec.heads, [3, 1, 9]);
        assert_eq!(rec.next_avail, 7);
        assert_eq!(rec.next_counter, 13);
        // Still marked: a second crash before they complete resubmits them again.
        assert_eq!(recover_region(&r, 4, 16).heads, [3, 1, 9]);
    }

    #[test]
    fn recovery_finishes_a_completion_the_used_ring_already_shows() {
        let r = fresh(16);
        r.used_idx().store(4, Ordering::Relaxed);
        mark(&r, 3, 10);
        mark(&r, 5, 11);
        // Died after add_used published head 5 (used index 5), before clearing it.
        r.last_batch_head().store(5, Ordering::Relaxed);
        let rec = recover_region(&r, 5, 16);
        assert_eq!(rec.heads, [3]);
        assert_eq!(rec.next_avail, 6);
        assert_eq!(r.used_idx().load(Ordering::Relaxed), 5);
        assert_eq!(r.inflight(5).load(Ordering::Relaxed), 0);
        // Died after setting last_batch_head but before the used index moved:
        // the head is still in flight.
        r.last_batch_head().store(3, Ordering::Relaxed);
        let rec = recover_region(&r, 5, 16);
        assert_eq!(rec.heads, [3]);
    }

    #[test]
    fn recovery_wraps_and_drops_impossible_heads() {
        let r = fresh(16);
        r.used_idx().store(u16::MAX, Ordering::Relaxed);
        mark(&r, 2, 1);
        mark(&r, 12, 2);
        // The ring is only 8 long: head 12 cannot be one of its chains.
        let rec = recover_region(&r, u16::MAX, 8);
        assert_eq!(rec.heads, [2]);
        assert_eq!(rec.next_avail, 0);
        assert_eq!(r.inflight(12).load(Ordering::Relaxed), 0);
        // A frontend-written last_batch_head out of range is not used.
        r.last_batch_head().store(999, Ordering::Relaxed);
        let rec = recover_region(&r, 3, 8);
        assert_eq!(rec.heads, [2]);
    }

    /// A ring in guest memory: descriptor table 0x1000, avail 0x2000, used 0x3000.
    fn vring(
        mem: &vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    ) -> vhost_user_backend::VringRwLock {
        let v = vhost_user_backend::VringRwLock::new(mem.clone(), 16).unwrap();
        v.set_queue_size(8);
        v.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        let used = v.queue_used_idx().unwrap();
        v.set_queue_next_used(used);
        v.set_queue_ready(true);
        v
    }

    #[test]
    fn queue_handle_round_trip_across_a_restart() {
        use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let first = InflightTracker::new(1, 8);
        let (reply, fd) = first.get_inflight_fd(&msg(1, 8)).unwrap();
        first
            .set_inflight_fd(&reply, fd.try_clone().unwrap())
            .unwrap();
        let ring = vring(&mem);
        let mut q = first.queue(0);
        assert!(q.recovery_pending());
        assert_eq!(q.recover(&ring).unwrap(), Vec::<u16>::new());
        assert!(!q.recovery_pending() && q.is_tracking());
        // Pop 3, 5, 1 (avail positions 0..3); 5 completes.
        for head in [3, 5, 1] {
            q.start(head);
        }
        q.add_used(&ring, 5, 1).unwrap();
        assert_eq!(ring.queue_used_idx().unwrap(), 1);
        drop(q);

        // A new backend with the same region, the ring restarted at used 1.
        let second = InflightTracker::new(1, 8);
        second.set_inflight_fd(&reply, fd).unwrap();
        let ring = vring(&mem);
        ring.set_queue_next_avail(1);
        let mut q = second.queue(0);
        assert_eq!(q.recover(&ring).unwrap(), [3, 1]);
        assert_eq!(ring.queue_next_avail(), 3);
        // Resubmitted and completed: nothing left for a third backend.
        q.add_used(&ring, 1, 1).unwrap();
        q.add_used(&ring, 3, 1).unwrap();
        q.ring_stopped();
        assert!(q.recovery_pending());
        assert_eq!(q.recover(&ring).unwrap(), Vec::<u16>::new());
        assert_eq!(ring.queue_next_avail(), 3);
    }

    #[test]
    fn zeroed_region_is_initialised() {
        let r = fresh(8);
        r.version().store(0, Ordering::Relaxed);
        r.desc_num_field().store(0, Ordering::Relaxed);
        r.inflight(4).store(1, Ordering::Relaxed);
        let rec = recover_region(&r, 42, 8);
        assert_eq!(rec.heads, Vec::<u16>::new());
        assert_eq!(rec.next_avail, 42);
        assert_eq!(r.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(r.desc_num_field().load(Ordering::Relaxed), 8);
        assert_eq!(r.used_idx().load(Ordering::Relaxed), 42);
        assert_eq!(r.inflight(4).load(Ordering::Relaxed), 0);
    }
}
