//! Confinement: every thread of a running vubd is under a seccomp filter, a forbidden system
//! call stops the process with a line naming it, and `--seccomp off` turns it off.

mod common;

use common::*;
use std::process::Command;
use vubd::testing::{apply_seccomp, SeccompMode, ThreadKind, EXIT_FORBIDDEN};

/// "Seccomp:" of every thread of `pid`: (thread name, mode).
fn seccomp_of_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    out
}

#[test]
fn every_thread_is_filtered_by_default() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "16M"]);
    // A connected frontend: its connection thread exists too.
    let mut c = Client::connect(&server.socket, 1);
    ok("write", c.disk().write(0, &pattern(1, 0, 4096)));
    let threads = seccomp_of_threads(server.pid());
    assert!(
        threads.len() >= 4,
        "main, reactor, watchdog, connection: {threads:?}"
    );
    assert!(
        threads.iter().any(|(n, _)| n.starts_with("vhost-dev0")),
        "{threads:?}"
    );
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not filtered: {threads:?}");
    }
    drop(c);
    let off = Server::start(dir.path(), "off", &["--ram", "16M", "--seccomp", "off"]);
    assert!(
        seccomp_of_threads(off.pid()).iter().all(|(_, m)| m == "0"),
        "--seccomp off"
    );
}

/// Child side of `forbidden_calls_stop_the_process`: confines itself as a reactor and opens
/// an internet socket, which no reactor may do.
#[test]
fn forbidden_call_child() {
    if std::env::var_os("VUBD_SECCOMP_CHILD").is_none() {
        return;
    }
    apply_seccomp(ThreadKind::Reactor, SeccompMode::On).expect("filter");
    // SAFETY: a plain system call; it does not return (the filter stops the process).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    panic!("socket() was allowed under the reactor filter (fd {fd})");
}

#[test]
fn forbidden_calls_stop_the_process() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "forbidden_call_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("VUBD_SECCOMP_CHILD", "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_FORBIDDEN), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!(
            "a reactor thread made system call {}, which vubd does not allow",
            libc::SYS_socket
        )),
        "{stderr}"
    );
}
