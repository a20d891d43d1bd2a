//! Where things are: the workspace, cargo's target directory, the image
//! cache and the binaries under test.
//!
//! Paths are the same on the host and inside the L1 VM (it mounts the host's
//! root), so these are usable verbatim in commands run through `KvmHost`.

use std::path::{Path, PathBuf};

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The `tests/` package directory.
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/cache/`: downloaded packages and built images (gitignored).
pub fn cache_dir() -> PathBuf {
    tests_dir().join("cache")
}

/// Cargo's profile directory holding the workspace binaries (`target/debug`
/// or `target/release`).
///
/// Found from the running executable so a release or custom-target-dir build
/// tests its own binaries: integration tests live in `<profile>/deps/`,
/// examples in `<profile>/examples/`. Falls back to `$CARGO_TARGET_DIR/debug`
/// or `<workspace>/target/debug`.
pub fn profile_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "deps" || name == "examples" {
                if let Some(profile) = dir.parent() {
                    return profile.to_path_buf();
                }
            }
        }
    }
    target_dir().join("debug")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else the parent of
/// [`profile_dir`] when running from cargo's output, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/{deps,examples}/<exe>
        if let Some(target) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            if target.join("CACHEDIR.TAG").exists() {
                return target.to_path_buf();
            }
        }
    }
    workspace_root().join("target")
}

/// Scratch directory for harness logs (L1 console logs, ...): `<target>/flotilla-tests`.
pub fn log_dir() -> PathBuf {
    target_dir().join("flotilla-tests")
}

/// Removes entries of `dir` not modified for `max_age`, so per-process logs
/// and scratch directories do not pile up run after run. Best effort: a file
/// another process is still using is young, and errors are ignored.
pub fn prune_older_than(dir: &Path, max_age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > max_age);
        if old {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// The workspace programs a test may start (the gateway finds its siblings next to itself).
const PROGRAMS: &[&str] = &[
    "flotilla",
    "flotilla-vmm",
    "flotilla-blk",
    "flotilla-net",
    "flotilla-balloon",
];

/// This test process's private copy of the workspace programs.
///
/// Why a copy: the KVM host VM reads the host's files over 9p while a test runs, and a
/// `cargo build` elsewhere (another test binary, a developer) replaces `target/<profile>/*`
/// under it; the running program then faults (SIGSEGV/SIGILL). The copy is taken once per
/// test process, so every command of that process sees one consistent set of binaries.
/// Programs not built yet are left out; old copies are pruned after a day.
pub fn binaries_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = log_dir().join("bin");
        prune_older_than(&root, std::time::Duration::from_secs(24 * 3600));
        let dir = root.join(std::process::id().to_string());
        let copied = std::fs::create_dir_all(&dir).is_ok()
            && PROGRAMS.iter().all(|name| {
                let src = profile_dir().join(name);
                !src.exists() || std::fs::copy(&src, dir.join(name)).is_ok()
            });
        if copied {
            dir
        } else {
            profile_dir()
        }
    })
    .clone()
}

/// A workspace program under test, from [`binaries_dir`] (`$FLOTILLA_<NAME>` overrides,
/// e.g. `FLOTILLA_VMM` for `flotilla-vmm`).
pub fn program(name: &str) -> PathBuf {
    let var = name.to_uppercase().replace('-', "_");
    match std::env::var_os(&var).filter(|_| name != "flotilla") {
        Some(p) => PathBuf::from(p),
        None => binaries_dir().join(name),
    }
}

/// The flotilla-vmm binary under test (`$FLOTILLA_VMM` overrides).
pub fn vmm_binary() -> PathBuf {
    program("flotilla-vmm")
}

/// The reference VMM (`$FLOTILLA_QEMU` overrides `qemu-system-x86_64` from PATH).
pub fn qemu_binary() -> String {
    std::env::var("FLOTILLA_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}
