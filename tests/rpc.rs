//! The management socket, spoken raw (JSON-RPC 2.0, one line each way): devices added,
//! listed, resized and removed at run time while real clients (libblkio) do I/O; protocol
//! errors answered without disturbing anything; a stuck client holds up nobody.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// vubd with only a management socket.
fn rpc_server(dir: &Path, extra: &[&str]) -> (Server, PathBuf) {
    let rpc = dir.join("rpc.sock");
    let mut args: Vec<String> = vec![
        "--rpc-socket".into(),
        rpc.display().to_string(),
        "-m".into(),
        last_cpu_mask(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = Server::spawn(dir, "vubd", &args, std::slice::from_ref(&rpc));
    (server, rpc)
}

struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Rpc {
    fn connect(path: &Path) -> Rpc {
        let s = UnixStream::connect(path).expect("connect to the management socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Rpc {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
            next_id: 1,
        }
    }

    fn send_line(&mut self, line: &str) -> Value {
        // The server may answer and close before reading all of an oversized line.
        let _ = writeln!(self.writer, "{line}");
        self.read_answer()
    }

    fn read_answer(&mut self) -> Value {
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("an answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
    }

    /// Calls `method`; Ok(result) or Err((code, message)).
    fn call(&mut self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let a = self.send_line(&req.to_string());
        assert_eq!(a["jsonrpc"], "2.0");
        assert_eq!(a["id"], id, "answer to another request: {a}");
        match a.get("error") {
            Some(e) => Err((
                e["code"].as_i64().unwrap(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )),
            None => Ok(a["result"].clone()),
        }
    }

    fn ok(&mut self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
    }

    /// Waits until device `name` has no frontend (a client's disconnect is seen a moment
    /// after its socket closes).
    fn wait_detached(&mut self, name: &str) {
        for _ in 0..500 {
            let list = self.ok("device_list", json!({}));
            let d = list.as_array().unwrap().iter().find(|d| d["name"] == name);
            if d.is_none_or(|d| d["connected"] == false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("device {name} still has a frontend after 5 s");
    }
}

#[test]
fn devices_come_and_go_at_run_time() {
    let dir = test_dir();
    let (mut server, rpc_path) = rpc_server(dir.path(), &[]);
    let mut rpc = Rpc::connect(&rpc_path);
    assert_eq!(rpc.ok("device_list", json!({})), json!([]));

    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let img = create_file(dir.path(), "b.img", 32 * MIB);
    rpc.ok(
        "device_add",
        json!({"name": "a", "socket-path": a, "ram": "64M", "num-queues": 2}),
    );
    rpc.ok(
        "device_add",
        json!({"name": "b", "socket-path": b, "blk-file": img, "buffered": true, "serial": "bee"}),
    );
    let err = rpc
        .call(
            "device_add",
            json!({"name": "a", "socket-path": dir.path().join("c.sock"), "ram": "1M"}),
        )
        .unwrap_err();
    assert_eq!(err.0, -32002, "{err:?}");
    let err = rpc
        .call(
            "device_add",
            json!({"name": "c", "socket-path": dir.path().join("c.sock"), "ram": "1M", "bogus": 1}),
        )
        .unwrap_err();
    assert_eq!(err.0, -32602, "{err:?}");
    assert!(err.1.contains("bogus"), "{err:?}");

    let mut ca = Client::connect(&a, 2);
    let data = pattern(1, 4096, 8192);
    ok("write a", ca.disks[1].write(4096, &data));
    assert_bytes_eq("a", &ok("read a", ca.disks[1].read(4096, 8192)), &data);

    let list = rpc.ok("device_list", json!({}));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let da = &list[0];
    assert_eq!(da["name"], "a");
    assert_eq!(da["backend"], "ram");
    assert_eq!(da["capacity"], 64 * MIB);
    assert_eq!(da["connected"], true);
    assert_eq!(da["frontend"]["pid"], std::process::id());
    assert_eq!(da["queues"].as_array().unwrap().len(), 2);
    assert_eq!(da["config"]["num-queues"], 2);
    assert_eq!(list[1]["config"]["serial"], "bee");
    assert_eq!(list[1]["connected"], false);

    // The statistics count exactly what the client did.
    let io = rpc.ok("iostat", json!({"name": "a"}));
    let dev = &io["devices"][0];
    assert_eq!(dev["total"]["ops"]["read"]["ops"], 1);
    assert_eq!(dev["total"]["ops"]["read"]["bytes"], 8192);
    assert_eq!(dev["total"]["ops"]["write"]["bytes"], 8192);
    let q1 = dev["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == 1)
        .unwrap();
    assert_eq!(q1["ops"]["write"]["ops"], 1);
    assert!(io["timestamp"].as_f64().unwrap() > 1.7e9);

    // Busy while attached; forced removal drains and disconnects, data written is intact
    // for the next device on the same backend (not here: RAM goes with it).
    let err = rpc.call("device_remove", json!({"name": "a"})).unwrap_err();
    assert_eq!(err.0, -32003, "{err:?}");
    rpc.ok("device_remove", json!({"name": "a", "force": true}));
    assert!(!a.exists(), "the socket file is removed");
    assert!(UnixStream::connect(&a).is_err(), "nothing listens any more");
    // (libblkio does not notice a closed connection; its rings simply stop.)
    drop(ca);
    let err = rpc.call("device_remove", json!({"name": "a"})).unwrap_err();
    assert_eq!(err.0, -32001, "{err:?}");
    assert!(err.1.contains("\"a\""), "{err:?}");
    server.assert_alive();

    // The other device was never disturbed.
    let mut cb = Client::connect(&b, 1);
    ok("write b", cb.disk().write(0, &pattern(2, 0, 4096)));
    drop(cb);
    rpc.wait_detached("b");
    rpc.ok("device_remove", json!({"name": "b"}));
    assert_eq!(rpc.ok("device_list", json!({})), json!([]));
}

#[test]
fn protocol_errors_are_answered_and_the_connection_keeps_working() {
    let dir = test_dir();
    let (mut server, rpc_path) = rpc_server(dir.path(), &[]);
    let mut rpc = Rpc::connect(&rpc_path);
    let a = rpc.send_line("{not json");
    assert_eq!(a["error"]["code"], -32700);
    assert_eq!(a["id"], Value::Null);
    let a = rpc.send_line(r#"{"jsonrpc":"1.0","id":5,"method":"version"}"#);
    assert_eq!(a["error"]["code"], -32600);
    let a = rpc.send_line(r#"[]"#);
    assert_eq!(a["error"]["code"], -32600);
    let a = rpc.send_line(r#"{"jsonrpc":"2.0","id":6,"method":"no_such"}"#);
    assert_eq!(a["error"]["code"], -32601);
    let a =
        rpc.send_line(r#"{"jsonrpc":"2.0","id":7,"method":"device_remove","params":{"force":1}}"#);
    assert_eq!(a["error"]["code"], -32602);
    // A batch: two answers, the notification none.
    let a = rpc.send_line(
        r#"[{"jsonrpc":"2.0","id":8,"method":"version"},{"jsonrpc":"2.0","method":"version"},{"jsonrpc":"2.0","id":9,"method":"rpc_get_methods"}]"#,
    );
    let answers = a.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0]["result"]["name"], "vubd");
    assert!(answers[1]["result"]
        .as_array()
        .unwrap()
        .contains(&json!("device_add")));
    // The connection still serves.
    assert_eq!(rpc.ok("version", json!({}))["name"], "vubd");
    // A line longer than 1 MiB is refused and that connection closed; others go on.
    let mut big = Rpc::connect(&rpc_path);
    let long = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let a = big.send_line(&long);
    assert_eq!(a["error"]["code"], -32600);
    assert_eq!(rpc.ok("version", json!({}))["name"], "vubd");
    server.assert_alive();
}

#[test]
fn a_stuck_management_client_holds_up_nobody() {
    let dir = test_dir();
    let (mut server, rpc_path) = rpc_server(dir.path(), &[]);
    // Half a request, never finished.
    let mut stuck = UnixStream::connect(&rpc_path).unwrap();
    stuck
        .write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#)
        .unwrap();
    let mut rpc = Rpc::connect(&rpc_path);
    let sock = dir.path().join("d.sock");
    rpc.ok(
        "device_add",
        json!({"name": "d", "socket-path": sock, "ram": "16M"}),
    );
    let mut c = Client::connect(&sock, 1);
    for i in 0..100u64 {
        ok(
            "write",
            c.disk().write(i * 4096, &pattern(i, i * 4096, 4096)),
        );
    }
    assert_eq!(rpc.ok("device_list", json!({}))[0]["connected"], true);
    drop(stuck);
    server.assert_alive();
}

#[test]
fn resize_grows_and_shrinks_and_clients_see_it() {
    let dir = test_dir();
    let (mut server, rpc_path) = rpc_server(dir.path(), &[]);
    let mut rpc = Rpc::connect(&rpc_path);
    let ram = dir.path().join("ram.sock");
    let file = dir.path().join("file.sock");
    let img = create_file(dir.path(), "f.img", 16 * MIB);
    rpc.ok(
        "device_add",
        json!({"name": "ram", "socket-path": ram, "ram": "16M"}),
    );
    rpc.ok(
        "device_add",
        json!({"name": "file", "socket-path": file, "blk-file": img, "buffered": true}),
    );

    // RAM grows in place, keeping its data; a new connection sees the new capacity.
    let mut c = Client::connect(&ram, 1);
    let data = pattern(9, 0, 4096);
    ok("write", c.disk().write(0, &data));
    drop(c);
    let r = rpc.ok("device_resize", json!({"name": "ram", "size": "48M"}));
    assert_eq!(r["capacity"], 48 * MIB);
    let mut c = Client::connect(&ram, 1);
    assert_eq!(c.capacity(), 48 * MIB);
    assert_bytes_eq("data kept", &ok("read", c.disk().read(0, 4096)), &data);
    let tail = 48 * MIB - 4096;
    ok(
        "write at the new end",
        c.disk().write(tail, &pattern(3, tail, 4096)),
    );
    drop(c);

    // A file is extended; grown outside vubd, a resize without size re-reads it.
    let r = rpc.ok("device_resize", json!({"name": "file", "size": 32 * MIB}));
    assert_eq!(r["capacity"], 32 * MIB);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let r = rpc.ok("device_resize", json!({"name": "file"}));
    assert_eq!(r["capacity"], 40 * MIB);

    // Shrinking while a client is busy past the new end: its requests fail cleanly (IOERR)
    // or complete, none hangs, and afterwards the end is enforced.
    let mut c = Client::connect(&file, 1);
    let disk = c.disk();
    for i in 0..16 {
        disk.submit_read(
            36 * MIB + i * 65536,
            (i as usize) * 65536,
            65536,
            i as usize,
        );
    }
    let r = rpc.ok("device_resize", json!({"name": "file", "size": "8M"}));
    assert_eq!(r["capacity"], 8 * MIB);
    let done = disk.wait(16);
    for (_, ret) in &done {
        assert!(*ret == 0 || *ret == -libc::EIO, "completion {ret}");
    }
    assert_io_error("read past the new end", disk.read(9 * MIB, 4096));
    ok("read before the new end", disk.read(0, 4096));
    drop(c);

    let err = rpc
        .call("device_resize", json!({"name": "ram", "size": 1000}))
        .unwrap_err();
    assert_eq!(err.0, -32602, "not a multiple of the block size: {err:?}");
    let err = rpc
        .call("device_resize", json!({"name": "nope", "size": 4096}))
        .unwrap_err();
    assert_eq!(err.0, -32001);
    // Saved configuration starts the RAM disk at its new size.
    let toml = rpc.ok("config_save", json!({}))["toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(toml.contains(&format!("ram = {}", 48 * MIB)), "{toml}");
    server.assert_alive();
}

#[test]
fn poll_mode_changes_at_run_time_and_is_saved() {
    let dir = test_dir();
    let (_server, rpc_path) = rpc_server(dir.path(), &[]);
    let mut rpc = Rpc::connect(&rpc_path);
    let r = rpc.ok(
        "engine_set_poll_mode",
        json!({"mode": "interrupt", "idle-spin-us": 7}),
    );
    assert_eq!(r, json!({"mode": "interrupt", "idle-spin-us": 7}));
    let reactors = rpc.ok("reactor_stats", json!({}));
    assert_eq!(reactors[0]["poll-mode"], "interrupt");
    assert_eq!(reactors[0]["idle-spin-us"], 7);
    let toml = rpc.ok("config_save", json!({}))["toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(toml.contains("poll-mode = \"interrupt\""), "{toml}");
    let err = rpc
        .call("engine_set_poll_mode", json!({"mode": "sometimes"}))
        .unwrap_err();
    assert_eq!(err.0, -32602);
}

/// A queue idle for a while on a reactor that keeps running (poll mode: it never sleeps)
/// parks: the reactor stops polling it and reads its kick eventfd instead. A request after
/// that is served (the driver kicks), again and again; a parked queue whose frontend goes
/// away drains at once (the kick read is cancelled), so the device can be removed.
#[test]
fn idle_queues_park_and_wake_on_a_kick() {
    let dir = test_dir();
    let (_server, path) = rpc_server(dir.path(), &["--poll-mode", "poll"]);
    let mut rpc = Rpc::connect(&path);
    for name in ["a", "b"] {
        rpc.ok(
            "device_add",
            json!({"name": name, "socket-path": dir.path().join(format!("{name}.sock")), "ram": "16M", "num-queues": 1}),
        );
    }
    let mut a = Client::connect(&dir.path().join("a.sock"), 1);
    let mut b = Client::connect(&dir.path().join("b.sock"), 1);
    for (c, seed) in [(&mut a, 1), (&mut b, 2)] {
        let data = pattern(seed, 0, 4096);
        ok("write", c.disk().write(0, &data));
        assert_bytes_eq("read", &ok("read", c.disk().read(0, 4096)), &data);
    }
    let parked = |rpc: &mut Rpc| -> (u64, u64) {
        let r = rpc.ok("reactor_stats", json!({}));
        let r = &r.as_array().unwrap()[0];
        (r["parked"].as_u64().unwrap(), r["parks"].as_u64().unwrap())
    };
    std::thread::sleep(Duration::from_millis(100));
    let (now, total) = parked(&mut rpc);
    assert_eq!(now, 2, "both idle queues parked (parks so far: {total})");
    // Wake b again and again: each request must be served although nobody polls it.
    for i in 0..20u64 {
        std::thread::sleep(Duration::from_millis(3 + i % 4));
        let data = pattern(100 + i, i * 4096, 4096);
        ok("write after parking", b.disk().write(i * 4096, &data));
        assert_bytes_eq(
            "read after parking",
            &ok("read", b.disk().read(i * 4096, 4096)),
            &data,
        );
    }
    let (_, total_after) = parked(&mut rpc);
    assert!(
        total_after >= total + 10,
        "b parked again between requests: {total} -> {total_after}"
    );
    // b's frontend leaves while its queue is parked: the queue drains and b goes.
    std::thread::sleep(Duration::from_millis(50));
    drop(b);
    let mut removed = false;
    for _ in 0..50 {
        if rpc.call("device_remove", json!({"name": "b"})).is_ok() {
            removed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(removed, "b could not be removed after its frontend left");
    let data = pattern(7, 8192, 4096);
    ok("a still serves", a.disk().write(8192, &data));
    assert_bytes_eq("a", &ok("read", a.disk().read(8192, 4096)), &data);
}
