//! Opening tap devices for flotilla-net: the gateway attaches to the tap (it may create it,
//! which needs CAP_NET_ADMIN) and hands the backend the descriptor, so the backend never
//! opens /dev/net/tun and needs no privilege. A tap the orchestrator passes (`fd=`, or a
//! `getfd` name) is checked to be what flotilla-net can drive.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// The flags flotilla-net needs on its tap.
const FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq() -> IfReq {
    IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    }
}

/// Attaches to (or creates) tap `ifname` with a virtio-net header.
pub fn open_tap(ifname: &str) -> std::io::Result<OwnedFd> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("'{ifname}' is not an interface name"),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq();
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    req.flags = FLAGS;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun.into())
}

/// Takes a duplicate of an inherited or passed tap descriptor after checking it is a tap
/// with the flags flotilla-net needs.
pub fn adopt_tap(fd: RawFd) -> std::io::Result<OwnedFd> {
    let mut req = ifreq();
    // SAFETY: TUNGETIFF writes into the ifreq we own; a non-tap fd fails with an errno.
    if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("descriptor {fd} is not a tap ({e})"),
        ));
    }
    if req.flags & FLAGS != FLAGS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "descriptor {fd} is a tap without IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {:#x})",
                req.flags
            ),
        ));
    }
    // SAFETY: dup of a valid descriptor; the copy is owned by the result.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_non_taps_are_refused() {
        assert!(open_tap("").is_err());
        assert!(open_tap("a-name-far-too-long").is_err());
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let e = adopt_tap(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("is not a tap"), "{e}");
    }
}
