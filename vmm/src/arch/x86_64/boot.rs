//! The Linux x86 boot protocol: load a bzImage or ELF vmlinux, the initrd and the command
//! line, and fill the zero page (`boot_params`) with the e820 map and the RSDP address.
//!
//! The vCPU then enters the kernel's 64-bit entry point directly (no firmware), as Firecracker
//! and Cloud Hypervisor do.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use crate::vstate::memory::{GuestMemory, RamRange};

/// `boot_params.hdr.header` magic ("HdrS").
const HDR_MAGIC: u32 = 0x5372_6448;
/// `boot_params.hdr.boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// xloadflags bit: the kernel has a 64-bit entry point at offset 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// Default `initrd_addr_max` for old headers.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} '{path}': {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel image is neither a valid bzImage nor a valid ELF vmlinux.
    #[error("'{path}' is not a bootable x86_64 kernel: {reason}")]
    BadKernel {
        /// The path.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The initrd does not fit below the 32-bit MMIO gap and above the kernel.
    #[error("initrd '{path}' ({size} bytes) does not fit in guest memory")]
    InitrdTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is too long or contains invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the boot {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Where the kernel was loaded and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// A kernel or initrd file, opened once at start-up and kept: a reset reloads the guest from
/// the same open file (even if its path has since changed), and the core opens nothing after
/// set-up.
pub struct BootImage {
    what: &'static str,
    path: PathBuf,
    file: File,
}

impl BootImage {
    /// Opens `path`; `what` ("kernel", "initrd") names it in errors.
    pub fn open(what: &'static str, path: &Path) -> Result<Self, BootError> {
        let file = File::open(path).map_err(|source| BootError::Read {
            what,
            path: path.into(),
            source,
        })?;
        Ok(BootImage {
            what,
            path: path.into(),
            file,
        })
    }

    fn read_err(&self, source: std::io::Error) -> BootError {
        BootError::Read {
            what: self.what,
            path: self.path.clone(),
            source,
        }
    }

    /// The file, positioned at its start.
    fn rewound(&mut self) -> Result<&mut File, BootError> {
        match self.file.seek(SeekFrom::Start(0)) {
            Ok(_) => Ok(&mut self.file),
            Err(e) => Err(self.read_err(e)),
        }
    }
}

/// Loads a bzImage or ELF vmlinux at 1 MiB.
pub fn load_kernel(memory: &GuestMemory, image: &mut BootImage) -> Result<LoadedKernel, BootError> {
    let path = image.path.clone();
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.clone(),
        source,
    };
    let bad = |reason: String| BootError::BadKernel {
        path: path.clone(),
        reason,
    };
    let file = image.rewound()?;
    let mut magic = [0u8; 4];
    let is_elf = match file.read_exact(&mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(bad("file is too short".into()))
        }
        Err(e) => return Err(read_err(e)),
    };
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let himem = Some(GuestAddress(HIMEM_START));
    if is_elf {
        let result =
            loader::Elf::load(memory, None, file, himem).map_err(|e| bad(format!("ELF: {e}")))?;
        return Ok(LoadedKernel {
            entry: result.kernel_load,
            end: result.kernel_end,
            setup_header: None,
        });
    }
    let result = loader::BzImage::load(memory, None, file, himem)
        .map_err(|e| bad(format!("bzImage: {e}")))?;
    let header = result
        .setup_header
        .ok_or_else(|| bad("bzImage without setup header".into()))?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            "bzImage has no 64-bit entry point (XLF_KERNEL_64 unset)".into(),
        ));
    }
    Ok(LoadedKernel {
        entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
        end: result.kernel_end,
        setup_header: Some(header),
    })
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the top of low RAM, page aligned, above the kernel.
pub fn load_initrd(
    memory: &GuestMemory,
    ranges: &[RamRange],
    kernel: &LoadedKernel,
    image: &mut BootImage,
) -> Result<LoadedInitrd, BootError> {
    let path = image.path.clone();
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.clone(),
        source,
    };
    let file = image.rewound()?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let low_end = ranges
        .first()
        .map(|r| r.start + r.len)
        .unwrap_or(0)
        .min(addr_max + 1);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end && size > 0)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.clone(),
            size,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        path: path.clone(),
        size,
    })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn load_cmdline(memory: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let mut c = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} ({} bytes)", cmdline.len())))?;
    loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &c)
        .map_err(|_| BootError::GuestWrite("command line"))
}

/// The e820 map: low RAM up to the EBDA, the legacy BIOS area reserved, then every RAM range.
pub fn e820_map(ranges: &[RamRange]) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in ranges {
        let start = r.start.max(HIMEM_START);
        let end = r.start + r.len;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// `boot_params` with the `ByteValued` marker vm-memory needs to write it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: `boot_params` is a plain-old-data C struct (integers and arrays of them); every byte
// pattern is a valid value.
unsafe impl ByteValued for ZeroPage {}

/// Fills and writes the zero page.
pub fn write_zero_page(
    memory: &GuestMemory,
    ranges: &[RamRange],
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = RSDP_START;
    let map = e820_map(ranges);
    if map.len() > params.e820_table.len() {
        return Err(BootError::GuestWrite("e820 map (too many entries)"));
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    memory
        .write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestWrite("zero page"))?;
    debug_assert!(memory
        .check_address(GuestAddress(ZERO_PAGE_START))
        .is_some());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{ram_ranges, GuestRam};
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("flotilla-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn e820_has_holes_for_bios_and_mmio_gap() {
        let map = e820_map(&ram_ranges(4096 * MIB));
        let spans: Vec<_> = map
            .iter()
            .map(|e| (e.addr, e.addr + e.size, e.r#type))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START, E820_RESERVED),
                (HIMEM_START, MMIO_GAP_START, E820_RAM),
                (MMIO_GAP_END, MMIO_GAP_END + 1024 * MIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn garbage_and_truncated_kernels_are_refused() {
        let ram = GuestRam::new(256 * MIB).unwrap();
        for (name, bytes) in [
            ("empty", &b""[..]),
            ("short", &b"MZ"[..]),
            ("garbage", &[0x5a; 8192][..]),
            ("elf-header-only", &b"\x7fELF\x02\x01\x01\0"[..]),
        ] {
            let path = temp_file(name, bytes);
            let err = load_kernel(&ram.memory, &mut BootImage::open("kernel", &path).unwrap())
                .unwrap_err();
            assert!(matches!(err, BootError::BadKernel { .. }), "{name}: {err}");
            std::fs::remove_file(path).unwrap();
        }
        let err = BootImage::open("kernel", Path::new("/nonexistent/vmlinuz"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let ram = GuestRam::new(256 * MIB).unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            end: 20 * MIB,
            setup_header: None,
        };
        let path = temp_file("initrd", &[7u8; 10_000]);
        let mut image = BootImage::open("initrd", &path).unwrap();
        let initrd = load_initrd(&ram.memory, &ram.ranges, &kernel, &mut image).unwrap();
        assert_eq!(initrd.size, 10_000);
        assert_eq!(initrd.addr % 4096, 0);
        assert!(initrd.addr + initrd.size <= 256 * MIB && initrd.addr >= 256 * MIB - 16384);
        assert_eq!(
            ram.memory
                .read_obj::<u8>(GuestAddress(initrd.addr + 9_999))
                .unwrap(),
            7
        );
        // An initrd that would overlap the kernel is refused, not truncated.
        let big = LoadedKernel {
            end: 256 * MIB - 4096,
            ..kernel
        };
        assert!(load_initrd(&ram.memory, &ram.ranges, &big, &mut image).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn cmdline_limits() {
        let ram = GuestRam::new(256 * MIB).unwrap();
        load_cmdline(&ram.memory, "console=ttyS0 reboot=k").unwrap();
        let mut buf = [0u8; 23];
        ram.memory
            .read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k\0");
        assert!(load_cmdline(&ram.memory, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }
}
