//! Who may connect: socket-mode and socket-owner on the socket file, allow-uid checked with
//! SO_PEERCRED before a message is read. Clients of another uid are real processes
//! (vubd-bench, libblkio) started with that uid. Needs root (to switch uids); it fails, not
//! skips, without it, as CI runs as root.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

const NOBODY: u32 = 65534;

/// A test directory the unprivileged uid can reach and write.
fn open_dir() -> tempfile::TempDir {
    assert_eq!(
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() },
        0,
        "these tests switch uids and must run as root"
    );
    let dir = test_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// vubd-bench against `socket` as `uid`: true if it did I/O successfully.
fn client_as(uid: u32, socket: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vubd-bench"))
        .args(["--socket", socket.to_str().unwrap()])
        .args(["--seconds", "0.3", "--verify", "--json"])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .expect("run vubd-bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("\"ios\":"), text)
}

#[test]
fn socket_mode_and_owner_are_applied() {
    let dir = open_dir();
    let server = Server::start(
        dir.path(),
        "vubd",
        &[
            "--ram",
            "16M",
            "--socket-mode",
            "0640",
            "--socket-owner",
            "nobody:nogroup",
        ],
    );
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640, "socket mode");
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "socket owner");
    // The owner can connect and do I/O; root (not the owner, but privileged) too.
    let (ok_nobody, out) = client_as(NOBODY, &server.socket);
    assert!(ok_nobody, "the socket's owner could not use it: {out}");
}

#[test]
fn allow_uid_refuses_every_other_uid() {
    let dir = open_dir();
    let mut server = Server::start(
        dir.path(),
        "vubd",
        &["--ram", "16M", "--socket-mode", "0666", "--allow-uid", "0"],
    );
    let (ok_nobody, out) = client_as(NOBODY, &server.socket);
    assert!(!ok_nobody, "uid {NOBODY} was served: {out}");
    server.assert_alive();
    assert!(
        server
            .stderr()
            .contains(&format!("refused a frontend with uid {NOBODY}")),
        "{}",
        server.stderr()
    );
    // An allowed uid is served afterwards.
    let mut c = Client::connect(&server.socket, 1);
    let data = pattern(1, 0, 4096);
    ok("write as an allowed uid", c.disk().write(0, &data));
    assert_bytes_eq("data", &ok("read", c.disk().read(0, 4096)), &data);
    drop(c);

    let dir2 = open_dir();
    let server2 = Server::start(
        dir2.path(),
        "vubd",
        &[
            "--ram",
            "16M",
            "--socket-mode",
            "0666",
            "--allow-uid",
            &format!("7,{NOBODY}"),
        ],
    );
    let (ok_nobody, out) = client_as(NOBODY, &server2.socket);
    assert!(ok_nobody, "an allowed uid was refused: {out}");
}

#[test]
fn a_chown_vubd_may_not_do_is_a_startup_error() {
    let dir = open_dir();
    let sock = dir.path().join("v.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_vubd"))
        .args(["--socket-path", sock.to_str().unwrap()])
        .args([
            "--ram",
            "16M",
            "--socket-owner",
            "root",
            "-m",
            &last_cpu_mask(),
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .expect("run vubd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vubd: ")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(
        lines[0].contains("cannot give the socket to root"),
        "{stderr}"
    );
    assert!(!sock.exists(), "the socket file was left behind");
}

#[test]
fn socket_mode_or_owner_with_an_inherited_fd_is_a_usage_error() {
    let dir = test_dir();
    for flag in ["--socket-mode", "--socket-owner"] {
        let value = if flag == "--socket-mode" {
            "0600"
        } else {
            "root"
        };
        let (status, stderr) = run_vubd_to_exit(
            dir.path(),
            "cli",
            &[
                "--fd".into(),
                "3".into(),
                "--ram".into(),
                "16M".into(),
                flag.into(),
                value.into(),
            ],
        );
        assert_eq!(status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains("not to --fd"), "{stderr}");
    }
}
