//! Eventfds: the reactor's own (wake-up, io_uring completions), which nobody else holds and
//! which are therefore always non-blocking, and the check that an fd a frontend hands us
//! really is an eventfd.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, RawFd};

/// An eventfd created by vubd: non-blocking, close-on-exec, never shared with a frontend, so
/// no read or write on it can block.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the returned fd is checked and then owned by the File.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh eventfd nobody else owns.
        Ok(EventFd(unsafe { File::from_raw_fd(fd) }))
    }

    /// Adds one to the counter; a full counter (never reached in practice) is ignored, as
    /// the reader is then awake anyway.
    pub fn notify(&self) {
        let _ = io::Write::write(&mut &self.0, &1u64.to_ne_bytes());
    }

    /// Resets the counter to zero.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = io::Read::read(&mut &self.0, &mut buf);
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// True if `fd` is an eventfd. Frontends hand us kick and call fds; anything else (a pipe, a
/// socket) could block or behave in ways the reactor must not depend on.
pub fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsFd;

    #[test]
    fn eventfds_are_told_apart_from_pipes() {
        let e = EventFd::new().unwrap();
        // SAFETY: the fd is owned by `e`, alive for the whole test.
        assert!(is_eventfd(unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }));
        let (r, _w) = std::io::pipe().unwrap();
        assert!(!is_eventfd(r.as_fd()));
        e.notify();
        e.drain();
        e.drain(); // empty: must not block
    }
}
