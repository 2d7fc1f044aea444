//! Per-thread seccomp filters. Four kinds of thread, four allowlists:
//! - reactors (the data path): their io_uring, epoll, eventfds, memory management;
//! - control threads (the main thread, one per vhost-user connection, later the management
//!   socket's): sockets, files, memory tables, thread creation;
//! - the watchdog: shutting down a stalled socket;
//! - librbd: the thread that opens a Ceph RBD image and the threads librbd starts from it.
//!
//! A thread installs its filter itself once its set-up is done (`confine`); threads spawned
//! afterwards inherit it (a connection thread inherits the control thread's). `--seccomp log`
//! lets forbidden calls through and has the kernel log them (dmesg: "audit: type=1326 ...
//! syscall=N"), to find a call missing from a list; `on` (the default) stops the process
//! with one line naming the thread and the call.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    On,
    Off,
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("seccomp must be on, off or log, got {s:?}")),
        }
    }
}

impl SeccompMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Control,
    Reactor,
    Watchdog,
    /// The thread that connects to a Ceph cluster and opens an RBD image, and every thread
    /// librbd starts from it (they inherit its filter).
    Librbd,
}

impl ThreadKind {
    fn name(self) -> &'static [u8] {
        match self {
            ThreadKind::Control => b"control",
            ThreadKind::Reactor => b"reactor",
            ThreadKind::Watchdog => b"watchdog",
            ThreadKind::Librbd => b"librbd",
        }
    }
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the mode for the process (before any thread confines itself). Without it, threads
/// are not confined (library use: tests, fuzz targets).
pub fn init(mode: SeccompMode) -> std::io::Result<()> {
    let _ = MODE.set(mode);
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    Ok(())
}

/// Every thread: memory, futexes, signals, time, exit, and the writes of logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
];

/// The data path.
const REACTOR: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The control plane.
const CONTROL: &[i64] = &[
    // sockets: listen, accept, the vhost-user protocol, credentials, the stale-socket check
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // the NBD connector resolving a server's name: glibc sends the A and AAAA queries with
    // one sendmmsg
    libc::SYS_sendmmsg,
    // event loops and signals
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_signalfd4,
    // call fd signal rings, memory tables, inflight regions, ublk's control ring
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    // what the librbd thread needs beyond the calls above (see LIBRBD)
    libc::SYS_access,
    libc::SYS_epoll_create,
    libc::SYS_pipe2,
    libc::SYS_statfs,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // files: backends, /proc (eventfd checks), socket files, user lookups, /dev/ublk-control
    // and /dev/ublkcN (ublk: mapped on the reactors, which need no call of their own for it)
    libc::SYS_openat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // listing a directory: the VDUSE front end finds its /dev/vdX in sysfs
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_ioctl,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_fchownat,
    libc::SYS_chown,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    // threads (one per connection)
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_setaffinity,
];

const WATCHDOG: &[i64] = &[libc::SYS_shutdown];

/// librados and librbd: the thread that connects and opens an image, and every thread they
/// start from it (messengers, timers, work queues, the admin socket, the log writer), which
/// inherit its filter. Measured with `strace -f` over connect, I/O, resize, lock break and
/// close (Ceph 16), plus what their error paths and options use: asynchronous connects
/// (getsockopt SO_ERROR), address lookup over netlink (`public network`), the admin socket
/// (accept4).
///
/// A device added at run time starts this thread from a control thread that is already
/// confined, and stacked filters allow only what both allow: every call here must also be
/// in CONTROL or COMMON (a test checks it).
const LIBRBD: &[i64] = &[
    // threads
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_setaffinity,
    // the messenger: TCP to mons and OSDs, its event loop and wake-up pipes
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_fcntl,
    // asio's timers (librbd's io_context threads), seen when a lock is broken
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // loading the libraries, reading the configuration and keyring, logs, the admin
    // socket file, vubd's lock records (lock.rs)
    libc::SYS_openat,
    libc::SYS_access,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_readlink,
    libc::SYS_statfs,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_uname,
    libc::SYS_geteuid,
    libc::SYS_getuid,
    libc::SYS_getegid,
    libc::SYS_getgid,
];

fn allowed(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Control => CONTROL,
        ThreadKind::Reactor => REACTOR,
        ThreadKind::Watchdog => WATCHDOG,
        ThreadKind::Librbd => LIBRBD,
    }
}

/// Whether `kind`'s threads get `refuse_open` on top of their filter.
fn refuses_open(kind: ThreadKind, mode: SeccompMode) -> bool {
    mode == SeccompMode::On && !allowed(kind).contains(&libc::SYS_openat)
}

fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = COMMON
        .iter()
        .chain(allowed(kind))
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if refuses_open(kind, mode) {
        // Let through here so that `refuse_open`'s ERRNO decides: TRAP would beat it.
        rules.insert(libc::SYS_open, Vec::new());
        rules.insert(libc::SYS_openat, Vec::new());
    }
    // Closing a file checks it first with fcntl(F_GETFD) (Rust's std, in debug builds):
    // every thread may do that much, control threads anything.
    rules.entry(libc::SYS_fcntl).or_insert_with(|| {
        vec![
            seccompiler::SeccompRule::new(vec![seccompiler::SeccompCondition::new(
                1,
                seccompiler::SeccompCmpArgLen::Dword,
                seccompiler::SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )
            .expect("valid condition")])
            .expect("valid rule"),
        ]
    });
    // A VDUSE queue completes with VDUSE_VQ_INJECT_IRQ on its device fd, from its reactor:
    // reactors may make that one ioctl.
    if kind == ThreadKind::Reactor {
        rules.insert(
            libc::SYS_ioctl,
            vec![
                seccompiler::SeccompRule::new(vec![seccompiler::SeccompCondition::new(
                    1,
                    seccompiler::SeccompCmpArgLen::Dword,
                    seccompiler::SeccompCmpOp::Eq,
                    VDUSE_VQ_INJECT_IRQ,
                )
                .expect("valid condition")])
                .expect("valid rule"),
            ],
        );
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|e| e.to_string())
}

thread_local! {
    static KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Records that the calling thread runs under `kind`'s filter, inherited from the thread
/// that spawned it (for the message when it makes a forbidden call).
pub fn inherited(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Confines the calling thread to `kind`'s system calls, per the process's mode.
pub fn confine(kind: ThreadKind) -> std::io::Result<()> {
    let mode = *MODE.get().unwrap_or(&SeccompMode::Off);
    apply(kind, mode)
}

/// Confines the calling thread in `mode`, whatever the process's mode (tests).
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> std::io::Result<()> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    KIND.with(|k| k.set(Some(kind)));
    // First: the main filter forbids the prctl(2) installing a filter makes.
    if refuses_open(kind, mode) {
        let bpf = refuse_open().map_err(std::io::Error::other)?;
        seccompiler::apply_filter(&bpf).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let bpf = filter(kind, mode).map_err(std::io::Error::other)?;
    seccompiler::apply_filter(&bpf).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A second filter for threads that open no files: open(2) and openat(2) fail with EACCES
/// instead of stopping the process. glibc's free() opens /proc/sys/vm/overcommit_memory the
/// first time it shrinks a thread's heap, on whichever thread that happens (a reactor, when
/// the queues it dropped at shutdown held the last big allocation), and copes with the open
/// failing. A refused open reaches nothing, so it needs no stop. The kernel takes the stricter
/// action of the two filters: ERRNO here beats the ALLOW `filter` gives these two calls.
fn refuse_open() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [libc::SYS_open, libc::SYS_openat]
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())
}

/// `VDUSE_VQ_INJECT_IRQ` (`_IOW(0x81, 0x17, __u32)`), the one ioctl reactors may make (the
/// VDUSE front end checks that its own definition agrees).
pub const VDUSE_VQ_INJECT_IRQ: u64 = 0x4004_8117;

/// Exit status of a process stopped by a forbidden system call.
pub const EXIT_FORBIDDEN: i32 = 159;

fn install_sigsys_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    // SAFETY: sigaction is plain data; all-zero is a valid empty action.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: a valid action for SIGSYS with an SA_SIGINFO handler; no old action wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// Writes `n` in decimal into `buf`; returns the digits.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A forbidden system call (SECCOMP_RET_TRAP): one line on stderr, then exit. Only write(2)
/// and exit_group(2), which every filter allows: async-signal-safe.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `_sigsys { void *call_addr; int syscall; ... }`
    // right after the three ints of the header and their padding: the call number sits at
    // byte 24 of the siginfo it passes.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let kind = KIND
        .with(|k| k.get())
        .map_or(&b"unknown"[..], ThreadKind::name);
    let mut digits = [0u8; 10];
    let parts: [&[u8]; 5] = [
        b"vubd: seccomp: a ",
        kind,
        b" thread made system call ",
        decimal(nr.max(0) as u32, &mut digits),
        b", which vubd does not allow; exiting (run with --seccomp log to find more)\n",
    ];
    for p in parts {
        // SAFETY: writes a byte slice to stderr.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: ends the process at once; no destructors run in a signal handler.
    unsafe { libc::_exit(EXIT_FORBIDDEN) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_kind_and_mode() {
        for kind in [
            ThreadKind::Control,
            ThreadKind::Reactor,
            ThreadKind::Watchdog,
            ThreadKind::Librbd,
        ] {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                assert!(!filter(kind, mode).unwrap().is_empty());
            }
        }
    }

    /// A device added at run time starts its librbd thread from a confined control thread:
    /// the librbd filter is stacked on the control filter, so it gets nothing more.
    #[test]
    fn the_librbd_thread_needs_nothing_a_control_thread_may_not_do() {
        let missing: Vec<i64> = LIBRBD
            .iter()
            .filter(|nr| !CONTROL.contains(nr) && !COMMON.contains(nr))
            .copied()
            .collect();
        assert!(missing.is_empty(), "add to CONTROL: {missing:?}");
    }

    #[test]
    fn decimal_digits() {
        let mut b = [0u8; 10];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(425, &mut b), b"425");
    }
}
