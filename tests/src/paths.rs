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

/// The flotilla-vmm binary under test (`$FLOTILLA_VMM` overrides).
pub fn vmm_binary() -> PathBuf {
    match std::env::var_os("FLOTILLA_VMM") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join("flotilla-vmm"),
    }
}

/// The reference VMM (`$FLOTILLA_QEMU` overrides `qemu-system-x86_64` from PATH).
pub fn qemu_binary() -> String {
    std::env::var("FLOTILLA_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}
