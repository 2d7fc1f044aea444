//! vubdctl against a real vubd started with only a management socket: devices are added,
//! listed, used by a libblkio client, measured, resized and removed through the binary,
//! and its exit statuses and messages are checked.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VUBDCTL: &str = env!("CARGO_BIN_EXE_vubdctl");

/// vubd with no devices, only the management socket, reactors on the last CPU.
fn start(dir: &Path, name: &str) -> (Server, Ctl) {
    let rpc = dir.join(format!("{name}-rpc.sock"));
    let args = [
        "--rpc-socket".to_string(),
        rpc.display().to_string(),
        "-m".into(),
        last_cpu_mask(),
    ];
    let server = Server::spawn(dir, name, &args, std::slice::from_ref(&rpc));
    (server, Ctl { socket: rpc })
}

/// Runs the vubdctl binary against one socket. Command lines are given as one string and
/// split at blanks (test paths have none), so they read as typed.
struct Ctl {
    socket: PathBuf,
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn command(&self, line: &str) -> Command {
        let mut c = Command::new(VUBDCTL);
        // A bound on every answer, so a stuck server fails the test instead of hanging it.
        c.arg("-s").arg(&self.socket).args(["--timeout", "20"]);
        c.args(line.split_whitespace())
            .env_remove("VUBD_RPC_SOCKET");
        c
    }

    fn run(&self, line: &str) -> Ran {
        ran(self.command(line).output().expect("run vubdctl"))
    }

    /// Stdout of a command that must succeed.
    #[track_caller]
    fn ok(&self, line: &str) -> String {
        let r = self.run(line);
        assert_eq!(r.code, 0, "vubdctl {line}: {}", r.stderr);
        assert!(
            r.stderr.is_empty(),
            "vubdctl {line} wrote to stderr: {}",
            r.stderr
        );
        r.stdout
    }

    /// Stderr of a command that must fail with exit status `code`.
    #[track_caller]
    fn fails(&self, line: &str, code: i32) -> String {
        let r = self.run(line);
        let what = format!(
            "vubdctl {line}: stdout {:?} stderr {:?}",
            r.stdout, r.stderr
        );
        assert_eq!(r.code, code, "{what}");
        assert!(r.stdout.is_empty(), "{what}");
        r.stderr
    }

    /// The --json output: exactly one line of JSON.
    #[track_caller]
    fn json(&self, line: &str) -> Value {
        let out = self.ok(&format!("--json {line}"));
        assert_eq!(
            out.lines().count(),
            1,
            "--json output is not one line: {out}"
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{line}: {e}: {out}"))
    }

    fn devices(&self) -> Vec<Value> {
        let list = self.json("device list");
        list.as_array().expect("device list is an array").clone()
    }

    fn device(&self, name: &str) -> Option<Value> {
        self.devices().into_iter().find(|d| d["name"] == name)
    }
}

fn ran(o: Output) -> Ran {
    Ran {
        code: o.status.code().expect("vubdctl killed by a signal"),
        stdout: String::from_utf8(o.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(o.stderr).expect("utf-8 stderr"),
    }
}

/// A table whose cells have no blanks, as header -> cell maps.
fn table(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cells.len(), header.len(), "row {l:?} under {header:?}");
            let named = header.iter().zip(cells);
            named.map(|(h, c)| (h.to_string(), c.to_string())).collect()
        })
        .collect()
}

fn sock(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.sock")).display().to_string()
}

/// (ops, bytes) of one op in an `iostat` device entry.
fn op_counts(dev: &Value, op: &str) -> (Value, Value) {
    let o = &dev["total"]["ops"][op];
    (o["ops"].clone(), o["bytes"].clone())
}

#[test]
fn devices_io_iostat_resize_and_remove() {
    let dir = test_dir();
    let d = dir.path();
    let (_server, ctl) = start(d, "vubd");
    let file = create_file(d, "f1.img", 64 * MIB);
    let (r1, f1) = (sock(d, "r1"), sock(d, "f1"));

    let out = ctl.ok(&format!(
        "device add --name r1 --ram 64M --num-queues 2 --socket-path {r1}"
    ));
    assert_eq!(out, "added r1\n");
    let file_arg = file.display();
    ctl.ok(&format!(
        "device add --name f1 --blk-file {file_arg} --socket-path {f1}"
    ));

    let list = ctl.ok("device list");
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    for h in "NAME BACKEND SIZE RO CONNECTED FRONTEND QUEUES SOCKET".split(' ') {
        assert!(lines[0].contains(h), "no {h} in {list}");
    }
    assert!(
        list.contains("r1") && list.contains("ram") && list.contains(&r1),
        "{list}"
    );
    assert!(
        list.contains("f1") && list.contains("file") && list.contains("64.0M"),
        "{list}"
    );

    let r = ctl.device("r1").expect("r1 listed");
    assert_eq!(r["backend"], "ram");
    assert_eq!(r["capacity"], 64 * MIB);
    assert_eq!(r["socket-path"], r1.as_str());
    assert_eq!(r["num-queues"], 2);
    assert_eq!(r["logical-block-size"], 512);
    assert_eq!(r["read-only"], false);
    assert_eq!(r["connected"], false);
    assert_eq!(r["frontend"], Value::Null);
    assert_eq!(r["config"]["ram"], "64M");
    assert_eq!(ctl.device("f1").expect("f1 listed")["backend"], "file");

    // Known I/O on r1: every request counted once, with its bytes.
    let mut client = Client::connect(Path::new(&r1), 1);
    let disk = client.disk();
    for i in 0..3u64 {
        ok("write", disk.write(i * 4096, &pattern(i, i * 4096, 4096)));
    }
    for _ in 0..2 {
        ok("read", disk.read(0, 8192));
    }
    ok("flush", disk.flush());

    let stat = ctl.json("iostat r1");
    assert!(stat["timestamp"].as_f64().expect("timestamp") > 1.6e9);
    let devs = stat["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1, "iostat r1 reports only r1: {stat}");
    let dev = &devs[0];
    assert_eq!(dev["name"], "r1");
    assert_eq!(op_counts(dev, "read"), (json!(2), json!(16384)));
    assert_eq!(op_counts(dev, "write"), (json!(3), json!(12288)));
    assert_eq!(op_counts(dev, "flush").0, 1);
    assert_eq!(op_counts(dev, "discard").0, 0);
    let buckets = dev["total"]["ops"]["read"]["latency"]["buckets"]
        .as_array()
        .unwrap();
    let timed: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(timed, 2, "every read is in the histogram: {dev}");
    assert_eq!(dev["queues"].as_array().unwrap().len(), 1);

    // Connected: the frontend is this process.
    let r = ctl.device("r1").unwrap();
    assert_eq!(r["connected"], true);
    assert_eq!(r["frontend"]["pid"], std::process::id());
    let list = ctl.ok("device list");
    let row = list.lines().find(|l| l.starts_with("r1")).unwrap();
    assert!(row.contains(&format!("{}/", std::process::id())), "{list}");
    assert!(row.contains("1 on cpu"), "{list}");

    // The table: totals since the last reset.
    let text = ctl.ok("iostat");
    let rows = table(&text);
    let row = rows.iter().find(|r| r["DEVICE"] == "r1").expect("r1 row");
    assert_eq!(
        (row["reads"].as_str(), row["writes"].as_str()),
        ("2", "3"),
        "{text}"
    );
    assert_eq!(
        (row["read"].as_str(), row["written"].as_str()),
        ("16.0K", "12.0K"),
        "{text}"
    );
    assert_eq!(row["flushes"], "1");
    assert_ne!(row["mean"], "-", "{text}");
    assert!(rows.iter().any(|r| r["DEVICE"] == "f1"), "{text}");
    let text = ctl.ok("iostat --queues r1");
    assert!(text.lines().any(|l| l.starts_with("r1/q0")), "{text}");

    watch_shows_rates(&ctl, client.disk());

    // Busy while attached.
    let err = ctl.fails("device remove r1", 1);
    assert!(err.contains("r1") && err.contains("attached"), "{err}");
    assert!(err.contains("(code -32003)"), "{err}");
    drop(client);

    // Resizing: to a given size, and to the file's new size.
    let out = ctl.ok("device resize r1 128M");
    assert_eq!(out, format!("r1: 128.0M ({} bytes)\n", 128 * MIB));
    assert_eq!(ctl.device("r1").unwrap()["capacity"], 128 * MIB);
    let grown = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    grown.set_len(96 * MIB).unwrap();
    let r = ctl.json("device resize f1");
    assert_eq!(r, json!({"name": "f1", "capacity": 96 * MIB}));
    let client = Client::connect(Path::new(&r1), 1);
    assert_eq!(client.capacity(), 128 * MIB);
    let f_client = Client::connect(Path::new(&f1), 1);
    assert_eq!(f_client.capacity(), 96 * MIB);
    drop(f_client);

    ctl.fails("device remove r1", 1);
    assert_eq!(ctl.ok("device remove r1 --force"), "removed r1\n");
    assert!(ctl.device("r1").is_none());
    assert!(
        !Path::new(&r1).exists(),
        "socket of a removed device left behind"
    );
    drop(client);
    assert_eq!(ctl.json("device remove f1"), json!({"name": "f1"}));
    assert!(ctl.devices().is_empty());
}

/// `iostat --watch 1 --count 2` while writing: two tables, rates from the writes.
fn watch_shows_rates(ctl: &Ctl, disk: &mut Disk) {
    let started = Instant::now();
    let mut child = ctl
        .command("iostat --watch 1 --count 2 r1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vubdctl");
    let mut writes = 0u64;
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "iostat --watch did not stop"
        );
        ok("write while watching", disk.write(0, &pattern(7, 0, 4096)));
        writes += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "two 1 s intervals"
    );
    let tables: Vec<&str> = r.stdout.split("\n\n").collect();
    assert_eq!(tables.len(), 2, "two tables: {}", r.stdout);
    let mut per_s = 0.0;
    for t in tables {
        let rows = table(t);
        assert_eq!(rows.len(), 1, "{t}");
        assert_eq!(rows[0]["DEVICE"], "r1");
        assert_eq!(rows[0]["r/s"], "0.0", "{t}");
        per_s += rows[0]["w/s"].parse::<f64>().unwrap();
    }
    // Two 1 s intervals inside the time we wrote: about as many writes as we made, no more.
    assert!(
        per_s > 0.0 && per_s <= writes as f64 * 1.2,
        "w/s {per_s}, {writes} writes"
    );
}

#[test]
fn device_flags_and_errors() {
    let dir = test_dir();
    let d = dir.path();
    let (_server, ctl) = start(d, "vubd");
    // Our own uid, for socket-owner and allow-uid: the owner of a directory we made.
    let uid = std::fs::metadata(d).unwrap().uid();
    let (s1, mask) = (sock(d, "s1"), last_cpu_mask());
    ctl.ok(&format!(
        "device add --name s1 --socket-path {s1} --null 1G --num-queues 3 --read-only \
         --writethrough --serial ser-1 --logical-block-size 4096 --cpumask {mask} \
         --socket-mode 0660 --socket-owner {uid} --allow-uid {uid},0"
    ));
    let dev = ctl.device("s1").unwrap();
    assert_eq!(dev["read-only"], true);
    assert_eq!(dev["logical-block-size"], 4096);
    assert_eq!(dev["num-queues"], 3);
    let cfg = &dev["config"];
    assert_eq!(cfg["serial"], "ser-1");
    assert_eq!(cfg["writethrough"], true);
    assert_eq!(cfg["allow-uid"], json!([uid, 0]));
    assert_eq!(cfg["socket-mode"], "0660");
    let mode = std::fs::metadata(&s1).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let file = create_file(d, "b.img", MIB);
    let b1 = sock(d, "b1");
    ctl.ok(&format!(
        "device add --name b1 --blk-file {} --buffered --socket-path {b1}",
        file.display()
    ));
    // The NBD and RBD keys are known to vubd: with a RAM backend it refuses them for
    // belonging to another backend, not as unknown fields (without dialing a server or
    // loading librbd).
    let x = sock(d, "x");
    for extra in [
        "--nbd-timeout-s 1",
        "--rbd-conf /c --rbd-user u --rbd-keyring /k",
    ] {
        let err = ctl.fails(
            &format!("device add --name x --socket-path {x} --ram 1M {extra}"),
            1,
        );
        assert!(err.contains("another backend"), "{extra}: {err}");
    }

    // Errors vubd reports: exit 1, "vubdctl: MESSAGE (code N)".
    let err = ctl.fails("device remove nosuch", 1);
    assert!(
        err.starts_with("vubdctl: ") && err.contains("nosuch"),
        "{err}"
    );
    assert!(err.trim_end().ends_with("(code -32001)"), "{err}");
    for line in ["iostat nosuch", "device resize nosuch 1G"] {
        let err = ctl.fails(line, 1);
        assert!(
            err.contains("nosuch") && err.contains("-32001"),
            "{line}: {err}"
        );
    }
    let other = sock(d, "other");
    let err = ctl.fails(
        &format!("device add --name s1 --ram 1M --socket-path {other}"),
        1,
    );
    assert!(err.contains("s1") && err.contains("(code -32002)"), "{err}");
    let err = ctl.fails(
        &format!("device add --name bad --ram 1M --logical-block-size 1000 --socket-path {other}"),
        1,
    );
    assert!(
        err.contains("1000") && err.contains("(code -32602)"),
        "{err}"
    );
    let err = ctl.fails("device resize s1 1000", 1);
    assert!(err.contains("(code -32602)"), "{err}");
    let err = ctl.fails("call no_such_method", 1);
    assert!(err.contains("(code -32601)"), "{err}");

    // Usage errors: exit 2 (clap's), nothing sent.
    for line in [
        "device add --name y --socket-path /y",
        "device add --name y --socket-path /y --ram 1M --null 1M",
        "iostat --count 2",
        "iostat --watch 1 --reset",
        "iostat --watch 0",
        "poll-mode sometimes",
        "call device_list {not-json",
        "no-such-command",
    ] {
        ctl.fails(line, 2);
    }
    assert!(ctl.device("y").is_none());

    // No server: exit 2, naming the socket.
    let missing = d.join("missing.sock");
    let err = Ctl {
        socket: missing.clone(),
    }
    .fails("version", 2);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    // The socket from the environment when there is no -s.
    let out = Command::new(VUBDCTL)
        .args(["device", "list"])
        .env("VUBD_RPC_SOCKET", &ctl.socket)
        .output()
        .unwrap();
    let r = ran(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("s1"), "{}", r.stdout);

    // Raw calls.
    let v = ctl.json(r#"call iostat {"name":"s1","reset":true}"#);
    assert_eq!(v["devices"][0]["name"], "s1");
    let pretty = ctl.ok("call version");
    assert!(pretty.lines().count() > 1, "pretty-printed: {pretty}");
    assert_eq!(
        serde_json::from_str::<Value>(&pretty).unwrap()["name"],
        "vubd"
    );
}

#[test]
fn reactors_poll_mode_version_methods() {
    let dir = test_dir();
    let (_server, ctl) = start(dir.path(), "vubd");
    let text = ctl.ok("reactors");
    let rows = table(&text);
    assert_eq!(rows.len(), 1, "one reactor (-m names one CPU): {text}");
    let cpu = allowed_cpus().last().unwrap().to_string();
    assert_eq!(
        (rows[0]["REACTOR"].as_str(), rows[0]["CPU"].as_str()),
        ("0", cpu.as_str())
    );
    assert!(rows[0]["BUSY%"].parse::<f64>().is_ok(), "{text}");
    for h in ["SLEEPS", "WAKEUPS", "POLLERS", "PARKED", "MODE"] {
        assert!(rows[0].contains_key(h), "{text}");
    }

    assert_eq!(
        ctl.ok("poll-mode interrupt"),
        "poll mode interrupt, idle spin 50us\n"
    );
    let reactors = ctl.json("reactors");
    for r in reactors.as_array().unwrap() {
        assert_eq!(r["poll-mode"], "interrupt", "{reactors}");
    }
    assert_eq!(table(&ctl.ok("reactors"))[0]["MODE"], "interrupt");
    let set = ctl.json("poll-mode adaptive --idle-spin-us 20");
    assert_eq!(set, json!({"mode": "adaptive", "idle-spin-us": 20}));
    assert_eq!(ctl.json("reactors")[0]["idle-spin-us"], 20);
    assert_eq!(table(&ctl.ok("reactors"))[0]["MODE"], "adaptive/20us");

    let out = ctl.ok("reactors --watch 0.3 --count 2");
    let tables: Vec<&str> = out.split("\n\n").collect();
    assert_eq!(tables.len(), 2, "{out}");
    for t in tables {
        let rows = table(t);
        let busy: f64 = rows[0]["BUSY%"].parse().unwrap();
        assert!((0.0..=100.0).contains(&busy), "{t}");
        assert!(rows[0].contains_key("SLEEPS/s"), "{t}");
    }
    let lines = ctl.ok("--json reactors --watch 0.2 --count 3");
    assert_eq!(lines.lines().count(), 3, "{lines}");
    for l in lines.lines() {
        assert!(serde_json::from_str::<Value>(l).unwrap().is_array(), "{l}");
    }

    assert!(ctl.ok("version").starts_with("vubd "));
    let methods = ctl.ok("methods");
    for m in [
        "device_add",
        "device_list",
        "iostat",
        "reactor_stats",
        "config_save",
    ] {
        assert!(methods.lines().any(|l| l == m), "{methods}");
    }
}

#[test]
fn config_save_starts_the_same_devices() {
    let (dir_a, dir_b) = (test_dir(), test_dir());
    let (a, b) = (dir_a.path(), dir_b.path());
    let (mut server, ctl) = start(a, "vubd");
    let file = create_file(a, "f.img", 8 * MIB);
    let (r, f) = (sock(a, "r"), sock(a, "f"));
    ctl.ok(&format!(
        "device add --name r --ram 32M --num-queues 2 --socket-path {r}"
    ));
    ctl.ok(&format!(
        "device add --name f --blk-file {} --serial keep-me --socket-path {f}",
        file.display()
    ));
    ctl.ok("device resize r 48M");
    let data = pattern(5, MIB, 64 * 1024);
    {
        let mut client = Client::connect(Path::new(&f), 1);
        ok("write", client.disk().write(MIB, &data));
        ok("flush", client.disk().flush());
    }

    let text = ctl.ok("config save");
    let saved_to = a.join("saved.toml");
    assert_eq!(
        ctl.ok(&format!("config save -o {}", saved_to.display())),
        ""
    );
    assert_eq!(read_to_string(&saved_to), text);
    assert_eq!(ctl.json("config save")["toml"], text.as_str());

    // The same devices, with their sockets (and the management socket) in another dir.
    let mut cfg: toml::Table = toml::from_str(&text).expect("config save prints TOML");
    let rpc_b = b.join("rpc.sock");
    assert!(cfg.contains_key("rpc-socket"), "{text}");
    cfg.insert("rpc-socket".into(), rpc_b.display().to_string().into());
    let devices = cfg["device"].as_array_mut().expect("[[device]] tables");
    assert_eq!(devices.len(), 2, "{text}");
    let mut sockets = vec![rpc_b.clone()];
    for dev in devices {
        let t = dev.as_table_mut().unwrap();
        let moved = b.join(format!("{}.sock", t["name"].as_str().unwrap()));
        t.insert("socket-path".into(), moved.display().to_string().into());
        sockets.push(moved);
    }
    let cfg_b = b.join("vubd.toml");
    std::fs::write(&cfg_b, toml::to_string(&cfg).unwrap()).unwrap();
    let before = ctl.devices();
    server.terminate();

    let _server_b = Server::start_config(b, "vubd-b", &cfg_b, &sockets);
    let ctl_b = Ctl { socket: rpc_b };
    let after = ctl_b.devices();
    let summary = |l: &[Value]| -> Vec<Value> {
        let row = |d: &Value| {
            let keys = [&d["name"], &d["backend"], &d["capacity"], &d["num-queues"]];
            json!([keys, d["config"]["serial"]])
        };
        l.iter().map(row).collect()
    };
    assert_eq!(summary(&after), summary(&before));
    assert_eq!(ctl_b.device("r").unwrap()["capacity"], 48 * MIB);
    let mut client = Client::connect(&b.join("f.sock"), 1);
    let got = ok("read back", client.disk().read(MIB, data.len()));
    assert_bytes_eq("data through the restarted device", &got, &data);
}

/// A garbage line gets a parse error; the connection stays usable.
#[test]
fn garbage_line_then_a_request_on_the_same_connection() {
    let dir = test_dir();
    let (_server, ctl) = start(dir.path(), "vubd");
    let stream = UnixStream::connect(&ctl.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = |line: &str| -> Value {
        writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    };
    let e = ask("this is not json {");
    assert_eq!(e["error"]["code"], -32700, "{e}");
    assert_eq!(e["id"], Value::Null);
    let e = ask(r#"{"jsonrpc":"2.0","id":2}"#);
    assert_eq!(e["error"]["code"], -32600, "{e}");
    let v = ask(r#"{"jsonrpc":"2.0","id":3,"method":"version"}"#);
    assert_eq!(v["id"], 3);
    assert_eq!(v["result"]["name"], "vubd", "{v}");
}

/// A socket that accepts but never answers: vubdctl gives up after --timeout, exit 1.
#[test]
fn no_answer_within_the_timeout() {
    let dir = test_dir();
    let path = dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let started = Instant::now();
    let out = Command::new(VUBDCTL)
        .arg("-s")
        .arg(&path)
        .args(["--timeout", "0.5", "version"])
        .output()
        .unwrap();
    let r = ran(out);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("no answer") && r.stderr.contains("--timeout"),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
