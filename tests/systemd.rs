//! Running under systemd: the unit files in contrib/systemd pass `systemd-analyze verify`,
//! vubd says READY=1 on $NOTIFY_SOCKET once its devices listen, serves sockets passed by
//! socket activation on the devices they are named after, re-reads its config file on
//! SIGHUP, and writes log lines journald understands.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vubd() -> &'static str {
    env!("CARGO_BIN_EXE_vubd")
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    have_tool("systemd-analyze");
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze is missing (Debian package systemd)");
        assert_eq!(
            std::env::var("VUBD_ALLOW_SYSTEMD_SKIP").as_deref(),
            Ok("1"),
            "systemd-analyze is missing"
        );
        return;
    };
    assert!(out.status.success());
    let dir = test_dir();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut units = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        // verify checks that ExecStart's program exists: point it at the one just built.
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/bin/vubd", vubd());
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(dir.path().join(&name));
    }
    assert!(units.len() >= 3, "units found: {units:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about the host's own units (not ours) are not our business.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("vubd"))
        .filter(|l| !l.contains("qemu-vm7"))
        .collect();
    assert!(out.status.success() || ours.is_empty(), "{text}");
    assert!(ours.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn ready_is_sent_once_every_device_listens() {
    let dir = test_dir();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sock = dir.path().join("d.sock");
    let mut child = Command::new(vubd())
        .args(["--socket-path", sock.to_str().unwrap(), "--ram", "16M"])
        .args(["-m", &last_cpu_mask()])
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = listener.recv(&mut buf).expect("a notification within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg}");
    // READY=1 came after the device was listening.
    assert!(UnixStream::connect(&sock).is_ok());
    signal(child.id(), libc::SIGTERM);
    let n = listener.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}

#[test]
fn sockets_passed_by_socket_activation_serve_the_device_of_their_name() {
    let dir = test_dir();
    // What systemd would have made: a listening socket, passed as fd 3, named "vm7".
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let config = dir.path().join("vubd.toml");
    std::fs::write(
        &config,
        format!(
            "cpumask = \"{}\"\n[[device]]\nname = \"vm7\"\nsocket-path = \"{}\"\nram = \"16M\"\n",
            last_cpu_mask(),
            dir.path().join("never-bound.sock").display()
        ),
    )
    .unwrap();
    let stderr = std::fs::File::create(dir.path().join("vubd.stderr")).unwrap();
    let mut cmd = Command::new("sh");
    // LISTEN_PID must be vubd's own pid: sh's, which exec keeps.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=vm7 exec \"$0\" --config \"$1\"",
        vubd(),
        config.to_str().unwrap(),
    ])
    .stderr(stderr);
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let mut c = Client::connect(&path, 1);
    let data = pattern(4, 0, 4096);
    ok("write through the passed socket", c.disk().write(0, &data));
    assert_bytes_eq("data", &ok("read", c.disk().read(0, 4096)), &data);
    drop(c);
    assert!(
        !dir.path().join("never-bound.sock").exists(),
        "vubd bound socket-path although systemd passed the socket"
    );
    signal(child.id(), libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("vubd.stderr")).unwrap();
    assert!(log.contains("serving the socket passed as fd 3"), "{log}");
}

fn rpc_list(rpc: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(rpc).unwrap();
    writeln!(s, r#"{{"jsonrpc":"2.0","id":1,"method":"device_list"}}"#).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str::<serde_json::Value>(&line).unwrap()["result"].clone()
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sighup_rereads_the_config_file() {
    let dir = test_dir();
    let d = dir.path();
    let rpc = d.join("rpc.sock");
    let config = d.join("vubd.toml");
    let table = |name: &str, size: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\nsocket-path = \"{}\"\nram = \"{size}\"\n",
            d.join(format!("{name}.sock")).display()
        )
    };
    let head = format!(
        "cpumask = \"{}\"\nrpc-socket = \"{}\"\n",
        last_cpu_mask(),
        rpc.display()
    );
    std::fs::write(
        &config,
        format!(
            "{head}{}{}{}",
            table("keep", "16M"),
            table("gone", "16M"),
            table("busy", "16M")
        ),
    )
    .unwrap();
    let mut server = Server::start_config(d, "vubd", &config, std::slice::from_ref(&rpc));
    // A frontend on "busy": changing or removing it must leave it alone.
    let mut busy = Client::connect(&d.join("busy.sock"), 1);
    ok("write", busy.disk().write(0, &pattern(5, 0, 4096)));
    std::fs::write(
        &config,
        format!(
            "{head}poll-mode = \"interrupt\"\n{}{}{}",
            table("keep", "16M"),
            table("new", "8M"),
            table("busy", "32M")
        ),
    )
    .unwrap();
    signal(server.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = rpc_list(&rpc);
        let n = names(&list);
        if n.contains(&"new".to_string()) && !n.contains(&"gone".to_string()) {
            let busy_dev = list
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == "busy")
                .unwrap();
            assert_eq!(
                busy_dev["capacity"],
                16 * MIB,
                "the busy device was replaced"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reloaded: {n:?}\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!d.join("gone.sock").exists());
    assert!(UnixStream::connect(d.join("new.sock")).is_ok());
    ok("the busy device still serves", busy.disk().read(0, 4096));
    let log = server.stderr();
    assert!(log.contains("device busy changed"), "{log}");
    server.assert_alive();
}

#[test]
fn logs_carry_syslog_priorities_under_journald() {
    let dir = test_dir();
    let err_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&err_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let sock = dir.path().join("d.sock");
    let mut child = Command::new(vubd())
        .args(["--socket-path", sock.to_str().unwrap(), "--ram", "16M"])
        .args(["-m", &last_cpu_mask()])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "vubd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&err_path).unwrap();
    let first = log.lines().next().unwrap_or_default();
    assert!(first.starts_with("<6>vubd"), "{log}");
    assert!(!log.contains("Z INFO"), "timestamps under journald: {log}");
}
