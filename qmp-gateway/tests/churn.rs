//! Connection churn: clients vanishing mid-command and a thousand connect/disconnect
//! cycles, with a check that no fd leaks. Kept apart from the other server tests because it
//! counts this process's open fds, which parallel tests would disturb; the two tests here
//! take turns.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use common::{open_fds, serve, unlimited, wait_for};
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn a_client_vanishing_mid_command_harms_nobody() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = serve(unlimited());
    let fds_before = open_fds();
    for _ in 0..5 {
        let mut c = f.unix();
        c.negotiate();
        c.send(&json!({"execute": "sleep", "arguments": {"ms": 200}}));
        drop(c);
    }
    // Half a command, then gone.
    let mut c = f.tcp();
    c.negotiate();
    c.send_raw(b"{\"execute\":\"echo\",\"argu");
    drop(c);
    wait_for("clients to be reaped", || f.server.client_count() == 0);
    assert_eq!(f.handler.closed.load(Ordering::SeqCst), 6);
    let mut c = f.unix();
    c.negotiate();
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"v": 1}}))["return"],
        1
    );
    drop(c);
    wait_for("last client reaped", || f.server.client_count() == 0);
    wait_for("fds to be closed", || open_fds() <= fds_before);
}

#[test]
fn a_thousand_connect_disconnect_cycles() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = serve(unlimited());
    let fds_before = open_fds();
    for i in 0..1000 {
        let mut c = if i % 2 == 0 { f.unix() } else { f.tcp() };
        match i % 4 {
            0 => drop(c),
            1 => {
                c.recv();
            }
            _ => {
                c.negotiate();
                if i % 8 == 2 {
                    c.send(&json!({"execute": "echo", "arguments": {"v": i}}));
                }
            }
        }
    }
    wait_for("clients to be reaped", || f.server.client_count() == 0);
    assert_eq!(f.server.events().subscribers(), 0);
    wait_for("fds to be closed", || open_fds() <= fds_before);
    let mut c = f.unix();
    c.negotiate();
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"v": "alive"}}))["return"],
        "alive"
    );
}
