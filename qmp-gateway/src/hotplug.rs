//! QMP hotplug on microvm, as StratoVirt does it: `blockdev-add` opens an image and names
//! it, `device_add` (driver `virtio-blk-mmio`, id = node-name, `addr` = slot) starts a
//! flotilla-blk for it and attaches it to the core's slot, `device_del` detaches it, reaps the
//! backend and emits `DEVICE_DELETED`, `blockdev-del` closes the image.
//!
//! Every command checks everything before it changes anything, and a failure half-way (the
//! backend does not start, the core refuses it) undoes what was done: no stray process, no
//! occupied slot, no open descriptor. One lock serializes hotplug commands, so two clients
//! cannot race for a slot.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};

use crate::qmp::{EventBus, QmpError};
use crate::supervisor::backend::{blk_spec, BlkOptions};
use crate::supervisor::launch::{open_image, BLK_SLOTS};
use crate::supervisor::{CoreOps, Supervisor};

/// QMP drivers of a microvm disk (`virtio-blk-device` is the command-line spelling).
const BLK_DRIVERS: &[&str] = &["virtio-blk-mmio", "virtio-blk-device"];

/// An image opened by `blockdev-add` (or `-drive`).
struct BlockNode {
    opts: BlkOptions,
    file: File,
    /// The device using it.
    user: Option<String>,
}

/// A plugged disk.
struct Disk {
    slot: usize,
    node: String,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, BlockNode>,
    disks: BTreeMap<String, Disk>,
    blk_slots: [Option<String>; BLK_SLOTS],
}

/// The hotplug commands' state: named images, plugged disks, occupied slots.
pub struct Hotplug {
    supervisor: Arc<Supervisor>,
    core: Arc<dyn CoreOps>,
    events: EventBus,
    blk_program: PathBuf,
    state: Mutex<State>,
}

fn err(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

fn get_str<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// `addr` as StratoVirt takes it: "0x1" or "1", the slot index (0x0 is vda).
fn parse_addr(addr: &str) -> Result<usize, QmpError> {
    let parsed = match addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")) {
        Some(hex) => usize::from_str_radix(hex, 16),
        None => addr.parse(),
    };
    parsed.map_err(|_| {
        err(format!(
            "Invalid addr '{addr}': expected a slot number such as \"0x1\""
        ))
    })
}

impl Hotplug {
    /// Hotplug through `supervisor` and `core`, emitting `DEVICE_DELETED` on `events`.
    pub fn new(
        supervisor: Arc<Supervisor>,
        core: Arc<dyn CoreOps>,
        events: EventBus,
        blk_program: PathBuf,
    ) -> Self {
        Hotplug {
            supervisor,
            core,
            events,
            blk_program,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a disk plugged from the command line: its `-drive` becomes a node (so
    /// `blockdev-del` works after `device_del`) and it occupies `slot`.
    pub fn register_cold_disk(
        &self,
        id: &str,
        drive: &str,
        slot: usize,
        opts: BlkOptions,
        image: File,
    ) {
        let mut st = self.state();
        st.nodes.insert(
            drive.to_string(),
            BlockNode {
                opts,
                file: image,
                user: Some(id.to_string()),
            },
        );
        st.disks.insert(
            id.to_string(),
            Disk {
                slot,
                node: drive.to_string(),
            },
        );
        if let Some(s) = st.blk_slots.get_mut(slot) {
            *s = Some(id.to_string());
        }
    }

    /// `blockdev-add`: opens the image (the backend never opens a path) and names it.
    pub fn blockdev_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let node = get_str(args, "node-name").unwrap_or_default();
        if node.is_empty() {
            return Err(err("Parameter 'node-name' must be a non-empty string"));
        }
        if let Some(driver) = get_str(args, "driver").filter(|d| *d != "raw") {
            return Err(err(format!(
                "Block driver '{driver}' is not supported (only raw images)"
            )));
        }
        let Some(Value::Object(file)) = args.get("file") else {
            return Err(err("Parameter 'file' must be an object"));
        };
        if let Some(d) = get_str(file, "driver").filter(|d| *d != "file") {
            return Err(err(format!(
                "Protocol driver '{d}' is not supported (only 'file')"
            )));
        }
        let Some(filename) = get_str(file, "filename").filter(|f| !f.is_empty()) else {
            return Err(err("Parameter 'file.filename' is missing"));
        };
        let aio = match get_str(file, "aio").or_else(|| get_str(args, "aio")) {
            None => None,
            Some("native") => Some("native"),
            Some("io_uring") => Some("io_uring"),
            Some("threads") => Some("threads"),
            Some("off") => Some("sync"),
            Some(other) => {
                return Err(err(format!(
                    "Invalid aio '{other}': expected native, io_uring, threads or off"
                )))
            }
        };
        let direct = match args.get("cache").map(|c| c.get("direct")) {
            None | Some(None) => false,
            Some(Some(Value::Bool(b))) => *b,
            Some(Some(_)) => return Err(err("Parameter 'cache.direct' must be a boolean")),
        };
        let read_only = args
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let iops = args
            .get("throttling.iops-total")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0);
        let mut st = self.state();
        if st.nodes.contains_key(node) {
            return Err(err(format!("Duplicate node name '{node}'")));
        }
        let image = open_image(std::path::Path::new(filename), read_only)
            .map_err(|e| err(format!("Could not open '{filename}': {e}")))?;
        if !image
            .metadata()
            .map(|m| m.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false)
        {
            return Err(err(format!(
                "'{filename}' is neither a regular file nor a block device"
            )));
        }
        st.nodes.insert(
            node.to_string(),
            BlockNode {
                opts: BlkOptions {
                    image_name: filename.to_string(),
                    read_only,
                    direct,
                    iops,
                    aio,
                    ..BlkOptions::default()
                },
                file: image,
                user: None,
            },
        );
        log::info!("blockdev-add: node '{node}' is {filename}");
        Ok(json!({}))
    }

    /// `blockdev-del`: closes a node no device uses.
    pub fn blockdev_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let node = get_str(args, "node-name").unwrap_or_default();
        let mut st = self.state();
        match st.nodes.get(node) {
            None => Err(err(format!("Failed to find node with node-name='{node}'"))),
            Some(BlockNode {
                user: Some(user), ..
            }) => Err(err(format!(
                "Node '{node}' is in use by device '{user}' (device_del it first)"
            ))),
            Some(_) => {
                st.nodes.remove(node);
                log::info!("blockdev-del: node '{node}' closed");
                Ok(json!({}))
            }
        }
    }

    /// `device_add`: plugs a disk into a slot.
    pub fn device_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or_default();
        let driver = get_str(args, "driver").unwrap_or_default();
        if id.is_empty() {
            return Err(err("Parameter 'id' must be a non-empty string"));
        }
        if !BLK_DRIVERS.contains(&driver) {
            return Err(err(match driver {
                d if d.ends_with("-pci") => format!(
                    "driver '{d}' needs the standard machine (PCI), which flotilla does not have; use the -mmio driver on microvm"
                ),
                d => format!("driver '{d}' cannot be hot-plugged (supported: virtio-blk-mmio)"),
            }));
        }
        let node_name = get_str(args, "drive").unwrap_or(id).to_string();
        let num_queues = args.get("num-queues").and_then(Value::as_u64);
        if num_queues.is_some_and(|n| n != 1) {
            return Err(err(
                "num-queues: a hot-plugged disk has one queue (its slot was set up at boot)",
            ));
        }
        let mut st = self.state();
        if st.disks.contains_key(id) || self.supervisor.contains(id) {
            return Err(err(format!("Duplicate ID '{id}' for device")));
        }
        let Some(node) = st.nodes.get(&node_name) else {
            return Err(err(format!(
                "Block device '{node_name}' not found (blockdev-add it first)"
            )));
        };
        if let Some(user) = &node.user {
            return Err(err(format!(
                "Node '{node_name}' is already used by device '{user}'"
            )));
        }
        let slot = match (
            get_str(args, "addr"),
            args.get("lun").and_then(Value::as_u64),
        ) {
            (Some(addr), _) => parse_addr(addr)?,
            // QMP compatibility: lun N is the disk after vda.
            (None, Some(lun)) => usize::try_from(lun).unwrap_or(usize::MAX).saturating_add(1),
            (None, None) => st
                .blk_slots
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| err(format!("All {BLK_SLOTS} disk slots are in use")))?,
        };
        match st.blk_slots.get(slot) {
            None => {
                return Err(err(format!(
                "addr {slot:#x} is out of range: microvm has {BLK_SLOTS} disk slots (0x0-{:#x})",
                BLK_SLOTS - 1
            )))
            }
            Some(Some(other)) => {
                return Err(err(format!("addr {slot:#x} is in use by device '{other}'")))
            }
            Some(None) => {}
        }
        let opts = BlkOptions {
            serial: get_str(args, "serial").map(str::to_string),
            ..node.opts.clone()
        };
        let image: OwnedFd = node
            .file
            .try_clone()
            .map_err(|e| err(format!("cannot share the image of '{node_name}': {e}")))?
            .into();
        let spec = blk_spec(self.blk_program.clone(), &opts, image);
        self.supervisor
            .start(id, driver, &format!("blk{slot}"), spec)
            .map_err(|e| err(format!("device_add '{id}': {e}")))?;
        st.blk_slots[slot] = Some(id.to_string());
        if let Some(node) = st.nodes.get_mut(&node_name) {
            node.user = Some(id.to_string());
        }
        st.disks.insert(
            id.to_string(),
            Disk {
                slot,
                node: node_name,
            },
        );
        log::info!("device_add: '{id}' in disk slot {slot}");
        Ok(json!({}))
    }

    /// `device_del`: empties the slot (the guest sees capacity 0), stops and reaps the
    /// backend, then emits `DEVICE_DELETED`. Works while the backend is being restarted.
    pub fn device_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or_default();
        let mut st = self.state();
        let Some(disk) = st.disks.remove(id) else {
            return Err(err(format!("Device '{id}' not found")));
        };
        let slot = format!("blk{}", disk.slot);
        let detach = || {
            if let Err(e) = self.core.detach(&slot, true) {
                log::warn!("device_del '{id}': the core did not empty {slot}: {e}");
            }
        };
        if self.supervisor.stop_then(id, detach).is_err() {
            // No backend process (it could not be restarted): still empty the slot.
            if let Err(e) = self.core.detach(&slot, true) {
                log::warn!("device_del '{id}': the core did not empty {slot}: {e}");
            }
        }
        st.blk_slots[disk.slot] = None;
        if let Some(node) = st.nodes.get_mut(&disk.node) {
            node.user = None;
        }
        drop(st);
        self.events
            .emit("DEVICE_DELETED", json!({ "device": id, "path": id }));
        log::info!("device_del: '{id}' removed from disk slot {}", disk.slot);
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests;
