//! SIGBUS containment. A frontend shares its memory as a file we map; if it later truncates
//! the file, the next access to a page past the new end raises SIGBUS, which by default kills
//! every device of the process. The size check at map time cannot help: the file shrinks
//! later. So (as libwayland-server does for shm pools) a handler looks the fault address up in
//! a table of frontend mappings, maps zero pages over that mapping (`MAP_FIXED`) so the access
//! completes, marks the mapping's owner poisoned and wakes the control thread, which
//! disconnects that owner. A fault outside every frontend mapping is our own bug: the previous
//! handler (or the default action) takes it.
//!
//! The handler must be async-signal-safe: no locks, no allocation. The table is a fixed array
//! of atomics published ahead of time; registration (control plane only) takes a mutex that
//! the handler never touches.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::engine::eventfd::EventFd;

/// Who a mapping belongs to: a connection id, never 0.
pub type Owner = u64;

/// Mappings registered at once (frontend regions, old snapshots still in use, inflight and
/// log regions of every connected frontend).
const SLOTS: usize = 16384;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// 0: free. Stored last on registration (Release), cleared first on removal.
    owner: AtomicU64,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    owner: AtomicU64::new(0),
    poisoned: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Writers of the table (never the handler).
static WRITERS: Mutex<()> = Mutex::new(());
/// The eventfd the handler writes to wake the control thread, or -1.
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS action before ours, for faults that are not a frontend's.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("too many frontend mappings (at most {SLOTS})")]
pub struct TableFull;

/// A mapping in the table; removed on drop. Drop it only once nothing can access the
/// mapping any more (then no fault can race with the removal), and before unmapping it.
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

/// Registers `[start, start + len)` as a frontend mapping of `owner`.
pub fn register(start: *const u8, len: usize, owner: Owner) -> Result<Registration, TableFull> {
    assert!(owner != 0, "owner 0 means a free slot");
    let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    let slot = TABLE
        .iter()
        .position(|s| s.owner.load(Ordering::Relaxed) == 0)
        .ok_or(TableFull)?;
    let s = &TABLE[slot];
    s.start.store(start as usize, Ordering::Relaxed);
    s.end.store(start as usize + len, Ordering::Relaxed);
    s.poisoned.store(false, Ordering::Relaxed);
    s.owner.store(owner, Ordering::Release);
    Ok(Registration { slot })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        let s = &TABLE[self.slot];
        s.owner.store(0, Ordering::Release);
        s.poisoned.store(false, Ordering::Relaxed);
    }
}

/// Owners whose mappings faulted since the last call (each once).
pub fn take_poisoned() -> Vec<Owner> {
    let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for s in TABLE.iter() {
        let owner = s.owner.load(Ordering::Acquire);
        if owner != 0 && s.poisoned.swap(false, Ordering::AcqRel) && !out.contains(&owner) {
            out.push(owner);
        }
    }
    out
}

/// Installs the handler; `notify` is written once per contained fault. Call once, before
/// any frontend memory is mapped. The eventfd must live for the rest of the process.
pub fn install(notify: &'static EventFd) -> io::Result<()> {
    NOTIFY_FD.store(notify.as_raw_fd(), Ordering::Release);
    // SAFETY: sigaction is plain data; all-zero is a valid empty action.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid sigaction structs for the duration of the call; the
    // handler is an `extern "C"` function with the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = PREVIOUS.set(previous);
    Ok(())
}

/// The SIGBUS handler. Only atomics and raw system calls: async-signal-safe.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        let owner = s.owner.load(Ordering::Acquire);
        if owner == 0 {
            continue;
        }
        let (start, end) = (
            s.start.load(Ordering::Relaxed),
            s.end.load(Ordering::Relaxed),
        );
        if addr < start || addr >= end {
            continue;
        }
        // Zero pages over the whole mapping: this access completes, and later ones anywhere in
        // it cannot fault again. The frontend's data is gone for us, and so is the frontend.
        // SAFETY: [start, end) is a mapping of ours (registered, and registrations outlive
        // every access); replacing it with anonymous memory of the same size keeps every
        // pointer into it valid.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                end - start,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        s.poisoned.store(true, Ordering::Release);
        let fd = NOTIFY_FD.load(Ordering::Acquire);
        if fd >= 0 {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local to an eventfd; async-signal-safe.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
        return;
    }
    // Not a frontend's mapping: our own bug. Hand it to whoever handled SIGBUS before (the
    // default: core dump) by restoring that action; returning re-runs the faulting access.
    let previous = PREVIOUS
        .get()
        .map_or(std::ptr::null(), |p| p as *const libc::sigaction);
    if previous.is_null() {
        // SAFETY: restoring the default action for this signal.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    } else {
        // SAFETY: `previous` points to the action saved at install time, a static.
        unsafe { libc::sigaction(sig, previous, std::ptr::null_mut()) };
    }
}
