//! `flotilla`, the front end of the flotilla VMM: it parses StratoVirt's command line
//! ([`cli`]), serves QMP ([`qmp`]) and answers the commands that need no VM ([`gateway`]).
//! Later it spawns and supervises the core and the device backends (DESIGN.md, "Processes").

#![deny(missing_docs)]

pub mod cli;
pub mod core_link;
pub mod gateway;
pub mod hotplug;
pub mod privileges;
pub mod qmp;
pub mod supervisor;
