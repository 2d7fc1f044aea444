//! The NBD backend against real NBD servers (`nbdkit memory`, `qemu-nbd`,
//! `qemu-storage-daemon --export type=nbd`) and hostile ones written here, driven by a real
//! vhost-user-blk client (libblkio), with vubd's seccomp filters on (its default).
//!
//! Needs `nbdkit` and `qemu-utils` (qemu-nbd, qemu-storage-daemon), which
//! tests/install-deps.sh installs. Without them the tests fail, unless VUBD_ALLOW_NBD_SKIP=1
//! says skipping is fine.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;

const DISK: u64 = 64 * MIB;

/// True if `tool` can run (installing the test dependencies first when it is missing and
/// the tests run as root); otherwise panics, unless skipping is allowed.
fn have(tool: &str) -> bool {
    if have_tool(tool) {
        return true;
    }
    if std::env::var_os("VUBD_ALLOW_NBD_SKIP").is_some() {
        eprintln!("{tool} is not installed: skipping");
        return false;
    }
    panic!(
        "{tool} is not installed (tests/install-deps.sh: nbdkit libnbd-bin qemu-utils); \
         set VUBD_ALLOW_NBD_SKIP=1 to skip"
    );
}

/// A server process a test started; killed (by its own pid) when dropped.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` and waits until `ready` exists (a socket) or `port` accepts.
    fn spawn(dir: &Path, name: &str, cmd: &mut Command, ready: Ready<'_>) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut d = Daemon {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match ready {
                Ready::Socket(p) => UnixStream::connect(p).is_ok(),
                Ready::Port(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
            };
            if up {
                return d;
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{name} exited ({st}): {}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the server vanishes mid-request, as in a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy)]
enum Ready<'a> {
    Socket(&'a Path),
    Port(u16),
}

fn nbd_unix(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// `nbdkit memory` on a Unix socket, with extra arguments before the plugin.
fn nbdkit(dir: &Path, name: &str, filters: &[&str], plugin: &[&str]) -> (Daemon, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    // A killed nbdkit leaves its socket file behind, and a new one will not replace it.
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(filters)
        .args(plugin);
    let d = Daemon::spawn(dir, name, &mut cmd, Ready::Socket(&sock));
    (d, sock)
}

/// `qemu-nbd` serving `img` (raw, O_DIRECT) on a Unix socket, with `extra` arguments.
fn qemu_nbd_unix(dir: &Path, sock: &Path, img: &Path, extra: &[&str]) -> Daemon {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--persistent", "--format=raw", "--cache=none", "--socket"])
        .arg(sock)
        .args(extra)
        .arg(img);
    Daemon::spawn(dir, "qemu-nbd", &mut cmd, Ready::Socket(sock))
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn vubd(dir: &Path, uri: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--nbd", uri];
    args.extend_from_slice(extra);
    Server::start(dir, "vubd", &args)
}

/// Writes, reads back, flushes, discards and zeroes through `disk`, checking every byte.
fn exercise(disk: &mut Disk, what: &str) {
    let extents: [(u64, usize); 6] = [
        (0, 512),
        (4096, 4096),
        (MIB + 512, 65536),
        (2 * MIB, MIB as usize),
        (5 * MIB, 3 * MIB as usize),
        (DISK - 4096, 4096),
    ];
    for (i, &(off, len)) in extents.iter().enumerate() {
        let flags = if i % 2 == 1 {
            ReqFlags::FUA
        } else {
            ReqFlags::empty()
        };
        ok(
            &format!("{what}: write {len} at {off}"),
            disk.write_flags(off, &pattern(i as u64, off, len), flags),
        );
    }
    ok(&format!("{what}: flush"), disk.flush());
    for (i, &(off, len)) in extents.iter().enumerate() {
        let got = ok(&format!("{what}: read {len} at {off}"), disk.read(off, len));
        assert_bytes_eq(
            &format!("{what}: data at {off}"),
            &got,
            &pattern(i as u64, off, len),
        );
    }
    // Scattered segments in one request, both ways.
    let segs: Vec<Vec<u8>> = [512usize, 4096, 1536, 65536]
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(100 + i as u64, 0, l))
        .collect();
    let refs: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
    ok(&format!("{what}: writev"), disk.writev(9 * MIB, &refs));
    let back = ok(
        &format!("{what}: readv"),
        disk.readv(9 * MIB, &[512, 4096, 1536, 65536]),
    );
    assert_eq!(back, segs, "{what}: scattered data");
    // Zeroes and discards read back as zeroes (this server's discard deallocates).
    ok(
        &format!("{what}: write zeroes"),
        disk.write_zeroes(2 * MIB, 65536, ReqFlags::NO_UNMAP),
    );
    assert_zeroes(
        &format!("{what}: zeroed range"),
        &ok("read", disk.read(2 * MIB, 65536)),
    );
    ok(&format!("{what}: discard"), disk.discard(5 * MIB, MIB));
}

#[test]
fn nbdkit_memory_round_trips_every_operation() {
    if !have("nbdkit") {
        return;
    }
    let dir = test_dir();
    let (_nbdkit, sock) = nbdkit(dir.path(), "nbdkit", &[], &["memory", "size=64M"]);
    let server = vubd(dir.path(), &nbd_unix(&sock, ""), &[]);
    let mut c = Client::connect(&server.socket, 1);
    assert_eq!(c.capacity(), DISK);
    exercise(c.disk(), "nbdkit");
    assert_zeroes(
        "discarded",
        &ok("read", c.disk().read(5 * MIB, MIB as usize)),
    );
}

/// A server without FUA: a write-through device's writes are followed by a flush (seen in
/// nbdkit's request log), and a server without write-zeroes is not offered it (both filters
/// default to advertising nothing).
#[test]
fn nbdkit_without_fua_gets_a_flush_after_each_write_through_write() {
    if !have("nbdkit") {
        return;
    }
    let dir = test_dir();
    let log = dir.path().join("requests.log");
    let logfile = format!("logfile={}", log.display());
    let (_nbdkit, sock) = nbdkit(
        dir.path(),
        "nbdkit",
        &["--filter=log", "--filter=fua", "--filter=nozero"],
        &["memory", "size=64M", &logfile],
    );
    let server = vubd(dir.path(), &nbd_unix(&sock, ""), &["--writethrough"]);
    let mut c = Client::connect(&server.socket, 1);
    let data = pattern(3, 8192, 8192);
    ok("write-through write", c.disk().write(8192, &data));
    assert_bytes_eq("data", &ok("read", c.disk().read(8192, 8192)), &data);
    assert!(
        c.disk().write_zeroes(0, 4096, ReqFlags::empty()).is_err(),
        "write-zeroes is not offered by this server"
    );
    let requests = read_to_string(&log);
    let write = requests.find("Write id=").expect("a write in nbdkit's log");
    assert!(
        requests[write..].contains("Flush id="),
        "a flush follows the write:\n{requests}"
    );
    assert!(!requests.contains("fua=1"), "no FUA flag sent:\n{requests}");
}

#[test]
fn qemu_nbd_file_backed_writes_land_in_the_file() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let sock = dir.path().join("qemu-nbd.sock");
    let _qnbd = qemu_nbd_unix(dir.path(), &sock, &img, &[]);
    let server = vubd(dir.path(), &nbd_unix(&sock, ""), &[]);
    let mut c = Client::connect(&server.socket, 1);
    exercise(c.disk(), "qemu-nbd");
    let data = pattern(9, 12 * MIB, 256 * 1024);
    ok("write", c.disk().write(12 * MIB, &data));
    ok("flush", c.disk().flush());
    assert_bytes_eq(
        "file contents",
        &read_file_at(&img, 12 * MIB, data.len()),
        &data,
    );
}

#[test]
fn qemu_storage_daemon_nbd_export() {
    if !have("qemu-storage-daemon") {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let sock = dir.path().join("qsd-nbd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(format!(
        "driver=file,filename={},node-name=f,cache.direct=on",
        img.display()
    ));
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()));
    cmd.arg("--export")
        .arg("type=nbd,id=e0,node-name=f,name=disk0,writable=on");
    let _qsd = Daemon::spawn(dir.path(), "qsd", &mut cmd, Ready::Socket(&sock));
    let server = vubd(dir.path(), &nbd_unix(&sock, "disk0"), &[]);
    let mut c = Client::connect(&server.socket, 1);
    assert_eq!(c.capacity(), DISK);
    exercise(c.disk(), "qemu-storage-daemon");
    // A missing export fails the device at start, naming the export.
    let (st, err) = run_vubd_to_exit(
        dir.path(),
        "missing",
        &[
            "--socket-path".into(),
            dir.path().join("x.sock").display().to_string(),
            "--nbd".into(),
            nbd_unix(&sock, "nope"),
        ],
    );
    assert!(!st.success());
    assert!(err.contains("nope") && !err.contains("panicked"), "{err}");
}

/// The reactors that had a connection to the server (a "(reactor N): connected" line each
/// time one was made or reused).
fn reactors_connected(server: &Server) -> std::collections::BTreeSet<String> {
    server
        .stderr()
        .lines()
        .filter_map(|l| {
            let end = l.find("): connected")?;
            let start = l[..end].rfind("(reactor ")?;
            Some(l[start..end].to_string())
        })
        .collect()
}

#[test]
fn multi_conn_server_gets_one_connection_per_reactor() {
    if !have("qemu-nbd") || allowed_cpus().len() < 2 {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let sock = dir.path().join("qemu-nbd.sock");
    // -e 2: two clients, and NBD_FLAG_CAN_MULTI_CONN.
    let _qnbd = qemu_nbd_unix(dir.path(), &sock, &img, &["--shared=2"]);
    let server = vubd(dir.path(), &nbd_unix(&sock, ""), &["-m", &two_cpu_mask()]);
    let mut c = Client::connect(&server.socket, 2);
    let data = pattern(5, 0, 65536);
    ok("write on queue 0", c.disks[0].write(0, &data));
    // A flush on the other connection covers it (multi-conn), and the data is there.
    ok("flush on queue 1", c.disks[1].flush());
    assert_bytes_eq(
        "read on queue 1",
        &ok("read", c.disks[1].read(0, 65536)),
        &data,
    );
    assert_bytes_eq("in the file", &read_file_at(&img, 0, data.len()), &data);
    assert_eq!(reactors_connected(&server).len(), 2, "{}", server.stderr());
}

#[test]
fn server_without_multi_conn_gets_one_connection() {
    if !have("qemu-nbd") || allowed_cpus().len() < 2 {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let sock = dir.path().join("qemu-nbd.sock");
    // One client at a time, no multi-conn: a second connection would never be served.
    let _qnbd = qemu_nbd_unix(dir.path(), &sock, &img, &[]);
    let server = vubd(dir.path(), &nbd_unix(&sock, ""), &["-m", &two_cpu_mask()]);
    for round in 0..2 {
        let mut c = Client::connect(&server.socket, 2);
        for q in 0..2 {
            let off = (round * 2 + q) as u64 * MIB;
            let data = pattern(q as u64, off, 8192);
            ok("write", c.disks[q].write(off, &data));
            assert_bytes_eq("read", &ok("read", c.disks[1 - q].read(off, 8192)), &data);
        }
    }
    assert_eq!(reactors_connected(&server).len(), 1, "{}", server.stderr());
    assert!(
        !server.stderr().contains("connecting failed"),
        "{}",
        server.stderr()
    );
}

/// qemu-nbd (file-backed, over TCP to "localhost") is killed in the middle of writes and
/// flushes and started again: the client sees no error, and every write is in the file.
#[test]
fn qemu_nbd_restarted_mid_io_loses_nothing() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let port = free_port();
    let start = |dir: &Path| {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--persistent",
            "--format=raw",
            "--cache=none",
            "--bind=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(&img);
        Daemon::spawn(dir, "qemu-nbd", &mut cmd, Ready::Port(port))
    };
    let mut qnbd = start(dir.path());
    let server = vubd(dir.path(), &format!("nbd://localhost:{port}/"), &[]);
    let mut c = Client::connect(&server.socket, 1);
    let mut disk = c.disks.remove(0);

    const QD: usize = 8;
    const LEN: usize = 64 * 1024;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // Each round writes QD extents (offsets rotate over 16 MiB) with that round's pattern;
    // every fourth round ends with a flush. Returns the seed each offset holds.
    let writer = std::thread::spawn(move || {
        let mut latest = std::collections::BTreeMap::new();
        let mut flushed = std::collections::BTreeMap::new();
        let mut round = 0u64;
        let mut errors = Vec::new();
        while !stop2.load(Ordering::SeqCst) || round < 8 {
            for k in 0..QD {
                let slot = (round as usize * QD + k) % 256;
                let off = (slot * LEN) as u64;
                disk.buf.store(k * LEN, &pattern(round + 1, off, LEN));
                disk.submit_write(off, k * LEN, LEN, k + 1);
                latest.insert(off, round + 1);
            }
            for (ud, ret) in disk.wait(QD) {
                if ret != 0 {
                    errors.push(format!("write {ud} of round {round}: {ret}"));
                }
            }
            if round % 4 == 3 {
                match disk.flush() {
                    Ok(()) => flushed.clone_from(&latest),
                    Err(e) => errors.push(format!("flush after round {round}: {e}")),
                }
            }
            round += 1;
        }
        (disk, latest, flushed, errors, round)
    });
    std::thread::sleep(Duration::from_millis(700));
    qnbd.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _qnbd = start(dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let (mut disk, latest, flushed, errors, rounds) = writer.join().unwrap();
    assert!(errors.is_empty(), "the client saw errors: {errors:?}");
    assert!(rounds > 8, "I/O went on ({rounds} rounds)");
    assert!(
        server.stderr().contains("connection back"),
        "vubd reconnected:\n{}",
        server.stderr()
    );
    // Through vubd, then in the file itself: the latest data everywhere (a raw file keeps
    // every completed write across a server crash), flushed data above all.
    for (&off, &seed) in &latest {
        let want = pattern(seed, off, LEN);
        assert_bytes_eq("read back", &ok("read", disk.read(off, LEN)), &want);
        assert_bytes_eq("in the file", &read_file_at(&img, off, LEN), &want);
    }
    for (&off, &seed) in &flushed {
        assert!(latest[&off] >= seed);
    }
}

/// The server goes away: requests wait, then fail with IOERR after `nbd-timeout-s`; new ones
/// fail at once while it stays away; another device of the same process is unaffected; when
/// the server is back, so is the device.
#[test]
fn server_gone_fails_requests_after_the_timeout_then_recovers() {
    if !have("nbdkit") {
        return;
    }
    let dir = test_dir();
    let (mut nbdkit1, sock) = nbdkit(dir.path(), "nbdkit", &[], &["memory", "size=64M"]);
    let (server, nbd, bystander) = with_bystander(dir.path(), &nbd_unix(&sock, ""));
    let mut c = Client::connect(&nbd, 1);
    ok("write", c.disk().write(0, &pattern(1, 0, 4096)));
    nbdkit1.kill();
    let t0 = Instant::now();
    let r = c.disk().read(0, 4096);
    let waited = t0.elapsed();
    assert_io_error("read with the server gone", r);
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(9),
        "failed after {waited:?}, the timeout is 2 s"
    );
    let t0 = Instant::now();
    assert_io_error("next read", c.disk().read(0, 4096));
    assert!(t0.elapsed() < Duration::from_secs(1), "fails at once now");
    check_bystander(&bystander);
    let _nbdkit2 = nbdkit(dir.path(), "nbdkit", &[], &["memory", "size=64M"]);
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        if c.disk().read(0, 4096).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the device did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(
        "write after recovery",
        c.disk().write(0, &pattern(2, 0, 4096)),
    );
    drop(server);
}

/// vubd serving `uri` (timeout 2 s) and a RAM "bystander" device; returns their sockets.
fn with_bystander(dir: &Path, uri: &str) -> (Server, PathBuf, PathBuf) {
    let nbd = dir.join("nbd.sock");
    let bystander = dir.join("bystander.sock");
    let config = dir.join("vubd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"nbd\"\nsocket-path = \"{}\"\nnbd = \"{uri}\"\nnbd-timeout-s = 2\n\n\
             [[device]]\nname = \"bystander\"\nsocket-path = \"{}\"\nram = \"16M\"\n",
            nbd.display(),
            bystander.display()
        ),
    )
    .unwrap();
    let server = Server::start_config(dir, "vubd", &config, &[nbd.clone(), bystander.clone()]);
    (server, nbd, bystander)
}

fn check_bystander(sock: &Path) {
    let mut b = Client::connect(sock, 1);
    let data = pattern(7, 4096, 8192);
    ok("bystander write", b.disk().write(4096, &data));
    assert_bytes_eq("bystander", &ok("read", b.disk().read(4096, 8192)), &data);
}

// ---- hostile servers -------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

#[derive(Clone, Copy, Debug)]
enum Evil {
    /// Half a reply header, then close.
    ShortReply,
    /// A reply with a handle that was never sent.
    WrongHandle,
    /// A data chunk claiming almost 4 GiB.
    OversizedChunk,
    /// An error chunk claiming almost 4 GiB.
    OversizedError,
    /// A read reply with data for the wrong range.
    OutOfRange,
    /// Random bytes.
    Garbage,
    /// An option reply of 4 GiB during the handshake.
    OversizedOptionReply,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The server side of a handshake: fixed newstyle, structured replies, GO with a 64 MiB
/// export that has every feature. False if the client left.
fn handshake(s: &mut UnixStream, evil: Evil) -> std::io::Result<()> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&hello)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = be32(&h[8..]);
        let mut data = vec![0u8; be32(&h[12..]) as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut UnixStream, kind: u32, d: &[u8], len: u32| {
            let mut r = REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            r.extend_from_slice(d);
            s.write_all(&r)
        };
        match opt {
            8 if matches!(evil, Evil::OversizedOptionReply) => {
                reply(s, 1, &[], u32::MAX)?;
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            8 => reply(s, 1, &[], 0)?, // STRUCTURED_REPLY: ACK
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec(); // NBD_INFO_EXPORT
                info.extend_from_slice(&DISK.to_be_bytes());
                info.extend_from_slice(&0x01edu16.to_be_bytes());
                reply(s, 3, &info, info.len() as u32)?;
                reply(s, 1, &[], 0)?;
                return Ok(());
            }
            _ => reply(s, (1 << 31) | 1, &[], 0)?, // unsupported
        }
    }
}

fn misbehave(s: &mut UnixStream, evil: Evil) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = &h[8..16];
        let len = be32(&h[24..]);
        if kind == 1 {
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
        }
        let mut r = Vec::new();
        match evil {
            Evil::ShortReply => {
                s.write_all(&0x6744_6698u32.to_be_bytes()[..3])?;
                return Ok(());
            }
            Evil::WrongHandle => {
                r.extend_from_slice(&0x6744_6698u32.to_be_bytes());
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(
                    &(u64::from_be_bytes(cookie.try_into().unwrap()) ^ 0xff).to_be_bytes(),
                );
            }
            Evil::OversizedChunk | Evil::OversizedError | Evil::OutOfRange => {
                let (kind, length) = match evil {
                    Evil::OversizedChunk => (1u16, 0xffff_fff0u32),
                    Evil::OversizedError => (0x8001, 0xffff_fff0),
                    _ => (1, 8 + 512),
                };
                r.extend_from_slice(&0x668e_33efu32.to_be_bytes());
                r.extend_from_slice(&1u16.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(cookie);
                r.extend_from_slice(&length.to_be_bytes());
                let off = u64::from_be_bytes(h[16..24].try_into().unwrap());
                r.extend_from_slice(&(off + (1 << 30)).to_be_bytes());
                r.extend_from_slice(&[0xee; 512]);
            }
            Evil::Garbage => {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for _ in 0..4096 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    r.push(x as u8);
                }
            }
            Evil::OversizedOptionReply => return Ok(()),
        }
        s.write_all(&r)?;
    }
}

/// A hostile server on `path`: every connection handshakes, then misbehaves.
fn evil_server(path: &Path, evil: Evil) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                if handshake(&mut s, evil).is_ok() {
                    let _ = misbehave(&mut s, evil);
                }
            });
        }
    });
}

#[test]
fn hostile_servers_fail_requests_not_vubd() {
    for evil in [
        Evil::ShortReply,
        Evil::WrongHandle,
        Evil::OversizedChunk,
        Evil::OversizedError,
        Evil::OutOfRange,
        Evil::Garbage,
    ] {
        let dir = test_dir();
        let sock = dir.path().join("evil.sock");
        evil_server(&sock, evil);
        let (mut server, nbd, bystander) = with_bystander(dir.path(), &nbd_unix(&sock, ""));
        let mut c = Client::connect(&nbd, 1);
        let t0 = Instant::now();
        assert_io_error(&format!("{evil:?}: read"), c.disk().read(0, 4096));
        assert_io_error(
            &format!("{evil:?}: write"),
            c.disk().write(0, &pattern(1, 0, 4096)),
        );
        assert!(
            t0.elapsed() < Duration::from_secs(9),
            "{evil:?}: {:?}",
            t0.elapsed()
        );
        server.assert_alive();
        check_bystander(&bystander);
        let log = server.stderr();
        assert!(log.contains("connection lost"), "{evil:?}:\n{log}");
        assert!(!log.contains("panicked"), "{evil:?}:\n{log}");
    }
}

#[test]
fn hostile_handshake_fails_the_device_cleanly() {
    let dir = test_dir();
    let sock = dir.path().join("evil.sock");
    evil_server(&sock, Evil::OversizedOptionReply);
    let (st, err) = run_vubd_to_exit(
        dir.path(),
        "vubd",
        &[
            "--socket-path".into(),
            dir.path().join("v.sock").display().to_string(),
            "--nbd".into(),
            nbd_unix(&sock, ""),
        ],
    );
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("option reply") && !err.contains("panicked"),
        "{err}"
    );
}

/// `resize` with no size asks the server (NBD_OPT_INFO on a connection of its own): nbdkit's
/// file plugin reports the file's size as it is when a client connects.
#[test]
fn resize_learns_the_new_size_from_the_server() {
    if !have("nbdkit") {
        return;
    }
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", DISK);
    let file = format!("file={}", img.display());
    let (_nbdkit, sock) = nbdkit(dir.path(), "nbdkit", &[], &["file", &file]);
    let backend = vubd::testing::open_backend(
        &vubd::BackendSpec::Nbd {
            uri: nbd_unix(&sock, ""),
            timeout: Duration::from_secs(5),
        },
        false,
    )
    .unwrap();
    assert_eq!(backend.info().size, DISK);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 * DISK)
        .unwrap();
    assert_eq!(backend.resize(None).unwrap(), 2 * DISK);
    assert!(
        backend.resize(Some(3 * DISK)).is_err(),
        "the client cannot set a size"
    );
}

/// The connector resolves host names under the control thread's seccomp filter: a lookup
/// that goes to DNS (a name that is not in /etc/hosts) must not make a forbidden call (the
/// test binary would stop with "seccomp: ... system call N").
#[test]
fn host_name_lookup_is_allowed_by_the_control_filter() {
    use std::net::ToSocketAddrs;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        vubd::testing::apply_seccomp(
            vubd::testing::ThreadKind::Control,
            vubd::testing::SeccompMode::On,
        )
        .unwrap();
        let _ = ("localhost", 10809).to_socket_addrs();
        // Whether it resolves does not matter; that the lookup runs does.
        let _ = ("vubd-nbd-test.invalid", 10809).to_socket_addrs();
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        eprintln!("the DNS lookup did not finish in 60 s (no resolver?): not checked");
    }
}
