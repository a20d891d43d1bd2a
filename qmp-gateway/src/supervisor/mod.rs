//! Starting and watching the VM's processes: the core (`flotilla-vmm`) and one vhost-user
//! backend per device. Every child dies with the gateway (PR_SET_PDEATHSIG), so a killed
//! gateway leaves nothing behind. Restarting crashed backends arrives with the supervision
//! issue (4).

pub mod launch;
pub mod spawn;

pub use launch::{launch_vm, LaunchError, LaunchedVm};
