//! The QMP server over real unix and TCP sockets, with a fake handler and a Rust client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{serve, temp_dir, unlimited, wait_for};
use qmp_gateway::qmp::{self, EventBus, ListenAddr, ServerConfig};
use serde_json::{json, Value};

#[test]
fn greeting_on_unix_and_tcp() {
    let f = serve(unlimited());
    for mut c in [f.unix(), f.tcp()] {
        let line = c.line().unwrap();
        let g: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let v = &g["QMP"]["version"];
        assert!(v["qemu"]["major"].as_u64().unwrap() >= 5);
        assert_eq!(v["qemu"]["minor"], 0);
        assert_eq!(v["qemu"]["micro"], 0);
        assert_eq!(
            v["package"],
            format!("flotilla-{}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn negotiation_then_commands() {
    let f = serve(unlimited());
    let mut c = f.unix();
    c.recv();
    let r = c.cmd(json!({"execute": "echo", "arguments": {"v": 1}, "id": 1}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(
        r["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    assert_eq!(r["id"], 1);
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "id": "n"})),
        json!({"return": {}, "id": "n"})
    );
    let r = c.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = c.cmd(json!({"execute": "echo", "arguments": {"v": "hi"}}));
    assert_eq!(r, json!({"return": "hi"}));
    let r = c.cmd(json!({"execute": "query-commands"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "echo",
        "emit",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
}

#[test]
fn ids_are_echoed_and_member_order_is_free() {
    let f = serve(unlimited());
    let mut c = f.tcp();
    c.negotiate();
    for id in [
        json!(7),
        json!("x"),
        json!({"a": [1, null]}),
        json!(null),
        json!(1.5),
    ] {
        let r = c.cmd(json!({"execute": "echo", "arguments": {"v": 0}, "id": id}));
        assert_eq!(r["id"], id);
    }
    c.send_raw(b"{\"id\":42,\"arguments\":{\"v\":[true]},\"execute\":\"echo\"}\n");
    assert_eq!(c.reply(), json!({"return": [true], "id": 42}));
    // No id, no id in the reply.
    let r = c.cmd(json!({"execute": "echo", "arguments": {"v": 0}}));
    assert!(r.get("id").is_none());
    // Several commands in one write, one command spread over several writes.
    c.send_raw(b"{\"execute\":\"echo\",\"arguments\":{\"v\":1}}{\"execute\":\"echo\",");
    assert_eq!(c.reply(), json!({"return": 1}));
    c.send_raw(b"\n \"arguments\":{\"v\":2}}\n");
    assert_eq!(c.reply(), json!({"return": 2}));
}

#[test]
fn bad_input_gets_an_error_and_the_connection_stays() {
    let f = serve(unlimited());
    let mut c = f.unix();
    c.negotiate();
    let cases: &[(&[u8], &str, &str)] = &[
        (b"{\"execute\": }\n", "GenericError", "JSON parse error"),
        (b"this is not json\n", "GenericError", "JSON parse error"),
        (b"[1, 2]\n", "GenericError", "must be a JSON object"),
        (
            b"{\"arguments\": {}}\n",
            "GenericError",
            "lacks member 'execute'",
        ),
        (
            b"{\"execute\": 5}\n",
            "GenericError",
            "'execute' must be a string",
        ),
        (
            b"{\"execute\": \"echo\", \"arguments\": 5}\n",
            "GenericError",
            "'arguments' must be an object",
        ),
        (
            b"{\"execute\": \"echo\", \"bogus\": 1}\n",
            "GenericError",
            "'bogus' is unexpected",
        ),
        (
            b"{\"execute\": \"nope\"}\n",
            "CommandNotFound",
            "The command nope has not been found",
        ),
        (
            b"{\"execute\": \"sleep\", \"arguments\": {\"ms\": \"10\"}}\n",
            "GenericError",
            "Invalid parameter type for 'ms', expected: integer",
        ),
        (
            b"{\"execute\": \"sleep\", \"arguments\": {\"ms\": 1, \"extra\": 2}}\n",
            "GenericError",
            "Parameter 'extra' is unexpected",
        ),
        (
            b"{\"execute\": \"sleep\"}\n",
            "GenericError",
            "Parameter 'ms' is missing",
        ),
        (
            b"{\"execute\": \"fail\"}\n",
            "DeviceNotFound",
            "no such device",
        ),
        (
            b"{\"execute\": \"bad \xff utf8\"}\n",
            "GenericError",
            "JSON parse error",
        ),
    ];
    for (input, class, desc) in cases {
        c.send_raw(input);
        let r = c.reply();
        assert_eq!(
            r["error"]["class"],
            *class,
            "{}",
            String::from_utf8_lossy(input)
        );
        let got = r["error"]["desc"].as_str().unwrap();
        assert!(got.contains(desc), "{got:?} should contain {desc:?}");
    }
    // Deep nesting is refused by the parser's recursion limit, not by a stack overflow.
    let deep = format!(
        "{{\"execute\":\"echo\",\"arguments\":{{\"v\":{}{}}}}}\n",
        "[".repeat(20000),
        "]".repeat(20000)
    );
    c.send_raw(deep.as_bytes());
    let r = c.reply();
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("recursion limit"),
        "{r}"
    );
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"v": "ok"}}))["return"],
        "ok"
    );
}

#[test]
fn a_mebibyte_without_newline_is_refused_and_others_carry_on() {
    let f = serve(unlimited());
    let mut big = f.unix();
    big.negotiate();
    let mut other = f.tcp();
    other.negotiate();
    let writer = {
        let mut s = big.unix.as_ref().unwrap().try_clone().unwrap();
        std::thread::spawn(move || {
            s.write_all(b"{\"execute\":\"echo\",\"arguments\":{\"v\":\"")
                .unwrap();
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..16 {
                s.write_all(&chunk).unwrap();
            }
        })
    };
    // The other client is served while the big line streams in.
    for i in 0..20 {
        let r = other.cmd(json!({"execute": "echo", "arguments": {"v": i}}));
        assert_eq!(r["return"], i);
    }
    let r = big.reply();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"].as_str().unwrap().contains("exceeds"));
    writer.join().unwrap();
    // The rest of the line is skipped; after the newline the client is usable again.
    big.send_raw(b"\"}}\n");
    let r = big.cmd(json!({"execute": "echo", "arguments": {"v": "after"}}));
    assert_eq!(r, json!({"return": "after"}));
}

#[test]
fn two_clients_at_once() {
    let f = serve(unlimited());
    let mut clients = vec![f.unix(), f.tcp()];
    for c in &mut clients {
        c.negotiate();
    }
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut c)| {
            std::thread::spawn(move || {
                for i in 0..300 {
                    let id = format!("{n}-{i}");
                    let r = c.cmd(json!({"execute": "echo", "arguments": {"v": [n, i]}, "id": id}));
                    assert_eq!(r, json!({"return": [n, i], "id": id}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A slow command on one client does not hold up the other.
    let mut a = f.unix();
    a.negotiate();
    let mut b = f.unix();
    b.negotiate();
    a.send(&json!({"execute": "sleep", "arguments": {"ms": 2000}}));
    let start = Instant::now();
    assert_eq!(
        b.cmd(json!({"execute": "echo", "arguments": {"v": 1}}))["return"],
        1
    );
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(a.reply(), json!({"return": {}}));
}

#[test]
fn events_fan_out_to_negotiated_clients() {
    let f = serve(unlimited());
    let mut a = f.unix();
    a.negotiate();
    let mut b = f.tcp();
    b.negotiate();
    let mut quiet = f.unix();
    quiet.recv(); // greeting only: not negotiated, gets no events
    wait_for("two subscribers", || f.server.events().subscribers() == 2);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // An event emitted while a command runs reaches its client before the reply.
    a.send(&json!({"execute": "emit", "arguments": {"name": "STOP"}}));
    assert_eq!(a.recv()["event"], "STOP");
    assert_eq!(a.recv(), json!({"return": {}}));
    f.server
        .events()
        .emit("DEVICE_DELETED", json!({"device": "d0", "path": "d0"}));
    let check = |v: &Value, name: &str| {
        assert_eq!(v["event"], name);
        let ts = &v["timestamp"];
        assert!(ts["seconds"].as_u64().unwrap() >= before);
        assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(v["data"].is_object());
    };
    check(&a.recv(), "DEVICE_DELETED");
    check(&b.recv(), "STOP");
    let v = b.recv();
    check(&v, "DEVICE_DELETED");
    assert_eq!(v["data"], json!({"device": "d0", "path": "d0"}));
    // A client that has read its negotiation reply is subscribed: an event emitted right
    // then reaches it (no wait for the server thread).
    for _ in 0..50 {
        let mut fresh = f.unix();
        fresh.negotiate();
        f.server.events().emit("RESET", json!({"guest": true}));
        assert_eq!(fresh.recv()["event"], "RESET");
    }
    // The unnegotiated client's next message is its reply, not an event.
    let r = quiet.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(r, json!({"return": {}}));
    let r = quiet.cmd(json!({"execute": "echo", "arguments": {"v": 0}}));
    assert_eq!(r, json!({"return": 0}));
}

#[test]
fn a_client_that_never_reads_is_dropped_not_waited_for() {
    let f = serve(ServerConfig {
        rate_limit: None,
        outbound_queue: 8,
        ..ServerConfig::default()
    });
    let mut stuck = f.unix();
    stuck.negotiate();
    let mut good = f.tcp();
    good.negotiate();
    wait_for("two subscribers", || f.server.events().subscribers() == 2);
    let data = json!({"pad": "x".repeat(4096)});
    let start = Instant::now();
    let mut received = 0;
    for _ in 0..2000 {
        f.server.events().emit("BALLOON_CHANGED", data.clone());
        // The good client keeps up.
        let v = good.recv();
        assert_eq!(v["event"], "BALLOON_CHANGED");
        received += 1;
    }
    assert_eq!(received, 2000);
    assert!(start.elapsed() < Duration::from_secs(30));
    wait_for("the stuck client to be dropped", || {
        f.server.events().subscribers() == 1
    });
    drop(stuck);
}

#[test]
fn flow_control_at_100_commands_per_second() {
    let f = serve(ServerConfig::default());
    let mut c = f.unix();
    c.negotiate();
    let mut batch = Vec::new();
    for i in 0..150 {
        batch.extend_from_slice(
            format!("{{\"execute\":\"echo\",\"arguments\":{{\"v\":{i}}},\"id\":{i}}}\n").as_bytes(),
        );
    }
    let start = Instant::now();
    c.send_raw(&batch);
    let replies: Vec<Value> = (0..150).map(|_| c.reply()).collect();
    let elapsed = start.elapsed().as_secs_f64();
    let throttled: Vec<&Value> = replies
        .iter()
        .filter(|r| r["error"]["class"] == "OperationThrottled")
        .collect();
    let ok = replies.iter().filter(|r| r.get("return").is_some()).count();
    assert_eq!(ok + throttled.len(), 150);
    // qmp_capabilities counted too; the bucket drains 100/s while the batch is processed.
    let most = 100 + (elapsed * 100.0).ceil() as usize;
    assert!(ok >= 99 && ok <= most, "{ok} passed in {elapsed:.3} s");
    assert!(!throttled.is_empty());
    assert!(throttled[0]["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("More than 100 requests"));
    assert!(throttled.iter().all(|r| r["id"].is_u64()));
    // The bucket drains: a second later commands pass again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"v": 1}}))["return"],
        1
    );
    // Another client has its own bucket.
    let mut d = f.tcp();
    d.negotiate();
    assert_eq!(
        d.cmd(json!({"execute": "echo", "arguments": {"v": 2}}))["return"],
        2
    );
}

#[test]
fn fds_passed_with_scm_rights_reach_the_handler() {
    let f = serve(unlimited());
    let mut c = f.unix();
    c.negotiate();
    // The fd travels with the command itself.
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, b"through the pipe").unwrap();
    drop(w);
    use std::os::fd::AsRawFd;
    c.send_with_fds(b"{\"execute\":\"take-fd\"}\n", &[r.as_raw_fd()]);
    drop(r);
    assert_eq!(c.reply(), json!({"return": "through the pipe"}));
    // The fd travels alone with one byte, the command follows (QEMU Python library style).
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, b"second").unwrap();
    drop(w);
    c.send_with_fds(b" ", &[r.as_raw_fd()]);
    drop(r);
    assert_eq!(
        c.cmd(json!({"execute": "take-fd"})),
        json!({"return": "second"})
    );
    // No fd: an error, not a hang.
    let r = c.cmd(json!({"execute": "take-fd"}));
    assert_eq!(r["error"]["class"], "GenericError");
}

#[test]
fn line_based_session_like_ncat() {
    let f = serve(unlimited());
    let mut s = UnixStream::connect(&f.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"{\"execute\":\"qmp_capabilities\"}\n\
          {\"execute\":\"query-version\"}\n\
          {\"execute\":\"emit\",\"arguments\":{\"name\":\"RESUME\"}}\n\
          {\"execute\":\"stop\"}\n",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(lines[0].starts_with("{\"QMP\":{\"capabilities\":[],\"version\":{"));
    assert_eq!(lines[1], "{\"return\":{}}");
    assert!(lines[2].starts_with("{\"return\":{\"package\":\"flotilla-"));
    // The event is queued before the command's reply.
    assert!(lines[3].starts_with("{\"event\":\"RESUME\",\"data\":{},\"timestamp\":{\"seconds\":"));
    assert_eq!(lines[4], "{\"return\":{}}");
    assert_eq!(
        lines[5],
        "{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command stop has not been found\"}}"
    );
}

#[test]
fn too_many_clients_are_told_so() {
    let f = serve(ServerConfig {
        max_clients: 2,
        rate_limit: None,
        ..ServerConfig::default()
    });
    let mut a = f.unix();
    a.recv();
    let mut b = f.tcp();
    b.recv();
    let mut c = f.unix();
    let r = c.recv();
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("too many QMP clients"));
    assert!(c.line().is_none());
    drop(a);
    wait_for("a slot to free up", || f.server.client_count() == 1);
    let mut d = f.unix();
    d.negotiate();
}

#[test]
fn socket_path_rules() {
    let f = serve(unlimited());
    // The path is taken while the server runs.
    let err = qmp::start(
        &[ListenAddr::Unix(f.path.clone())],
        f.handler.clone(),
        EventBus::new(),
        unlimited(),
    )
    .err()
    .expect("second bind must fail");
    assert!(err.to_string().contains("already exists"), "{err}");
    // A failing address leaves nothing bound behind.
    let dir = temp_dir("rules");
    let fresh = dir.join("a.sock");
    let err = qmp::start(
        &[
            ListenAddr::Unix(fresh.clone()),
            ListenAddr::Unix(dir.join("missing/b.sock")),
        ],
        f.handler.clone(),
        EventBus::new(),
        unlimited(),
    )
    .err()
    .expect("missing directory must fail");
    assert!(err.to_string().contains("missing/b.sock"), "{err}");
    assert!(!fresh.exists());
    // Shutdown disconnects clients and removes the socket.
    let mut c = f.unix();
    c.negotiate();
    let path = f.path.clone();
    f.server.shutdown();
    assert!(c.line().is_none());
    assert!(!path.exists());
}
