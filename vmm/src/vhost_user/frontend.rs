//! One generic vhost-user frontend for every device type (as Cloud Hypervisor's
//! `vu_common_ctrl`): feature and config negotiation with the guest on one side and the
//! backend on the other, memory table and vring set-up on DRIVER_OK, ring stop on guest reset.
//!
//! The frontend is the device as far as the guest is concerned. It can exist without a
//! backend (an empty hotplug slot, or a backend being restarted): the guest still negotiates
//! against the fixed feature offer, reads a config space of zeros (a disk of capacity 0), and
//! its kicks accumulate in the kick eventfds until a backend is attached and the set-up is
//! replayed.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::MemoryTable;
use super::virtqueues::{QueueStatus, VirtqueueStatus, VIRTIO_RING_F_EVENT_IDX};
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
    /// The previous backend has not exited yet; two backends must never serve one ring.
    #[error("the previous backend still has its connection open")]
    PreviousBackendAlive,
}

/// How long `attach` waits for a replaced backend to be gone.
const RETIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits until the peer of `fd` has closed its end (the process is dead: a killed process's
/// descriptors close only after all its threads stopped, so it no longer touches guest
/// memory or rings). `true` once closed.
fn wait_peer_closed(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: poll on one pollfd we own; the descriptor stays open during the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0
            && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        {
            return true;
        }
        if n == 0 || std::time::Instant::now() >= deadline {
            return false;
        }
    }
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
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Who owns a device type's config space, and what attaching, emptying and guest writes do
/// to it. The generic frontend calls these hooks; the device modules (blk, net, balloon)
/// implement them.
pub trait ConfigPolicy: Send {
    /// Whether the config space is the backend's (read with GET_CONFIG on attach, guest writes
    /// forwarded with SET_CONFIG). Otherwise the core owns it and the backend never sees it,
    /// so a restarted backend needs no state (a NIC's MAC and link, the balloon's target).
    fn backend_owns_config(&self) -> bool {
        true
    }
    /// Adjusts the config when a backend is attached (e.g. link up).
    fn on_attach(&self, _config: &mut [u8]) {}
    /// Called after the guest wrote config bytes at `offset`; `config` is the whole space.
    fn on_guest_write(&self, _offset: usize, _config: &[u8]) {}
}

/// The config space is the backend's (block devices).
#[derive(Debug, Default, Clone, Copy)]
pub struct BackendConfig;

impl ConfigPolicy for BackendConfig {}

/// Where a device stands with respect to its backend (DESIGN.md "The core owns device
/// state"); the guest cannot tell the states apart except by latency and, for `Empty`, by
/// the config space of an absent device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// A backend is connected and has the guest's set-up.
    Attached,
    /// The backend died; a new one is being started. Kicks pile up in the eventfds.
    Waiting,
    /// No device in this slot (hotplug slot before `device_add` or after `device_del`).
    Empty,
}

impl BackendState {
    /// The name used on the control socket and in QMP.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Attached => "attached",
            BackendState::Waiting => "waiting",
            BackendState::Empty => "empty",
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the backend's whole config space into `cache`.
fn refresh_config(conn: &mut Frontend, cache: &Mutex<Vec<u8>>) -> Result<(), String> {
    let len = lock(cache).len();
    if len == 0 {
        return Ok(());
    }
    let (_, payload) = conn
        .get_config(
            0,
            len as u32,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; len],
        )
        .map_err(|e| e.to_string())?;
    if payload.len() != len {
        return Err(format!(
            "backend returned {} config bytes, expected {len}",
            payload.len()
        ));
    }
    lock(cache).copy_from_slice(&payload);
    Ok(())
}

/// Serves the backend's requests on the backend channel. Today: CONFIG_CHANGE_MSG (e.g. a
/// disk resized): the config cache is re-read and the guest gets a config-change interrupt.
struct BackendChannel {
    name: String,
    /// Whether the config space is the backend's to change.
    from_backend: bool,
    conn: Mutex<Frontend>,
    config: Arc<Mutex<Vec<u8>>>,
    interrupt: Arc<Mutex<Option<Arc<VirtioInterrupt>>>>,
}

impl VhostUserFrontendReqHandler for BackendChannel {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        trace_event!(
            VHOST_USER_MESSAGE,
            "{}: CONFIG_CHANGE_MSG from the backend",
            self.name
        );
        if !self.from_backend {
            log::warn!(
                "{}: the backend announced a config change for a config space it does not own",
                self.name
            );
            return Ok(0);
        }
        refresh_config(&mut lock(&self.conn), &self.config).map_err(std::io::Error::other)?;
        if let Some(interrupt) = lock(&self.interrupt).as_ref() {
            interrupt.signal_config_change();
        }
        log::info!("{}: backend changed its config space", self.name);
        Ok(0)
    }
}

/// A raw descriptor number lent to `set_backend_request_fd`.
struct Lent(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for Lent {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

struct Backend {
    conn: Frontend,
    features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    /// Our end of the backend request channel (a duplicate of what its thread reads).
    channel: Option<OwnedFd>,
}

impl Backend {
    fn has(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.protocol.is_some_and(|p| p.contains(feature))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // The channel's thread also holds the backend's end of the socketpair, so it would
        // never see a hang-up: shutting the socket down ends its read and the thread.
        if let Some(fd) = &self.channel {
            // SAFETY: shutdown on a socket we own; it only changes the socket's state.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// The inflight-tracking area (spec "Inflight I/O tracking"): allocated by the first backend
/// after the guest started the device, kept by the core across backend restarts so the next
/// backend can resubmit what its predecessor had in flight.
struct Inflight {
    info: VhostUserInflight,
    file: File,
}

/// A virtio device whose data path is a vhost-user backend.
pub struct VhostUserDevice {
    name: String,
    device_type: u32,
    queue_sizes: Vec<u16>,
    offered_features: u64,
    /// What an empty slot offers: the features any later backend must cope with.
    empty_features: u64,
    acked_features: u64,
    config: Arc<Mutex<Vec<u8>>>,
    /// The config space of an empty slot.
    empty_config: Vec<u8>,
    policy: Box<dyn ConfigPolicy>,
    memory: GuestMemory,
    memory_table: MemoryTable,
    kicks: Vec<EventFd>,
    interrupt: Arc<Mutex<Option<Arc<VirtioInterrupt>>>>,
    backend: Option<Backend>,
    /// A backend that was lost or unplugged, kept until its process is gone (its connection
    /// stays open so that its death can be seen).
    retiring: Option<Backend>,
    state: BackendState,
    inflight: Option<Inflight>,
    active_queues: Option<Vec<QueueConfig>>,
}

impl VhostUserDevice {
    /// A device of `device_type` with `queue_sizes`, offering `offered_features` (the
    /// backend's features are intersected with this when one is attached). `empty_config` is
    /// the config space while no backend is attached (its length is the config's).
    pub fn new(
        name: &str,
        device_type: u32,
        queue_sizes: Vec<u16>,
        offered_features: u64,
        empty_config: Vec<u8>,
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
            empty_features: offered_features,
            acked_features: 0,
            config: Arc::new(Mutex::new(empty_config.clone())),
            empty_config,
            policy: Box::new(BackendConfig),
            memory,
            memory_table,
            kicks,
            interrupt: Arc::default(),
            backend: None,
            retiring: None,
            state: BackendState::Empty,
            inflight: None,
            active_queues: None,
        })
    }

    /// Restricts what the device offers while no backend is attached. A guest driver that
    /// binds to an empty slot keeps the features it acked for good, so the empty offer leaves
    /// out what would bind every later backend (a disk's read-only flag).
    pub fn with_empty_features(mut self, features: u64) -> Self {
        self.empty_features = features & self.offered_features;
        self
    }

    /// Gives the config space to `policy` (by default it is the backend's).
    pub fn with_config_policy(mut self, policy: Box<dyn ConfigPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// A copy of the config space as the guest sees it.
    pub fn config(&self) -> Vec<u8> {
        lock(&self.config).clone()
    }

    /// Writes config bytes on the device's side (a core-owned field such as the balloon's
    /// target) and tells the guest with a config-change interrupt.
    pub fn update_config(&mut self, offset: usize, data: &[u8]) -> Result<(), FrontendError> {
        {
            let mut config = lock(&self.config);
            let end = offset
                .checked_add(data.len())
                .filter(|&e| e <= config.len())
                .ok_or_else(|| {
                    FrontendError::Config(format!(
                        "config update past the end ({offset}+{})",
                        data.len()
                    ))
                })?;
            config[offset..end].copy_from_slice(data);
        }
        self.signal_config_change();
        Ok(())
    }

    /// Whether a backend is attached.
    pub fn is_attached(&self) -> bool {
        self.backend.is_some()
    }

    /// Where the device stands (attached, waiting for a restarted backend, empty slot).
    pub fn state(&self) -> BackendState {
        self.state
    }

    /// The device's name (its id or slot).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A snapshot of the device's virtqueues for diagnosing a stall (QMP
    /// `x-flotilla-query-virtqueues`; see [`super::virtqueues`] for why the rings are read).
    /// Queues are those the guest activated the device with; before activation, and after a
    /// guest reset, every queue is listed as not ready and no guest memory is read.
    pub fn virtqueues(&self) -> VirtqueueStatus {
        let queues = (0..self.queue_sizes.len())
            .map(|index| {
                let config = self.active_queues.as_ref().and_then(|q| q.get(index));
                QueueStatus::read(&self.memory, index, config)
            })
            .collect();
        VirtqueueStatus {
            state: self.state,
            activated: self.active_queues.is_some(),
            event_idx: self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0,
            interrupt_status: lock(&self.interrupt).as_ref().map(|i| i.status()),
            queues,
        }
    }

    /// Connects a backend over `stream`: negotiates features and protocol features, reads its
    /// config space, and when the guest has already started the device, replays the set-up and
    /// kicks every queue (requests the guest queued meanwhile wait in the rings). A backend
    /// still attached is dropped first. Filling an empty slot announces the new config space
    /// to the guest (a disk's capacity appears); a failed attach leaves the device as it was
    /// (empty or waiting) with no connection kept.
    pub fn attach(&mut self, stream: UnixStream) -> Result<(), FrontendError> {
        self.retire();
        if self.state == BackendState::Attached {
            self.state = BackendState::Waiting;
        }
        // A killed backend may still be running for a moment (a jailed one dies when its
        // keeper does, asynchronously): never let two processes serve the same rings.
        if let Some(old) = &self.retiring {
            if !wait_peer_closed(old.conn.as_raw_fd(), RETIRE_TIMEOUT) {
                return Err(FrontendError::PreviousBackendAlive);
            }
            self.retiring = None;
        }
        let was_empty = self.state == BackendState::Empty;
        let result = self.connect(stream);
        if result.is_err() {
            // It may have been given rings before it failed: wait for it like any other.
            self.retire();
            if was_empty {
                lock(&self.config).copy_from_slice(&self.empty_config);
            }
            return result;
        }
        self.state = BackendState::Attached;
        self.policy.on_attach(&mut lock(&self.config));
        if self.active_queues.is_some() {
            for (kick, _) in self.kicks.iter().zip(self.ready_queues()) {
                // Ring the doorbell once: the new backend looks at every ring it was given.
                let _ = kick.write(1);
            }
            // The previous backend may have died between putting a completion in the used
            // ring and raising the interrupt; the new one has nothing to add to the ring, so
            // nobody else would tell the driver. One spurious interrupt costs a ring read.
            if let Some(interrupt) = lock(&self.interrupt).as_ref() {
                if let Err(e) = interrupt.irq().write(1) {
                    log::error!("{}: cannot raise the used-ring interrupt: {e}", self.name);
                }
            }
        }
        if was_empty {
            self.signal_config_change();
        }
        Ok(())
    }

    /// Drops the backend. `unplug` empties the slot (the guest sees the device's empty config
    /// space, e.g. a disk of capacity 0, through a config-change interrupt); otherwise the
    /// device waits for a replacement with all guest state intact.
    pub fn detach(&mut self, unplug: bool) {
        self.retire();
        if unplug {
            self.state = BackendState::Empty;
            lock(&self.config).copy_from_slice(&self.empty_config);
            self.signal_config_change();
            log::info!("{}: backend detached, slot empty", self.name);
        } else if self.state != BackendState::Empty {
            self.state = BackendState::Waiting;
            log::info!("{}: backend lost, waiting for a new one", self.name);
        }
    }

    /// Moves the attached backend aside until its process is gone.
    fn retire(&mut self) {
        if let Some(b) = self.backend.take() {
            self.retiring = Some(b);
        }
    }

    fn signal_config_change(&self) {
        if let Some(interrupt) = lock(&self.interrupt).as_ref() {
            interrupt.signal_config_change();
        }
    }

    /// Indexes of the queues the guest made ready (none before activation).
    fn ready_queues(&self) -> impl Iterator<Item = usize> + '_ {
        self.active_queues
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, _)| i)
    }

    fn connect(&mut self, stream: UnixStream) -> Result<(), FrontendError> {
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
        if self.policy.backend_owns_config()
            && protocol.is_some_and(|p| p.contains(VhostUserProtocolFeatures::CONFIG))
        {
            refresh_config(&mut conn, &self.config).map_err(FrontendError::Config)?;
        }
        let channel = match protocol.filter(|p| p.contains(VhostUserProtocolFeatures::BACKEND_REQ))
        {
            Some(p) => Some(self.start_backend_channel(&mut conn, p)?),
            None => None,
        };
        self.backend = Some(Backend {
            conn,
            features,
            protocol,
            channel,
        });
        if let Some(queues) = self.active_queues.clone() {
            self.setup_backend(&queues)?;
        }
        log::info!("{}: backend attached (features {features:#x})", self.name);
        Ok(())
    }

    /// Opens the backend request channel and serves it on a thread of its own. Returns a
    /// duplicate of the socket the thread reads: the handler keeps its copy of the backend's
    /// end of the socketpair, so the thread would not see the backend die; dropping the
    /// [`Backend`] shuts this socket down and so ends the thread.
    fn start_backend_channel(
        &self,
        conn: &mut Frontend,
        protocol: VhostUserProtocolFeatures,
    ) -> Result<OwnedFd, FrontendError> {
        let channel = BackendChannel {
            name: self.name.clone(),
            from_backend: self.policy.backend_owns_config(),
            conn: Mutex::new(conn.clone()),
            config: self.config.clone(),
            interrupt: self.interrupt.clone(),
        };
        let mut handler = FrontendReqHandler::new(Arc::new(channel))
            .map_err(|e| FrontendError::Config(format!("backend channel: {e}")))?;
        handler.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        // SAFETY: dup of the handler's open socket; the new descriptor is ours alone.
        let ours = unsafe { libc::fcntl(handler.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if ours < 0 {
            return Err(FrontendError::EventFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `ours` was just returned by fcntl and is owned by nothing else.
        let ours = unsafe { OwnedFd::from_raw_fd(ours) };
        conn.set_backend_request_fd(&Lent(handler.get_tx_raw_fd()))
            .map_err(req("SET_BACKEND_REQ_FD"))?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("{}-backend-req", self.name))
            .spawn(move || {
                crate::jail::enter_thread(crate::jail::Role::BackendRequest);
                loop {
                    // Ends when the backend closes its end (or sends garbage).
                    if let Err(e) = handler.handle_request() {
                        log::info!("{name}: backend channel closed: {e}");
                        return;
                    }
                }
            })
            .map_err(FrontendError::EventFd)?;
        Ok(ours)
    }

    /// Hands the backend the inflight-tracking area: the one kept from an earlier backend, or
    /// a new one the backend allocates (GET_INFLIGHT_FD) on the first start after a reset.
    fn setup_inflight(&mut self) -> Result<(), FrontendError> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(());
        };
        if !backend.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Ok(());
        }
        if self.inflight.is_none() {
            let queue_size = self.queue_sizes.iter().copied().max().unwrap_or(0);
            let ask = VhostUserInflight::new(0, 0, self.queue_sizes.len() as u16, queue_size);
            let (info, file) = backend
                .conn
                .get_inflight_fd(&ask)
                .map_err(req("GET_INFLIGHT_FD"))?;
            self.inflight = Some(Inflight { info, file });
        }
        if let Some(inflight) = &self.inflight {
            backend
                .conn
                .set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
                .map_err(req("SET_INFLIGHT_FD"))?;
        }
        Ok(())
    }

    /// Sends the guest's negotiated state to the backend and starts its rings.
    fn setup_backend(&mut self, queues: &[QueueConfig]) -> Result<(), FrontendError> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(());
        };
        let interrupt = lock(&self.interrupt).clone();
        let interrupt = interrupt.as_ref().map(|i| i.irq());
        backend
            .conn
            .set_features(self.acked_features | (backend.features & PROTOCOL_FEATURES_BIT))
            .map_err(req("SET_FEATURES"))?;
        backend
            .conn
            .set_mem_table(self.memory_table.regions())
            .map_err(req("SET_MEM_TABLE"))?;
        self.setup_inflight()?;
        let Some(backend) = self.backend.as_mut() else {
            return Ok(());
        };
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
            None => self.empty_features,
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = lock(&self.config);
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
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
        {
            let mut config = lock(&self.config);
            if end > config.len() {
                log::warn!(
                    "{}: config write past the end ({end} > {})",
                    self.name,
                    config.len()
                );
                return;
            }
            config[end - data.len()..end].copy_from_slice(data);
            self.policy.on_guest_write(end - data.len(), &config);
        }
        if !self.policy.backend_owns_config() {
            return;
        }
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
                // The backend is unusable; the device waits for the supervisor to replace it
                // (which replays this set-up). The guest sees a device that is merely slow.
                self.backend = None;
                self.state = BackendState::Waiting;
                log::warn!("{}: backend failed during activation: {e}", self.name);
                Ok(())
            }
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }

    fn set_interrupt(&mut self, interrupt: Arc<VirtioInterrupt>) {
        // The backend signals the irqfd directly and the core never sees a used-ring update,
        // so the transport must always report "vring" in its interrupt status.
        interrupt.set_external_vrings(true);
        *lock(&self.interrupt) = Some(interrupt);
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
        // A new driver starts with fresh rings: nothing of the old ones may be resubmitted.
        self.inflight = None;
        // Drain kicks of the old rings so the next activation does not see stale ones.
        for k in &self.kicks {
            let _ = k.read();
        }
    }
}

#[cfg(test)]
mod tests {
    //! A scripted backend speaking raw vhost-user, for what no real backend here does yet:
    //! announcing a config change on the backend channel.
    use super::*;
    use crate::transport::INT_CONFIG;
    use crate::vstate::memory::GuestRam;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, RawFd};
    use std::sync::atomic::{AtomicU64, Ordering};

    const VERSION: u32 = 0x1;
    const REPLY: u32 = 0x4;

    /// Receives one message: (request, body, fd passed with it).
    fn recv(sock: &mut UnixStream) -> Option<(u32, Vec<u8>, Option<RawFd>)> {
        let mut hdr = [0u8; 12];
        let mut cmsg = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        };
        // SAFETY: msghdr is plain data; every pointer in it refers to live buffers above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: recvmsg writes only into the buffers msg describes.
        let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(sock), &mut msg, 0) };
        if n <= 0 {
            return None;
        }
        if (n as usize) < hdr.len() {
            sock.read_exact(&mut hdr[n as usize..]).ok()?;
        }
        // SAFETY: CMSG_FIRSTHDR/CMSG_DATA walk the control buffer recvmsg filled.
        let fd = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (!c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS)
                .then(|| std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const RawFd))
        };
        let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let mut body = vec![0u8; word(2) as usize];
        sock.read_exact(&mut body).ok()?;
        Some((word(0), body, fd))
    }

    fn send(sock: &mut UnixStream, request: u32, flags: u32, body: &[u8]) {
        let mut m = Vec::new();
        for v in [request, flags, body.len() as u32] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(body);
        sock.write_all(&m).unwrap();
    }

    /// Serves the frontend's requests; the disk's capacity is `capacity`. Returns the backend
    /// channel it was handed.
    fn fake_backend(
        mut sock: UnixStream,
        capacity: Arc<AtomicU64>,
    ) -> std::sync::mpsc::Receiver<UnixStream> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Some((request, body, fd)) = recv(&mut sock) {
                match request {
                    1 => {
                        let features = PROTOCOL_FEATURES_BIT | crate::transport::VIRTIO_F_VERSION_1;
                        send(&mut sock, 1, VERSION | REPLY, &features.to_le_bytes());
                    }
                    15 => {
                        let p = (VhostUserProtocolFeatures::CONFIG
                            | VhostUserProtocolFeatures::BACKEND_REQ)
                            .bits();
                        send(&mut sock, 15, VERSION | REPLY, &p.to_le_bytes());
                    }
                    24 => {
                        let size = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                        let mut config = vec![0u8; size];
                        config[..8].copy_from_slice(&capacity.load(Ordering::SeqCst).to_le_bytes());
                        let mut reply = body[..12].to_vec();
                        reply.extend_from_slice(&config);
                        send(&mut sock, 24, VERSION | REPLY, &reply);
                    }
                    21 => {
                        let fd = fd.expect("SET_BACKEND_REQ_FD carries a descriptor");
                        // SAFETY: the descriptor just arrived over SCM_RIGHTS and is ours.
                        tx.send(unsafe { UnixStream::from_raw_fd(fd) }).unwrap();
                    }
                    _ => {} // SET_OWNER, SET_PROTOCOL_FEATURES: no reply without REPLY_ACK.
                }
            }
        });
        rx
    }

    #[test]
    fn config_change_from_the_backend_reaches_the_guest() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let capacity = Arc::new(AtomicU64::new(2048));
        let (ours, theirs) = UnixStream::pair().unwrap();
        let channels = fake_backend(theirs, capacity.clone());
        let mut dev =
            crate::vhost_user::blk::vhost_user_blk("d", 1, &ram.memory, &MemoryTable::new(&ram))
                .unwrap();
        dev.attach(ours).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        dev.set_interrupt(interrupt.clone());
        let read_capacity = |dev: &VhostUserDevice| {
            let mut b = [0u8; 8];
            dev.read_config(0, &mut b);
            u64::from_le_bytes(b)
        };
        assert_eq!(read_capacity(&dev), 2048);

        // The disk grows; the backend says so on its channel (no reply requested).
        capacity.store(4096, Ordering::SeqCst);
        let mut channel = channels
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("backend channel");
        send(&mut channel, 2, VERSION, &[]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while interrupt.status() & INT_CONFIG == 0 {
            assert!(std::time::Instant::now() < deadline, "no config interrupt");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read_capacity(&dev), 4096);
        assert_eq!(interrupt.config_generation(), 1);
        assert!(irq.read().is_ok());
    }
}

#[cfg(test)]
mod feature_tests {
    //! A guest that bound to an empty slot keeps what it acked: a backend lacking any of it
    //! is refused, and the slot stays as it was.
    use super::tests_support::*;
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn a_backend_lacking_acked_features_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut dev =
            crate::vhost_user::blk::vhost_user_blk("blk3", 1, &ram.memory, &MemoryTable::new(&ram))
                .unwrap();
        const EVENT_IDX: u64 = 1 << 29;
        dev.ack_features(crate::transport::VIRTIO_F_VERSION_1 | EVENT_IDX);
        let (ours, theirs) = UnixStream::pair().unwrap();
        // This backend offers VERSION_1 only.
        minimal_backend(theirs, crate::transport::VIRTIO_F_VERSION_1);
        let e = dev.attach(ours).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("backend lacks features {EVENT_IDX:#x} the guest negotiated")
        );
        assert_eq!(dev.state(), BackendState::Empty);
        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        assert_eq!(capacity, [0; 8]);
    }
}

#[cfg(test)]
mod virtqueue_tests {
    //! The diagnostic snapshot of a frontend built without a VM: rings in a `GuestRam` the
    //! test writes indices into, the transport's side played by calling the device directly.
    use super::tests_support::*;
    use super::*;
    use crate::transport::{INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};
    use crate::vstate::memory::GuestRam;

    fn put(ram: &GuestRam, gpa: u64, value: u16) {
        ram.memory
            .write_slice(&value.to_le_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    #[test]
    fn snapshot_follows_activation_backend_and_rings() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut dev =
            crate::vhost_user::blk::vhost_user_blk("blk0", 2, &ram.memory, &MemoryTable::new(&ram))
                .unwrap();
        // Nothing set up yet: both queues listed, neither ready, no interrupt yet.
        let s = dev.virtqueues();
        assert_eq!(s.state, BackendState::Empty);
        assert!(!s.activated && !s.event_idx);
        assert_eq!(s.interrupt_status, None);
        assert_eq!(s.queues.len(), 2);
        assert!(s.queues.iter().all(|q| q.ready.is_none()));

        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.set_interrupt(interrupt.clone());
        dev.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        // Queue 0 ready with its rings in RAM; queue 1 left alone by the driver.
        let q0 = QueueConfig {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x10_0000,
            avail_ring: 0x10_0800,
            used_ring: 0x10_1000,
        };
        dev.activate(&[q0, QueueConfig::new(256)]).unwrap();
        put(&ram, q0.avail_ring + 2, 7);
        put(&ram, q0.avail_ring + 4 + 2 * 128, 4);
        put(&ram, q0.used_ring + 2, 5);
        put(&ram, q0.used_ring + 4 + 8 * 128, 7);
        let s = dev.virtqueues();
        assert!(s.activated && s.event_idx);
        // vhost-user: the used-ring bit is always reported.
        assert_eq!(s.interrupt_status, Some(INT_VRING));
        let ready = s.queues[0].ready.expect("queue 0 is ready");
        assert_eq!(ready.config, q0);
        assert_eq!(
            ready.rings,
            crate::vhost_user::virtqueues::RingIndices {
                avail_flags: Some(0),
                avail_idx: Some(7),
                used_event: Some(4),
                used_flags: Some(0),
                used_idx: Some(5),
                avail_event: Some(7),
            }
        );
        assert_eq!(ready.rings.inflight(), Some(2));
        assert_eq!(s.queues[1].index, 1);
        assert_eq!(s.queues[1].ready, None);

        // A pending config change shows in the status bits; a backend shows in the state.
        interrupt.signal_config_change();
        let (ours, theirs) = UnixStream::pair().unwrap();
        minimal_backend(theirs, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        dev.attach(ours).unwrap();
        let s = dev.virtqueues();
        assert_eq!(s.state, BackendState::Attached);
        assert_eq!(s.interrupt_status, Some(INT_VRING | INT_CONFIG));
        dev.detach(false);
        assert_eq!(dev.virtqueues().state, BackendState::Waiting);

        // The guest resets the device: its rings are forgotten and no longer read.
        dev.reset();
        let s = dev.virtqueues();
        assert!(!s.activated && !s.event_idx);
        assert!(s.queues.iter().all(|q| q.ready.is_none()));
    }
}

#[cfg(test)]
mod tests_support {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Answers GET_FEATURES with `features` and ignores everything else.
    pub fn minimal_backend(mut sock: UnixStream, features: u64) {
        std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            while sock.read_exact(&mut hdr).is_ok() {
                let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
                let mut body = vec![0u8; word(2) as usize];
                if sock.read_exact(&mut body).is_err() {
                    return;
                }
                if word(0) == 1 {
                    let mut m = Vec::new();
                    for v in [1u32, 0x5, 8] {
                        m.extend_from_slice(&v.to_le_bytes());
                    }
                    m.extend_from_slice(&features.to_le_bytes());
                    if sock.write_all(&m).is_err() {
                        return;
                    }
                }
            }
        });
    }
}
