//! flotilla-vmm, the core of the flotilla VMM: KVM, guest memory, vCPUs, the irqchip, legacy
//! devices and virtio transports. Device backends run in other processes (DESIGN.md); this
//! crate never touches a disk image or a tap.

#![deny(missing_docs)]

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod events;
pub mod exit;
pub mod hotplug;
pub mod jail;
pub mod logger;
pub mod options;
pub mod terminal;
pub mod trace;
pub mod transport;
pub mod vhost_user;
pub mod vstate;
