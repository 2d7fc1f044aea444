//! Ceph RBD backend (`--rbd POOL/IMAGE`): a librbd client per device, loaded at run time.
//!
//! - `ffi`: the ~30 librados/librbd functions vubd calls, dlopen'ed (`librbd.so.1`,
//!   `librados.so.2`), so neither building nor running vubd without `--rbd` needs Ceph.
//! - `cluster`: the per-device thread that connects (confined by its own seccomp filter,
//!   which librbd's threads inherit), opens, resizes and closes the image.
//! - `lock`: breaking the exclusive lock of this image's killed predecessor, and only that.
//! - `channel`: one per queue, on the queue's reactor: `rbd_aio_readv`/`writev` straight
//!   from the guest's iovecs, flush, discard, write-zeroes; completions come from a mailbox.
//! - `router`: one poller per reactor serving the image, watching librbd's completion
//!   eventfd through the reactor's io_uring and routing completions to their channels.
//!
//! Errors librbd reports (a timed-out OSD op, a blocklisted client) fail that request with
//! IOERR, nothing more; librbd's own threads do all network waiting, so a dead cluster
//! never blocks a reactor.

mod channel;
mod cluster;
mod ffi;
mod lock;
mod router;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;

use crossbeam_channel::{Receiver, Sender};

use super::BackendError;
use crate::blk::backend::{BackendInfo, Channel, ResizeError};
use crate::blk::model::Caps;
use crate::blk::Backend;
use crate::engine::{Ctx, PollerId};
use channel::RbdChannel;
use cluster::{Handle, Request, Spec};
use router::{Router, RouterShared};

/// How long dropping the backend waits for librbd to close the image (release the
/// exclusive lock, write back its cache) before going on without it.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An open image, shared by the backend, its channels and its routers. The last one to go
/// has the service thread close it.
pub(crate) struct Image {
    api: &'static ffi::Api,
    handle: Handle,
    /// librbd's completion eventfd (a duplicate; see `cluster::Opened::events`).
    events: File,
    /// `pool/image`, for logs.
    name: String,
    /// Requests in librbd, over every channel. Read by routers about to sleep; one relaxed
    /// add and sub per request on a shared line, which next to librbd's own locking per
    /// request costs nothing measurable.
    in_flight: AtomicU64,
    /// The router of each reactor thread with channels of this image.
    routers: Mutex<Vec<(ThreadId, Weak<RouterShared>)>>,
    requests: Sender<Request>,
}

impl Drop for Image {
    fn drop(&mut self) {
        // Nothing uses the handle any more: channels and routers hold this Image.
        let _ = self.requests.send(Request::Close);
    }
}

pub struct RbdBackend {
    image: Option<Arc<Image>>,
    size: AtomicU64,
    read_only: bool,
    /// Disconnected once the service thread has closed the image.
    closed: Receiver<()>,
}

impl RbdBackend {
    fn image(&self) -> &Arc<Image> {
        self.image.as_ref().expect("image open until drop")
    }
}

pub fn open(
    pool: &str,
    image: &str,
    conf: &Path,
    user: &str,
    keyring: Option<&Path>,
    read_only: bool,
) -> Result<Arc<dyn Backend>, BackendError> {
    let spec = Spec {
        pool: pool.to_string(),
        image: image.to_string(),
        conf: conf.to_path_buf(),
        user: user.to_string(),
        keyring: keyring.map(Path::to_path_buf),
        read_only,
    };
    let name = spec.name();
    // The libraries are loaded by the service thread, under its filter: their static
    // constructors run there, not on a (confined) control thread.
    let opened = cluster::open(spec)?;
    let api = ffi::api().map_err(BackendError::Unsupported)?;
    Ok(Arc::new(RbdBackend {
        image: Some(Arc::new(Image {
            api,
            handle: opened.handle,
            events: opened.events,
            name,
            in_flight: AtomicU64::new(0),
            routers: Mutex::new(Vec::new()),
            requests: opened.requests,
        })),
        size: AtomicU64::new(opened.size),
        read_only,
        closed: opened.closed,
    }))
}

impl Backend for RbdBackend {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            size: self.size.load(Ordering::Relaxed),
            caps: Caps::ALL,
            read_only: self.read_only,
            single_reactor: false,
        }
    }

    fn open_channel(&self, ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>> {
        let image = self.image();
        let me = std::thread::current().id();
        let shared = {
            let mut routers = image.routers.lock().unwrap_or_else(|p| p.into_inner());
            routers.retain(|(_, w)| w.strong_count() > 0);
            let live = routers
                .iter()
                .find(|(t, _)| *t == me)
                .and_then(|(_, w)| w.upgrade())
                .filter(|s| s.join());
            match live {
                Some(s) => s,
                None => {
                    let s = Arc::new(RouterShared::new());
                    let router = Router::new(Arc::clone(image), Arc::clone(&s));
                    if !ctx.spawn(PollerId::next(), Box::new(router)) {
                        return Err(io::Error::other(
                            "the rbd backend needs a reactor to route its completions",
                        ));
                    }
                    routers.retain(|(t, _)| *t != me);
                    routers.push((me, Arc::downgrade(&s)));
                    s
                }
            }
        };
        Ok(Box::new(RbdChannel::new(Arc::clone(image), shared, ctx)))
    }

    fn resize(&self, new: Option<u64>) -> Result<u64, ResizeError> {
        if new.is_some() && self.read_only {
            return Err(ResizeError::Invalid("the image is open read-only".into()));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.image()
            .requests
            .send(Request::Resize(new, tx))
            .map_err(|_| ResizeError::Invalid("the image is closed".into()))?;
        let size = match rx.recv_timeout(cluster::RESIZE_TIMEOUT) {
            Ok(Ok(size)) => size,
            Ok(Err(errno)) => return Err(io::Error::from_raw_os_error(errno).into()),
            Err(_) => {
                return Err(ResizeError::Invalid(format!(
                    "rbd {}: no answer from the cluster within {} s",
                    self.image().name,
                    cluster::RESIZE_TIMEOUT.as_secs()
                )))
            }
        };
        self.size.store(size, Ordering::Relaxed);
        Ok(size)
    }
}

impl Drop for RbdBackend {
    /// Closes the image (through the service thread) and waits, bounded, until it is closed:
    /// a clean close releases the exclusive lock and writes back librbd's cache, and a
    /// process must not exit while librbd's threads still run. If channels still hold the
    /// image (queues not yet drained), it closes when the last one goes, without waiting.
    fn drop(&mut self) {
        let Some(image) = self.image.take() else {
            return;
        };
        let last = Arc::strong_count(&image) == 1;
        let name = image.name.clone();
        drop(image);
        if last
            && self.closed.recv_timeout(CLOSE_TIMEOUT)
                == Err(crossbeam_channel::RecvTimeoutError::Timeout)
        {
            log::warn!(
                "rbd {name}: not closed after {} s; going on without it",
                CLOSE_TIMEOUT.as_secs()
            );
        }
    }
}
