//! QMP hotplug on microvm, as StratoVirt does it: `blockdev-add` opens an image and names
//! it, `device_add` (driver `virtio-blk-mmio`, id = node-name, `addr` = slot) starts a
//! flotilla-blk for it and attaches it to the core's slot, `device_del` detaches it, reaps the
//! backend and emits `DEVICE_DELETED`, `blockdev-del` closes the image. NICs go the same way:
//! `netdev_add` opens the tap, `device_add` (driver `virtio-net-mmio`, `addr` 0x0/0x1 = the
//! guest's eth0/eth1) starts flotilla-net and brings the link up, `device_del` takes it down.
//!
//! Every command checks everything before it changes anything, and a failure half-way (the
//! backend does not start, the core refuses it) undoes what was done: no stray process, no
//! occupied slot, no open descriptor. One lock serializes hotplug commands, so two clients
//! cannot race for a slot.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};

use crate::qmp::{EventBus, QmpError};
use crate::supervisor::backend::{blk_spec, net_spec, BlkOptions};
use crate::supervisor::launch::{open_image, BLK_SLOTS, NET_SLOTS};
use crate::supervisor::{tap, CoreOps, Supervisor};

/// QMP drivers of a microvm disk (`virtio-blk-device` is the command-line spelling).
const BLK_DRIVERS: &[&str] = &["virtio-blk-mmio", "virtio-blk-device"];
/// QMP drivers of a microvm NIC.
const NET_DRIVERS: &[&str] = &["virtio-net-mmio", "virtio-net-device"];

/// The kinds of hot-pluggable device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A disk (block slots `blk0`..`blk5`).
    Blk,
    /// A NIC (slots `net0`, `net1`).
    Net,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Blk => "blk",
            Kind::Net => "net",
        }
    }
    fn slots(self) -> usize {
        match self {
            Kind::Blk => BLK_SLOTS,
            Kind::Net => NET_SLOTS,
        }
    }
    fn what(self) -> &'static str {
        match self {
            Kind::Blk => "disk",
            Kind::Net => "NIC",
        }
    }
}

/// A tap opened by `netdev_add` (or `-netdev`).
struct NetNode {
    tap: OwnedFd,
    user: Option<String>,
}

/// An image opened by `blockdev-add` (or `-drive`).
struct BlockNode {
    opts: BlkOptions,
    file: File,
    /// The device using it.
    user: Option<String>,
}

/// A plugged device.
struct Plugged {
    kind: Kind,
    slot: usize,
    /// Its block node or netdev.
    backing: String,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, BlockNode>,
    netdevs: BTreeMap<String, NetNode>,
    devices: BTreeMap<String, Plugged>,
    blk_slots: [Option<String>; BLK_SLOTS],
    net_slots: [Option<String>; NET_SLOTS],
}

impl State {
    fn slots(&mut self, kind: Kind) -> &mut [Option<String>] {
        match kind {
            Kind::Blk => &mut self.blk_slots,
            Kind::Net => &mut self.net_slots,
        }
    }

    /// Marks the backing of a device as free.
    fn release(&mut self, kind: Kind, backing: &str) {
        match kind {
            Kind::Blk => {
                if let Some(n) = self.nodes.get_mut(backing) {
                    n.user = None;
                }
            }
            Kind::Net => {
                if let Some(n) = self.netdevs.get_mut(backing) {
                    n.user = None;
                }
            }
        }
    }
}

/// Where `netdev_add` gets its tap.
pub enum TapSource {
    /// `ifname`: the gateway opens it.
    Ifname(String),
    /// A descriptor (`fd`/`fds` naming a `getfd` descriptor).
    Fd(OwnedFd),
}

/// The hotplug commands' state: named images, plugged disks, occupied slots.
pub struct Hotplug {
    supervisor: Arc<Supervisor>,
    core: Arc<dyn CoreOps>,
    events: EventBus,
    blk_program: PathBuf,
    net_program: PathBuf,
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
    /// Hotplug through `supervisor` and `core`, emitting `DEVICE_DELETED` on `events`;
    /// disks are served by `blk_program`, NICs by `net_program`.
    pub fn new(
        supervisor: Arc<Supervisor>,
        core: Arc<dyn CoreOps>,
        events: EventBus,
        blk_program: PathBuf,
        net_program: PathBuf,
    ) -> Self {
        Hotplug {
            supervisor,
            core,
            events,
            blk_program,
            net_program,
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
        st.devices.insert(
            id.to_string(),
            Plugged {
                kind: Kind::Blk,
                slot,
                backing: drive.to_string(),
            },
        );
        if let Some(s) = st.blk_slots.get_mut(slot) {
            *s = Some(id.to_string());
        }
    }

    /// Records a NIC plugged from the command line: its `-netdev` becomes a netdev (so
    /// `netdev_del` works after `device_del`) and it occupies `slot`.
    pub fn register_cold_nic(&self, id: &str, netdev: &str, slot: usize, tap: OwnedFd) {
        let mut st = self.state();
        st.netdevs.insert(
            netdev.to_string(),
            NetNode {
                tap,
                user: Some(id.to_string()),
            },
        );
        st.devices.insert(
            id.to_string(),
            Plugged {
                kind: Kind::Net,
                slot,
                backing: netdev.to_string(),
            },
        );
        if let Some(s) = st.net_slots.get_mut(slot) {
            *s = Some(id.to_string());
        }
    }

    /// Every plugged disk and NIC, hot- or cold-plugged, as (device id, the core's slot).
    pub fn devices(&self) -> Vec<(String, String)> {
        self.state()
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), format!("{}{}", d.kind.prefix(), d.slot)))
            .collect()
    }

    /// `netdev_add`: opens (or takes) the tap and names it.
    pub fn netdev_add(&self, id: &str, source: TapSource) -> Result<Value, QmpError> {
        if id.is_empty() {
            return Err(err("Parameter 'id' must be a non-empty string"));
        }
        let mut st = self.state();
        if st.netdevs.contains_key(id) {
            return Err(err(format!("Duplicate netdev id '{id}'")));
        }
        let tap = match source {
            TapSource::Ifname(name) => tap::open_tap(&name)
                .map_err(|e| err(format!("netdev_add '{id}': cannot open tap '{name}': {e}")))?,
            TapSource::Fd(fd) => tap::adopt_tap(fd.as_raw_fd())
                .map_err(|e| err(format!("netdev_add '{id}': {e}")))?,
        };
        st.netdevs
            .insert(id.to_string(), NetNode { tap, user: None });
        log::info!("netdev_add: '{id}'");
        Ok(json!({}))
    }

    /// `netdev_del`: closes a tap no device uses.
    pub fn netdev_del(&self, id: &str) -> Result<Value, QmpError> {
        let mut st = self.state();
        match st.netdevs.get(id) {
            None => Err(err(format!("netdev '{id}' not found"))),
            Some(NetNode {
                user: Some(user), ..
            }) => Err(err(format!(
                "netdev '{id}' is in use by device '{user}' (device_del it first)"
            ))),
            Some(_) => {
                st.netdevs.remove(id);
                log::info!("netdev_del: '{id}' closed");
                Ok(json!({}))
            }
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

    /// `device_add`: plugs a disk or a NIC into a slot.
    pub fn device_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or_default();
        let driver = get_str(args, "driver").unwrap_or_default();
        if id.is_empty() {
            return Err(err("Parameter 'id' must be a non-empty string"));
        }
        let kind = if BLK_DRIVERS.contains(&driver) {
            Kind::Blk
        } else if NET_DRIVERS.contains(&driver) {
            Kind::Net
        } else {
            return Err(err(match driver {
                d if d.ends_with("-pci") => format!(
                    "driver '{d}' needs the standard machine (PCI), which flotilla does not have; use the -mmio driver on microvm"
                ),
                d => format!(
                    "driver '{d}' cannot be hot-plugged (supported: virtio-blk-mmio, virtio-net-mmio)"
                ),
            }));
        };
        let backing = match kind {
            Kind::Blk => get_str(args, "drive"),
            Kind::Net => get_str(args, "netdev"),
        }
        .unwrap_or(id)
        .to_string();
        if kind == Kind::Blk
            && args
                .get("num-queues")
                .and_then(Value::as_u64)
                .is_some_and(|n| n != 1)
        {
            return Err(err(
                "num-queues: a hot-plugged disk has one queue (its slot was set up at boot)",
            ));
        }
        let mut st = self.state();
        if st.devices.contains_key(id) || self.supervisor.contains(id) {
            return Err(err(format!("Duplicate ID '{id}' for device")));
        }
        let resource = match kind {
            Kind::Blk => {
                let Some(node) = st.nodes.get(&backing) else {
                    return Err(err(format!(
                        "Block device '{backing}' not found (blockdev-add it first)"
                    )));
                };
                if let Some(user) = &node.user {
                    return Err(err(format!(
                        "Node '{backing}' is already used by device '{user}'"
                    )));
                }
                node.file.as_fd().try_clone_to_owned()
            }
            Kind::Net => {
                let Some(netdev) = st.netdevs.get(&backing) else {
                    return Err(err(format!(
                        "netdev '{backing}' not found (netdev_add it first)"
                    )));
                };
                if let Some(user) = &netdev.user {
                    return Err(err(format!(
                        "netdev '{backing}' is already used by device '{user}'"
                    )));
                }
                netdev.tap.try_clone()
            }
        }
        .map_err(|e| err(format!("cannot share '{backing}' with a backend: {e}")))?;
        let slot = match (
            get_str(args, "addr"),
            args.get("lun").and_then(Value::as_u64),
        ) {
            (Some(addr), _) => parse_addr(addr)?,
            // QMP compatibility: lun N is the disk after vda.
            (None, Some(lun)) if kind == Kind::Blk => {
                usize::try_from(lun).unwrap_or(usize::MAX).saturating_add(1)
            }
            _ => st
                .slots(kind)
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| {
                    err(format!(
                        "All {} {} slots are in use",
                        kind.slots(),
                        kind.what()
                    ))
                })?,
        };
        match st.slots(kind).get(slot) {
            None => {
                return Err(err(format!(
                    "addr {slot:#x} is out of range: microvm has {} {} slots (0x0-{:#x})",
                    kind.slots(),
                    kind.what(),
                    kind.slots() - 1
                )))
            }
            Some(Some(other)) => {
                return Err(err(format!("addr {slot:#x} is in use by device '{other}'")))
            }
            Some(None) => {}
        }
        let spec = match kind {
            Kind::Blk => {
                let opts = BlkOptions {
                    serial: get_str(args, "serial").map(str::to_string),
                    ..st.nodes[&backing].opts.clone()
                };
                blk_spec(self.blk_program.clone(), &opts, resource)
            }
            Kind::Net => {
                if let Some(mac) = get_str(args, "mac") {
                    // The guest's driver read the slot's MAC at boot and never reads it again.
                    log::warn!(
                        "device_add '{id}': mac={mac} is not applied; the NIC keeps its slot's MAC (set it in the guest)"
                    );
                }
                net_spec(self.net_program.clone(), None, resource)
            }
        };
        self.supervisor
            .start(id, driver, &format!("{}{slot}", kind.prefix()), spec)
            .map_err(|e| err(format!("device_add '{id}': {e}")))?;
        st.slots(kind)[slot] = Some(id.to_string());
        match kind {
            Kind::Blk => {
                if let Some(node) = st.nodes.get_mut(&backing) {
                    node.user = Some(id.to_string());
                }
            }
            Kind::Net => {
                if let Some(netdev) = st.netdevs.get_mut(&backing) {
                    netdev.user = Some(id.to_string());
                }
            }
        }
        st.devices.insert(
            id.to_string(),
            Plugged {
                kind,
                slot,
                backing,
            },
        );
        log::info!("device_add: '{id}' in {} slot {slot}", kind.what());
        Ok(json!({}))
    }

    /// `device_del`: empties the slot (a disk's capacity drops to 0, a NIC's link goes
    /// down), stops and reaps the backend, then emits `DEVICE_DELETED`. Works while the
    /// backend is being restarted.
    pub fn device_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or_default();
        let mut st = self.state();
        let Some(dev) = st.devices.remove(id) else {
            return Err(err(format!("Device '{id}' not found")));
        };
        let slot = format!("{}{}", dev.kind.prefix(), dev.slot);
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
        st.slots(dev.kind)[dev.slot] = None;
        st.release(dev.kind, &dev.backing);
        drop(st);
        self.events
            .emit("DEVICE_DELETED", json!({ "device": id, "path": id }));
        log::info!("device_del: '{id}' removed from {slot}");
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests;
