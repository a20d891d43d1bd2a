//! A minimal ELF64 "kernel" for tests that need a VM but no real guest: a few bytes of code
//! loaded at 1 MiB, entered in 64-bit mode. A handful of instructions run even on a
//! `/dev/kvm` that cannot boot Linux (PVM), so such tests run on any host.

use std::path::{Path, PathBuf};

/// Where the code is loaded and entered.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// `jmp .`: spins forever.
pub const SPIN: &[u8] = &[0xeb, 0xfe];

/// The bytes of an ELF64 executable with one PT_LOAD segment holding `code` at
/// [`LOAD_ADDRESS`], which is also its entry point.
pub fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // entry
    elf.extend_from_slice(&EHDR.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for v in [EHDR + PHDR, LOAD_ADDRESS, LOAD_ADDRESS, len, len, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Writes [`tiny_kernel`]`(code)` to `dir/name` and returns the path.
pub fn write_tiny_kernel(dir: &Path, name: &str, code: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, tiny_kernel(code))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let elf = tiny_kernel(SPIN);
        assert_eq!(elf.len(), 64 + 56 + 2);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(&elf[120..], SPIN);
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            LOAD_ADDRESS
        );
    }
}
