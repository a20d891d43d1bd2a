//! Boot images for the test guest (L2) and the KVM host VM (L1), built by
//! `tests/guest/build.sh` from Debian packages into `tests/cache/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, IoContext, Result};
use crate::paths;

/// A kernel + initramfs pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl Images {
    fn in_cache(kind: &str) -> Images {
        let dir = paths::cache_dir().join(kind);
        Images {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.img"),
        }
    }
}

/// Runs build.sh once per process. It is idempotent and cheap when nothing
/// changed, so running it (rather than only checking that the outputs exist)
/// means an edited scenario or init script is never tested stale. Concurrent
/// processes (nextest) serialize inside build.sh on a lock file.
fn build_once() -> Result<()> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build("all").map_err(|e| e.to_string()))
        .clone()
        .map_err(|msg| Error::ImageBuild {
            status: "earlier in this process".into(),
            stderr: msg,
        })
}

fn build(target: &str) -> Result<()> {
    let script = paths::tests_dir().join("guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(target)
        .output()
        .context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        return Err(Error::ImageBuild {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// The test guest's images (Debian cloud kernel + scenario initramfs),
/// building them if needed.
pub fn guest_images() -> Result<Images> {
    build_once()?;
    checked(Images::in_cache("guest"))
}

/// The L1 KVM host VM's images (Debian generic kernel + agent initramfs),
/// building them if needed.
pub fn l1_images() -> Result<Images> {
    build_once()?;
    checked(Images::in_cache("l1"))
}

/// The test guest with iperf3 (network benchmark): the guest kernel and
/// `tests/cache/guest-iperf3/initramfs.img`, the guest initramfs followed by an
/// archive with iperf3 and its libraries (`tests/guest/build.sh iperf3`, built
/// once per process, idempotently). A separate image because it is ~4x the
/// size of the one every other test boots.
pub fn iperf3_guest_images() -> Result<Images> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build("iperf3").map_err(|e| e.to_string()))
        .clone()
        .map_err(|msg| Error::ImageBuild {
            status: "earlier in this process".into(),
            stderr: msg,
        })?;
    checked(Images {
        kernel: Images::in_cache("guest").kernel,
        initramfs: paths::cache_dir().join("guest-iperf3/initramfs.img"),
    })
}

/// The ext4 root file system image for `root=/dev/vda` boots
/// (`tests/guest/build.sh rootfs`) and the id its init prints
/// (`FLOTILLA-ROOTFS-INIT id=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFs {
    pub image: PathBuf,
    pub id: String,
}

/// Builds (once per process, idempotently) and returns the ext4 root image.
pub fn rootfs_image() -> Result<RootFs> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build("rootfs").map_err(|e| e.to_string()))
        .clone()
        .map_err(|msg| Error::ImageBuild {
            status: "earlier in this process".into(),
            stderr: msg,
        })?;
    let dir = paths::cache_dir().join("rootfs");
    let image = dir.join("root.ext4");
    if !image.is_file() {
        return Err(Error::Missing {
            what: "rootfs image",
            path: image,
            hint: " (tests/guest/build.sh rootfs did not produce it)",
        });
    }
    let id_path = dir.join("id");
    let id = std::fs::read_to_string(&id_path)
        .context(|| format!("reading {}", id_path.display()))?
        .trim()
        .to_string();
    Ok(RootFs { image, id })
}

fn checked(images: Images) -> Result<Images> {
    for (what, path) in [("kernel", &images.kernel), ("initramfs", &images.initramfs)] {
        if !path.is_file() {
            return Err(Error::Missing {
                what,
                path: path.clone(),
                hint: " (tests/guest/build.sh did not produce it)",
            });
        }
    }
    Ok(images)
}

/// Writes `out` = `base` + a cpio archive of `dir`'s contents, so a test can
/// add files to the guest (`dir/scenarios/x.sh` becomes `/scenarios/x.sh`)
/// without rebuilding the base image: the kernel unpacks concatenated
/// archives in order.
pub fn extend_initramfs(base: &Path, out: &Path, dir: &Path) -> Result<()> {
    let script = paths::tests_dir().join("guest/extend.sh");
    let result = Command::new("bash")
        .arg(&script)
        .args([base, out, dir])
        .output()
        .context(|| format!("running {}", script.display()))?;
    if !result.status.success() {
        return Err(Error::ImageBuild {
            status: result.status.to_string(),
            stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        });
    }
    Ok(())
}
