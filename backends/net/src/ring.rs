//! Publishing used buffers ourselves, and reading and writing the rings fast through host
//! pointers (see [`RingView`]), for both queues.
//!
//! With MRG_RXBUF one frame fills several chains, and the driver reads
//! `num_buffers` from the first and then expects all of them in the used
//! ring. `virtio-queue`'s `add_used` publishes the used index after every
//! element, so a driver polling the ring could see the first buffer without
//! the rest (Linux counts that as a length error and drops the frame). Here
//! the elements of one frame are written first and the index is published
//! once, as QEMU's `virtqueue_fill`/`virtqueue_flush` do. Because we bypass
//! the library's bookkeeping, the EVENT_IDX interrupt decision is made here
//! too, from the used index at the start of the batch. The transmit queue uses the same
//! path to publish its completions in batches (one used-index store per batch instead of
//! one per frame).

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use flotilla_backend::chain::{
    avail_pending, ChainDescriptor, DESC_LEN, F_INDIRECT, F_NEXT, F_WRITE,
};

use crate::GuestMem;

/// With EVENT_IDX, a queue asks whether the driver wants an interrupt after
/// this many completions within a pass, not only at its end: a driver
/// sleeping until some of its chains complete (Linux's
/// `virtqueue_enable_cb_delayed`) wakes while the pass goes on and posts
/// more, instead of finding the ring drained. The check is a fence and a
/// load; the interrupt is only sent when the driver asked for it.
pub const SIGNAL_EVERY: usize = 16;

/// How long a queue busy-polls after running dry, with `--poll`: long
/// enough to catch the guest's next frames without a kick (a kick costs a
/// VM exit and an eventfd wakeup), short enough that an idle queue gives
/// its CPU back almost at once (as flotilla-blk's `--poll`).
pub const POLL_TIME: Duration = Duration::from_micros(50);

/// Spins until the driver makes a chain available on `vring` or `time`
/// passes; true if there is work. Does not touch notifications.
pub fn poll_avail(vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>, time: Duration) -> bool {
    let guard = mem.memory();
    let m: &GuestMem = &guard;
    let deadline = Instant::now() + time;
    loop {
        {
            let state = vring.get_ref();
            let q = state.get_queue();
            if !q.ready() || !state.is_enabled() {
                return false;
            }
            match avail_pending(m, q) {
                Some(0) => {}
                Some(_) => return true,
                None => return false,
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Longest chain [`RingView::chain`] is given room for: a receive buffer is one descriptor
/// (two without MRG_RXBUF's small buffers), a transmit frame a header and a frame or a
/// frame with a few page fragments; longer chains take `virtio-queue`'s path.
pub const VIEW_CHAIN: usize = 16;

/// Host pointers to a split ring's descriptor table, avail ring and used ring, checked once
/// (inside one guest memory region each, aligned as the spec requires) for a pass that pops
/// and completes many chains: `virtio-queue` looks the guest address up in the memory map
/// for every avail entry and every descriptor, and `vm-memory`'s `write_slice` walks a
/// slice iterator for every used element; for a 64 KB frame over 16 receive buffers that
/// was most of the receive path's user-space time, and for a transmit chain (header,
/// frame) a good part of it. Chains longer than the caller's room, with an indirect table
/// or with a bad index are not read here: [`RingView::chain`] returns None and the caller
/// pops them through `virtio-queue` as before, which checks them as it always did.
///
/// Valid only while the memory snapshot it was made from is held (the lifetime).
pub struct RingView<'a> {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    _mem: std::marker::PhantomData<&'a GuestMem>,
}

impl<'a> RingView<'a> {
    /// The view of `q`'s rings in `mem`, or None if an area is misaligned, crosses a region
    /// boundary or lies outside guest memory (the caller then uses `virtio-queue`).
    pub fn new(mem: &'a GuestMem, q: &Queue) -> Option<Self> {
        let size = q.size();
        if size == 0
            || q.desc_table() % 16 != 0
            || q.avail_ring() % 2 != 0
            || q.used_ring() % 4 != 0
        {
            return None;
        }
        let desc_len = usize::from(size) * DESC_LEN as usize;
        let avail_len = AVAIL_HEADER as usize + usize::from(size) * 2 + 2;
        let used_len = (USED_HEADER + u64::from(size) * USED_ELEM) as usize + 2;
        let within =
            |addr: u64, len: usize| crate::chain::within_one_region(mem, GuestAddress(addr), len);
        Some(RingView {
            desc: within(q.desc_table(), desc_len)?,
            avail: within(q.avail_ring(), avail_len)?,
            used: within(q.used_ring(), used_len)?,
            size,
            _mem: std::marker::PhantomData,
        })
    }

    /// Writes the (head, length) elements `used` from `q`'s next used slot on and
    /// publishes them with one used-index store ([`add_used`] through the view).
    fn add_used(&self, q: &mut Queue, used: &[(u16, u32)]) {
        let next = q.next_used();
        for (i, (head, len)) in used.iter().enumerate() {
            let slot = usize::from(next.wrapping_add(i as u16) % self.size);
            let at = USED_HEADER as usize + slot * USED_ELEM as usize;
            // SAFETY: slot < size, so the 8-byte element lies inside the checked used
            // ring, 4-byte aligned (checked in `new`). Volatile: the guest owns the memory.
            unsafe {
                let e = self.used.add(at);
                std::ptr::write_volatile(e as *mut u32, u32::from(*head).to_le());
                std::ptr::write_volatile(e.add(4) as *mut u32, len.to_le());
            }
        }
        let next = next.wrapping_add(used.len() as u16);
        q.set_next_used(next);
        // SAFETY: `used + 2` is the used index inside the checked area, 2-byte aligned. The
        // driver reads it concurrently, hence the atomic; Release: the frame data, the
        // header fix-up and the elements are visible before the index announces them.
        let idx = unsafe { AtomicU16::from_ptr(self.used.add(2) as *mut u16) };
        idx.store(next.to_le(), Ordering::Release);
    }

    /// The driver's `used_event` (EVENT_IDX), read after the used index stores.
    fn used_event(&self) -> u16 {
        let at = AVAIL_HEADER as usize + usize::from(self.size) * 2;
        // SAFETY: the 2 bytes past the avail entries are inside the checked avail area,
        // 2-byte aligned; the driver writes them concurrently, hence the atomic.
        let event = unsafe { AtomicU16::from_ptr(self.avail.add(at) as *mut u16) };
        u16::from_le(event.load(Ordering::Acquire))
    }

    /// The driver's avail index (acquire: the entries and descriptors it publishes are
    /// read after it).
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: `avail` points at `4 + 2 * size + 2` bytes of mapped guest memory that
        // stay mapped while the snapshot (`'a`) is held; `avail + 2` is 2-byte aligned
        // (checked in `new`). The guest writes it concurrently, hence the atomic.
        let idx = unsafe { AtomicU16::from_ptr(self.avail.add(2) as *mut u16) };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// The chain at avail position `at`: its head and its descriptors, read into `descs`.
    /// None for a head or a `next` out of range, an indirect descriptor, or a chain longer
    /// than `descs` (pop those with `virtio-queue`).
    pub fn chain<'d>(
        &self,
        at: u16,
        descs: &'d mut [ChainDescriptor],
    ) -> Option<(u16, &'d [ChainDescriptor])> {
        let slot = usize::from(at % self.size);
        // SAFETY: slot < size, so the entry lies inside the checked avail area; 2-byte
        // aligned (checked in `new`). A volatile read: the guest owns the memory.
        let head = u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(AVAIL_HEADER as usize + slot * 2) as *const u16)
        });
        let mut index = head;
        for n in 0..descs.len() {
            if index >= self.size {
                return None;
            }
            let base = usize::from(index) * DESC_LEN as usize;
            // SAFETY: index < size, so the 16-byte descriptor lies inside the checked table;
            // 16-byte aligned (checked in `new`). Volatile reads of guest-owned memory.
            let (addr, len, flags, next) = unsafe {
                let d = self.desc.add(base);
                (
                    u64::from_le(std::ptr::read_volatile(d as *const u64)),
                    u32::from_le(std::ptr::read_volatile(d.add(8) as *const u32)),
                    u16::from_le(std::ptr::read_volatile(d.add(12) as *const u16)),
                    u16::from_le(std::ptr::read_volatile(d.add(14) as *const u16)),
                )
            };
            if flags & F_INDIRECT != 0 {
                return None;
            }
            descs[n] = ChainDescriptor {
                addr: GuestAddress(addr),
                len,
                writable: flags & F_WRITE != 0,
            };
            if flags & F_NEXT == 0 {
                return Some((head, &descs[..=n]));
            }
            index = next;
        }
        // Longer than the room (or a loop): `virtio-queue` walks it with its own limit.
        None
    }
}

/// Size of the used ring header (flags, idx) and of one element.
const USED_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;
/// Offset of `used_event` in the avail ring past its `size` entries.
const AVAIL_HEADER: u64 = 4;

/// Most used elements [`write_used`] writes with one memory access.
const USED_BATCH: usize = 32;

/// Writes the (head, length) elements `used` into the used ring from the
/// queue's next used slot on; nothing is visible to the driver until
/// [`publish`]. Slots that follow each other in the ring are written with
/// one access (a 64 KB frame fills 16 buffers).
pub fn write_used(
    mem: &GuestMem,
    q: &Queue,
    used: &[(u16, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    let size = usize::from(q.size().max(1));
    let mut bytes = [0u8; USED_BATCH * USED_ELEM as usize];
    let mut done = 0;
    while done < used.len() {
        let slot = (usize::from(q.next_used()) + done) % size;
        // Up to the end of the ring, at most a batch.
        let n = (used.len() - done).min(size - slot).min(USED_BATCH);
        for (i, (head, len)) in used[done..done + n].iter().enumerate() {
            let elem = &mut bytes[i * USED_ELEM as usize..(i + 1) * USED_ELEM as usize];
            elem[..4].copy_from_slice(&u32::from(*head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
        }
        let at = GuestAddress(q.used_ring() + USED_HEADER + slot as u64 * USED_ELEM);
        mem.write_slice(&bytes[..n * USED_ELEM as usize], at)?;
        done += n;
    }
    Ok(())
}

/// Makes the next `count` written elements visible to the driver.
pub fn publish(
    mem: &GuestMem,
    q: &mut Queue,
    count: u16,
) -> Result<(), vm_memory::GuestMemoryError> {
    let next = (Wrapping(q.next_used()) + Wrapping(count)).0;
    q.set_next_used(next);
    // Release: the frame data, the header fix-up and the elements are
    // visible before the index that announces them.
    mem.store(
        next.to_le(),
        GuestAddress(q.used_ring() + 2),
        Ordering::Release,
    )
}

/// [`write_used`] and [`publish`]: the elements appear to the driver together. Through
/// `view`'s host pointers when the pass has one.
pub fn add_used(
    mem: &GuestMem,
    view: Option<&RingView<'_>>,
    q: &mut Queue,
    used: &[(u16, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    if let Some(view) = view {
        view.add_used(q, used);
        return Ok(());
    }
    write_used(mem, q, used)?;
    publish(mem, q, used.len() as u16)
}

/// Whether the driver wants an interrupt for the elements published since
/// the used index was `old` (always, without EVENT_IDX; VRING_AVAIL_F_NO_INTERRUPT
/// is only a hint and, like `virtio-queue`, we do not use it).
pub fn needs_signal(
    mem: &GuestMem,
    view: Option<&RingView<'_>>,
    q: &Queue,
    old: u16,
    event_idx: bool,
) -> bool {
    let new = Wrapping(q.next_used());
    if new.0 == old {
        return false;
    }
    if !event_idx {
        return true;
    }
    // Order the index stores before reading the driver's used_event.
    fence(Ordering::SeqCst);
    let event = match view {
        Some(view) => view.used_event(),
        None => {
            let at = GuestAddress(q.avail_ring() + AVAIL_HEADER + u64::from(q.size()) * 2);
            let Ok(event) = mem.load::<u16>(at, Ordering::Acquire) else {
                return true;
            };
            u16::from_le(event)
        }
    };
    let event = Wrapping(event);
    // vring_need_event(): the driver asked to hear about index `event`.
    new - event - Wrapping(1) < new - Wrapping(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Address;

    const USED: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;

    fn setup(size: u16) -> (GuestMem, Queue) {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        (mem, q)
    }

    #[test]
    fn elements_appear_only_when_published_and_wrap() {
        let (mem, mut q) = setup(4);
        q.set_next_used(3);
        write_used(&mem, &q, &[(2, 100), (0, 200)]).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
        publish(&mem, &mut q, 2).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 5);
        assert_eq!(q.next_used(), 5);
        // Slot 3, then slot 0 (wrapped).
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(USED + 4 + 3 * 8)).unwrap(),
            2
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(USED + 8 + 3 * 8)).unwrap(),
            100
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 200);
    }

    #[test]
    fn long_batches_wrap_and_span_several_writes() {
        let (mem, mut q) = setup(256);
        q.set_next_used(65_500); // slot 220: 36 slots to the ring's end
        let used: Vec<(u16, u32)> = (0..100u16).map(|i| (i, 1000 + u32::from(i))).collect();
        write_used(&mem, &q, &used).unwrap();
        for (i, (head, len)) in used.iter().enumerate() {
            let slot = (220 + i as u64) % 256;
            let at = USED + 4 + slot * 8;
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
                u32::from(*head)
            );
            assert_eq!(mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(), *len);
        }
        publish(&mem, &mut q, 100).unwrap();
        assert_eq!(q.next_used(), 64);
    }

    #[test]
    fn the_ring_view_reads_short_direct_chains_and_leaves_the_rest() {
        const DESC: u64 = 0x4000;
        let (mem, mut q) = setup(4);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(DESC + i * 16);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        };
        desc(0, 0x8000, 1500, F_WRITE, 0);
        desc(1, 0x9000, 12, F_WRITE | F_NEXT, 2);
        desc(2, 0xa000, 4096, F_INDIRECT, 0);
        desc(3, 0xb000, 64, 0, 0);
        // Avail entries: heads 3, 0, 1, 2, then (wrapped) an out-of-range head 9.
        for (slot, head) in [(0u64, 3u16), (1, 0), (2, 1), (3, 2)] {
            mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
                .unwrap();
        }
        mem.write_obj(5u16, GuestAddress(AVAIL + 2)).unwrap();
        let view = RingView::new(&mem, &q).expect("aligned rings inside memory");
        assert_eq!(view.avail_idx(), 5);
        let d = |addr: u64, len: u32, writable: bool| ChainDescriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        };
        let mut one = [d(0, 0, false)];
        let mut two = [d(0, 0, false); 2];
        assert_eq!(
            view.chain(0, &mut one),
            Some((3, &[d(0xb000, 64, false)][..]))
        );
        assert_eq!(
            view.chain(1, &mut one),
            Some((0, &[d(0x8000, 1500, true)][..]))
        );
        assert_eq!(view.chain(2, &mut one), None, "longer than the room");
        assert_eq!(
            view.chain(3, &mut two),
            None,
            "indirect, directly or further down a chain"
        );
        assert_eq!(
            view.chain(5, &mut one),
            Some((0, &[d(0x8000, 1500, true)][..])),
            "wraps"
        );
        // Head 1 chains to 2 (indirect); made direct, the two are read in order.
        desc(2, 0xa000, 4096, F_WRITE, 0);
        assert_eq!(
            view.chain(2, &mut two),
            Some((1, &[d(0x9000, 12, true), d(0xa000, 4096, true)][..]))
        );
        // A `next` out of range, a loop (1 -> 1), a head out of range.
        desc(1, 0x9000, 12, F_WRITE | F_NEXT, 7);
        assert_eq!(view.chain(2, &mut two), None, "next out of range");
        desc(1, 0x9000, 12, F_WRITE | F_NEXT, 1);
        assert_eq!(view.chain(2, &mut two), None, "loop");
        mem.write_obj(9u16, GuestAddress(AVAIL + 4)).unwrap();
        assert_eq!(view.chain(4, &mut one), None, "head out of range");

        // A table running out of guest memory: no view, the caller falls back. (Misaligned
        // ring addresses never reach here: `Queue` refuses them.)
        q.set_desc_table_address(Some(0xfff0), Some(0));
        assert_eq!(q.desc_table(), 0xfff0);
        assert!(RingView::new(&mem, &q).is_none());
    }

    #[test]
    fn the_ring_view_publishes_used_elements_as_the_memory_path_does() {
        const DESC: u64 = 0x4000;
        let (mem, mut q) = setup(256);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        let (mem2, mut q2) = setup(256);
        q2.set_desc_table_address(Some(DESC as u32), Some(0));
        // 100 elements from slot 220: past the ring's end.
        q.set_next_used(65_500);
        q2.set_next_used(65_500);
        let used: Vec<(u16, u32)> = (0..100u16).map(|i| (i, 4096 - u32::from(i))).collect();
        let view = RingView::new(&mem, &q).expect("aligned rings inside memory");
        add_used(&mem, Some(&view), &mut q, &used).unwrap();
        add_used(&mem2, None, &mut q2, &used).unwrap();
        assert_eq!(q.next_used(), 64);
        let used_ring = |m: &GuestMem| {
            let mut bytes = vec![0u8; 4 + 256 * 8 + 2];
            m.read_slice(&mut bytes, GuestAddress(USED)).unwrap();
            bytes
        };
        assert_eq!(used_ring(&mem), used_ring(&mem2));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 64);

        // The interrupt decision reads the driver's used_event through the view alike.
        let used_event = GuestAddress(AVAIL + 4 + 256 * 2);
        for event in [65_499u16, 65_500, 63, 64, 200] {
            mem.write_obj(event, used_event).unwrap();
            assert_eq!(
                needs_signal(&mem, Some(&view), &q, 65_500, true),
                needs_signal(&mem, None, &q, 65_500, true),
                "used_event {event}"
            );
        }

        // A used ring running out of guest memory: no view.
        q.set_used_ring_address(Some(0xff00), Some(0));
        assert!(RingView::new(&mem, &q).is_none());
    }

    #[test]
    fn event_idx_decides_the_interrupt() {
        let (mem, mut q) = setup(4);
        assert!(!needs_signal(&mem, None, &q, 0, false), "nothing new");
        publish(&mem, &mut q, 3).unwrap();
        assert!(needs_signal(&mem, None, &q, 0, false));
        let used_event = GuestAddress(AVAIL + 4 + 4 * 2);
        // Driver wants to hear once index 1 is passed: 0 -> 3 passes it.
        mem.write_obj(1u16, used_event).unwrap();
        assert!(needs_signal(&mem, None, &q, 0, true));
        // Driver wants index 5: 0 -> 3 does not reach it.
        mem.write_obj(5u16, used_event).unwrap();
        assert!(!needs_signal(&mem, None, &q, 0, true));
        // Wrapping: old 65534, new 1, event 65535.
        q.set_next_used(1);
        mem.write_obj(65535u16, used_event).unwrap();
        assert!(needs_signal(&mem, None, &q, 65534, true));
    }
}
