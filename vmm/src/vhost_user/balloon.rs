//! virtio-balloon over vhost-user: the device type, queues and the core-owned config space.
//!
//! flotilla-balloon does the data path (inflated pages are punched out of the guest-memory
//! memfd). The config space never reaches it: `num_pages` (the target) is written here when
//! QMP `balloon` is called and `actual` is written by the guest driver, so a restarted
//! backend continues with nothing to recover, and the core alone maps the QMP commands
//! (`balloon`, `query-balloon`, `BALLOON_CHANGED`) onto the two fields.

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::frontend::{ConfigPolicy, FrontendError, VhostUserDevice};
use super::memory::MemoryTable;
use crate::events::EventRelay;
use crate::transport::VIRTIO_F_VERSION_1;
use crate::vstate::memory::GuestMemory;

/// virtio device id of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Ring size of each queue (inflate, deflate, stats).
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_balloon_config` up to `actual`.
pub const CONFIG_LEN: usize = 8;
/// virtio's balloon page size, whatever the host's.
pub const PAGE_SIZE: u64 = 4096;

const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
const ACTUAL: usize = 4;

/// At most one BALLOON_CHANGED per this period, the latest value last (QEMU throttles the
/// event the same way): a guest deflating on OOM rewrites `actual` for every MiB, and
/// thousands of events would only make QMP clients that do not read fast enough be
/// disconnected.
pub const EVENT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The guest's writes of `actual` become (throttled) BALLOON_CHANGED events.
struct BalloonConfig {
    last_actual: Mutex<Option<u32>>,
    changes: Mutex<std::sync::mpsc::Sender<u32>>,
}

/// Emits BALLOON_CHANGED for the values coming in on `changes`, at most once per
/// [`EVENT_PERIOD`], always ending with the latest value. Ends when the device is dropped.
fn throttle_events(changes: std::sync::mpsc::Receiver<u32>, mem_bytes: u64, events: EventRelay) {
    use std::sync::mpsc::RecvTimeoutError;
    let emit = |actual: u32| {
        let bytes = guest_bytes(mem_bytes, actual);
        log::info!("balloon: the guest holds {actual} pages, {bytes} bytes left to it");
        events.emit("BALLOON_CHANGED", json!({ "actual": bytes }));
    };
    while let Ok(first) = changes.recv() {
        emit(first);
        // Collect what comes during the period; emit only the latest, then start over.
        let mut window_end = std::time::Instant::now() + EVENT_PERIOD;
        let mut pending = None;
        loop {
            let left = window_end.saturating_duration_since(std::time::Instant::now());
            match changes.recv_timeout(left) {
                Ok(v) => pending = Some(v),
                Err(RecvTimeoutError::Timeout) => match pending.take() {
                    Some(v) => {
                        emit(v);
                        window_end = std::time::Instant::now() + EVENT_PERIOD;
                    }
                    None => break,
                },
                Err(RecvTimeoutError::Disconnected) => {
                    if let Some(v) = pending {
                        emit(v);
                    }
                    return;
                }
            }
        }
    }
}

fn le32(config: &[u8], at: usize) -> u32 {
    config
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Guest memory left to the guest when `pages` are in the balloon.
fn guest_bytes(mem_bytes: u64, pages: u32) -> u64 {
    mem_bytes.saturating_sub(u64::from(pages) * PAGE_SIZE)
}

impl ConfigPolicy for BalloonConfig {
    fn backend_owns_config(&self) -> bool {
        false
    }

    fn on_guest_write(&self, offset: usize, config: &[u8]) {
        if offset + 4 <= ACTUAL || offset >= ACTUAL + 4 {
            return;
        }
        let actual = le32(config, ACTUAL);
        let mut last = self.last_actual.lock().unwrap_or_else(|p| p.into_inner());
        if *last != Some(actual) {
            *last = Some(actual);
            // The throttling thread outlives every write; if it is gone, so is the VM.
            let _ = self
                .changes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(actual);
        }
    }
}

/// A vhost-user balloon of a guest with `mem_bytes` of memory.
pub fn vhost_user_balloon(
    deflate_on_oom: bool,
    mem_bytes: u64,
    memory: &GuestMemory,
    table: &MemoryTable,
    events: EventRelay,
) -> Result<VhostUserDevice, FrontendError> {
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ;
    if deflate_on_oom {
        features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    }
    let (changes, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("balloon-events".into())
        .spawn(move || {
            crate::jail::enter_thread(crate::jail::Role::Events);
            throttle_events(rx, mem_bytes, events)
        })
        .map_err(FrontendError::EventFd)?;
    Ok(VhostUserDevice::new(
        "balloon0",
        VIRTIO_ID_BALLOON,
        vec![QUEUE_SIZE; 3],
        features,
        vec![0; CONFIG_LEN],
        memory.clone(),
        table.clone(),
    )?
    .with_config_policy(Box::new(BalloonConfig {
        last_actual: Mutex::new(None),
        changes: Mutex::new(changes),
    })))
}

/// QMP's handle on the balloon.
#[derive(Clone)]
pub struct BalloonHandle {
    device: Arc<Mutex<VhostUserDevice>>,
    mem_bytes: u64,
}

impl BalloonHandle {
    /// Wraps the balloon of a guest with `mem_bytes` of memory.
    pub fn new(device: Arc<Mutex<VhostUserDevice>>, mem_bytes: u64) -> Self {
        BalloonHandle { device, mem_bytes }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, VhostUserDevice> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// QMP `balloon`: the guest should be left with `value` bytes (clamped to its memory).
    pub fn set_target(&self, value: u64) -> Result<(), String> {
        let value = value.min(self.mem_bytes);
        let pages = u32::try_from((self.mem_bytes - value) / PAGE_SIZE)
            .map_err(|_| format!("balloon target {value} needs too many pages"))?;
        log::info!("balloon: target {value} bytes ({pages} pages in the balloon)");
        self.device()
            .update_config(0, &pages.to_le_bytes())
            .map_err(|e| e.to_string())
    }

    /// QMP `query-balloon`: the memory the guest has, from the `actual` field it maintains.
    pub fn actual(&self) -> u64 {
        guest_bytes(self.mem_bytes, le32(&self.device().config(), ACTUAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{VirtioDevice, VirtioInterrupt, INT_CONFIG};
    use crate::vstate::memory::GuestRam;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn qmp_and_guest_meet_in_the_config_space() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let events = EventRelay::default();
        let seen = events.record();
        let mem = 256u64 << 20;
        let device =
            vhost_user_balloon(true, mem, &ram.memory, &MemoryTable::new(&ram), events).unwrap();
        assert_eq!(
            device.device_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        );
        let shared = Arc::new(Mutex::new(device));
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        shared.lock().unwrap().set_interrupt(interrupt.clone());
        let balloon = BalloonHandle::new(shared.clone(), mem);
        assert_eq!(balloon.actual(), mem);

        // balloon 192 MiB: 64 MiB = 16384 pages to take, announced to the guest.
        balloon.set_target(192 << 20).unwrap();
        let mut num_pages = [0u8; 4];
        shared.lock().unwrap().read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 16384);
        assert_ne!(interrupt.status() & INT_CONFIG, 0);
        // Above the guest's memory: clamped, the balloon empties.
        balloon.set_target(1 << 40).unwrap();
        shared.lock().unwrap().read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 0);

        // The guest reports what it gave; the same value twice is one event.
        let write_actual =
            |pages: u32| shared.lock().unwrap().write_config(4, &pages.to_le_bytes());
        write_actual(16384);
        write_actual(16384);
        assert_eq!(balloon.actual(), 192 << 20);
        let wait_events = |n: usize| {
            let deadline = std::time::Instant::now() + 3 * EVENT_PERIOD;
            while seen.lock().unwrap().len() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{:?}",
                    seen.lock().unwrap()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            seen.lock().unwrap().clone()
        };
        assert_eq!(
            wait_events(1),
            vec![(
                "BALLOON_CHANGED".to_string(),
                json!({"actual": 192u64 << 20})
            )]
        );
        // A burst (a guest deflating page by page) is one more event, with the last value.
        for pages in (1000..16384).rev().step_by(97) {
            write_actual(pages);
        }
        write_actual(0);
        let got = wait_events(2);
        std::thread::sleep(2 * EVENT_PERIOD);
        assert_eq!(seen.lock().unwrap().len(), 2, "{got:?}");
        assert_eq!(got[1].1, json!({"actual": 256u64 << 20}));
        // A write of num_pages by a confused guest is no event.
        shared.lock().unwrap().write_config(0, &[1, 0, 0, 0]);
        assert_eq!(balloon.actual(), 256 << 20);
        std::thread::sleep(2 * EVENT_PERIOD);
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}
