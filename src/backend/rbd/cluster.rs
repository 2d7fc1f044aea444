//! The connection to the cluster and the open image, owned by one thread per device.
//!
//! librbd starts its own threads (messengers, timers, work queues: about 17 per client)
//! from the thread that connects, and they inherit that thread's seccomp filter. So the
//! connection is made on a thread of its own that first confines itself to the system calls
//! librbd needs (`ThreadKind::Librbd`): librbd's threads get exactly that filter, whether
//! the device is created at start-up or later over the management socket. The same thread
//! later resizes and finally closes the image, so calls that wait on the network never run
//! on a reactor, and the control thread waits for them only with a timeout.
//!
//! One client (rados connection) and one image handle per device: each open is its own
//! exclusive-lock owner, so handles per reactor would pass the lock back and forth; one
//! client per device also keeps one device's cluster trouble away from the others.

use std::ffi::{c_char, CStr, CString};
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::ffi::{self, strerror, Api, ImageT, IoctxT, RadosT};
use super::lock::{self, Identity, Verdict};
use crate::backend::BackendError;

/// How long creating a device may wait for the cluster: connecting (bounded by
/// `client_mount_timeout`), opening the image, and breaking a dead predecessor's lock.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a resize may take before the caller gets an error (it may still finish).
pub const RESIZE_TIMEOUT: Duration = Duration::from_secs(60);

/// Client options whose Ceph defaults do not suit a server that must answer: vubd's value
/// is used unless the configuration file set another one. `client_mount_timeout` (300 s)
/// would hang device creation for 5 minutes on a dead cluster; `rados_osd_op_timeout` and
/// `rados_mon_op_timeout` (0: forever) would leave a guest's request waiting for ever
/// instead of failing it with an I/O error once the cluster has been unreachable this long.
const TIMEOUTS: [(&str, f64, &str); 3] = [
    ("client_mount_timeout", 300.0, "10"),
    ("rados_osd_op_timeout", 0.0, "30"),
    ("rados_mon_op_timeout", 0.0, "30"),
];

/// What the device asked for.
#[derive(Clone, Debug)]
pub struct Spec {
    pub pool: String,
    pub image: String,
    pub conf: PathBuf,
    pub user: String,
    pub keyring: Option<PathBuf>,
    pub read_only: bool,
}

impl Spec {
    pub fn name(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// An image handle. librbd's handles may be used from any thread, concurrently (its
/// `ImageCtx` locks what it shares).
#[derive(Clone, Copy, Debug)]
pub struct Handle(pub ImageT);
// SAFETY: see the type's comment: librbd's C API is thread-safe per image handle.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// The open image, as the service thread hands it over.
pub struct Opened {
    pub handle: Handle,
    pub size: u64,
    /// librbd writes 1 to it per completed request (`rbd_set_image_notification`).
    /// Blocking on purpose: the reactors read it through io_uring, which then waits for it
    /// to become readable instead of failing with EAGAIN. A duplicate: the service thread
    /// keeps the fd librbd writes to open until after the image is closed, so librbd never
    /// writes to a closed (or reused) fd number.
    pub events: File,
    pub requests: Sender<Request>,
    /// Disconnected when the service thread has closed everything and exits.
    pub closed: Receiver<()>,
}

pub enum Request {
    /// `Some(bytes)`: rbd_resize; `None`: re-read the size.
    Resize(Option<u64>, Sender<Result<u64, i32>>),
    /// Close the image (no request may be in flight), then exit.
    Close,
}

struct Client<'a> {
    api: &'a Api,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

impl Drop for Client<'_> {
    /// In reverse order of opening; each call waits for librbd's threads to finish.
    fn drop(&mut self) {
        let a = self.api;
        // SAFETY: each handle was opened by this client, is non-null only if open, and is
        // closed once; nothing else uses them any more (the caller's promise at Close, or the
        // open failed before anyone saw them).
        unsafe {
            if !self.image.is_null() {
                (a.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (a.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (a.rados_shutdown)(self.cluster);
            }
        }
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

fn path_cstring(what: &str, p: &Path) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{what} {} contains a NUL byte", p.display()))
}

impl Client<'_> {
    fn conf_get(&self, key: &str) -> Option<String> {
        let k = CString::new(key).ok()?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: a live cluster handle, a NUL-terminated key and a buffer of the length
        // passed, which librados NUL-terminates on success.
        let rc = unsafe {
            (self.api.rados_conf_get)(self.cluster, k.as_ptr(), buf.as_mut_ptr(), buf.len())
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: NUL-terminated by librados when rc == 0.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Some(s.to_string_lossy().into_owned())
    }

    fn conf_set(&self, key: &str, value: &str) -> Result<(), String> {
        let (k, v) = (cstring("option", key)?, cstring("value", value)?);
        // SAFETY: a live cluster handle and NUL-terminated strings.
        let rc = unsafe { (self.api.rados_conf_set)(self.cluster, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(format!("cannot set {key}={value}: {}", strerror(rc.into())));
        }
        Ok(())
    }

    fn addr(&self) -> Option<String> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: a connected cluster handle; librados stores a malloc'ed string in `p`.
        let rc = unsafe { (self.api.rados_getaddrs)(self.cluster, &mut p) };
        if rc < 0 || p.is_null() {
            return None;
        }
        // SAFETY: NUL-terminated, malloc'ed by librados; copied, then freed once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        unsafe { libc::free(p.cast()) };
        Some(s)
    }

    fn fsid(&self) -> Option<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: a connected cluster handle and a buffer of the length passed.
        let rc =
            unsafe { (self.api.rados_cluster_fsid)(self.cluster, buf.as_mut_ptr(), buf.len()) };
        if rc < 0 {
            return None;
        }
        // SAFETY: librados NUL-terminates the fsid (36 characters) in the buffer.
        Some(
            unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The exclusive lock's owner, if any.
    fn lock_owner(&self) -> Result<Option<String>, String> {
        let mut mode = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n = owners.len();
        // SAFETY: an open image, an array of `n` pointers that librbd fills with malloc'ed
        // strings, and `n` updated to how many.
        let rc = unsafe {
            (self.api.rbd_lock_get_owners)(self.image, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        if rc < 0 {
            return Err(strerror(rc.into()));
        }
        let first = if n > 0 && !owners[0].is_null() {
            // SAFETY: librbd set `n` NUL-terminated strings.
            let s = unsafe { CStr::from_ptr(owners[0]) };
            Some(s.to_string_lossy().into_owned())
        } else {
            None
        };
        // SAFETY: the strings librbd allocated above, freed once by its own cleanup.
        unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(first)
    }
}

/// Connects, opens the image and prepares completions; runs on the service thread.
fn connect<'a>(api: &'a Api, spec: &Spec) -> Result<(Client<'a>, u64, u64, String), String> {
    let name = spec.name();
    let mut c = Client {
        api,
        cluster: ptr::null_mut(),
        ioctx: ptr::null_mut(),
        image: ptr::null_mut(),
    };
    let user = if spec.user.starts_with("client.") {
        spec.user.clone()
    } else {
        format!("client.{}", spec.user)
    };
    let user_c = cstring("rbd-user", &user)?;
    // SAFETY: `c.cluster` receives the handle; both strings are NUL-terminated.
    let rc = unsafe { (api.rados_create2)(&mut c.cluster, c"ceph".as_ptr(), user_c.as_ptr(), 0) };
    if rc < 0 {
        c.cluster = ptr::null_mut();
        return Err(format!("rados_create2({user}): {}", strerror(rc.into())));
    }
    let conf = path_cstring("rbd-conf", &spec.conf)?;
    // SAFETY: a live cluster handle and a NUL-terminated path.
    let rc = unsafe { (api.rados_conf_read_file)(c.cluster, conf.as_ptr()) };
    if rc < 0 {
        return Err(format!(
            "cannot read the Ceph configuration {}: {}",
            spec.conf.display(),
            strerror(rc.into())
        ));
    }
    if let Some(k) = &spec.keyring {
        c.conf_set("keyring", &k.to_string_lossy())?;
    }
    for (key, ceph_default, ours) in TIMEOUTS {
        let current = c.conf_get(key).and_then(|v| v.trim().parse::<f64>().ok());
        if current == Some(ceph_default) {
            c.conf_set(key, ours)?;
        }
        log::debug!(
            "rbd {name}: {key} = {}",
            c.conf_get(key).unwrap_or_default()
        );
    }
    // SAFETY: a configured cluster handle; blocks up to client_mount_timeout.
    let rc = unsafe { (api.rados_connect)(c.cluster) };
    if rc < 0 {
        return Err(format!(
            "cannot connect to the Ceph cluster of {} as {user}: {}",
            spec.conf.display(),
            strerror(rc.into())
        ));
    }
    let pool = cstring("pool", &spec.pool)?;
    // SAFETY: a connected cluster; `c.ioctx` receives the handle.
    let rc = unsafe { (api.rados_ioctx_create)(c.cluster, pool.as_ptr(), &mut c.ioctx) };
    if rc < 0 {
        c.ioctx = ptr::null_mut();
        return Err(format!("pool {}: {}", spec.pool, strerror(rc.into())));
    }
    let image = cstring("image", &spec.image)?;
    let open = if spec.read_only {
        api.rbd_open_read_only
    } else {
        api.rbd_open
    };
    // SAFETY: a live ioctx, a NUL-terminated name, no snapshot; `c.image` receives the handle.
    let rc = unsafe { open(c.ioctx, image.as_ptr(), &mut c.image, ptr::null()) };
    if rc < 0 {
        c.image = ptr::null_mut();
        return Err(format!("image {name}: {}", strerror(rc.into())));
    }
    let (mut size, mut features) = (0u64, 0u64);
    // SAFETY: an open image; each call writes one u64.
    let rc = unsafe { (api.rbd_get_size)(c.image, &mut size) };
    if rc < 0 {
        return Err(format!("image {name}: size: {}", strerror(rc.into())));
    }
    // SAFETY: as above.
    let rc = unsafe { (api.rbd_get_features)(c.image, &mut features) };
    if rc < 0 {
        return Err(format!("image {name}: features: {}", strerror(rc.into())));
    }
    let addr = c.addr().unwrap_or_default();
    Ok((c, size, features, addr))
}

/// The exclusive lock of a dead predecessor: see `lock.rs`. Returns where this client's
/// identity is recorded, to forget it at a clean close.
fn take_over(c: &Client<'_>, spec: &Spec, addr: &str) -> Record {
    let name = spec.name();
    let fsid = c.fsid().unwrap_or_default();
    let path = match lock::state_path(&fsid, &spec.pool, &spec.image) {
        Ok(p) => p,
        Err(e) => {
            log::warn!(
                "rbd {name}: no private state directory ({e}): a lock left by a killed vubd \
                 will only be freed when librbd's watch on it expires (~30 s)"
            );
            return None;
        }
    };
    let prev = lock::read(&path);
    match c.lock_owner() {
        Err(e) => log::warn!("rbd {name}: cannot read the exclusive lock's owner: {e}"),
        Ok(owner) => match lock::judge(owner.as_deref(), prev.as_ref()) {
            Verdict::Free => {}
            Verdict::Leave { why } => log::info!(
                "rbd {name}: the exclusive lock is held by {} ({why}): not breaking it; librbd \
                 will ask the owner for it at the first write",
                owner.unwrap_or_default()
            ),
            Verdict::Break { why } => {
                let owner = owner.unwrap_or_default();
                let t0 = Instant::now();
                let rc = match CString::new(owner.clone()) {
                    // SAFETY: an open image and a NUL-terminated owner address.
                    Ok(o) => unsafe {
                        (c.api.rbd_lock_break)(c.image, ffi::LOCK_MODE_EXCLUSIVE, o.as_ptr())
                    },
                    Err(_) => -libc::EINVAL,
                };
                if rc < 0 {
                    log::warn!(
                        "rbd {name}: breaking the exclusive lock of {owner} failed: {}",
                        strerror(rc.into())
                    );
                } else {
                    log::warn!(
                        "rbd {name}: broke the exclusive lock held by {owner} ({why}); it is \
                         blocklisted ({} ms)",
                        t0.elapsed().as_millis()
                    );
                }
            }
        },
    }
    let me = match Identity::ours(addr) {
        Ok(me) => me,
        Err(e) => {
            log::warn!("rbd {name}: cannot tell who this process is: {e}");
            return None;
        }
    };
    if let Err(e) = lock::write(&path, &me) {
        log::warn!(
            "rbd {name}: cannot record this client in {}: {e}",
            path.display()
        );
        return None;
    }
    Some((path, me))
}

fn eventfd() -> std::io::Result<File> {
    // SAFETY: plain syscall; the fd is checked and then owned by the File. Not
    // EFD_NONBLOCK: see `Opened::events`.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Where this client's identity is recorded (to forget it at a clean close).
type Record = Option<(PathBuf, Identity)>;

/// Everything the service thread does before it answers the opener.
fn start(api: &'static Api, spec: &Spec) -> Result<(Client<'static>, u64, File, Record), String> {
    let (c, size, features, addr) = connect(api, spec)?;
    let events = eventfd().map_err(|e| format!("eventfd: {e}"))?;
    // SAFETY: an open image and a live eventfd, which stays open until after rbd_close.
    let rc = unsafe {
        (api.rbd_set_image_notification)(c.image, events.as_raw_fd(), ffi::EVENT_TYPE_EVENTFD)
    };
    if rc < 0 {
        return Err(format!(
            "rbd {}: rbd_set_image_notification: {}",
            spec.name(),
            strerror(rc.into())
        ));
    }
    let record = (!spec.read_only && features & ffi::FEATURE_EXCLUSIVE_LOCK != 0)
        .then(|| take_over(&c, spec, &addr))
        .flatten();
    log::info!(
        "rbd {}: opened{} as {addr}, {size} bytes, features {features:#x}",
        spec.name(),
        if spec.read_only { " read-only" } else { "" },
    );
    Ok((c, size, events, record))
}

/// Why the service thread could not open the image.
enum Failed {
    /// librbd or librados is missing.
    Library(String),
    Open(String),
}

/// Opens `spec`'s image on a new service thread; fails after `OPEN_TIMEOUT`.
pub fn open(spec: Spec) -> Result<Opened, BackendError> {
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    let (req_tx, req_rx) = crossbeam_channel::unbounded::<Request>();
    let (closed_tx, closed_rx) = crossbeam_channel::bounded::<()>(0);
    let name = spec.name();
    std::thread::Builder::new()
        .name("librbd".into())
        .spawn(move || {
            let _closed = closed_tx;
            if let Err(e) = crate::sandbox::confine(crate::sandbox::ThreadKind::Librbd) {
                let _ = reply_tx.send(Err(Failed::Open(format!(
                    "cannot confine the librbd thread: {e}"
                ))));
                return;
            }
            let api = match ffi::api() {
                Ok(api) => api,
                Err(e) => {
                    let _ = reply_tx.send(Err(Failed::Library(e)));
                    return;
                }
            };
            let (client, size, events, record) = match start(api, &spec) {
                Ok(v) => v,
                Err(e) => {
                    let _ = reply_tx.send(Err(Failed::Open(e)));
                    return;
                }
            };
            let dup = events.try_clone();
            let opened = dup.map(|d| (Handle(client.image), size, d));
            let answered = match opened {
                Ok(o) => reply_tx.send(Ok(o)).is_ok(),
                Err(e) => {
                    let _ = reply_tx.send(Err(Failed::Open(format!("eventfd: {e}"))));
                    false
                }
            };
            // The opener gave up (timeout): nobody will use the image; close it.
            if answered {
                serve(&client, &spec, req_rx);
            }
            drop(client);
            drop(events);
            if let Some((path, me)) = record {
                lock::forget(&path, &me);
            }
            log::info!("rbd {}: closed", spec.name());
        })
        .map_err(|e| BackendError::Connect(format!("cannot start the librbd thread: {e}")))?;
    match reply_rx.recv_timeout(OPEN_TIMEOUT) {
        Ok(Ok((handle, size, events))) => Ok(Opened {
            handle,
            size,
            events,
            requests: req_tx,
            closed: closed_rx,
        }),
        Ok(Err(Failed::Library(e))) => Err(BackendError::Unsupported(e)),
        Ok(Err(Failed::Open(e))) => Err(BackendError::Connect(e)),
        Err(_) => Err(BackendError::Connect(format!(
            "rbd {name}: no answer from the cluster within {} s (is it reachable? see the \
             mon addresses in the configuration file)",
            OPEN_TIMEOUT.as_secs()
        ))),
    }
}

/// Serves resizes until the image is closed (or every sender is gone).
fn serve(c: &Client<'_>, spec: &Spec, rx: Receiver<Request>) {
    while let Ok(req) = rx.recv() {
        match req {
            Request::Resize(new, reply) => {
                let _ = reply.send(resize(c, new));
            }
            Request::Close => {
                log::debug!("rbd {}: closing", spec.name());
                return;
            }
        }
    }
}

fn resize(c: &Client<'_>, new: Option<u64>) -> Result<u64, i32> {
    if let Some(bytes) = new {
        // SAFETY: an open image.
        let rc = unsafe { (c.api.rbd_resize)(c.image, bytes) };
        if rc < 0 {
            return Err(-rc);
        }
    }
    let mut size = 0u64;
    // SAFETY: an open image; writes one u64.
    let rc = unsafe { (c.api.rbd_get_size)(c.image, &mut size) };
    if rc < 0 {
        return Err(-rc);
    }
    Ok(size)
}
