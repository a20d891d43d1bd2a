//! Replaceable device slots: StratoVirt's hotplug on microvm (DESIGN.md "The core owns
//! device state").
//!
//! microvm has no hotplug bus, so every device a VM may ever have exists from boot: six
//! block slots and two network slots, each a virtio-mmio transport with a vhost-user frontend
//! that may or may not have a backend. The guest's driver binds every slot at boot (an empty
//! disk has capacity 0); `device_add` attaches a backend and announces the new config space
//! with a config-change interrupt, `device_del` detaches it and announces the empty one. A
//! backend that dies leaves its slot *waiting* until the supervisor attaches a replacement.
//!
//! The slot table shares each frontend with its transport: the vCPU that touches the device's
//! registers and the control thread that (re)attaches backends both lock the frontend, never
//! the transport, so a slow backend hand-over stalls only that one device.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::MmioDeviceInfo;
use crate::transport::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use crate::vhost_user::frontend::{BackendState, VhostUserDevice};
use crate::vhost_user::virtqueues::VirtqueueStatus;

/// Block slots on microvm, cold-plugged disks included (StratoVirt: at most 6 disks).
pub const BLK_SLOTS: usize = 6;
/// NIC slots on microvm, cold-plugged NICs included (StratoVirt: eth0 and eth1 from boot).
pub const NET_SLOTS: usize = 2;

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// virtio-balloon (cold-plugged only, but its backend is replaceable like any other).
    Balloon,
}

impl SlotKind {
    /// Name prefix of slots of this kind (`blk0`, `blk1`, ...).
    pub fn prefix(self) -> &'static str {
        match self {
            SlotKind::Blk => "blk",
            SlotKind::Net => "net",
            SlotKind::Balloon => "balloon",
        }
    }
}

/// Errors of slot operations, reported to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// No slot of that name.
    #[error("no device slot '{0}'")]
    Unknown(String),
    /// Filling the slot failed; it is left as it was.
    #[error("slot '{slot}': {reason}")]
    Attach {
        /// The slot.
        slot: String,
        /// Why.
        reason: String,
    },
    /// Another thread held the slot's frontend for longer than a diagnostic query waits.
    #[error(
        "slot '{slot}': its frontend has been busy for over {} ms (most likely a vhost-user request the backend does not answer)",
        waited.as_millis()
    )]
    Busy {
        /// The slot.
        slot: String,
        /// How long the query waited.
        waited: Duration,
    },
}

/// How long `x-query-virtqueues` waits for a frontend another thread holds. Bounded because
/// the query is for stuck devices: a vCPU blocked in a vhost-user exchange with a backend that
/// stopped answering holds the frontend, and the control thread must not hang with it.
pub const QUERY_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// One slot: a name the gateway uses, and the frontend shared with the transport.
pub struct Slot {
    /// `blk0`..`blk5`.
    pub name: String,
    /// What kind of device it holds.
    pub kind: SlotKind,
    /// Where the transport lives.
    pub info: MmioDeviceInfo,
    device: Arc<Mutex<VhostUserDevice>>,
}

fn lock(device: &Mutex<VhostUserDevice>) -> MutexGuard<'_, VhostUserDevice> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks `device` unless another thread keeps it for `timeout`.
fn lock_within(
    device: &Mutex<VhostUserDevice>,
    timeout: Duration,
) -> Option<MutexGuard<'_, VhostUserDevice>> {
    let deadline = Instant::now() + timeout;
    loop {
        match device.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A slot's virtqueues as `x-query-virtqueues` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotQueues {
    /// Slot name.
    pub name: String,
    /// Its kind.
    pub kind: SlotKind,
    /// The frontend's snapshot.
    pub status: VirtqueueStatus,
}

/// A slot as the control channel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// Its kind.
    pub kind: SlotKind,
    /// Attached, waiting or empty.
    pub state: BackendState,
}

/// Every replaceable slot of the VM.
#[derive(Default)]
pub struct Slots(Vec<Slot>);

impl Slots {
    /// Registers a slot whose transport was placed at `info`.
    pub fn push(
        &mut self,
        name: String,
        kind: SlotKind,
        info: MmioDeviceInfo,
        device: Arc<Mutex<VhostUserDevice>>,
    ) {
        self.0.push(Slot {
            name,
            kind,
            info,
            device,
        });
    }

    fn find(&self, name: &str) -> Result<&Slot, SlotError> {
        self.0
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SlotError::Unknown(name.to_string()))
    }

    /// Attaches the backend connected over `stream` to slot `name` (hotplug, or a restarted
    /// backend replacing a dead one).
    pub fn attach(&self, name: &str, stream: UnixStream) -> Result<(), SlotError> {
        let slot = self.find(name)?;
        lock(&slot.device)
            .attach(stream)
            .map_err(|e| SlotError::Attach {
                slot: name.to_string(),
                reason: e.to_string(),
            })
    }

    /// Drops slot `name`'s backend: `unplug` empties the slot, otherwise it waits for a new
    /// backend.
    pub fn detach(&self, name: &str, unplug: bool) -> Result<(), SlotError> {
        lock(&self.find(name)?.device).detach(unplug);
        Ok(())
    }

    /// A snapshot of slot `name`'s virtqueues (diagnostics), waiting at most `timeout` for a
    /// frontend that another thread holds.
    pub fn virtqueues(&self, name: &str, timeout: Duration) -> Result<SlotQueues, SlotError> {
        let slot = self.find(name)?;
        let device = lock_within(&slot.device, timeout).ok_or_else(|| SlotError::Busy {
            slot: name.to_string(),
            waited: timeout,
        })?;
        Ok(SlotQueues {
            name: slot.name.clone(),
            kind: slot.kind,
            status: device.virtqueues(),
        })
    }

    /// Every slot and its state.
    pub fn status(&self) -> Vec<SlotStatus> {
        self.0
            .iter()
            .map(|s| SlotStatus {
                name: s.name.clone(),
                kind: s.kind,
                state: lock(&s.device).state(),
            })
            .collect()
    }
}

/// The transport's view of a slot's frontend: a [`VirtioDevice`] that locks the shared
/// frontend for each call. Queue sizes and kick eventfds never change, so they are copied
/// out once (the trait hands out references to them).
pub struct SlotDevice {
    device: Arc<Mutex<VhostUserDevice>>,
    device_type: u32,
    queue_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
}

impl SlotDevice {
    /// Shares `device` with a transport.
    pub fn new(device: Arc<Mutex<VhostUserDevice>>) -> std::io::Result<Self> {
        let guard = lock(&device);
        let device_type = guard.device_type();
        let queue_sizes = guard.queue_max_sizes().to_vec();
        let kicks = guard
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(guard);
        Ok(SlotDevice {
            device,
            device_type,
            queue_sizes,
            kicks,
        })
    }
}

impl VirtioDevice for SlotDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn device_features(&self) -> u64 {
        lock(&self.device).device_features()
    }
    fn ack_features(&mut self, features: u64) {
        lock(&self.device).ack_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_config(offset, data)
    }
    fn activate(&mut self, queues: &[QueueConfig]) -> Result<(), ActivateError> {
        lock(&self.device).activate(queues)
    }
    fn reset(&mut self) {
        lock(&self.device).reset()
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }
    fn set_interrupt(&mut self, interrupt: Arc<VirtioInterrupt>) {
        lock(&self.device).set_interrupt(interrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::{blk, memory::MemoryTable};
    use crate::vstate::memory::GuestRam;

    fn capacity(dev: &SlotDevice) -> u64 {
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn empty_slot_offers_fixed_features_and_a_zero_capacity_disk() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let frontend =
            blk::vhost_user_blk("blk0", 1, &ram.memory, &MemoryTable::new(&ram)).unwrap();
        let shared = Arc::new(Mutex::new(frontend));
        let dev = SlotDevice::new(shared.clone()).unwrap();
        let info = MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        };
        let mut slots = Slots::default();
        slots.push("blk0".into(), SlotKind::Blk, info, shared);
        // Everything but read-only: a guest that acked RO for an empty slot would see every
        // disk plugged there later as read-only.
        assert_eq!(dev.device_features(), blk::OFFERED_FEATURES & !(1 << 5));
        assert_eq!(capacity(&dev), 0);
        let mut seg_max = [0u8; 4];
        dev.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 254);
        assert_eq!(dev.queue_events().len(), 1);
        assert_eq!(slots.status()[0].state, BackendState::Empty);
        assert!(matches!(
            slots.detach("blk9", true),
            Err(SlotError::Unknown(_))
        ));

        // A backend that hangs up at once: the attach fails and the slot stays empty.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let e = slots.attach("blk0", ours).unwrap_err();
        assert!(e.to_string().starts_with("slot 'blk0': "), "{e}");
        assert_eq!(slots.status()[0].state, BackendState::Empty);
        assert_eq!(capacity(&dev), 0);
    }

    #[test]
    fn virtqueues_by_slot_name_and_a_busy_frontend_does_not_hang_the_query() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let frontend =
            blk::vhost_user_blk("blk2", 1, &ram.memory, &MemoryTable::new(&ram)).unwrap();
        let shared = Arc::new(Mutex::new(frontend));
        let info = MmioDeviceInfo {
            base: 0xd000_2000,
            len: 0x1000,
            irq: 7,
        };
        let mut slots = Slots::default();
        slots.push("blk2".into(), SlotKind::Blk, info, shared.clone());
        let q = slots.virtqueues("blk2", QUERY_LOCK_TIMEOUT).unwrap();
        assert_eq!((q.name.as_str(), q.kind), ("blk2", SlotKind::Blk));
        assert_eq!(q.status.state, BackendState::Empty);
        assert_eq!(q.status.queues.len(), 1);
        assert!(matches!(
            slots.virtqueues("net0", QUERY_LOCK_TIMEOUT),
            Err(SlotError::Unknown(_))
        ));

        // A vCPU stuck in a vhost-user exchange holds the frontend.
        let held = shared.lock().unwrap();
        let started = Instant::now();
        let e = slots
            .virtqueues("blk2", Duration::from_millis(20))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            e.to_string(),
            "slot 'blk2': its frontend has been busy for over 20 ms (most likely a vhost-user request the backend does not answer)"
        );
        drop(held);
        assert!(slots.virtqueues("blk2", QUERY_LOCK_TIMEOUT).is_ok());
    }
}
