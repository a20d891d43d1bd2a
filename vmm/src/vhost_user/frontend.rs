//! One generic vhost-user frontend for every device type (as Cloud Hypervisor's
//! `vu_common_ctrl`): feature and config negotiation with the guest on one side and the
//! backend on the other, memory table and vring set-up on DRIVER_OK, ring stop on guest reset.
//!
//! The frontend is the device as far as the guest is concerned. It can exist without a
//! backend (an empty hotplug slot, or a backend being restarted): the guest still negotiates
//! against the fixed feature offer, reads a config space of zeros (a disk of capacity 0), and
//! its kicks accumulate in the kick eventfds until a backend is attached and the set-up is
//! replayed.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::MemoryTable;
use crate::trace::VHOST_USER_MESSAGE;
use crate::trace_event;
use crate::transport::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use crate::vstate::memory::GuestMemory;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the backend speaks the protocol-feature extension.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A vhost-user request failed (the backend died, refused, or answered nonsense).
    #[error("vhost-user {request} failed: {source}")]
    Request {
        /// The request.
        request: &'static str,
        /// Underlying error.
        source: vhost::Error,
    },
    /// The backend lacks features the guest already uses.
    #[error("backend lacks features {0:#x} the guest negotiated")]
    MissingFeatures(u64),
    /// The backend's config space is smaller than the device needs.
    #[error("backend config space read failed: {0}")]
    Config(String),
    /// The guest put a ring outside guest memory.
    #[error("queue {queue}: {what} at {gpa:#x} is outside guest memory")]
    RingOutsideMemory {
        /// Queue index.
        queue: usize,
        /// Which part of the ring.
        what: &'static str,
        /// The guest-physical address.
        gpa: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Maps a failed request to an error. Also the request's trace point: it is evaluated right
/// after the request went out (`conn.x().map_err(req("X"))`).
fn req(request: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    trace_event!(VHOST_USER_MESSAGE, "{request}");
    move |source| FrontendError::Request { request, source }
}

/// The protocol features the frontend uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
}

struct Backend {
    conn: Frontend,
    features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
}

/// A virtio device whose data path is a vhost-user backend.
pub struct VhostUserDevice {
    name: String,
    device_type: u32,
    queue_sizes: Vec<u16>,
    offered_features: u64,
    acked_features: u64,
    config: Vec<u8>,
    memory: GuestMemory,
    memory_table: MemoryTable,
    kicks: Vec<EventFd>,
    interrupt: Option<std::sync::Arc<VirtioInterrupt>>,
    backend: Option<Backend>,
    active_queues: Option<Vec<QueueConfig>>,
}

impl VhostUserDevice {
    /// A device of `device_type` with `queue_sizes`, offering `offered_features` (the
    /// backend's features are intersected with this when one is attached) and a config space
    /// of `config_len` bytes.
    pub fn new(
        name: &str,
        device_type: u32,
        queue_sizes: Vec<u16>,
        offered_features: u64,
        config_len: usize,
        memory: GuestMemory,
        memory_table: MemoryTable,
    ) -> Result<Self, FrontendError> {
        let kicks = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VhostUserDevice {
            name: name.to_string(),
            device_type,
            queue_sizes,
            offered_features,
            acked_features: 0,
            config: vec![0; config_len],
            memory,
            memory_table,
            kicks,
            interrupt: None,
            backend: None,
            active_queues: None,
        })
    }

    /// Whether a backend is attached.
    pub fn is_attached(&self) -> bool {
        self.backend.is_some()
    }

    /// Connects a backend over `stream`: negotiates features and protocol features, reads its
    /// config space, and when the guest has already started the device, replays the set-up.
    pub fn attach(&mut self, stream: UnixStream) -> Result<(), FrontendError> {
        let mut conn = Frontend::from_stream(stream, self.queue_sizes.len() as u64);
        conn.set_owner().map_err(req("SET_OWNER"))?;
        let features = conn.get_features().map_err(req("GET_FEATURES"))?;
        let missing = self.acked_features & !features;
        if missing != 0 {
            return Err(FrontendError::MissingFeatures(missing));
        }
        let protocol = if features & PROTOCOL_FEATURES_BIT != 0 {
            let theirs = conn
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            let agreed = theirs & wanted_protocol_features();
            conn.set_protocol_features(agreed)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            Some(agreed)
        } else {
            None
        };
        if protocol.is_some_and(|p| p.contains(VhostUserProtocolFeatures::CONFIG))
            && !self.config.is_empty()
        {
            let len = self.config.len() as u32;
            let (_, payload) = conn
                .get_config(0, len, VhostUserConfigFlags::WRITABLE, &self.config.clone())
                .map_err(|e| FrontendError::Config(e.to_string()))?;
            self.config.copy_from_slice(&payload);
        }
        self.backend = Some(Backend {
            conn,
            features,
            protocol,
        });
        if let Some(queues) = self.active_queues.clone() {
            self.setup_backend(&queues)?;
        }
        log::info!("{}: backend attached (features {features:#x})", self.name);
        Ok(())
    }

    /// Sends the guest's negotiated state to the backend and starts its rings.
    fn setup_backend(&mut self, queues: &[QueueConfig]) -> Result<(), FrontendError> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(());
        };
        let interrupt = self.interrupt.as_ref().map(|i| i.irq());
        backend
            .conn
            .set_features(self.acked_features | (backend.features & PROTOCOL_FEATURES_BIT))
            .map_err(req("SET_FEATURES"))?;
        backend
            .conn
            .set_mem_table(self.memory_table.regions())
            .map_err(req("SET_MEM_TABLE"))?;
        for (index, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let conn = &mut backend.conn;
            conn.set_vring_num(index, q.size)
                .map_err(req("SET_VRING_NUM"))?;
            // vhost-user ring addresses are in the frontend's address space; the backend
            // translates them through the memory table's userspace addresses.
            let host = |gpa: u64, what: &'static str| {
                self.memory
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| FrontendError::RingOutsideMemory {
                        queue: index,
                        what,
                        gpa,
                    })
            };
            let addr = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc_table, "descriptor table")?,
                used_ring_addr: host(q.used_ring, "used ring")?,
                avail_ring_addr: host(q.avail_ring, "available ring")?,
                log_addr: None,
            };
            conn.set_vring_addr(index, &addr)
                .map_err(req("SET_VRING_ADDR"))?;
            // Resume where the device left off: the used index in guest memory is the one
            // piece of ring state that survives a backend (0 on a fresh ring).
            let used_idx: u16 = self
                .memory
                .read_obj(GuestAddress(q.used_ring + 2))
                .unwrap_or(0);
            conn.set_vring_base(index, used_idx)
                .map_err(req("SET_VRING_BASE"))?;
            if let Some(call) = interrupt {
                conn.set_vring_call(index, call)
                    .map_err(req("SET_VRING_CALL"))?;
            }
            conn.set_vring_kick(index, &self.kicks[index])
                .map_err(req("SET_VRING_KICK"))?;
            if backend.protocol.is_some() {
                conn.set_vring_enable(index, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        match &self.backend {
            Some(b) => self.offered_features & b.features & !PROTOCOL_FEATURES_BIT,
            None => self.offered_features,
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
        else {
            return;
        };
        if end > self.config.len() {
            log::warn!(
                "{}: config write past the end ({end} > {})",
                self.name,
                self.config.len()
            );
            return;
        }
        self.config[end - data.len()..end].copy_from_slice(data);
        if let Some(b) = self.backend.as_mut() {
            if b.protocol
                .is_some_and(|p| p.contains(VhostUserProtocolFeatures::CONFIG))
            {
                if let Err(e) =
                    b.conn
                        .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
                {
                    log::warn!("{}: SET_CONFIG failed: {e}", self.name);
                }
            }
        }
    }

    fn activate(&mut self, queues: &[QueueConfig]) -> Result<(), ActivateError> {
        self.active_queues = Some(queues.to_vec());
        match self.setup_backend(queues) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The backend is unusable; the device waits for a new one (supervision).
                self.backend = None;
                Err(ActivateError(format!("{}: {e}", self.name)))
            }
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }

    fn set_interrupt(&mut self, interrupt: std::sync::Arc<VirtioInterrupt>) {
        // The backend signals the irqfd directly and the core never sees a used-ring update,
        // so the transport must always report "vring" in its interrupt status.
        interrupt.set_external_vrings(true);
        self.interrupt = Some(interrupt);
    }

    fn reset(&mut self) {
        if let (Some(queues), Some(b)) = (self.active_queues.take(), self.backend.as_mut()) {
            for (index, _) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
                // GET_VRING_BASE stops the ring; the backend keeps running for the next boot.
                if let Err(e) = b.conn.get_vring_base(index) {
                    log::warn!("{}: stopping ring {index} failed: {e}", self.name);
                }
            }
        }
        self.active_queues = None;
        self.acked_features = 0;
        // Drain kicks of the old rings so the next activation does not see stale ones.
        for k in &self.kicks {
            let _ = k.read();
        }
    }
}
