//! The control thread's event loop: device sockets with a frontend waiting, connections that
//! ended, and SIGINT/SIGTERM. It never waits on a frontend or a reactor: connections have
//! threads of their own.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};

use super::{Registry, Token};

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and threads spawned after) and
/// returns a signalfd that reports them. Called before any other thread starts.
pub fn block_signals() -> io::Result<File> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and the thread's mask.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh signalfd owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Serves until SIGINT or SIGTERM, then disconnects every frontend. SIGHUP reads the config
/// file again.
pub fn serve(registry: &Registry, signals: File) -> io::Result<()> {
    registry
        .epoll
        .add(signals.as_raw_fd(), Token::Signal.to_u64())?;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
    loop {
        let tokens: Vec<u64> = registry.epoll.wait(&mut events, -1)?.collect();
        for t in tokens {
            match Token::from_u64(t) {
                Token::Signal => {
                    // struct signalfd_siginfo: 128 bytes, ssi_signo first.
                    let mut buf = [0u8; 128];
                    let n = io::Read::read(&mut &signals, &mut buf).unwrap_or(0);
                    let signo = if n >= 4 {
                        u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"))
                    } else {
                        0
                    };
                    if signo == libc::SIGHUP as u32 {
                        log::info!("SIGHUP: reading the config file again");
                        registry.reload();
                        continue;
                    }
                    log::info!("signal received, shutting down");
                    registry.shutdown();
                    return Ok(());
                }
                Token::Ended => registry.reap_connections(),
                Token::Poisoned => registry.disconnect_poisoned(),
                Token::Listener(id) => registry.accept(id),
            }
        }
    }
}
