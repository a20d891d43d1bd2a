//! flotilla-blk driven by libblkio's virtio-blk-vhost-user driver (the
//! `blkio` crate): an independent vhost-user frontend, so these tests check
//! the device against someone else's reading of the spec.

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::{random_image, Backend, Rng};

const MIB: usize = 1 << 20;

/// A started libblkio instance with one mapped buffer region.
struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    // Dropped last: queues and the region belong to it.
    _blkio: Blkio,
}

impl Client {
    fn connect(
        backend: &Backend,
        num_queues: i32,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        Self::connect_sized(backend, num_queues, read_only, 16 * MIB)
    }

    fn connect_sized(
        backend: &Backend,
        num_queues: i32,
        read_only: bool,
        region_len: usize,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", backend.sock.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let started = b.start()?;
        let region = b.alloc_mem_region(region_len)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            queues: started.queues,
            region,
            _blkio: b,
        })
    }

    fn capacity(&self) -> u64 {
        self._blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as a byte slice.
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: libblkio mapped `len` bytes read-write at `addr` for the
        // lifetime of `_blkio`, which outlives this borrow; only this test
        // thread touches it while no request is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    fn read(&mut self, q: usize, start: u64, at: usize, len: usize, user_data: usize) {
        let p = self.ptr(at);
        self.queues[q].read(start, p, len, user_data, ReqFlags::empty());
    }

    fn write(&mut self, q: usize, start: u64, at: usize, len: usize, user_data: usize) {
        let p = self.ptr(at);
        self.queues[q].write(start, p, len, user_data, ReqFlags::empty());
    }

    /// Waits for `n` completions on queue `q`; returns (user_data, ret).
    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::with_capacity(n);
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(20);
            let got = self.queues[q]
                .do_io(&mut comps[..want], want, Some(&mut timeout), None)
                .expect("do_io");
            assert!(got > 0, "no completion within 20 s: the backend hangs");
            for c in &comps[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    fn one(&mut self, q: usize) -> i32 {
        self.wait(q, 1)[0].1
    }
}

#[test]
fn read_write_flush_discard_write_zeroes() {
    let image = random_image(4 * MIB, 1);
    let backend = Backend::spawn("basic", &image, &["--serial", "basic-disk"]);
    let mut c = Client::connect(&backend, 1, false).expect("connect");
    assert_eq!(c.capacity(), 4 * MIB as u64);

    // Read what the image holds.
    c.read(0, MIB as u64, 0, 8192, 1);
    assert_eq!(c.one(0), 0);
    assert_eq!(&c.buf()[..8192], &image[MIB..MIB + 8192]);

    // Write, read back through the device, and check the file.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.buf()[..8192].copy_from_slice(&pattern);
    c.write(0, MIB as u64 + 512, 0, 8192, 2);
    assert_eq!(c.one(0), 0);
    c.queues[0].flush(3, ReqFlags::empty());
    assert_eq!(c.one(0), 0);
    c.read(0, MIB as u64 + 512, 65536, 8192, 4);
    assert_eq!(c.one(0), 0);
    assert_eq!(&c.buf()[65536..65536 + 8192], &pattern[..]);
    let file = backend.image_bytes();
    assert_eq!(&file[MIB + 512..MIB + 512 + 8192], &pattern[..]);
    assert_eq!(&file[MIB..MIB + 512], &image[MIB..MIB + 512]);

    // Discard and write-zeroes read back as zeroes; neighbours untouched.
    c.queues[0].discard(2 * MIB as u64, 65536, 5, ReqFlags::empty());
    assert_eq!(c.one(0), 0);
    c.queues[0].write_zeroes(3 * MIB as u64, 4096, 6, ReqFlags::empty());
    assert_eq!(c.one(0), 0);
    c.queues[0].write_zeroes(3 * MIB as u64 + 8192, 4096, 7, ReqFlags::NO_UNMAP);
    assert_eq!(c.one(0), 0);
    let file = backend.image_bytes();
    assert!(file[2 * MIB..2 * MIB + 65536].iter().all(|b| *b == 0));
    assert_eq!(file[2 * MIB + 65536], image[2 * MIB + 65536]);
    assert!(file[3 * MIB..3 * MIB + 4096].iter().all(|b| *b == 0));
    assert_eq!(
        &file[3 * MIB + 4096..3 * MIB + 8192],
        &image[3 * MIB + 4096..3 * MIB + 8192]
    );
    assert!(file[3 * MIB + 8192..3 * MIB + 12288]
        .iter()
        .all(|b| *b == 0));
    assert_eq!(
        file.len(),
        4 * MIB,
        "discard must not change the image size"
    );

    // Past the end: an error, not a hang or a crash.
    c.read(0, 4 * MIB as u64, 0, 512, 8);
    assert!(c.one(0) < 0);
    c.read(0, 4 * MIB as u64 - 512, 0, 1024, 9);
    assert!(c.one(0) < 0);
    // The device still works afterwards.
    c.read(0, 0, 0, 512, 10);
    assert_eq!(c.one(0), 0);
    assert_eq!(&c.buf()[..512], &image[..512]);
}

#[derive(Clone, Copy, Debug)]
enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// `ops` random requests over `queues` queues, up to 8 in flight per queue,
/// checked against a shadow copy. Requests in flight at the same time never
/// overlap, so the outcome does not depend on completion order.
///
/// With `misalign`, half of the buffers start 8 bytes past an aligned
/// address, which sends O_DIRECT requests through the bounce buffers.
fn random_ops(tag: &str, extra: &[&str], queues: usize, ops: usize, seed: u64, misalign: bool) {
    const DISK: usize = 16 * MIB;
    const MAX_LEN: usize = 128 * 1024;
    const SLOT: usize = MAX_LEN + 4096;
    const DEPTH: usize = 8;
    let mut shadow = random_image(DISK, seed);
    let qarg = queues.to_string();
    let mut args = vec!["--num-queues", qarg.as_str()];
    args.extend_from_slice(extra);
    let backend = Backend::spawn(tag, &shadow, &args);
    let mut c = Client::connect(&backend, queues as i32, false).expect("connect");
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut done = 0usize;
    let mut counts = [0usize; 5];
    while done < ops {
        // One batch: for each queue up to DEPTH non-overlapping requests.
        // (queue, buffer offset in the region, kind, disk offset, len)
        let mut batch: Vec<(usize, usize, OpKind, u64, usize)> = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        'fill: for q in 0..queues {
            for d in 0..DEPTH {
                if done + batch.len() >= ops {
                    break 'fill;
                }
                let kind = match rng.below(10) {
                    0..=3 => OpKind::Read,
                    4..=6 => OpKind::Write,
                    7 => OpKind::Flush,
                    8 => OpKind::Discard,
                    _ => OpKind::WriteZeroes,
                };
                let sectors = 1 + rng.below((MAX_LEN / 512) as u64) as usize;
                let len = sectors * 512;
                let offset = rng.below(((DISK - len) / 512) as u64 + 1) * 512;
                let end = offset + len as u64;
                if !matches!(kind, OpKind::Flush)
                    && taken.iter().any(|(s, e)| offset < *e && *s < end)
                {
                    continue;
                }
                taken.push((offset, end));
                let shift = if misalign && rng.below(2) == 0 { 8 } else { 0 };
                batch.push((q, (q * DEPTH + d) * SLOT + shift, kind, offset, len));
            }
        }
        // Fill write buffers, update the shadow, submit.
        let mut per_queue = vec![0usize; queues];
        for (i, &(q, at, kind, offset, len)) in batch.iter().enumerate() {
            let off = offset as usize;
            match kind {
                OpKind::Read => {
                    c.buf()[at..at + len].fill(0xee);
                    c.read(q, offset, at, len, i);
                }
                OpKind::Write => {
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    c.buf()[at..at + len].copy_from_slice(&data);
                    shadow[off..off + len].copy_from_slice(&data);
                    c.write(q, offset, at, len, i);
                }
                OpKind::Flush => c.queues[q].flush(i, ReqFlags::empty()),
                OpKind::Discard => {
                    shadow[off..off + len].fill(0);
                    c.queues[q].discard(offset, len as u64, i, ReqFlags::empty());
                }
                OpKind::WriteZeroes => {
                    shadow[off..off + len].fill(0);
                    let flags = if rng.below(2) == 0 {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    c.queues[q].write_zeroes(offset, len as u64, i, flags);
                }
            }
            per_queue[q] += 1;
        }
        for (q, n) in per_queue.iter().enumerate() {
            for (i, ret) in c.wait(q, *n) {
                let (_, at, kind, offset, len) = batch[i];
                assert_eq!(ret, 0, "{kind:?} {offset}+{len} failed: {ret}");
                if let OpKind::Read = kind {
                    let off = offset as usize;
                    assert!(
                        c.buf()[at..at + len] == shadow[off..off + len],
                        "read {offset}+{len} differs from the shadow copy"
                    );
                }
                counts[kind as usize] += 1;
            }
        }
        done += batch.len();
    }
    assert!(
        counts.iter().all(|n| *n > 0),
        "every kind exercised: {counts:?}"
    );
    drop(c);
    let mut backend = backend;
    assert_eq!(
        backend.wait_exit(Duration::from_secs(10)),
        Some(0),
        "exits when the frontend leaves"
    );
    assert!(
        backend.image_bytes() == shadow,
        "final image differs from the shadow copy"
    );
}

#[test]
fn ten_thousand_random_ops_match_shadow_copy() {
    random_ops("random", &[], 2, 10_000, 42, false);
}

#[test]
fn random_ops_with_thread_pool_engine() {
    random_ops("threads", &["--aio", "threads"], 2, 2_000, 7, true);
}

#[test]
fn random_ops_with_queue_polling() {
    random_ops("poll", &["--poll"], 2, 2_000, 11, false);
}

#[test]
fn random_ops_with_sync_engine() {
    random_ops("sync", &["--aio", "sync"], 1, 2_000, 8, false);
}

#[test]
fn random_ops_with_direct_io_and_bounce_buffers() {
    random_ops(
        "direct",
        &["--direct", "--aio", "io_uring"],
        2,
        2_000,
        9,
        true,
    );
}

#[test]
fn random_ops_with_direct_io_on_threads() {
    random_ops(
        "direct-threads",
        &["--direct", "--aio", "threads"],
        2,
        1_000,
        10,
        true,
    );
}

#[test]
fn read_only_device() {
    let image = random_image(MIB, 3);
    let backend = Backend::spawn("ro", &image, &["--readonly"]);
    // The device offers VIRTIO_BLK_F_RO: a read-write open is refused.
    let err = Client::connect(&backend, 1, false)
        .err()
        .expect("RO device opened read-write");
    assert!(
        err.message().to_lowercase().contains("read"),
        "{}",
        err.message()
    );
    drop(backend);

    let backend = Backend::spawn("ro2", &image, &["--readonly"]);
    let mut c = Client::connect(&backend, 1, true).expect("read-only connect");
    c.read(0, 4096, 0, 4096, 1);
    assert_eq!(c.one(0), 0);
    assert_eq!(&c.buf()[..4096], &image[4096..8192]);
    c.write(0, 0, 0, 512, 2);
    assert!(c.one(0) < 0);
    assert!(backend.image_bytes() == image);
}

#[test]
fn iops_limit_is_enforced() {
    let image = random_image(MIB, 4);
    let backend = Backend::spawn("iops", &image, &["--iops-total", "200"]);
    let mut c = Client::connect(&backend, 1, false).expect("connect");
    // 200 requests are the burst; 200 more need about a second.
    let start = Instant::now();
    for i in 0..400 {
        c.read(0, 0, 0, 512, i);
        assert_eq!(c.one(0), 0);
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "400 requests at 200/s took {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "throttle too slow: {elapsed:?}"
    );
}

#[test]
fn direct_io_bounce_budget_defers_large_misaligned_requests() {
    const LEN: usize = 8 * MIB;
    const N: usize = 8;
    let image = random_image(N * LEN, 21);
    let logs = common::TempDir::new("budget-log");
    let log = logs.0.join("blk.log");
    let backend = Backend::spawn(
        "budget",
        &image,
        &[
            "--direct",
            "--log-level",
            "debug",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect_sized(&backend, 1, false, N * LEN + 2 * MIB).expect("connect");
    // 64 MiB of misaligned writes in flight at once: twice the bounce budget.
    let data = random_image(N * LEN, 22);
    c.buf()[8..8 + N * LEN].copy_from_slice(&data);
    for i in 0..N {
        c.write(0, (i * LEN) as u64, 8 + i * LEN, LEN, i);
    }
    assert!(c.wait(0, N).iter().all(|(_, ret)| *ret == 0));
    c.buf().fill(0);
    for i in 0..N {
        c.read(0, (i * LEN) as u64, 8 + i * LEN, LEN, i);
    }
    assert!(c.wait(0, N).iter().all(|(_, ret)| *ret == 0));
    assert!(c.buf()[8..8 + N * LEN] == data[..], "read back differs");
    assert!(backend.image_bytes() == data, "image differs");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("request deferred"),
        "the budget was never reached"
    );
}
