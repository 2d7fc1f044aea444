//! Confinement: every thread of a running vubd is under a seccomp filter, a forbidden system
//! call stops the process with a line naming it, and `--seccomp off` turns it off.

mod common;

use common::*;
use std::process::Command;
use vubd::testing::{apply_seccomp, SeccompMode, ThreadKind, EXIT_FORBIDDEN};

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

/// A reactor's free() may open /proc/sys/vm/overcommit_memory (glibc, the first time a
/// thread's heap shrinks). Regression: three devices with a frontend each, then SIGTERM:
/// the reactors drop the queues, glibc shrinks their heaps, and the filter stopped the
/// process (exit 159) instead of a clean exit.
#[test]
fn shutdown_with_frontends_attached_is_clean() {
    let dir = test_dir();
    let file = create_file(dir.path(), "disk.img", 16 << 20);
    let sockets: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.sock")))
        .collect();
    let config = dir.path().join("vubd.toml");
    std::fs::write(
        &config,
        format!(
            "cpumask = \"{}\"\n\
             [[device]]\nsocket-path = \"{}\"\nblk-file = \"{}\"\n\
             [[device]]\nsocket-path = \"{}\"\nram = \"16M\"\n\
             [[device]]\nsocket-path = \"{}\"\nnull = \"16M\"\n",
            two_cpu_mask(),
            sockets[0].display(),
            file.display(),
            sockets[1].display(),
            sockets[2].display(),
        ),
    )
    .unwrap();
    let mut server = Server::start_config(dir.path(), "vubd", &config, &sockets);
    let mut clients: Vec<Client> = sockets.iter().map(|s| Client::connect(s, 1)).collect();
    for c in &mut clients[..2] {
        let data = pattern(3, 4096, 8192);
        ok("write", c.disk().write(4096, &data));
        assert_bytes_eq("read back", &ok("read", c.disk().read(4096, 8192)), &data);
    }
    let status = server.terminate();
    let stderr = server.stderr();
    assert!(status.success(), "vubd exited {status}; stderr:\n{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    drop(clients);
}

/// Child side of `threads_without_files_get_eacces_from_open`.
#[test]
fn open_refused_child() {
    if std::env::var_os("VUBD_SECCOMP_OPEN_CHILD").is_none() {
        return;
    }
    apply_seccomp(ThreadKind::Reactor, SeccompMode::On).expect("filter");
    let path = c"/proc/sys/vm/overcommit_memory";
    // SAFETY: a plain system call with a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    let line = format!("open returned {fd}, errno {errno:?}\n");
    // SAFETY: write(2) of a byte buffer to stdout, which the reactor filter allows (println!
    // might take locks or allocate in ways the filter does not expect).
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

#[test]
fn threads_without_files_get_eacces_from_open() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "open_refused_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("VUBD_SECCOMP_OPEN_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(&format!("open returned -1, errno Some({})", libc::EACCES)),
        "status {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}
