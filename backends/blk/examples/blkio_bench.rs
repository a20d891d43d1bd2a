//! Host-level throughput check of a running vhost-user-blk backend through
//! libblkio: random reads or writes at a fixed queue depth, one thread per
//! queue, for a fixed time.
//!
//! ```text
//! flotilla-blk --socket-path /tmp/b.sock --image disk.img --num-queues 2 &
//! cargo run --release -p flotilla-blk --example blkio_bench -- \
//!     /tmp/b.sock --queues 2 --depth 32 --bs 4096 --seconds 10 --rw randread|randwrite|read
//! ```
//!
//! It measures the backend and the vhost-user data path without a guest:
//! no VM exits, no guest block layer. Compare engines by restarting the
//! backend with another `--aio`.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

struct Opts {
    socket: String,
    queues: usize,
    depth: usize,
    bs: usize,
    seconds: u64,
    write: bool,
    sequential: bool,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        socket: args.next().ok_or("usage: blkio_bench SOCKET [--queues N] [--depth N] [--bs BYTES] [--seconds S] [--rw randread|randwrite]")?,
        queues: 1,
        depth: 32,
        bs: 4096,
        seconds: 10,
        write: false,
        sequential: false,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--queues" => o.queues = num()? as usize,
            "--depth" => o.depth = num()? as usize,
            "--bs" => o.bs = num()? as usize,
            "--seconds" => o.seconds = num()?,
            "--rw" => match value.as_str() {
                "randread" => {}
                "randwrite" => o.write = true,
                "read" => o.sequential = true,
                other => {
                    return Err(format!(
                        "--rw {other}: expected randread, randwrite or read"
                    ))
                }
            },
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.bs == 0 || o.bs % 512 != 0 || o.depth == 0 || o.queues == 0 {
        return Err("--bs must be a non-zero multiple of 512; --depth and --queues > 0".into());
    }
    Ok(o)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = parse()?;
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &o.socket)?;
    b.connect()?;
    b.set_i32("num-queues", o.queues as i32)?;
    let started = b.start()?;
    let capacity = b.get_u64("capacity")?;
    let blocks = capacity / o.bs as u64;
    if blocks == 0 {
        return Err("disk smaller than one block".into());
    }
    let per_queue = o.depth * o.bs;
    let region = b.alloc_mem_region((per_queue * o.queues).next_multiple_of(2 << 20))?;
    b.map_mem_region(&region)?;
    let deadline = Instant::now() + Duration::from_secs(o.seconds);

    let results: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(qi, mut q)| {
                let base = region.addr + qi * per_queue;
                let (depth, bs, write, sequential) = (o.depth, o.bs, o.write, o.sequential);
                s.spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (qi as u64 + 1);
                    let mut cursor = qi as u64 * (blocks / 8);
                    let mut next = move || {
                        if sequential {
                            cursor = (cursor + 1) % blocks;
                            return cursor;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    };
                    let submit = |q: &mut blkio::Blkioq, slot: usize, lba: u64| {
                        let buf = (base + slot * bs) as *mut u8;
                        if write {
                            q.write(lba * bs as u64, buf, bs, slot, ReqFlags::empty());
                        } else {
                            q.read(lba * bs as u64, buf, bs, slot, ReqFlags::empty());
                        }
                    };
                    for slot in 0..depth {
                        submit(&mut q, slot, next());
                    }
                    let mut comps: Vec<MaybeUninit<Completion>> =
                        (0..depth).map(|_| MaybeUninit::uninit()).collect();
                    let mut done = 0u64;
                    let mut outstanding = depth;
                    while outstanding > 0 {
                        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
                        for c in &comps[..n] {
                            // SAFETY: do_io initialised the first n entries.
                            let c = unsafe { c.assume_init_ref() };
                            assert_eq!(c.ret, 0, "request failed: {}", c.ret);
                            done += 1;
                            if Instant::now() < deadline {
                                submit(&mut q, c.user_data, next());
                            } else {
                                outstanding -= 1;
                            }
                        }
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });
    let total: u64 = results.iter().sum();
    let secs = o.seconds as f64;
    println!(
        "{} {} B x QD{} x {} queue(s): {:.0} IOPS, {:.1} MiB/s",
        if o.write {
            "randwrite"
        } else if o.sequential {
            "read"
        } else {
            "randread"
        },
        o.bs,
        o.depth,
        o.queues,
        total as f64 / secs,
        total as f64 * o.bs as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}
