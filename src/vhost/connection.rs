//! One frontend's connection, served on a thread of its own: the vhost crate reads each
//! message with blocking calls, and answering some (GET_VRING_BASE) means waiting for a
//! reactor to drain a queue. On its own thread that wait holds up only this device.

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{Backend, BackendReqHandler, Error as VhostError};

use super::device::VhostDevice;
use super::listener::Peer;
use super::watchdog::Watchdog;
use crate::blk::Device;

/// A frontend whose message takes longer than this to arrive (or whose reply it does not
/// read) is disconnected. Handling includes draining rings, which is not counted.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection's thread and the registry share.
#[derive(Default)]
pub struct ConnShared {
    /// The backend request channel (SET_BACKEND_REQ_FD), for CONFIG_CHANGE_MSG.
    backend: Mutex<Option<Backend>>,
}

impl ConnShared {
    pub fn set_backend(&self, b: Option<Backend>) {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = b;
    }

    /// Tells the frontend that the config space changed (a resize). Ok(false) if it gave no
    /// backend request channel (libblkio does not: it learns the size when it connects
    /// again). Never waits for a reply: see `Backend::send_config_change`.
    pub fn config_changed(&self) -> std::result::Result<bool, VhostError> {
        let b = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match b {
            Some(b) => b.send_config_change().map(|()| true),
            None => Ok(false),
        }
    }
}

pub struct Connection {
    /// A clone of the socket, to shut it down from outside (removal, shutdown).
    sock: UnixStream,
    thread: Option<JoinHandle<()>>,
    pub peer: Option<Peer>,
    pub shared: Arc<ConnShared>,
}

impl Connection {
    /// Serves `stream` for `device` on a new thread; `on_end` runs on that thread once the
    /// connection is over and every ring of it has stopped.
    pub fn spawn(
        stream: UnixStream,
        device: Arc<Device>,
        id: u64,
        watchdog: Arc<Watchdog>,
        on_end: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Connection> {
        let sock = stream.try_clone()?;
        let peer = Peer::of(&stream).ok();
        let thread_sock = stream.try_clone()?;
        let name = format!("vhost-{}", device.name);
        let shared = Arc::new(ConnShared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
                serve(stream, thread_sock, device, thread_shared, id, watchdog);
                on_end();
            })?;
        Ok(Connection {
            sock,
            thread: Some(thread),
            peer,
            shared,
        })
    }

    /// Disconnects the frontend: its thread stops every ring and ends.
    pub fn shut_down(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Waits for the connection's thread to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blocks until `sock` has data (or an error or hang-up, which the next read reports).
fn wait_readable(sock: &UnixStream) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn serve(
    stream: UnixStream,
    sock: UnixStream,
    device: Arc<Device>,
    shared: Arc<ConnShared>,
    id: u64,
    watchdog: Arc<Watchdog>,
) {
    let name = Arc::clone(&device.name);
    let handler_device = Arc::new(Mutex::new(VhostDevice::new(
        device,
        shared,
        id,
        Arc::clone(&watchdog),
    )));
    let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&handler_device));
    log::info!("device {name}: frontend connected");
    loop {
        // Idle time between messages is the frontend's right; only a message that starts
        // and does not finish counts against the watchdog.
        if let Err(e) = wait_readable(&sock) {
            log::warn!("device {name}: cannot wait for the frontend: {e}");
            break;
        }
        let (result, timed_out) = watchdog.guard(id, &sock, || handler.handle_request());
        match result {
            Ok(()) => continue,
            Err(_) if timed_out => log::warn!(
                "device {name}: frontend stalled mid-message for {MESSAGE_TIMEOUT:?}; disconnecting it"
            ),
            Err(VhostError::Disconnected) => log::info!("device {name}: frontend disconnected"),
            Err(e) => log::warn!("device {name}: closing connection after error: {e}"),
        }
        break;
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
    // With or without GET_VRING_BASE (libblkio sends none), every ring of the connection
    // stops here.
    handler_device
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .disconnect();
}
