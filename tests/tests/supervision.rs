//! Backend supervision with a real guest (issue 4): QMP disk hotplug on microvm
//! (tests/qmp/hotplug.py) and crash restart under a write-verify load
//! (tests/qmp/restart.py).

mod qmp_driver;

use std::time::Duration;

#[test]
fn disks_hot_plug_and_unplug_over_qmp() {
    qmp_driver::run("hotplug.py", "HOTPLUG-OK", Duration::from_secs(600), None);
}

#[test]
fn a_crashing_disk_backend_loses_no_io() {
    qmp_driver::run("restart.py", "RESTART-OK", Duration::from_secs(900), None);
}
