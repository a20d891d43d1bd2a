//! The image file: opening it (or adopting the parent's fd), its geometry,
//! and the synchronous metadata operations (discard, write-zeroes).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, OFlag};

use crate::request::SECTOR_SIZE;
use crate::{Error, Result};

/// How to get at the image.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Image path; with `fd` only a name for messages.
    pub path: PathBuf,
    /// Already-open image fd from the parent (`--image-fd`); the backend
    /// then opens nothing itself, which is what lets it run jailed.
    pub fd: Option<RawFd>,
    /// Refuse writes.
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
}

/// An open raw image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
    align: usize,
}

impl Disk {
    /// Opens the image (or adopts `fd`) as `opts` says.
    pub fn open(opts: &DiskOptions) -> Result<Disk> {
        let ctx = |what: &'static str| {
            let path = opts.path.clone();
            move |source: std::io::Error| Error::Image { path, what, source }
        };
        let file = match opts.fd {
            Some(fd) => adopt_fd(fd, opts).map_err(ctx("use --image-fd"))?,
            None => {
                let mut o = OpenOptions::new();
                o.read(true).write(!opts.readonly);
                if opts.direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                o.open(&opts.path).map_err(ctx("open"))?
            }
        };
        let meta = file.metadata().map_err(ctx("stat"))?;
        let is_blockdev = meta.file_type().is_block_device();
        if !meta.is_file() && !is_blockdev {
            return Err(Error::Image {
                path: opts.path.clone(),
                what: "use",
                source: std::io::Error::other("not a regular file or block device"),
            });
        }
        // Works for files and block devices alike.
        let size = (&file).seek(SeekFrom::End(0)).map_err(ctx("size"))?;
        let align = if opts.direct {
            logical_block_size(&file, is_blockdev).map_err(ctx("query block size"))?
        } else {
            SECTOR_SIZE as usize
        };
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "{}: size {size} is not a multiple of 512; the last {} bytes are not visible",
                opts.path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Disk {
            file,
            path: opts.path.clone(),
            size,
            readonly: opts.readonly,
            direct: opts.direct,
            align,
        })
    }

    /// The image name for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the image bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Alignment O_DIRECT needs for offsets, lengths and buffer addresses
    /// (512 without `--direct`, where nothing needs aligning).
    pub fn align(&self) -> usize {
        self.align
    }

    /// The raw fd, for the I/O engines.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Deallocates a range. Reads of it return zeroes afterwards on the
    /// filesystems and block devices we use, but the driver may not rely on
    /// that (it has write-zeroes for it).
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes a range; with `unmap` the blocks may be deallocated.
    ///
    /// Punching a hole reads back as zeroes on files and (since Linux 4.9)
    /// block devices, so it serves "zero and unmap"; ZERO_RANGE keeps the
    /// blocks allocated. Where neither is supported we write zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        let mode = if unmap {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_by_hand(offset, len)
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> std::io::Result<()> {
        let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
        fallocate(self.file.as_raw_fd(), mode, off, len).map_err(std::io::Error::from)
    }

    fn write_zeroes_by_hand(&self, mut offset: u64, len: u64) -> std::io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut zeroes = AlignedBuf::new(CHUNK.min(len as usize), self.align);
        zeroes.as_mut_slice().fill(0);
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn adopt_fd(fd: RawFd, opts: &DiskOptions) -> std::io::Result<File> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let mode = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
    if !opts.readonly && mode == OFlag::O_RDONLY {
        return Err(std::io::Error::other(
            "fd is open read-only but --readonly was not given",
        ));
    }
    // SAFETY: the fd is open (F_GETFL succeeded) and was handed to this
    // process on its command line for its exclusive use; no other owner
    // exists that could close it or use it after us.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if opts.direct {
        let with_direct = OFlag::from_bits_truncate(flags) | OFlag::O_DIRECT;
        fcntl(owned.as_raw_fd(), FcntlArg::F_SETFL(with_direct)).map_err(std::io::Error::from)?;
    }
    Ok(File::from(owned))
}

/// The block size O_DIRECT must respect: the logical block size for block
/// devices; 512 for files, which every Linux filesystem on a 512e device
/// accepts (4Kn devices are block devices here, or need a files-on-4Kn
/// option we do not have yet).
fn logical_block_size(file: &File, is_blockdev: bool) -> std::io::Result<usize> {
    if !is_blockdev {
        return Ok(SECTOR_SIZE as usize);
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to
    // a live local of that type; the fd is owned by `file`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(size).unwrap_or(512).max(512))
}

/// A heap buffer whose start is aligned as O_DIRECT needs.
///
/// Allocated as an over-sized `Vec<u8>` and used from the first aligned
/// byte, which needs no unsafe allocation code; the vector is never resized,
/// so the address stays put while the kernel uses it.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting at a multiple of `align`
    /// (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The usable bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("img");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0xaa; len]).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = nix::unistd::mkdtemp(&std::env::temp_dir().join("flotilla-disk.XXXXXX"))
                    .unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn opts(path: &Path) -> DiskOptions {
        DiskOptions {
            path: path.to_path_buf(),
            fd: None,
            readonly: false,
            direct: false,
        }
    }

    #[test]
    fn size_discard_write_zeroes() {
        let (_d, path) = image(1 << 20);
        let disk = Disk::open(&opts(&path)).unwrap();
        assert_eq!(disk.sectors(), 2048);
        disk.discard(4096, 4096).unwrap();
        disk.write_zeroes(65536, 512, false).unwrap();
        disk.write_zeroes(131072, 1024, true).unwrap();
        disk.write_zeroes_by_hand(200_000, 3000).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(data[4096..8192].iter().all(|b| *b == 0));
        assert!(data[65536..66048].iter().all(|b| *b == 0));
        assert_eq!(data[66048], 0xaa);
        assert!(data[131072..132096].iter().all(|b| *b == 0));
        assert!(data[200_000..203_000].iter().all(|b| *b == 0));
        assert_eq!(data[203_000], 0xaa);
        assert_eq!(data[4095], 0xaa);
    }

    #[test]
    fn image_fd_is_adopted_and_access_mode_checked() {
        let (_d, path) = image(4096);
        let ro = File::open(&path).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(ro);
        let mut o = opts(Path::new("named-only"));
        o.fd = Some(fd);
        // Read-only fd without --readonly is refused (and the fd not taken).
        assert!(Disk::open(&o).is_err());
        o.readonly = true;
        let disk = Disk::open(&o).unwrap();
        assert_eq!(disk.sectors(), 8);
        assert!(disk.readonly());
        assert_eq!(disk.path(), Path::new("named-only"));
    }

    #[test]
    fn missing_image_is_an_error_with_context() {
        let e = Disk::open(&opts(Path::new("/nonexistent/flotilla.img"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/flotilla.img"), "{e}");
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for align in [512usize, 4096] {
            let mut b = AlignedBuf::new(10_000, align);
            assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
            assert_eq!(b.len(), 10_000);
            b.as_mut_slice()[9_999] = 1;
        }
    }
}
