//! NICs served by flotilla-net with a real guest (issue 6): tests/qmp/net.py runs on the KVM
//! host inside a network namespace this test creates and deletes; the taps live there and no
//! traffic leaves it.

mod qmp_driver;

use std::time::Duration;

#[test]
fn nics_carry_traffic_survive_backend_crashes_and_hot_plug() {
    let ns = format!("flnet{}", std::process::id());
    // Normally ~400 s; the guest -> host step may crawl for up to 900 s (net.py).
    qmp_driver::run("net.py", "NET-OK", Duration::from_secs(2400), Some(&ns));
}
