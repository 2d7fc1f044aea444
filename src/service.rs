//! Running under systemd: readiness (`sd_notify`, `Type=notify`), sockets passed by socket
//! activation (`LISTEN_FDS`, `LISTEN_FDNAMES`), and log lines journald understands. No
//! libsystemd: the protocols are a datagram and three environment variables.

use std::os::unix::io::RawFd;

/// Sends `state` (e.g. "READY=1") to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        log::warn!("cannot notify the service manager: {e}");
    }
}

/// Sockets passed by socket activation: (name, fd), when they are meant for this process.
/// The variables are removed, so children do not take them for theirs.
pub fn listen_fds() -> Vec<(String, RawFd)> {
    let mine = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: start-up, before any other thread exists (called first thing by main).
        unsafe { std::env::remove_var(v) };
    }
    if !mine {
        return Vec::new();
    }
    let mut names = names.split(':');
    (0..count)
        .map(|i| {
            // SD_LISTEN_FDS_START: passed fds start at 3.
            let fd = 3 + i as RawFd;
            // SAFETY: plain fcntl on an fd systemd passed us; they must not leak to children.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let name = names.next().unwrap_or("unknown").to_string();
            (name, fd)
        })
        .collect()
}

/// True when stderr is connected to journald (JOURNAL_STREAM names it): log lines then carry
/// a `<N>` syslog priority prefix and no timestamp (journald keeps its own).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    // SAFETY: struct stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat for fd 2.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// The syslog priority of a log level.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}
