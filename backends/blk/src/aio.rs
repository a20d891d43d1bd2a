//! Asynchronous data I/O: reads, writes and flushes, submitted by a queue
//! thread and completed later, so one queue keeps many requests in flight.
//!
//! Three engines behind one trait, picked with `--aio`:
//! - `io_uring` (and `native`, see [`AioMode`]): the kernel's asynchronous
//!   interface; the ring's eventfd wakes the queue thread.
//! - `threads`: a few helper threads per queue doing blocking
//!   `preadv`/`pwritev`/`fdatasync`; for kernels or sandboxes without
//!   io_uring.
//! - `sync`: the queue thread does the I/O itself; simplest, one request at
//!   a time per queue. Useful for debugging and as a reference.
//!
//! Buffers are raw `iovec`s into guest memory or bounce buffers. The queue
//! thread keeps both alive (an `Arc` of the guest memory mapping, the bounce
//! buffer) until the completion for that token is reaped; that is the
//! contract of [`Engine::submit`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The `--aio` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AioMode {
    /// io_uring if the kernel allows it, else threads.
    Auto,
    /// io_uring.
    #[value(name = "io_uring")]
    IoUring,
    /// Same engine as io_uring: QEMU's "native" means the kernel's own
    /// asynchronous interface, which on current kernels is io_uring (legacy
    /// Linux AIO is only asynchronous with O_DIRECT and is not worth a
    /// second engine).
    Native,
    /// A small thread pool per queue doing blocking I/O.
    Threads,
    /// Blocking I/O on the queue thread.
    Sync,
}

impl AioMode {
    /// Resolves `Auto` by probing io_uring once.
    pub fn resolve(self) -> AioMode {
        match self {
            AioMode::Auto if io_uring_available() => AioMode::IoUring,
            AioMode::Auto => AioMode::Threads,
            AioMode::Native => AioMode::IoUring,
            other => other,
        }
    }
}

/// Whether this kernel (and seccomp policy) lets us create an io_uring.
pub fn io_uring_available() -> bool {
    IoUring::new(2).is_ok()
}

/// One data operation.
pub enum Op {
    /// Read into the buffers from byte `offset`.
    Read {
        /// Byte offset into the image.
        offset: u64,
        /// Destination buffers.
        iov: Vec<libc::iovec>,
    },
    /// Write the buffers at byte `offset`.
    Write {
        /// Byte offset into the image.
        offset: u64,
        /// Source buffers.
        iov: Vec<libc::iovec>,
    },
    /// fdatasync.
    Flush,
}

// SAFETY: an `Op` only carries addresses of buffers that the submitting
// queue thread keeps alive until the op's completion is reaped (see
// `Engine::submit`); nothing dereferences them in user space except the
// engine doing the I/O, so moving them to a helper thread is sound.
unsafe impl Send for Op {}

impl Op {
    fn expected(&self) -> usize {
        match self {
            Op::Read { iov, .. } | Op::Write { iov, .. } => iov.iter().map(|v| v.iov_len).sum(),
            Op::Flush => 0,
        }
    }
}

/// A finished operation: bytes transferred or the error.
#[derive(Debug)]
pub struct Completion {
    /// The token given to `submit`.
    pub token: u64,
    /// Bytes transferred (always the full length when `Ok`).
    pub result: io::Result<usize>,
}

/// An I/O engine owned by one queue thread.
pub trait Engine: Send {
    /// Starts `op`; its completion is later returned by `reap` with `token`.
    ///
    /// The caller keeps every buffer the op points to alive and untouched
    /// until then.
    fn submit(&mut self, token: u64, op: Op) -> io::Result<()>;
    /// Hands batched submissions to the kernel.
    fn commit(&mut self) -> io::Result<()>;
    /// The fd that becomes readable when completions are ready, if any
    /// (`sync` completes inside `submit` and has none).
    fn completion_fd(&self) -> Option<RawFd>;
    /// Moves finished operations to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

/// Creates the engine for `mode` (already resolved) on image `fd`.
pub fn new_engine(mode: AioMode, fd: RawFd, depth: u32) -> io::Result<Box<dyn Engine>> {
    Ok(match mode.resolve() {
        AioMode::IoUring | AioMode::Native | AioMode::Auto => Box::new(Uring::new(fd, depth)?),
        AioMode::Threads => Box::new(ThreadPool::new(fd, THREADS_PER_QUEUE)?),
        AioMode::Sync => Box::new(Blocking::new(fd)),
    })
}

/// Finishes `op` with blocking calls, starting `done` bytes in; used by the
/// thread engines and to complete short io_uring transfers.
fn run_blocking(fd: RawFd, op: &Op, mut done: usize) -> io::Result<usize> {
    let (offset, iov, write) = match op {
        Op::Flush => {
            // SAFETY: fdatasync takes no pointers; `fd` stays open for the
            // engine's lifetime (the Disk outlives every queue thread).
            return match unsafe { libc::fdatasync(fd) } {
                0 => Ok(0),
                _ => Err(io::Error::last_os_error()),
            };
        }
        Op::Read { offset, iov } => (*offset, iov, false),
        Op::Write { offset, iov } => (*offset, iov, true),
    };
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    while done < total {
        // Rebuild the iovec list from `done` on.
        let mut skip = done;
        let mut rest = Vec::with_capacity(iov.len());
        for v in iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            rest.push(libc::iovec {
                iov_base: (v.iov_base as usize + skip) as *mut libc::c_void,
                iov_len: v.iov_len - skip,
            });
            skip = 0;
        }
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = (offset + done as u64) as libc::off_t;
        // SAFETY: `rest` points into buffers the submitter keeps alive until
        // completion (Engine::submit contract); the kernel checks the
        // addresses and fails with EFAULT rather than faulting us.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), cnt, off)
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// How many helper threads the `threads` engine runs per queue.
pub const THREADS_PER_QUEUE: usize = 4;

/// Blocking I/O on the caller's thread.
struct Blocking {
    fd: RawFd,
    done: Vec<Completion>,
}

impl Blocking {
    fn new(fd: RawFd) -> Self {
        Blocking {
            fd,
            done: Vec::new(),
        }
    }
}

impl Engine for Blocking {
    fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        let result = run_blocking(self.fd, &op, 0);
        self.done.push(Completion { token, result });
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }
}

/// Helper threads fed through a channel; completions come back through a
/// shared list and an eventfd.
struct ThreadPool {
    tx: Option<mpsc::Sender<(u64, Op)>>,
    done: Arc<Mutex<Vec<Completion>>>,
    event: Arc<EventFd>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl ThreadPool {
    fn new(fd: RawFd, threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(u64, Op)>();
        let rx = Arc::new(Mutex::new(rx));
        let done = Arc::new(Mutex::new(Vec::new()));
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, done, event) = (rx.clone(), done.clone(), event.clone());
            workers.push(thread::Builder::new().name(format!("blk-io{i}")).spawn(
                move || loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((token, op)) = next else { return };
                    let result = run_blocking(fd, &op, 0);
                    drop(op);
                    done.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Completion { token, result });
                    if let Err(e) = event.write(1) {
                        log::error!("threads engine: cannot signal completion: {e}");
                    }
                },
            )?);
        }
        Ok(ThreadPool {
            tx: Some(tx),
            done,
            event,
            workers,
        })
    }
}

impl Engine for ThreadPool {
    fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(|| io::Error::other("engine stopped"))?
            .send((token, op))
            .map_err(|_| io::Error::other("I/O threads exited"))
    }
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Drain the counter first so a completion pushed after the drain
        // re-arms the eventfd for the next wakeup.
        let _ = self.event.read();
        out.append(&mut self.done.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// io_uring with an eventfd registered for completions.
struct Uring {
    ring: IoUring,
    fd: RawFd,
    event: EventFd,
    /// Ops in flight, kept here so their iovec arrays stay put.
    ops: HashMap<u64, Op>,
    /// Completions produced without the kernel (submission errors, short
    /// transfers finished by hand).
    ready: Vec<Completion>,
}

impl Uring {
    fn new(fd: RawFd, depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(depth.next_power_of_two().max(8))?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Uring {
            ring,
            fd,
            event,
            ops: HashMap::new(),
            ready: Vec::new(),
        })
    }
}

impl Engine for Uring {
    fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        let target = types::Fd(self.fd);
        let entry = match &op {
            Op::Read { offset, iov } => {
                { opcode::Readv::new(target, iov.as_ptr(), iov.len() as u32).offset(*offset) }
                    .build()
            }
            Op::Write { offset, iov } => {
                { opcode::Writev::new(target, iov.as_ptr(), iov.len() as u32).offset(*offset) }
                    .build()
            }
            Op::Flush => opcode::Fsync::new(target)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(token);
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: the entry points at `op`'s iovec array, which moves into
        // `self.ops` below (a Vec's heap buffer does not move with it) and
        // stays there until the completion is reaped; the buffers it lists
        // are kept alive by the submitter (Engine::submit contract).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        self.ops.insert(token, op);
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EBUSY: the completion queue is full; the caller reaps and
                // the next commit retries.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.event.read();
        out.append(&mut self.ready);
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in finished {
            let Some(op) = self.ops.remove(&token) else {
                log::error!("io_uring: completion for unknown token {token}");
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if (res as usize) < op.expected() {
                // Short transfer (signal, page-cache pressure): finish it here.
                run_blocking(self.fd, &op, res as usize)
            } else {
                Ok(res as usize)
            };
            out.push(Completion { token, result });
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Wait for the kernel to finish with buffers we promised to keep alive.
        while !self.ops.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let mut sink = Vec::new();
            self.reap(&mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    fn wait_all(engine: &mut dyn Engine, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.len() < n {
            engine.reap(&mut out);
            assert!(std::time::Instant::now() < deadline, "I/O timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out
    }

    fn exercise(mode: AioMode) {
        let mut f = tempfile();
        f.write_all(&[7u8; 8192]).unwrap();
        let mut engine = new_engine(mode, f.as_raw_fd(), 16).unwrap();
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        engine
            .submit(
                1,
                Op::Write {
                    offset: 512,
                    iov: vec![iov(&mut a), iov(&mut b)],
                },
            )
            .unwrap();
        engine.commit().unwrap();
        let done = wait_all(engine.as_mut(), 1);
        assert_eq!(done[0].token, 1);
        assert_eq!(done[0].result.as_ref().unwrap(), &1536);

        let mut r = vec![0u8; 2048];
        engine
            .submit(
                2,
                Op::Read {
                    offset: 0,
                    iov: vec![iov(&mut r)],
                },
            )
            .unwrap();
        engine.submit(3, Op::Flush).unwrap();
        engine.commit().unwrap();
        let mut done = wait_all(engine.as_mut(), 2);
        done.sort_by_key(|c| c.token);
        assert_eq!(done[0].result.as_ref().unwrap(), &2048);
        assert!(done[1].result.is_ok());
        assert_eq!(&r[..512], &[7u8; 512][..]);
        assert_eq!(&r[512..1024], &[1u8; 512][..]);
        assert_eq!(&r[1024..2048], &[2u8; 1024][..]);

        // Reading past the end of the file is an error, not a hang.
        let mut past = vec![0u8; 512];
        engine
            .submit(
                4,
                Op::Read {
                    offset: 1 << 20,
                    iov: vec![iov(&mut past)],
                },
            )
            .unwrap();
        engine.commit().unwrap();
        let done = wait_all(engine.as_mut(), 1);
        assert!(done[0].result.is_err());
        let mut check = [0u8; 1];
        f.read_exact_at(&mut check, 600).unwrap();
        assert_eq!(check[0], 1);
    }

    fn tempfile() -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "flotilla-aio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn sync_engine() {
        exercise(AioMode::Sync);
    }

    #[test]
    fn threads_engine() {
        exercise(AioMode::Threads);
    }

    #[test]
    fn io_uring_engine() {
        // The test machines run kernels with io_uring; a sandbox that
        // forbids it must fail this test loudly rather than skip it.
        assert!(io_uring_available(), "io_uring is not available here");
        exercise(AioMode::IoUring);
    }

    #[test]
    fn auto_prefers_io_uring() {
        let expected = if io_uring_available() {
            AioMode::IoUring
        } else {
            AioMode::Threads
        };
        assert_eq!(AioMode::Auto.resolve(), expected);
        assert_eq!(AioMode::Native.resolve(), AioMode::IoUring);
    }
}
