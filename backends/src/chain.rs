//! Reading one split-ring descriptor chain by its head index.
//!
//! Resubmitting what a crashed backend had in flight (see [`crate::inflight`])
//! starts from a head index recorded in the inflight region, not from the
//! avail ring, so `pop_descriptor_chain` cannot produce the chain, and
//! `virtio_queue::DescriptorChain::new` is not public. [`read_chain`] walks
//! the descriptor table itself, with the same rules the pop path follows
//! (virtio 1.2 section 2.7.5): `NEXT` links within the table, at most one
//! level of indirection, an indirect descriptor ends the direct part of the
//! chain, and the whole chain carries less than 4 GiB. Where the pop path
//! quietly ends a malformed chain early, this walker returns an error: the
//! device then completes the request without touching its buffers.
//!
//! Everything read here is guest-controlled. Descriptor table entries are
//! read through `GuestMemory`, which refuses addresses outside guest memory;
//! the data buffers the descriptors point at are left to the device's own
//! request parser, exactly as for a popped chain.
//!
//! Also here, for every backend's queue loop: [`avail_pending`], the sanity check of the
//! driver's avail index.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Chains the driver has posted past `q`'s next one; None if its avail index is unreadable
/// or more than a ring ahead, which no driver can have outstanding: popping finds nothing
/// there, and a queue that took "the index moved" for work would spin on it.
pub fn avail_pending<M: GuestMemory>(mem: &M, q: &virtio_queue::Queue) -> Option<u16> {
    use virtio_queue::QueueT;
    let idx = q
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .ok()?;
    let pending = idx.0.wrapping_sub(q.next_avail());
    (pending <= q.size()).then_some(pending)
}

/// Size of one split-ring descriptor (`struct virtq_desc`).
pub const DESC_LEN: u64 = 16;
/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// One descriptor of a chain, as the device uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainDescriptor {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// The device may write the buffer (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// Why a chain cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The head index is not below the queue size.
    #[error("head {head} outside a queue of {size} descriptors")]
    Head {
        /// The head index.
        head: u16,
        /// The ring size.
        size: u16,
    },
    /// A `next` index points outside its table.
    #[error("descriptor links to {next}, outside a table of {size}")]
    Next {
        /// The `next` field.
        next: u16,
        /// Entries in the table being walked.
        size: u16,
    },
    /// A descriptor table entry is not in guest memory.
    #[error("descriptor at {addr:#x}: {source}")]
    Read {
        /// Guest address of the entry.
        addr: u64,
        /// Why it could not be read.
        source: GuestMemoryError,
    },
    /// An indirect table given inside an indirect table.
    #[error("nested indirect descriptor table")]
    NestedIndirect,
    /// An indirect table whose length is zero, not a multiple of 16, or
    /// more than 65536 entries.
    #[error("indirect descriptor table of {0} bytes")]
    IndirectLen(u32),
    /// More descriptors than the table holds: the chain loops.
    #[error("chain longer than its table of {0} descriptors (a loop)")]
    Loop(u16),
    /// The buffers add up to 4 GiB or more.
    #[error("chain of 4 GiB or more")]
    TooManyBytes,
}

/// Reads the chain starting at `head` from the descriptor table at
/// `desc_table` of a ring with `queue_size` entries.
pub fn read_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<ChainDescriptor>, ChainError> {
    if head >= queue_size {
        return Err(ChainError::Head {
            head,
            size: queue_size,
        });
    }
    let mut table = desc_table;
    let mut size = u32::from(queue_size);
    let mut index = head;
    let mut indirect = false;
    // Descriptors still allowed in the current table: a chain visiting more
    // entries than the table has must revisit one, i.e. it loops.
    let mut budget = size;
    let mut bytes: u32 = 0;
    let mut out = Vec::new();
    loop {
        if budget == 0 {
            return Err(ChainError::Loop(u16::try_from(size).unwrap_or(u16::MAX)));
        }
        budget -= 1;
        let addr = table
            .0
            .checked_add(u64::from(index) * DESC_LEN)
            .ok_or(ChainError::Read {
                addr: table.0,
                source: GuestMemoryError::InvalidGuestAddress(table),
            })?;
        let mut raw = [0u8; DESC_LEN as usize];
        mem.read_slice(&mut raw, GuestAddress(addr))
            .map_err(|source| ChainError::Read { addr, source })?;
        let d_addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let d_len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap_or_default());
        let next = u16::from_le_bytes(raw[14..16].try_into().unwrap_or_default());

        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            let entries = d_len / DESC_LEN as u32;
            if d_len == 0 || u64::from(d_len) % DESC_LEN != 0 || entries > 1 << 16 {
                return Err(ChainError::IndirectLen(d_len));
            }
            // The rest of the direct chain, if any, is not part of the
            // request (a driver must not set NEXT here; the pop path
            // ignores it too).
            table = GuestAddress(d_addr);
            size = entries;
            budget = entries;
            index = 0;
            indirect = true;
            continue;
        }
        bytes = bytes.checked_add(d_len).ok_or(ChainError::TooManyBytes)?;
        out.push(ChainDescriptor {
            addr: GuestAddress(d_addr),
            len: d_len,
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(out);
        }
        if u32::from(next) >= size {
            return Err(ChainError::Next {
                next,
                size: u16::try_from(size).unwrap_or(u16::MAX),
            });
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 8;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap<()>,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = table + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn d(addr: u64, len: u32, writable: bool) -> ChainDescriptor {
        ChainDescriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    #[test]
    fn direct_chain_in_link_order() {
        let mem = memory();
        put(&mem, TABLE, 5, 0x4000, 16, F_NEXT, 2);
        put(&mem, TABLE, 2, 0x5000, 512, F_NEXT | F_WRITE, 7);
        put(&mem, TABLE, 7, 0x6000, 1, F_WRITE, 0);
        let chain = read_chain(&mem, GuestAddress(TABLE), SIZE, 5).unwrap();
        assert_eq!(
            chain,
            [
                d(0x4000, 16, false),
                d(0x5000, 512, true),
                d(0x6000, 1, true)
            ]
        );
    }

    #[test]
    fn indirect_table() {
        let mem = memory();
        put(&mem, TABLE, 3, 0x8000, 48, F_INDIRECT, 0);
        put(&mem, 0x8000, 0, 0x4000, 16, F_NEXT, 1);
        put(&mem, 0x8000, 1, 0x5000, 4096, F_NEXT, 2);
        put(&mem, 0x8000, 2, 0x6000, 1, F_WRITE, 0);
        let chain = read_chain(&mem, GuestAddress(TABLE), SIZE, 3).unwrap();
        assert_eq!(
            chain,
            [
                d(0x4000, 16, false),
                d(0x5000, 4096, false),
                d(0x6000, 1, true)
            ]
        );
    }

    #[test]
    fn malformed_chains_are_errors() {
        let mem = memory();
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, SIZE),
            Err(ChainError::Head { .. })
        ));
        // Loop 0 -> 1 -> 0.
        put(&mem, TABLE, 0, 0x4000, 16, F_NEXT, 1);
        put(&mem, TABLE, 1, 0x4000, 16, F_NEXT, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 0),
            Err(ChainError::Loop(8))
        ));
        // Link past the table.
        put(&mem, TABLE, 1, 0x4000, 16, F_NEXT, 200);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 0),
            Err(ChainError::Next { next: 200, .. })
        ));
        // Table outside guest memory, and an address that wraps.
        assert!(matches!(
            read_chain(&mem, GuestAddress(0x20000), SIZE, 0),
            Err(ChainError::Read { .. })
        ));
        assert!(matches!(
            read_chain(&mem, GuestAddress(u64::MAX - 8), SIZE, 1),
            Err(ChainError::Read { .. })
        ));
        // Indirect table: bad length, outside memory, nested, looping.
        put(&mem, TABLE, 2, 0x8000, 20, F_INDIRECT, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 2),
            Err(ChainError::IndirectLen(20))
        ));
        put(&mem, TABLE, 2, 0x8000, 0, F_INDIRECT, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 2),
            Err(ChainError::IndirectLen(0))
        ));
        put(&mem, TABLE, 2, 0xfff0, 32, F_INDIRECT, 0);
        put(&mem, 0xfff0, 0, 0x4000, 16, F_NEXT, 1);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 2),
            Err(ChainError::Read { .. })
        ));
        put(&mem, TABLE, 2, 0x8000, 32, F_INDIRECT, 0);
        put(&mem, 0x8000, 0, 0x9000, 16, F_INDIRECT, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 2),
            Err(ChainError::NestedIndirect)
        ));
        put(&mem, 0x8000, 0, 0x4000, 16, F_NEXT, 1);
        put(&mem, 0x8000, 1, 0x4000, 16, F_NEXT, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 2),
            Err(ChainError::Loop(2))
        ));
        // 4 GiB or more in total.
        put(&mem, TABLE, 4, 0x4000, u32::MAX, F_NEXT, 5);
        put(&mem, TABLE, 5, 0x4000, 1, 0, 0);
        assert!(matches!(
            read_chain(&mem, GuestAddress(TABLE), SIZE, 4),
            Err(ChainError::TooManyBytes)
        ));
    }
}
