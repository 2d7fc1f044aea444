//! Connection lifecycle, several devices per process, misbehaving clients and CLI errors.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

#[test]
fn reconnect_keeps_data() {
    let dir = test_dir();
    let mut server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    for round in 0..4u64 {
        let mut client = Client::connect(&server.socket, 1);
        let disk = client.disk();
        // Everything earlier sessions wrote is still there.
        for prev in 0..round {
            let off = prev * 4 * MIB + 512;
            let what = format!("session {round}: data of session {prev}");
            let got = ok(&what, disk.read(off, 256 * 1024));
            assert_bytes_eq(&what, &got, &pattern(prev, off, 256 * 1024));
        }
        let off = round * 4 * MIB + 512;
        ok(
            &format!("session {round}: write"),
            disk.write(off, &pattern(round, off, 256 * 1024)),
        );
        drop(client); // disconnect without any teardown messages, like libblkio does
        server.assert_alive();
    }
}

/// A frontend may stay silent between messages for as long as it likes (QEMU talks only
/// during setup and reset); only a message that starts and does not finish is a stall.
#[test]
fn idle_frontend_stays_connected() {
    let dir = test_dir();
    let mut server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    let mut client = Client::connect(&server.socket, 1);
    ok("write", client.disk().write(0, &pattern(3, 0, 4096)));
    // Longer than the 5 s a message may take.
    std::thread::sleep(Duration::from_secs(7));
    let got = ok("read after 7 s of silence", client.disk().read(0, 4096));
    assert_bytes_eq("data", &got, &pattern(3, 0, 4096));
    server.assert_alive();
    assert!(
        !server.stderr().contains("stalled"),
        "an idle frontend was taken for a stalled one:\n{}",
        server.stderr()
    );
}

#[test]
fn two_devices_in_one_process_via_config() {
    let dir = test_dir();
    let sock_a = dir.path().join("a.sock");
    let sock_b = dir.path().join("b.sock");
    let file_b = create_file(dir.path(), "b.img", 32 * MIB);
    let config = dir.path().join("vubd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[device]]
socket-path = "{}"
ram = "64M"
num-queues = 2
serial = "dev-a"
cpumask = "{}"

[[device]]
socket-path = "{}"
blk-file = "{}"
num-queues = 1
read-only = false
serial = "dev-b"
"#,
            sock_a.display(),
            last_cpu_mask(),
            sock_b.display(),
            file_b.display()
        ),
    )
    .unwrap();
    let mut server = Server::start_config(
        dir.path(),
        "vubd",
        &config,
        &[sock_a.clone(), sock_b.clone()],
    );

    let mut a = Client::connect(&sock_a, 2);
    let mut b = Client::connect(&sock_b, 1);
    assert_eq!(a.capacity(), 64 * MIB, "device a: capacity of ram = 64M");
    assert_eq!(
        b.capacity(),
        32 * MIB,
        "device b: capacity of its 32 MiB file"
    );
    assert_eq!(a.blkio.get_i32("max-queues").unwrap(), 2, "device a queues");
    assert_eq!(b.blkio.get_i32("max-queues").unwrap(), 1, "device b queues");

    // The same offsets on both devices, at the same time, with different data.
    fn work(disk: &mut Disk, seed: u64) {
        for i in 0..16u64 {
            let off = i * MIB + 4096;
            ok(
                &format!("device seed {seed}: write at {off}"),
                disk.write(off, &pattern(seed, off, 512 * 1024)),
            );
        }
        for i in 0..16u64 {
            let off = i * MIB + 4096;
            let what = format!("device seed {seed}: read at {off}");
            let got = ok(&what, disk.read(off, 512 * 1024));
            assert_bytes_eq(&what, &got, &pattern(seed, off, 512 * 1024));
        }
    }
    std::thread::scope(|s| {
        let da = a.disk();
        let db = b.disk();
        s.spawn(move || work(da, 0xA));
        s.spawn(move || work(db, 0xB));
    });
    assert_bytes_eq(
        "device b's backing file",
        &read_file_at(&file_b, 4096, 512 * 1024),
        &pattern(0xB, 4096, 512 * 1024),
    );
    server.assert_alive();
}

/// Runs `vubd-bench` against the server, SIGKILLs it mid-I/O, and checks the server
/// survives and serves a new client.
#[test]
fn client_killed_mid_io_does_not_take_server_down() {
    let dir = test_dir();
    let mask = two_cpu_mask();
    let mut server = Server::start(
        dir.path(),
        "vubd",
        &["--ram", "64M", "--num-queues", "2", "-m", &mask],
    );
    let variants: [&[&str]; 3] = [
        &["--rw", "randrw", "--iodepth", "16"],
        &[
            "--rw",
            "randwrite",
            "--iodepth",
            "32",
            "--queues",
            "2",
            "--bs",
            "65536",
        ],
        &["--rw", "randread", "--iodepth", "8", "--poll"],
    ];
    for (round, extra) in variants.iter().enumerate() {
        let out = dir.path().join(format!("bench{round}.out"));
        let mut bench = Command::new(env!("CARGO_BIN_EXE_vubd-bench"))
            .arg("--socket")
            .arg(&server.socket)
            .args(["--seconds", "60"])
            .args(*extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&out).unwrap())
            .spawn()
            .expect("spawn vubd-bench");
        std::thread::sleep(Duration::from_secs(1));
        if let Some(status) = bench.try_wait().unwrap() {
            panic!(
                "vubd-bench {extra:?} exited early ({status}): {}",
                read_to_string(&out)
            );
        }
        bench.kill().expect("SIGKILL vubd-bench");
        bench.wait().unwrap();
        server.assert_alive();

        let mut client = Client::connect(&server.socket, 1);
        let disk = client.disk();
        let off = 5 * MIB;
        let data = pattern(round as u64, off, 128 * 1024);
        ok("write after killed client", disk.write(off, &data));
        let got = ok("read after killed client", disk.read(off, data.len()));
        assert_bytes_eq("round trip after killed client", &got, &data);
        drop(client);
        server.assert_alive();
    }
}

/// Expects a CLI error: exit code non-zero (not a crash by signal), a non-empty stderr that
/// is not a panic, and mentions at least one of `keywords` (case-insensitive).
#[track_caller]
fn assert_cli_error(status: ExitStatus, stderr: &str, keywords: &[&str]) {
    assert!(
        matches!(status.code(), Some(c) if c != 0),
        "expected a non-zero exit code, got {status}; stderr:\n{stderr}"
    );
    assert!(!stderr.trim().is_empty(), "no error message on stderr");
    assert!(
        !stderr.contains("panicked"),
        "the error is a panic, not an error message:\n{stderr}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "stderr mentions none of {keywords:?}:\n{stderr}"
    );
}

fn args(dir: &Path, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--socket-path".to_string(),
        dir.join("cli.sock").display().to_string(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

#[test]
fn cli_missing_blk_file_fails() {
    let dir = test_dir();
    let missing = dir.path().join("no-such-disk.img");
    let (status, stderr) = run_vubd_to_exit(
        dir.path(),
        "cli",
        &args(dir.path(), &["--blk-file", missing.to_str().unwrap()]),
    );
    assert_cli_error(status, &stderr, &["no-such-disk.img"]);
}

#[test]
fn cli_zero_ram_size_fails() {
    let dir = test_dir();
    let (status, stderr) = run_vubd_to_exit(dir.path(), "cli", &args(dir.path(), &["--ram", "0"]));
    assert_cli_error(status, &stderr, &["size", "ram", "zero"]);
}

#[test]
fn cli_nonexistent_cpu_fails() {
    let dir = test_dir();
    let (status, stderr) = run_vubd_to_exit(
        dir.path(),
        "cli",
        &args(dir.path(), &["--ram", "64M", "-m", "0x80000000"]),
    );
    assert_cli_error(status, &stderr, &["cpu", "core", "mask"]);
}

#[test]
fn cli_socket_in_use_fails_and_first_server_keeps_serving() {
    let dir = test_dir();
    let mut first = Server::start(dir.path(), "first", &["--ram", "64M"]);
    let mut client = Client::connect(&first.socket, 1);
    let data = pattern(8, 0, 4096);
    ok("write on first server", client.disk().write(0, &data));

    let second_args = vec![
        "--socket-path".to_string(),
        first.socket.display().to_string(),
        "--ram".to_string(),
        "64M".to_string(),
        "-m".to_string(),
        last_cpu_mask(),
    ];
    let (status, stderr) = run_vubd_to_exit(dir.path(), "second", &second_args);
    assert_cli_error(
        status,
        &stderr,
        &[first.socket.to_str().unwrap(), "in use", "listening"],
    );

    first.assert_alive();
    assert!(
        first.socket.exists(),
        "the second vubd removed the first one's socket"
    );
    drop(client);
    // A new client still reaches the first server (same data), not a stolen socket.
    let mut client = Client::connect(&first.socket, 1);
    let got = ok("read on first server", client.disk().read(0, 4096));
    assert_bytes_eq("first server's data", &got, &data);
}

#[test]
fn cli_more_queues_than_vhost_user_can_name_fails() {
    let dir = test_dir();
    let (status, stderr) = run_vubd_to_exit(
        dir.path(),
        "cli",
        &args(dir.path(), &["--ram", "64M", "--num-queues", "257"]),
    );
    assert_cli_error(status, &stderr, &["num-queues", "256"]);
}

#[test]
fn cli_no_backend_fails() {
    let dir = test_dir();
    let (status, stderr) = run_vubd_to_exit(dir.path(), "cli", &args(dir.path(), &[]));
    assert_cli_error(status, &stderr, &["ram", "null", "blk-file", "backend"]);
}

fn exits_cleanly_on(sig: libc::c_int) {
    let dir = test_dir();
    let mut server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    // A connected client must not keep the server from shutting down.
    let mut client = Client::connect(&server.socket, 1);
    ok("write", client.disk().write(0, &pattern(1, 0, 4096)));
    signal(server.pid(), sig);
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "vubd exited with {status} after signal {sig}; stderr:\n{}",
        server.stderr()
    );
}

#[test]
fn sigterm_exits_cleanly_with_connected_client() {
    exits_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_exits_cleanly_with_connected_client() {
    exits_cleanly_on(libc::SIGINT);
}
