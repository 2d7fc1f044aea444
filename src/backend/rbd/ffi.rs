//! librbd's and librados' C API, loaded at run time with dlopen.
//!
//! No crate binds these calls, and linking against them would make every build of vubd need
//! the Ceph development packages. Instead the few functions the backend calls are declared
//! here (prototypes from `rbd/librbd.h` and `rados/librados.h` of Ceph 16, whose ABI has been
//! stable for years: the sonames are `librbd.so.1` and `librados.so.2`) and looked up once,
//! the first time an `--rbd` device is opened. The libraries are never unloaded: librbd
//! keeps threads and static state for the life of the process.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub type RadosT = *mut c_void;
pub type IoctxT = *mut c_void;
pub type ImageT = *mut c_void;
pub type CompletionT = *mut c_void;
pub type Callback = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;

/// `rbd_set_image_notification`'s type for an eventfd.
pub const EVENT_TYPE_EVENTFD: c_int = 2;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` from `rbd/features.h`.
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero the range without deallocating it.
pub const WRITE_ZEROES_THICK: c_int = 1;

/// Which library a symbol comes from.
#[derive(Clone, Copy)]
enum From {
    Rados,
    Rbd,
}

macro_rules! api {
    ($( $lib:ident fn $name:ident ( $($arg:ty),* ) -> $ret:ty; )*) => {
        /// The functions of librados and librbd vubd calls, resolved once.
        #[allow(non_snake_case)]
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        impl Api {
            /// # Safety
            /// `rados` and `rbd` are live handles from dlopen of librados and librbd, whose
            /// symbols have the prototypes declared here.
            unsafe fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let handle = match From::$lib { From::Rados => rados, From::Rbd => rbd };
                        // SAFETY: a valid handle (the caller's contract) and a NUL-terminated
                        // name.
                        let p = unsafe { symbol(handle, concat!(stringify!($name), "\0")) }?;
                        // SAFETY: the symbol is the C function of this name, whose prototype
                        // (from the Ceph headers) is the declared one; function and data
                        // pointers have the same size on every platform Ceph supports.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(p)
                        }
                    }, )*
                })
            }
        }
    };
}

api! {
    Rados fn rados_create2(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    Rados fn rados_conf_read_file(RadosT, *const c_char) -> c_int;
    Rados fn rados_conf_set(RadosT, *const c_char, *const c_char) -> c_int;
    Rados fn rados_conf_get(RadosT, *const c_char, *mut c_char, usize) -> c_int;
    Rados fn rados_connect(RadosT) -> c_int;
    Rados fn rados_shutdown(RadosT) -> ();
    Rados fn rados_ioctx_create(RadosT, *const c_char, *mut IoctxT) -> c_int;
    Rados fn rados_ioctx_destroy(IoctxT) -> ();
    Rados fn rados_getaddrs(RadosT, *mut *mut c_char) -> c_int;
    Rados fn rados_cluster_fsid(RadosT, *mut c_char, usize) -> c_int;
    Rbd fn rbd_open(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    Rbd fn rbd_open_read_only(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    Rbd fn rbd_close(ImageT) -> c_int;
    Rbd fn rbd_get_size(ImageT, *mut u64) -> c_int;
    Rbd fn rbd_get_features(ImageT, *mut u64) -> c_int;
    Rbd fn rbd_resize(ImageT, u64) -> c_int;
    Rbd fn rbd_set_image_notification(ImageT, c_int, c_int) -> c_int;
    Rbd fn rbd_poll_io_events(ImageT, *mut CompletionT, c_int) -> c_int;
    Rbd fn rbd_aio_create_completion(*mut c_void, Callback, *mut CompletionT) -> c_int;
    Rbd fn rbd_aio_get_arg(CompletionT) -> *mut c_void;
    Rbd fn rbd_aio_get_return_value(CompletionT) -> isize;
    Rbd fn rbd_aio_release(CompletionT) -> ();
    Rbd fn rbd_aio_readv(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    Rbd fn rbd_aio_writev(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    Rbd fn rbd_aio_flush(ImageT, CompletionT) -> c_int;
    Rbd fn rbd_aio_discard(ImageT, u64, u64, CompletionT) -> c_int;
    Rbd fn rbd_aio_write_zeroes(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int;
    Rbd fn rbd_lock_get_owners(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    Rbd fn rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    Rbd fn rbd_lock_break(ImageT, c_int, *const c_char) -> c_int;
}

/// The last dlerror() message.
fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl*
    // call on this thread; it is copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// # Safety
/// `handle` is a live dlopen handle; `name` ends with a NUL byte.
unsafe fn symbol(handle: *mut c_void, name: &str) -> Result<*mut c_void, String> {
    // SAFETY: forwarded from the caller's contract.
    let p = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
    if p.is_null() {
        Err(format!(
            "symbol {} missing: {}",
            name.trim_end_matches('\0'),
            dlerror()
        ))
    } else {
        Ok(p)
    }
}

fn open_library(name: &str) -> Result<*mut c_void, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad library name {name:?}"))?;
    // SAFETY: a NUL-terminated path; RTLD_NOW resolves everything now, so a broken
    // installation fails here and not in the middle of a request.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        Err(dlerror())
    } else {
        Ok(h)
    }
}

/// librbd's soname, or `VUBD_LIBRBD` (a Ceph built elsewhere; the tests use it to check the
/// message a host without librbd gets).
fn librbd_name() -> String {
    std::env::var("VUBD_LIBRBD").unwrap_or_else(|_| "librbd.so.1".into())
}

fn load() -> Result<Api, String> {
    let missing = |lib: &str, pkg: &str, e: String| {
        format!("--rbd needs {lib} (Debian: apt install {pkg}): {e}")
    };
    let rbd_name = librbd_name();
    // librados first: librbd needs it, and a host with neither gets the first missing one.
    let rados =
        open_library("librados.so.2").map_err(|e| missing("librados.so.2", "librados2", e))?;
    let rbd = open_library(&rbd_name).map_err(|e| missing(&rbd_name, "librbd1", e))?;
    // SAFETY: both handles are live (never closed) and are librados and librbd.
    unsafe { Api::resolve(rados, rbd) }
        .map_err(|e| format!("{rbd_name} or librados.so.2 is not a usable Ceph library: {e}"))
}

/// The API, loaded on first use; the same error every time when the libraries are missing.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The text of a negative errno that a Ceph call returned.
pub fn strerror(rc: i64) -> String {
    let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
    std::io::Error::from_raw_os_error(errno).to_string()
}
