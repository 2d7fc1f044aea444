//! The control thread's epoll loop over the listening sockets, the connected frontends and a
//! signalfd for SIGINT/SIGTERM. It may block (it waits for reactors to drain queues), so it
//! is never pinned to a reactor core's job.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::device::Device;
use super::watchdog::Watchdog;
use crate::config::SocketSpec;

/// A frontend whose message takes longer than this to arrive (or whose reply it does not
/// read) is disconnected, so a stalled or hostile frontend cannot hold the control thread
/// (and every other device) hostage. Handling includes draining rings, bounded separately.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

const TOKEN_SIGNAL: u64 = u64::MAX;

struct Connection {
    handler: BackendReqHandler<Mutex<Device>>,
    /// A clone of the socket, for its fd number and to shut it down.
    sock: UnixStream,
}

struct Slot {
    listener: UnixListener,
    /// Removed on shutdown if we created it.
    path: Option<PathBuf>,
    device: Arc<Mutex<Device>>,
    conn: Option<Connection>,
}

pub struct Control {
    epoll: File,
    signals: File,
    slots: Vec<Slot>,
    watchdog: Arc<Watchdog>,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}: another server is listening on this socket")]
    InUse(String),
    #[error("{path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("--fd {0} is not a listening Unix socket")]
    NotSocket(i32),
}

/// Binds the device socket. A stale socket file with no listener behind it is replaced; a
/// live one is an error, as two servers on one socket would steal each other's frontends.
pub fn listen(spec: &SocketSpec) -> Result<(UnixListener, Option<PathBuf>), SocketError> {
    match spec {
        SocketSpec::Path(path) => {
            let name = path.display().to_string();
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(SocketError::Io {
                        path: name,
                        err: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "exists and is not a socket",
                        ),
                    });
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse(name));
                }
                std::fs::remove_file(path).map_err(|err| SocketError::Io {
                    path: name.clone(),
                    err,
                })?;
            }
            let l = UnixListener::bind(path).map_err(|err| SocketError::Io { path: name, err })?;
            Ok((l, Some(path.clone())))
        }
        SocketSpec::Fd(fd) => {
            let mut st: libc::stat = unsafe_zeroed_stat();
            // SAFETY: fstat writes one struct stat into `st`; a bad fd gives an error.
            if unsafe { libc::fstat(*fd, &mut st) } != 0
                || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
            {
                return Err(SocketError::NotSocket(*fd));
            }
            // SAFETY: the fd was handed to us by our parent for exactly this use, is a socket
            // (checked above), and nothing else in this process owns it.
            Ok((unsafe { UnixListener::from_raw_fd(*fd) }, None))
        }
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: struct stat is plain data for which all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

fn epoll_ctl(epoll: &File, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: both fds are open; ev is valid for the duration of the call.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads spawned after) and returns a
/// signalfd that reports them. Called before any reactor thread starts.
pub fn block_signals() -> io::Result<File> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and the thread's mask.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh signalfd owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl Control {
    pub fn new(signals: File, watchdog: Arc<Watchdog>) -> io::Result<Control> {
        // SAFETY: plain syscall; the fd is checked, then owned by the File.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd owned by nobody else.
        let epoll = unsafe { File::from_raw_fd(fd) };
        epoll_ctl(
            &epoll,
            libc::EPOLL_CTL_ADD,
            signals.as_raw_fd(),
            TOKEN_SIGNAL,
        )?;
        Ok(Control {
            epoll,
            signals,
            slots: Vec::new(),
            watchdog,
        })
    }

    pub fn add_device(
        &mut self,
        listener: UnixListener,
        path: Option<PathBuf>,
        device: Device,
    ) -> io::Result<()> {
        let i = self.slots.len() as u64;
        epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            i * 2,
        )?;
        self.slots.push(Slot {
            listener,
            path,
            device: Arc::new(Mutex::new(device)),
            conn: None,
        });
        Ok(())
    }

    /// Serves until SIGINT or SIGTERM, then stops every device's rings.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            // SAFETY: events is a valid buffer of the given length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter().take(n as usize) {
                let token = ev.u64;
                if token == TOKEN_SIGNAL {
                    log::info!("signal received, shutting down");
                    self.shutdown();
                    return Ok(());
                }
                let slot = (token / 2) as usize;
                if token % 2 == 0 {
                    self.accept(slot);
                } else {
                    self.serve(slot);
                }
            }
        }
    }

    fn accept(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let stream = match s.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("accept failed: {e}");
                return;
            }
        };
        let sock = match stream.try_clone() {
            Ok(sock) => sock,
            Err(e) => {
                log::warn!("cannot set up connection: {e}");
                return;
            }
        };
        let name = s
            .device
            .lock()
            .map(|d| d.name().to_string())
            .unwrap_or_default();
        // One frontend per device, as vhost-user is 1:1: a second one waits in the listen
        // backlog until the first disconnects.
        let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, s.listener.as_raw_fd(), 0);
        if let Err(e) = epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            sock.as_raw_fd(),
            i as u64 * 2 + 1,
        ) {
            log::warn!("device {name}: cannot watch connection: {e}");
            let _ = epoll_ctl(
                &self.epoll,
                libc::EPOLL_CTL_ADD,
                s.listener.as_raw_fd(),
                i as u64 * 2,
            );
            return;
        }
        let handler = BackendReqHandler::from_stream(stream, Arc::clone(&s.device));
        s.conn = Some(Connection { handler, sock });
        log::info!("device {name}: frontend connected");
    }

    fn serve(&mut self, i: usize) {
        let Some(conn) = self.slots[i].conn.as_mut() else {
            return;
        };
        let handler = &mut conn.handler;
        let (result, timed_out) = self.watchdog.guard(&conn.sock, || handler.handle_request());
        match result {
            Ok(()) => {}
            Err(_) if timed_out => {
                log::warn!(
                    "frontend stalled mid-message for {MESSAGE_TIMEOUT:?}; disconnecting it"
                );
                self.disconnect(i, None)
            }
            Err(VhostError::Disconnected) => self.disconnect(i, None),
            Err(e) => self.disconnect(i, Some(e)),
        }
    }

    fn disconnect(&mut self, i: usize, err: Option<VhostError>) {
        let s = &mut self.slots[i];
        let Some(conn) = s.conn.take() else { return };
        let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, conn.sock.as_raw_fd(), 0);
        let _ = conn.sock.shutdown(std::net::Shutdown::Both);
        let mut dev = match s.device.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        match err {
            None => log::info!("device {}: frontend disconnected", dev.name()),
            Some(e) => log::warn!("device {}: closing connection after error: {e}", dev.name()),
        }
        // With or without GET_VRING_BASE (libblkio sends none), every ring of the connection
        // stops here.
        dev.disconnect();
        drop(dev);
        if let Err(e) = epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            s.listener.as_raw_fd(),
            i as u64 * 2,
        ) {
            log::error!("cannot listen again: {e}");
        }
    }

    fn shutdown(&mut self) {
        let mut buf = [0u8; 128];
        let _ = std::io::Read::read(&mut &self.signals, &mut buf);
        for i in 0..self.slots.len() {
            self.disconnect(i, None);
            if let Some(p) = &self.slots[i].path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
