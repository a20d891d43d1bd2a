//! The tap device: adopting an fd the parent opened, or opening one by name
//! for standalone use, and the few ioctls the data path needs.
//!
//! Every tap we serve must be `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with a
//! 12-byte vnet header (`virtio_net_hdr_v1`), so that frames pass between
//! guest memory and the tap unchanged. The fd is made non-blocking: the
//! receive side reads until EAGAIN and then waits in epoll.
//!
//! The header endianness is the host's (the tap's default unless
//! TUNSETVNETLE/BE is used); VERSION_1 headers are little-endian, so this
//! backend, like the rest of flotilla, assumes a little-endian host.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::header::HEADER_LEN;

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The inherited fd is not open.
    #[error("--tap-fd {fd}: {source}")]
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// The underlying error.
        source: io::Error,
    },
    /// The interface name does not fit IFNAMSIZ.
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    /// Opening /dev/net/tun failed.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(io::Error),
    /// An ioctl on the tap failed.
    #[error("{what} on the tap: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The tap was not created with the flags we need.
    #[error("tap {name} has flags {flags:#x}; IFF_TAP|IFF_NO_PI|IFF_VNET_HDR are required")]
    Flags {
        /// Interface name.
        name: String,
        /// What TUNGETIFF returned.
        flags: u16,
    },
}

/// The flags a tap must have.
const REQUIRED: u16 = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Adopts the tap fd `fd` handed over by the parent (`--tap-fd`),
    /// checking its flags with TUNGETIFF. The parent may keep its own copy:
    /// a restarted backend gets the same tap.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // Refuse fds that are not open before taking ownership of the number.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| TapError::BadFd {
            fd,
            source: e.into(),
        })?;
        // SAFETY: the fd is open (checked above) and was handed to this
        // process on its command line for this use; nothing else in the
        // program refers to it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = ifreq_named("")?;
        // SAFETY: TUNGETIFF writes a `struct ifreq` into ifr, which is one.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        check(r, "TUNGETIFF")?;
        // SAFETY: TUNGETIFF filled the name (NUL-terminated, IFNAMSIZ) and
        // the flags member of the union.
        let (name, flags) = unsafe {
            (
                CStr::from_ptr(ifr.ifr_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                ifr.ifr_ifru.ifru_flags as u16,
            )
        };
        if flags & REQUIRED != REQUIRED || flags & libc::IFF_TUN as u16 != 0 {
            return Err(TapError::Flags { name, flags });
        }
        let tap = Tap { fd, name };
        tap.prepare()?;
        Ok(tap)
    }

    /// Opens (or creates) the tap `name` through /dev/net/tun, for use
    /// without a supervisor (`--tap`). Needs CAP_NET_ADMIN unless the tap
    /// exists and belongs to the caller.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let fd = OwnedFd::from(file);
        let mut ifr = ifreq_named(name)?;
        if name.is_empty() {
            return Err(TapError::Name(name.into()));
        }
        ifr.ifr_ifru.ifru_flags = REQUIRED as libc::c_short;
        // SAFETY: TUNSETIFF reads and updates a `struct ifreq`, which ifr is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        check(r, "TUNSETIFF")?;
        let tap = Tap {
            fd,
            name: name.into(),
        };
        tap.prepare()?;
        Ok(tap)
    }

    /// Non-blocking, 12-byte vnet header, no offloads until the driver
    /// acks some.
    fn prepare(&self) -> Result<(), TapError> {
        let raw = self.fd.as_raw_fd();
        let fl =
            nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| TapError::Ioctl {
                what: "F_GETFL",
                source: e.into(),
            })?;
        let fl = nix::fcntl::OFlag::from_bits_retain(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(|e| TapError::Ioctl {
            what: "F_SETFL",
            source: e.into(),
        })?;
        let size = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let r = unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &size) };
        check(r, "TUNSETVNETHDRSZ")?;
        self.set_offload(0)
    }

    /// Tells the tap which offloads the guest accepts (TUN_F_* bits): what
    /// it may hand us without checksum or unsegmented.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        check(r, "TUNSETOFFLOAD")
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header first) into `iov`.
    ///
    /// A single iovec (touching receive buffers merged into one) is read with `read(2)`:
    /// `readv` first copies in and checks the iovec array, ~0.1 µs of a 1514-byte frame's
    /// ~2 µs on this machine.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = if let [one] = iov {
            // SAFETY: the iovec points into memory the caller keeps mapped and writable
            // for the duration of the call (guest memory it holds a reference to, or its
            // own buffer).
            unsafe { libc::read(self.fd.as_raw_fd(), one.iov_base, one.iov_len) }
        } else {
            let cnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec points into memory the caller keeps mapped and
            // writable for the duration of the call (guest memory it holds a
            // reference to, or its own buffer).
            unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), cnt) }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (vnet header first) gathered from `iov`; a single iovec (Linux
    /// puts the header in front of a linear frame) with `write(2)`, as [`Self::readv`].
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = if let [one] = iov {
            // SAFETY: the iovec points into memory the caller keeps mapped for the
            // duration of the call; the kernel only reads it.
            unsafe { libc::write(self.fd.as_raw_fd(), one.iov_base, one.iov_len) }
        } else {
            let cnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec points into memory the caller keeps mapped for
            // the duration of the call; the kernel only reads it.
            unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), cnt) }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn ifreq_named(name: &str) -> Result<libc::ifreq, TapError> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
        return Err(TapError::Name(name.into()));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn check(r: libc::c_int, what: &'static str) -> Result<(), TapError> {
    if r < 0 {
        Err(TapError::Ioctl {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_ifnamsiz() {
        assert!(ifreq_named("tap0").is_ok());
        assert!(ifreq_named("123456789012345").is_ok());
        assert!(matches!(
            ifreq_named("1234567890123456"),
            Err(TapError::Name(_))
        ));
        assert!(matches!(ifreq_named("a\0b"), Err(TapError::Name(_))));
    }

    #[test]
    fn non_taps_are_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::IntoRawFd;
        let fd = a.into_raw_fd();
        assert!(matches!(
            Tap::from_fd(fd),
            Err(TapError::Ioctl {
                what: "TUNGETIFF",
                ..
            })
        ));
        assert!(matches!(Tap::from_fd(987_654), Err(TapError::BadFd { .. })));
    }
}
