//! Hotplug commands against a fake core and a fake backend program: every error case leaves
//! nothing behind, and a full add/del cycle emits DEVICE_DELETED.

use super::*;
use crate::supervisor::EventSink;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Default)]
struct FakeCore(Mutex<Vec<String>>);

impl CoreOps for FakeCore {
    fn attach(&self, slot: &str, _socket: &UnixStream) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("attach {slot}"));
        Ok(())
    }
    fn detach(&self, slot: &str, unplug: bool) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push(format!("detach {slot} {unplug}"));
        Ok(())
    }
}

struct Nothing;
impl EventSink for Nothing {
    fn emit(&self, _: &str, _: Value) {}
}

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("test arguments are objects"),
    }
}

struct Fixture {
    dir: PathBuf,
    core: Arc<FakeCore>,
    sup: Arc<Supervisor>,
    hp: Hotplug,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.sup.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("flotilla-hp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for disk in ["a.img", "b.img"] {
        std::fs::write(dir.join(disk), vec![0u8; 4096]).unwrap();
    }
    let program = dir.join("fake-blk");
    std::fs::write(&program, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let core = Arc::new(FakeCore::default());
    let sup = Supervisor::new(core.clone(), Arc::new(Nothing));
    let hp = Hotplug::new(
        sup.clone(),
        core.clone(),
        EventBus::new(),
        program.clone(),
        program,
    );
    Fixture { dir, core, sup, hp }
}

fn blockdev(node: &str, file: &Path) -> Map<String, Value> {
    args(json!({
        "node-name": node,
        "file": {"driver": "file", "filename": file.to_str().unwrap()},
        "cache": {"direct": false}, "read-only": false
    }))
}

/// Descriptors of this process open on files under `dir` (other tests run in parallel, so
/// only the fixture's own files are counted).
fn open_fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[test]
fn add_and_delete_a_disk_like_stratovirt() {
    let f = fixture("cycle");
    let a = f.dir.join("a.img");
    f.hp.blockdev_add(&blockdev("drive-0", &a)).unwrap();
    f.hp.device_add(&args(
        json!({"id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x1"}),
    ))
    .unwrap();
    let listed = f.sup.list();
    assert_eq!(
        (listed[0].id.as_str(), listed[0].slot.as_str()),
        ("drive-0", "blk1")
    );
    assert_eq!(f.hp.devices(), vec![("drive-0".into(), "blk1".into())]);
    let pid = listed[0].pid.unwrap();
    // The node is in use: it cannot go before the device.
    let e =
        f.hp.blockdev_del(&args(json!({"node-name": "drive-0"})))
            .unwrap_err();
    assert!(e.desc.contains("in use by device 'drive-0'"), "{}", e.desc);
    f.hp.device_del(&args(json!({"id": "drive-0"}))).unwrap();
    assert!(f.sup.list().is_empty());
    assert!(f.hp.devices().is_empty());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") S ") && !stat.contains(") Z ")
        }
    );
    assert_eq!(
        *f.core.0.lock().unwrap(),
        ["attach blk1", "detach blk1 true"]
    );
    // The same id again, this time in the first free slot, via `drive` and `lun`.
    f.hp.device_add(&args(json!({"id": "drive-0", "driver": "virtio-blk-mmio", "lun": 2, "serial": "S1", "romfile": ""})))
        .unwrap();
    assert_eq!(f.sup.list()[0].slot, "blk3");
    f.hp.device_del(&args(json!({"id": "drive-0"}))).unwrap();
    f.hp.blockdev_del(&args(json!({"node-name": "drive-0"})))
        .unwrap();
}

#[test]
fn every_error_leaves_nothing_behind() {
    let f = fixture("errors");
    let a = f.dir.join("a.img");
    let b = f.dir.join("b.img");
    let before = open_fds_under(&f.dir);
    let cases: Vec<(Map<String, Value>, &str)> = vec![
        (blockdev("", &a), "non-empty"),
        (
            args(json!({"node-name": "n", "file": {"filename": "/nonexistent/x.img"}})),
            "Could not open '/nonexistent/x.img'",
        ),
        (
            args(json!({"node-name": "n", "file": {"filename": "/dev/null"}})),
            "neither a regular file",
        ),
        (
            args(
                json!({"node-name": "n", "driver": "qcow2", "file": {"filename": a.to_str().unwrap()}}),
            ),
            "only raw",
        ),
        (
            args(json!({"node-name": "n", "file": {"driver": "nbd", "filename": "x"}})),
            "only 'file'",
        ),
        (
            args(
                json!({"node-name": "n", "file": {"filename": a.to_str().unwrap(), "aio": "posix"}}),
            ),
            "Invalid aio",
        ),
        (
            args(json!({"node-name": "n", "file": "a.img"})),
            "must be an object",
        ),
    ];
    for (a, want) in cases {
        let e = f.hp.blockdev_add(&a).unwrap_err();
        assert!(e.desc.contains(want), "{a:?}: {}", e.desc);
    }
    assert_eq!(
        open_fds_under(&f.dir),
        before,
        "a refused blockdev-add keeps no descriptor"
    );

    f.hp.blockdev_add(&blockdev("d0", &a)).unwrap();
    f.hp.blockdev_add(&blockdev("d1", &b)).unwrap();
    let e = f.hp.blockdev_add(&blockdev("d0", &b)).unwrap_err();
    assert_eq!(e.desc, "Duplicate node name 'd0'");
    f.hp.device_add(&args(
        json!({"id": "d0", "driver": "virtio-blk-mmio", "addr": "0x2"}),
    ))
    .unwrap();
    let device_cases: Vec<(Value, &str)> = vec![
        (
            json!({"id": "d0", "driver": "virtio-blk-mmio"}),
            "Duplicate ID 'd0' for device",
        ),
        (
            json!({"id": "zz", "driver": "virtio-blk-mmio"}),
            "Block device 'zz' not found (blockdev-add it first)",
        ),
        (
            json!({"id": "d1", "driver": "virtio-blk-mmio", "addr": "0x6"}),
            "out of range",
        ),
        (
            json!({"id": "d1", "driver": "virtio-blk-mmio", "addr": "0x2"}),
            "addr 0x2 is in use by device 'd0'",
        ),
        (
            json!({"id": "d1", "driver": "virtio-blk-mmio", "addr": "two"}),
            "Invalid addr 'two'",
        ),
        (
            json!({"id": "d1", "driver": "virtio-blk-pci", "addr": "0x0"}),
            "standard machine",
        ),
        (
            json!({"id": "d1", "driver": "virtio-scsi-mmio"}),
            "cannot be hot-plugged",
        ),
        (
            json!({"id": "d1", "driver": "virtio-blk-mmio", "num-queues": 4}),
            "one queue",
        ),
        (
            json!({"id": "x", "driver": "virtio-blk-mmio", "drive": "d0"}),
            "already used by device 'd0'",
        ),
        (json!({"id": "", "driver": "virtio-blk-mmio"}), "non-empty"),
    ];
    let fds = open_fds_under(&f.dir);
    for (a, want) in device_cases {
        let e = f.hp.device_add(&args(a.clone())).unwrap_err();
        assert!(e.desc.contains(want), "{a}: {}", e.desc);
        assert_eq!(f.sup.list().len(), 1, "{a}: no stray backend");
    }
    assert_eq!(
        open_fds_under(&f.dir),
        fds,
        "refused device_adds keep no descriptor"
    );
    let e = f.hp.device_del(&args(json!({"id": "nope"}))).unwrap_err();
    assert_eq!(e.desc, "Device 'nope' not found");
    let e =
        f.hp.blockdev_del(&args(json!({"node-name": "nope"})))
            .unwrap_err();
    assert!(e.desc.contains("nope"));
    // d1 still plugs fine after all that, in the first free slot (0).
    f.hp.device_add(&args(json!({"id": "d1", "driver": "virtio-blk-mmio"})))
        .unwrap();
    assert_eq!(
        f.sup
            .list()
            .iter()
            .map(|b| b.slot.as_str())
            .collect::<Vec<_>>(),
        ["blk2", "blk0"]
    );
}

#[test]
fn six_slots_then_full() {
    let f = fixture("full");
    let a = f.dir.join("a.img");
    for i in 0..BLK_SLOTS {
        f.hp.blockdev_add(&blockdev(&format!("n{i}"), &a)).unwrap();
        f.hp.device_add(&args(
            json!({"id": format!("n{i}"), "driver": "virtio-blk-mmio"}),
        ))
        .unwrap();
    }
    f.hp.blockdev_add(&blockdev("n6", &a)).unwrap();
    let e =
        f.hp.device_add(&args(json!({"id": "n6", "driver": "virtio-blk-mmio"})))
            .unwrap_err();
    assert_eq!(e.desc, "All 6 disk slots are in use");
}

/// NICs, with a real tap in a network namespace of this test's own (the thread unshares
/// its network namespace; nothing outside it is touched).
#[test]
fn a_nic_is_plugged_and_unplugged_through_its_netdev() {
    let f = fixture("nic");
    let result = std::thread::spawn(move || {
        // SAFETY: unshare with a namespace flag only affects this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        let e = f.hp.netdev_add("n0", TapSource::Ifname("bad/name".into()));
        assert!(e.unwrap_err().desc.contains("cannot open tap 'bad/name'"));
        f.hp.netdev_add("n0", TapSource::Ifname("fltap0".into()))
            .map_err(|e| e.desc)?;
        let e = f.hp.netdev_add("n0", TapSource::Ifname("fltap1".into()));
        assert_eq!(e.unwrap_err().desc, "Duplicate netdev id 'n0'");
        // A passed descriptor must be a tap with a vnet header.
        let plain = std::fs::File::open("/proc/self/stat").unwrap();
        let e = f.hp.netdev_add("n1", TapSource::Fd(plain.into()));
        assert!(e.unwrap_err().desc.contains("is not a tap"));
        f.hp.device_add(&args(json!({"id": "n0", "driver": "virtio-net-mmio", "addr": "0x1", "mac": "52:54:00:00:00:01"})))
            .map_err(|e| e.desc)?;
        assert_eq!(f.sup.list()[0].slot, "net1");
        let e = f.hp.device_add(&args(json!({"id": "x", "driver": "virtio-net-mmio", "addr": "0x2", "netdev": "n0"})));
        assert!(e.unwrap_err().desc.contains("already used by device 'n0'"));
        let e = f.hp.netdev_del("n0").unwrap_err();
        assert!(e.desc.contains("in use by device 'n0'"));
        f.hp.device_del(&args(json!({"id": "n0"}))).map_err(|e| e.desc)?;
        f.hp.netdev_del("n0").map_err(|e| e.desc)?;
        assert_eq!(
            *f.core.0.lock().unwrap(),
            ["attach net1", "detach net1 true"]
        );
        Ok(())
    })
    .join()
    .unwrap();
    result.unwrap();
}
