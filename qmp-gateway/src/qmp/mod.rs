//! QMP, the QEMU Machine Protocol, as StratoVirt speaks it: the wire format
//! ([`protocol`]), message framing ([`framing`]), command schemas ([`schema`]), flow control
//! ([`ratelimit`]), per-client protocol state ([`session`]), the handler interface
//! ([`handler`]) and the socket server ([`server`]). Nothing here knows about VMs: what a
//! command does is the [`CommandHandler`]'s business.

pub mod framing;
pub mod handler;
pub mod protocol;
pub mod ratelimit;
pub mod schema;
pub mod server;
pub mod session;

pub use handler::{ClientCtx, CommandHandler, Peer};
pub use protocol::{ErrorClass, Event, QmpError};
pub use schema::{ArgSpec, ArgType, CommandSpec};
pub use server::{start, BoundAddr, EventBus, ListenAddr, QmpServer, ServerConfig, ServerError};
