//! The Ceph RBD backend against a real one-node cluster (tests/ceph/cluster.sh, started and
//! stopped by each test), through a real vhost-user client (libblkio), with vubd's seccomp
//! filters on (the default): byte-exact I/O over two queues on two reactors, flush,
//! discard, write-zeroes, the image read back with `rbd export`, online resize, devices
//! added at run time, durability across a SIGKILL (write-through and flushed writes), the
//! exclusive lock of a killed predecessor broken (and a live one's never), a dead cluster
//! failing requests without stalling other devices, and clear errors at start.
//!
//! Without the Ceph packages (tests/ceph/install.sh) every test prints "SKIPPED: ..." and
//! FAILS, unless `VUBD_ALLOW_RBD_SKIP=1` is set: a missing cluster must never look like a
//! pass.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE_MB: u64 = 64;
const IMAGE: u64 = IMAGE_MB * MIB;

/// A fresh cluster, or None (after a loud SKIPPED line) when Ceph is not installed and
/// skipping is allowed; panics when it is not.
fn cluster(test: &str) -> Option<ceph::Cluster> {
    match ceph::Cluster::start() {
        Ok(c) => Some(c),
        Err(e) if e.contains("not installed") => skip(test, &e),
        Err(e) => panic!("{test}: {e}"),
    }
}

fn skip<T>(test: &str, why: &str) -> Option<T> {
    let why = why.lines().next().unwrap_or_default();
    eprintln!("SKIPPED: rbd test {test}: {why}");
    if std::env::var("VUBD_ALLOW_RBD_SKIP").as_deref() == Ok("1") {
        return None;
    }
    panic!("rbd test {test} could not run ({why}); set VUBD_ALLOW_RBD_SKIP=1 to allow skipping it");
}

/// `--rbd rbd/IMAGE --rbd-conf CONF`.
fn rbd_args(conf: &Path, image: &str) -> Vec<String> {
    vec![
        "--rbd".into(),
        format!("{}/{image}", ceph::POOL),
        "--rbd-conf".into(),
        conf.display().to_string(),
    ]
}

fn start(dir: &Path, name: &str, conf: &Path, image: &str, extra: &[&str]) -> Server {
    let mut args = rbd_args(conf, image);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(dir, name, &args)
}

/// The cluster's conf plus client options (e.g. short timeouts) in a [client] section.
fn client_conf(cluster: &ceph::Cluster, dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("client.conf");
    let base = std::fs::read_to_string(&cluster.conf).expect("read ceph.conf");
    std::fs::write(&path, format!("{base}\n[client]\n{extra}\n")).expect("write client.conf");
    path
}

/// The image as `rbd export` sees it.
fn export(cluster: &ceph::Cluster, dir: &Path, image: &str) -> Vec<u8> {
    let path = dir.join(format!("{image}.export"));
    cluster.export(image, &path);
    std::fs::read(&path).expect("read export")
}

/// What the client expects the image to hold: every write applied to a copy.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.0[off as usize..(off + len) as usize].fill(0);
    }
    fn get(&self, off: u64, len: usize) -> &[u8] {
        &self.0[off as usize..off as usize + len]
    }
}

fn write(disk: &mut Disk, model: &mut Model, off: u64, data: &[u8]) {
    ok(
        &format!("write {} B at {off}", data.len()),
        disk.write(off, data),
    );
    model.write(off, data);
}

fn check(disk: &mut Disk, model: &Model, off: u64, len: usize, what: &str) {
    let got = ok(&format!("read {len} B at {off}"), disk.read(off, len));
    assert_bytes_eq(what, &got, model.get(off, len));
}

#[test]
fn io_is_byte_exact_and_lands_in_the_image() {
    let Some(cluster) = cluster("io") else { return };
    let dir = test_dir();
    cluster.create_image("io", IMAGE_MB, "");
    let mask = two_cpu_mask();
    let mut server = start(
        dir.path(),
        "vubd",
        &cluster.conf,
        "io",
        &["-m", &mask, "--num-queues", "2"],
    );
    let mut c = Client::connect(&server.socket, 2);
    assert_eq!(c.capacity(), IMAGE);
    let mut model = Model(vec![0u8; IMAGE as usize]);

    // Every size at aligned and unaligned offsets, the last sector, then overwrites.
    let mut extents = Vec::new();
    for (i, size) in [512usize, 4096, 65536, 1 << 20].into_iter().enumerate() {
        for (j, sub) in [0u64, 512, 3 * 4096 + 512].into_iter().enumerate() {
            extents.push(((i * 3 + j) as u64 * 2 * MIB + sub, size));
        }
    }
    extents.push((IMAGE - 512, 512));
    for (n, &(off, size)) in extents.iter().enumerate() {
        write(c.disk(), &mut model, off, &pattern(n as u64, off, size));
    }
    for &(off, size) in &extents {
        check(c.disk(), &model, off, size, "after first writes");
    }
    for &(off, size) in extents.iter().step_by(2) {
        write(c.disk(), &mut model, off, &pattern(99, off, size));
    }
    for &(off, size) in &extents {
        check(c.disk(), &model, off, size, "after overwrites");
    }

    // One request of six scattered segments, read back as one and as six.
    let lens = [512, 4096, 1536, 65536, 8192 + 512, 512];
    let total: usize = lens.iter().sum();
    let off = 30 * MIB + 512;
    let data = pattern(7, off, total);
    let mut segs = Vec::new();
    let mut at = 0;
    for len in lens {
        segs.push(&data[at..at + len]);
        at += len;
    }
    ok("writev", c.disk().writev(off, &segs));
    model.write(off, &data);
    check(c.disk(), &model, off, total, "multi-segment write");
    let back = ok("readv", c.disk().readv(off, &lens)).concat();
    assert_bytes_eq("multi-segment read", &back, &data);

    // Both queues at once, 32 requests deep each, on two reactors: completions reaped by
    // either reactor reach the queue that submitted them.
    let region = |q: usize| 40 * MIB + q as u64 * 4 * MIB;
    let mut writers = Vec::new();
    for (q, mut disk) in c.disks.drain(..).enumerate() {
        writers.push(std::thread::spawn(move || {
            for round in 0..4u64 {
                for i in 0..32usize {
                    let off = region(q) + (i * 65536) as u64;
                    disk.buf
                        .store(i * 65536, &pattern(round * 10 + q as u64, off, 65536));
                    disk.submit_write(off, i * 65536, 65536, i + 1);
                }
                for (ud, ret) in disk.wait(32) {
                    assert_eq!(ret, 0, "queue {q} request {ud} failed");
                }
                for i in 0..32usize {
                    let off = region(q) + (i * 65536) as u64;
                    disk.submit_read(off, i * 65536, 65536, i + 100);
                }
                for (ud, ret) in disk.wait(32) {
                    assert_eq!(ret, 0, "queue {q} read {ud} failed");
                }
                for i in 0..32usize {
                    let off = region(q) + (i * 65536) as u64;
                    assert_bytes_eq(
                        &format!("queue {q} round {round} block {i}"),
                        &disk.buf.load(i * 65536, 65536),
                        &pattern(round * 10 + q as u64, off, 65536),
                    );
                }
            }
            disk
        }));
    }
    for (q, w) in writers.into_iter().enumerate() {
        c.disks.push(w.join().unwrap());
        model.write(region(q), &{
            let mut v = Vec::new();
            for i in 0..32usize {
                let off = region(q) + (i * 65536) as u64;
                v.extend(pattern(30 + q as u64, off, 65536));
            }
            v
        });
    }

    ok("flush", c.disk().flush());

    // write-zeroes with and without unmap, unaligned to objects; discard of whole objects
    // (librbd deletes them: they read back as zeroes).
    let zoff = 2 * MIB + 4096;
    ok(
        "write zeroes",
        c.disk()
            .write_zeroes(zoff, 64 * 1024, blkio::ReqFlags::empty()),
    );
    model.zero(zoff, 64 * 1024);
    let zoff2 = 5 * MIB;
    ok(
        "write zeroes, no unmap",
        c.disk()
            .write_zeroes(zoff2, 8192, blkio::ReqFlags::NO_UNMAP),
    );
    model.zero(zoff2, 8192);
    ok("discard", c.disk().discard(8 * MIB, 8 * MIB));
    model.zero(8 * MIB, 8 * MIB);
    for off in (0..24 * MIB).step_by(MIB as usize) {
        check(
            c.disk(),
            &model,
            off,
            MIB as usize,
            "after zeroes and discard",
        );
    }
    ok("flush", c.disk().flush());

    // Every thread is filtered, librbd's own included.
    let threads = seccomp_of_threads(server.pid());
    assert!(
        threads.iter().any(|(n, _)| n.starts_with("msgr-worker")),
        "librbd's threads: {threads:?}"
    );
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not filtered: {threads:?}");
    }
    // The reactors' reads of librbd's eventfd wait by polling it, not in a blocking
    // io_uring worker thread per reactor.
    assert!(
        !threads.iter().any(|(n, _)| n.starts_with("iou-wrk")),
        "io_uring workers: {threads:?}"
    );

    drop(c);
    server.assert_alive();
    assert!(server.terminate().success(), "{}", server.stderr());
    let image = export(&cluster, dir.path(), "io");
    assert_bytes_eq("rbd export", &image, &model.0);
}

/// The management socket, spoken raw (one JSON-RPC line each way).
struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    id: u64,
}

impl Rpc {
    fn connect(path: &Path) -> Rpc {
        let s = UnixStream::connect(path).expect("connect to the management socket");
        s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        Rpc {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
            id: 0,
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.id += 1;
        let req = json!({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params});
        writeln!(self.writer, "{req}").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("an answer");
        let a: Value = serde_json::from_str(&line).unwrap();
        match a.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(a["result"].clone()),
        }
    }

    fn ok(&mut self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }
}

fn image_size(cluster: &ceph::Cluster, image: &str) -> u64 {
    let out = cluster.rbd(&["info", "--format", "json", &format!("rbd/{image}")]);
    assert!(out.status.success(), "rbd info");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["size"].as_u64().unwrap()
}

/// A device added over the management socket (librbd's thread then starts from the confined
/// control thread), resized online by vubd and from outside, the frontend seeing each size.
#[test]
fn devices_added_at_run_time_resize_online() {
    let Some(cluster) = cluster("resize") else {
        return;
    };
    let dir = test_dir();
    cluster.create_image("rs", IMAGE_MB, "layering,exclusive-lock");
    let rpc_path = dir.path().join("rpc.sock");
    let args = vec![
        "--rpc-socket".to_string(),
        rpc_path.display().to_string(),
        "-m".into(),
        last_cpu_mask(),
    ];
    let mut server = Server::spawn(dir.path(), "vubd", &args, std::slice::from_ref(&rpc_path));
    let mut rpc = Rpc::connect(&rpc_path);
    let sock = dir.path().join("rs.sock");
    rpc.ok(
        "device_add",
        json!({"name": "rs", "socket-path": sock, "rbd": "rbd/rs", "rbd-conf": cluster.conf}),
    );
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), IMAGE);
    let data = pattern(5, 0, 8192);
    ok("write", c.disk().write(0, &data));
    ok("flush", c.disk().flush());
    drop(c);

    // Grown by vubd (rbd_resize): the cluster and a new connection see it.
    let r = rpc.ok("device_resize", json!({"name": "rs", "size": "96M"}));
    assert_eq!(r["capacity"], 96 * MIB);
    assert_eq!(image_size(&cluster, "rs"), 96 * MIB);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 96 * MIB);
    let tail = 96 * MIB - 4096;
    ok(
        "write at the new end",
        c.disk().write(tail, &pattern(6, tail, 4096)),
    );
    assert_bytes_eq(
        "new end",
        &ok("read", c.disk().read(tail, 4096)),
        &pattern(6, tail, 4096),
    );
    assert_bytes_eq("data kept", &ok("read", c.disk().read(0, 8192)), &data);
    drop(c);

    // Grown from outside (`rbd resize`): a resize without a size re-reads it.
    let out = cluster.rbd(&["resize", "--size", "128", "rbd/rs"]);
    assert!(
        out.status.success(),
        "rbd resize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = rpc.ok("device_resize", json!({"name": "rs"}));
    assert_eq!(r["capacity"], 128 * MIB);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 128 * MIB);
    let tail = 128 * MIB - 512;
    ok(
        "write at the outside end",
        c.disk().write(tail, &pattern(7, tail, 512)),
    );
    drop(c);

    // Removing the device closes the image: the exclusive lock is released at once. (The
    // client's disconnect is seen a moment after its socket closes.)
    let t0 = Instant::now();
    while let Err(e) = rpc.call("device_remove", json!({"name": "rs"})) {
        assert!(t0.elapsed() < Duration::from_secs(5), "device_remove: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = cluster.rbd(&["lock", "ls", "--format", "json", "rbd/rs"]);
    let locks: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        locks.as_array().is_some_and(|a| a.is_empty()),
        "lock left after device_remove: {locks}"
    );
    server.assert_alive();
}

/// The client address vubd logged for its image.
fn client_addr(server: &Server) -> String {
    let log = server.stderr();
    let line = log
        .lines()
        .find(|l| l.contains(": opened as "))
        .unwrap_or_else(|| panic!("no 'opened as' line in:\n{log}"));
    line.split(": opened as ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string()
}

fn blocklist(cluster: &ceph::Cluster) -> String {
    let out = cluster.ceph(&["osd", "blocklist", "ls"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// SIGKILL, restart: the new vubd breaks the lock its dead predecessor held (no 30 s
/// stall) and says so; a flushed write (write-back) and every completed write
/// (write-through) survive; a live vubd's lock is never broken.
#[test]
fn restart_after_sigkill_keeps_flushed_data_and_takes_the_lock_at_once() {
    let Some(cluster) = cluster("restart") else {
        return;
    };
    let dir = test_dir();
    cluster.create_image("lk", IMAGE_MB, "layering,exclusive-lock");
    let conf = cluster.conf.clone();

    // Write-back: A writes and flushes (and so owns the lock), then writes more, unflushed.
    let mut a = start(dir.path(), "a", &conf, "lk", &[]);
    let mut c = Client::connect(&a.socket, 1);
    let flushed = pattern(1, 0, 65536);
    ok("write", c.disk().write(0, &flushed));
    ok("flush", c.disk().flush());
    ok(
        "unflushed write",
        c.disk().write(MIB, &pattern(2, MIB, 65536)),
    );
    let a_addr = client_addr(&a);
    signal(a.pid(), libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5));
    drop(c);

    // B: the first write needs the lock. Without breaking it, it would wait for the dead
    // client's watch to expire (~30 s).
    let b = start(dir.path(), "b", &conf, "lk", &["--writethrough"]);
    let mut c = Client::connect(&b.socket, 1);
    let t0 = Instant::now();
    ok(
        "write after restart",
        c.disk().write(2 * MIB, &pattern(3, 2 * MIB, 4096)),
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "first write after the restart took {took:?}:\n{}",
        b.stderr()
    );
    assert!(
        b.stderr().contains("broke the exclusive lock held by"),
        "B did not say it broke the lock:\n{}",
        b.stderr()
    );
    assert!(
        blocklist(&cluster).contains(&a_addr),
        "A ({a_addr}) not blocklisted"
    );
    assert_bytes_eq(
        "flushed data",
        &ok("read", c.disk().read(0, 65536)),
        &flushed,
    );

    // Write-through (B runs with --writethrough): completed writes are durable without a
    // flush, even when the process dies right after.
    let mut expect = Vec::new();
    for i in 0..16u64 {
        let off = 4 * MIB + i * 12288 + 512;
        let data = pattern(10 + i, off, 8192);
        ok("write-through write", c.disk().write(off, &data));
        expect.push((off, data));
    }
    let b_addr = client_addr(&b);

    // C opens the same image while B is alive and holds the lock: C must not break it.
    let mut cc = start(dir.path(), "c", &conf, "lk", &[]);
    let mut c2 = Client::connect(&cc.socket, 1);
    assert!(
        cc.stderr().contains("not breaking it"),
        "C should have left B's lock alone:\n{}",
        cc.stderr()
    );
    // Both keep working: the lock moves between live clients cooperatively.
    ok(
        "C writes",
        c2.disk().write(6 * MIB, &pattern(20, 6 * MIB, 4096)),
    );
    ok(
        "B writes again",
        c.disk()
            .write(6 * MIB + 4096, &pattern(21, 6 * MIB + 4096, 4096)),
    );
    assert!(
        !blocklist(&cluster).contains(&b_addr),
        "live B was blocklisted"
    );
    drop(c2);
    cc.terminate();

    let mut b = b;
    signal(b.pid(), libc::SIGKILL);
    b.wait_exit(Duration::from_secs(5));
    drop(c);
    let image = export(&cluster, dir.path(), "lk");
    assert_bytes_eq("flushed write-back data", &image[..65536], &flushed);
    for (off, data) in &expect {
        assert_bytes_eq(
            &format!("write-through data at {off}"),
            &image[*off as usize..*off as usize + data.len()],
            data,
        );
    }
}

/// The cluster dies under a running device: its requests fail (IOERR) once librados gives
/// up, while another device of the same vubd keeps serving without a hitch, and vubd lives.
#[test]
fn dead_cluster_fails_its_requests_only() {
    let Some(cluster) = cluster("dead") else {
        return;
    };
    let dir = test_dir();
    cluster.create_image("dd", IMAGE_MB, "layering");
    let conf = client_conf(
        &cluster,
        dir.path(),
        "rados osd op timeout = 3\nrados mon op timeout = 3",
    );
    let rpc_path = dir.path().join("rpc.sock");
    let args = vec![
        "--rpc-socket".to_string(),
        rpc_path.display().to_string(),
        "-m".into(),
        last_cpu_mask(),
    ];
    let mut server = Server::spawn(dir.path(), "vubd", &args, std::slice::from_ref(&rpc_path));
    let mut rpc = Rpc::connect(&rpc_path);
    let (rs, ram) = (dir.path().join("rbd.sock"), dir.path().join("ram.sock"));
    rpc.ok(
        "device_add",
        json!({"name": "rbd", "socket-path": rs, "rbd": "rbd/dd", "rbd-conf": conf}),
    );
    rpc.ok(
        "device_add",
        json!({"name": "ram", "socket-path": ram, "ram": "16M"}),
    );
    let mut c = Client::connect(&rs, 1);
    ok("write before", c.disk().write(0, &pattern(1, 0, 4096)));

    for pid in cluster.daemon_pids() {
        signal(pid, libc::SIGKILL);
    }
    // The RAM device, on the same reactor, keeps answering fast while rbd requests hang.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let ram_load = std::thread::spawn(move || {
        let mut r = Client::connect(&ram, 1);
        let mut worst = Duration::ZERO;
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            ok(
                "ram write",
                r.disk().write(n % 1000 * 4096, &[n as u8; 4096]),
            );
            worst = worst.max(t.elapsed());
            n += 1;
        }
        (n, worst)
    });
    let t0 = Instant::now();
    // With librbd's cache on, the write may be acknowledged at once; the flush cannot.
    let w = c.disk().write(4096, &pattern(2, 4096, 4096));
    let f = c.disk().flush();
    let took = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, worst) = ram_load.join().unwrap();
    assert!(
        w.is_err() || f.is_err(),
        "write {w:?} and flush {f:?} both succeeded with the cluster dead"
    );
    assert!(took < Duration::from_secs(9), "failing took {took:?}");
    assert!(n > 100, "the RAM device did only {n} writes meanwhile");
    assert!(
        worst < Duration::from_millis(500),
        "a RAM write took {worst:?}"
    );
    server.assert_alive();
    drop(c);
}

fn vubd_exits(
    dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, Duration) {
    let t0 = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vubd"));
    cmd.args(args)
        .args(["--socket-path"])
        .arg(dir.join("x.sock"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vubd");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

/// A host without librbd gets one clear line, and so does a cluster nobody answers for.
#[test]
fn clear_errors_without_librbd_or_cluster() {
    let dir = test_dir();
    let conf = dir.path().join("nobody.conf");
    // Nothing listens on these ports.
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:9\nauth client required = none\n",
    )
    .unwrap();
    let args = rbd_args(&conf, "img");
    let (st, err, _) = vubd_exits(
        dir.path(),
        &args,
        &[("VUBD_LIBRBD", "/nonexistent/librbd.so.1")],
    );
    assert!(!st.success());
    if err.contains("librados.so.2") {
        // No Ceph client libraries at all: that message, then the rest needs them.
        assert!(
            err.contains("--rbd needs librados.so.2 (Debian: apt install librados2)"),
            "{err}"
        );
        if skip::<()>("errors", &err).is_none() {
            return;
        }
    }
    assert!(
        err.contains("--rbd needs /nonexistent/librbd.so.1 (Debian: apt install librbd1)"),
        "{err}"
    );
    let (st, err, took) = vubd_exits(dir.path(), &args, &[]);
    assert!(!st.success());
    assert!(err.contains("cannot connect to the Ceph cluster"), "{err}");
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
}
