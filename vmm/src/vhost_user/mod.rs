//! vhost-user frontends: the core's side of every virtio device. The data path runs in a
//! backend process that maps guest memory (the memfd) and talks to the guest through the kick
//! and call eventfds registered with KVM; the frontend holds everything the guest negotiated,
//! so a backend can be replaced without the guest noticing (DESIGN.md "The core owns device
//! state").

pub mod balloon;
pub mod blk;
pub mod frontend;
pub mod memory;
pub mod net;
pub mod virtqueues;

pub use frontend::{FrontendError, VhostUserDevice};
