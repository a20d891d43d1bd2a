//! The balloon with a real guest (issue 7): tests/qmp/balloon.py runs on the KVM host next
//! to flotilla and checks the guest's and the host's view of memory.

mod qmp_driver;

use std::time::Duration;

#[test]
fn the_balloon_returns_guest_memory_to_the_host() {
    qmp_driver::run("balloon.py", "BALLOON-OK", Duration::from_secs(1800), None);
}
