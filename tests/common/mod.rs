//! Shared helpers for the integration tests: start a `vubd` process, connect a real
//! vhost-user-blk client (libblkio, driver `virtio-blk-vhost-user`) and do synchronous I/O.
//!
//! Every test crate includes this module but uses only part of it.
#![allow(dead_code)]

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::fs::File;
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long to wait for the server's socket to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A server still running after this long is killed, so a hung vhost-user handshake
/// (which libblkio waits for without a timeout) fails the test instead of hanging it.
const WATCHDOG: Duration = Duration::from_secs(180);
/// How long one request may take before the test declares the server stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-queue I/O buffer of a [`Client`] (in libblkio-allocated, mapped memory).
pub const BUF_LEN: usize = 4 << 20;

/// A directory for sockets, stderr logs and backing files. It lives on a disk file
/// system (/var/tmp), not tmpfs, because tmpfs rejects `O_DIRECT`.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vubd-test-")
        .tempdir_in("/var/tmp")
        .expect("create temp dir in /var/tmp")
}

/// CPUs this process may run on (from `sched_getaffinity`).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask struct, valid when zeroed; sched_getaffinity
    // writes at most `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        assert_eq!(rc, 0, "sched_getaffinity failed");
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// A core mask in the list form vubd accepts ("[0,3]").
pub fn cpu_list_mask(cpus: &[usize]) -> String {
    let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    format!("[{}]", list.join(","))
}

/// A hex core mask naming only the last CPU we may run on (keeps test servers to one
/// reactor each on this 2-core machine).
pub fn last_cpu_mask() -> String {
    let last = *allowed_cpus().last().expect("no CPUs");
    if last < 64 {
        format!("{:#x}", 1u64 << last)
    } else {
        cpu_list_mask(&[last])
    }
}

/// A hex core mask naming up to the first two CPUs we may run on.
pub fn two_cpu_mask() -> String {
    let cpus: Vec<usize> = allowed_cpus().into_iter().take(2).collect();
    cpu_list_mask(&cpus)
}

/// A running `vubd` process. Dropping it sends SIGTERM (then SIGKILL after 5 s) and,
/// if the test is failing, prints the server's stderr.
pub struct Server {
    child: Option<Child>,
    /// The first (or only) device socket.
    pub socket: PathBuf,
    stderr_path: PathBuf,
    /// Set before this thread starts reaping the child: from then on the watchdog stays
    /// away (and can never signal a reused pid).
    stopping: Arc<AtomicBool>,
}

impl Server {
    /// `vubd --socket-path DIR/NAME.sock ARGS... -m <last cpu> $VUBD_TEST_ARGS`; waits until
    /// the socket accepts connections. `-m` is added only if ARGS has no `-m`.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Server {
        let socket = dir.join(format!("{name}.sock"));
        let mut full: Vec<String> = vec!["--socket-path".into(), socket.display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        if !args.contains(&"-m") {
            full.push("-m".into());
            full.push(last_cpu_mask());
        }
        // e.g. VUBD_TEST_ARGS="--poll-mode interrupt" runs the suite in another mode.
        if let Ok(extra) = std::env::var("VUBD_TEST_ARGS") {
            full.extend(extra.split_whitespace().map(String::from));
        }
        Server::spawn(dir, name, &full, &[socket])
    }

    /// `vubd --config FILE` serving the given sockets; waits for all of them.
    pub fn start_config(dir: &Path, name: &str, config: &Path, sockets: &[PathBuf]) -> Server {
        let args = vec!["--config".to_string(), config.display().to_string()];
        Server::spawn(dir, name, &args, sockets)
    }

    /// Spawns vubd with exactly `args` and waits until every socket accepts a connection.
    pub fn spawn(dir: &Path, name: &str, args: &[String], sockets: &[PathBuf]) -> Server {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let child = vubd_command(args, &stderr_path)
            .spawn()
            .expect("spawn vubd");
        let stopping = Arc::new(AtomicBool::new(false));
        spawn_watchdog(child.id(), stopping.clone());
        let mut server = Server {
            child: Some(child),
            socket: sockets.first().cloned().unwrap_or_default(),
            stderr_path,
            stopping,
        };
        for socket in sockets {
            server.wait_for_socket(socket);
        }
        server
    }

    fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "vubd exited ({status}) before {} accepted a connection; stderr:\n{}",
                    socket.display(),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not accept a connection within {:?}; vubd stderr:\n{}",
                    socket.display(),
                    STARTUP_TIMEOUT,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server already stopped").id()
    }

    /// `Some(status)` if the server has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("server already stopped")
            .try_wait()
            .expect("try_wait")
    }

    /// Panics (with the server's stderr) unless the server process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("vubd died ({status}); stderr:\n{}", self.stderr());
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.wait_exit(Duration::from_secs(5))
    }

    /// Waits (bounded) for the server to exit; SIGKILLs it and panics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        self.stopping.store(true, Ordering::SeqCst);
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        match status {
            Some(status) => status,
            None => {
                panic!(
                    "vubd did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        signal(child.id(), libc::SIGTERM);
        if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- vubd stderr -----\n{}-----------------------",
                self.stderr()
            );
        }
    }
}

/// The server under test: the `vubd` built with these tests, or the program named by
/// `VUBD_TEST_SERVER` (e.g. a wrapper around a reference server taking vubd's CLI).
fn server_binary() -> PathBuf {
    std::env::var_os("VUBD_TEST_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vubd")))
}

fn spawn_watchdog(pid: u32, stopping: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + WATCHDOG;
        while Instant::now() < deadline {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !stopping.load(Ordering::SeqCst) {
            eprintln!("watchdog: test still running after {WATCHDOG:?}; killing vubd {pid}");
            signal(pid, libc::SIGKILL);
        }
    });
}

fn vubd_command(args: &[String], stderr_path: &Path) -> Command {
    let stderr = File::create(stderr_path).expect("create stderr log");
    let mut cmd = Command::new(server_binary());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .env("RUST_BACKTRACE", "1");
    cmd
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `vubd ARGS` expecting it to exit by itself within 10 s; returns its status and
/// stderr. Kills it and panics if it keeps running.
pub fn run_vubd_to_exit(dir: &Path, name: &str, args: &[String]) -> (ExitStatus, String) {
    let stderr_path = dir.join(format!("{name}.stderr"));
    let mut child = vubd_command(args, &stderr_path)
        .spawn()
        .expect("spawn vubd");
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    match status {
        Some(status) => (status, stderr),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vubd {args:?} kept running instead of exiting with an error; stderr:\n{stderr}"
            );
        }
    }
}

/// A sparse file of `size` bytes in `dir`.
pub fn create_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).expect("create backing file");
    f.set_len(size).expect("set_len");
    path
}

/// Reads `len` bytes at `off` of a regular file (what really landed on disk).
pub fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open backing file");
    let mut out = vec![0u8; len];
    f.read_exact_at(&mut out, off).expect("read backing file");
    out
}

pub fn read_to_string(path: &Path) -> String {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .expect("read file");
    s
}

/// Deterministic data that depends on `seed` and on the disk offset it is written to, so
/// data landing at the wrong offset, or stale data from another write, never compares equal.
pub fn pattern(seed: u64, disk_off: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut word = disk_off / 8;
    while out.len() < len {
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(word.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// `assert_eq!` for large buffers: reports the first differing byte instead of dumping MiBs.
#[track_caller]
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {bad} of {} bytes differ, first at byte {i}: got {:#04x}, want {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

#[track_caller]
pub fn assert_zeroes(what: &str, got: &[u8]) {
    assert_bytes_eq(what, got, &vec![0u8; got.len()]);
}

/// A view of part of a libblkio memory region (shared with the server). Raw because the
/// server writes into it behind our back; valid while the owning [`Client`]'s `Blkio` or
/// any of its queues is alive.
pub struct Buf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain shared memory; each Buf is used by one thread at a time.
unsafe impl Send for Buf {}

impl Buf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off + len <= self.len,
            "buffer range {off}+{len} > {}",
            self.len
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.add(off) }
    }

    pub fn iovec(&self, off: usize, len: usize) -> blkio::iovec {
        blkio::iovec {
            iov_base: self.ptr(off, len).cast(),
            iov_len: len,
        }
    }

    pub fn store(&self, off: usize, data: &[u8]) {
        let dst = self.ptr(off, data.len());
        // SAFETY: dst..dst+len is inside the mapped region; no request uses it now.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    pub fn load(&self, off: usize, len: usize) -> Vec<u8> {
        let src = self.ptr(off, len);
        let mut out = vec![0u8; len];
        // SAFETY: as in `store`.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }

    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        let dst = self.ptr(off, len);
        // SAFETY: as in `store`.
        unsafe { std::ptr::write_bytes(dst, byte, len) };
    }
}

/// A connected and started libblkio client.
pub struct Client {
    pub blkio: Blkio,
    /// One [`Disk`] (queue + private buffer) per queue; move them into threads freely.
    pub disks: Vec<Disk>,
}

impl Client {
    /// Connects with `num_queues` queues, each with a [`BUF_LEN`] buffer. Panics on error.
    pub fn connect(socket: &Path, num_queues: usize) -> Client {
        Client::try_connect(socket, num_queues, false)
            .unwrap_or_else(|e| panic!("connect to {}: {e} ({:?})", socket.display(), e.errno()))
    }

    /// Connect + start; `read_only` sets libblkio's "read-only" property (required to start
    /// a device that offers VIRTIO_BLK_F_RO).
    pub fn try_connect(socket: &Path, num_queues: usize, read_only: bool) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().expect("utf-8 path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues as i32)?;
        let outcome = blkio.start()?;
        assert_eq!(outcome.queues.len(), num_queues);
        // Segments must respect the device's advertised limit, like any real driver.
        let max_seg = match blkio.get_i32("max-segment-len")? {
            n if n > 0 => n as usize,
            _ => usize::MAX,
        };
        let region = blkio.alloc_mem_region(BUF_LEN * num_queues)?;
        blkio.map_mem_region(&region)?;
        let disks = outcome
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| Disk {
                q,
                buf: Buf {
                    // SAFETY: i * BUF_LEN + BUF_LEN <= region.len.
                    ptr: unsafe { (region.addr as *mut u8).add(i * BUF_LEN) },
                    len: BUF_LEN,
                },
                max_seg,
                next_user_data: 1,
            })
            .collect();
        Ok(Client { blkio, disks })
    }

    /// Device capacity in bytes, as reported by the device's config space.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn disk(&mut self) -> &mut Disk {
        &mut self.disks[0]
    }
}

/// Result of one request: `Err(ret)` carries libblkio's negative errno.
pub type IoResult<T> = Result<T, i32>;

/// One queue plus a private buffer; synchronous helpers submit one request and wait for it.
pub struct Disk {
    pub q: Blkioq,
    pub buf: Buf,
    max_seg: usize,
    next_user_data: usize,
}

impl Disk {
    fn user_data(&mut self) -> usize {
        self.next_user_data += 1;
        self.next_user_data
    }

    /// Splits buffer range [boff, boff+len) into iovecs no longer than the device's
    /// max-segment-len.
    fn iovecs(&self, boff: usize, len: usize) -> Vec<blkio::iovec> {
        (0..len)
            .step_by(self.max_seg)
            .map(|done| self.buf.iovec(boff + done, (len - done).min(self.max_seg)))
            .collect()
    }

    /// Writes `data` at disk offset `off` (staged at buffer offset 0).
    pub fn write(&mut self, off: u64, data: &[u8]) -> IoResult<()> {
        self.write_flags(off, data, ReqFlags::empty())
    }

    pub fn write_flags(&mut self, off: u64, data: &[u8], flags: ReqFlags) -> IoResult<()> {
        self.buf.store(0, data);
        let iovs = self.iovecs(0, data.len());
        let ud = self.user_data();
        self.q
            .writev(off, iovs.as_ptr(), iovs.len() as u32, ud, flags);
        self.wait_one(ud)
    }

    /// Reads `len` bytes at disk offset `off`. The buffer is first filled with 0xA5 so a
    /// request the server "completes" without writing data cannot pass for zeroes or for
    /// the previous read's data.
    pub fn read(&mut self, off: u64, len: usize) -> IoResult<Vec<u8>> {
        self.buf.fill(0, len, 0xA5);
        let iovs = self.iovecs(0, len);
        let ud = self.user_data();
        self.q
            .readv(off, iovs.as_ptr(), iovs.len() as u32, ud, ReqFlags::empty());
        self.wait_one(ud)?;
        Ok(self.buf.load(0, len))
    }

    /// Buffer offsets for scattered segments: each starts on a 4 KiB boundary with a
    /// 4 KiB gap after the previous one, so segments are never contiguous in memory.
    fn scatter_offsets(lens: &[usize]) -> Vec<usize> {
        let mut offs = Vec::new();
        let mut at = 0usize;
        for &len in lens {
            offs.push(at);
            at = (at + len).div_ceil(4096) * 4096 + 4096;
        }
        offs
    }

    /// One write request with one iovec per segment (scattered in memory).
    pub fn writev(&mut self, off: u64, segs: &[&[u8]]) -> IoResult<()> {
        let lens: Vec<usize> = segs.iter().map(|s| s.len()).collect();
        let offs = Self::scatter_offsets(&lens);
        let iovs: Vec<blkio::iovec> = segs
            .iter()
            .zip(&offs)
            .map(|(s, &o)| {
                self.buf.store(o, s);
                self.buf.iovec(o, s.len())
            })
            .collect();
        let ud = self.user_data();
        self.q
            .writev(off, iovs.as_ptr(), iovs.len() as u32, ud, ReqFlags::empty());
        self.wait_one(ud)
    }

    /// One read request with one iovec per segment length; returns each segment's bytes.
    pub fn readv(&mut self, off: u64, lens: &[usize]) -> IoResult<Vec<Vec<u8>>> {
        let offs = Self::scatter_offsets(lens);
        let iovs: Vec<blkio::iovec> = lens
            .iter()
            .zip(&offs)
            .map(|(&l, &o)| {
                self.buf.fill(o, l, 0xA5);
                self.buf.iovec(o, l)
            })
            .collect();
        let ud = self.user_data();
        self.q
            .readv(off, iovs.as_ptr(), iovs.len() as u32, ud, ReqFlags::empty());
        self.wait_one(ud)?;
        Ok(lens
            .iter()
            .zip(&offs)
            .map(|(&l, &o)| self.buf.load(o, l))
            .collect())
    }

    pub fn flush(&mut self) -> IoResult<()> {
        let ud = self.user_data();
        self.q.flush(ud, ReqFlags::empty());
        self.wait_one(ud)
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        let ud = self.user_data();
        self.q.write_zeroes(off, len, ud, flags);
        self.wait_one(ud)
    }

    pub fn discard(&mut self, off: u64, len: u64) -> IoResult<()> {
        let ud = self.user_data();
        self.q.discard(off, len, ud, ReqFlags::empty());
        self.wait_one(ud)
    }

    /// Queues a write of buffer range [boff, boff+len) to disk offset `off` without waiting.
    pub fn submit_write(&mut self, off: u64, boff: usize, len: usize, user_data: usize) {
        let ptr = self.buf.ptr(boff, len);
        self.q.write(off, ptr, len, user_data, ReqFlags::empty());
    }

    /// Queues a read into buffer range [boff, boff+len) from disk offset `off`.
    pub fn submit_read(&mut self, off: u64, boff: usize, len: usize, user_data: usize) {
        let ptr = self.buf.ptr(boff, len);
        self.q.read(off, ptr, len, user_data, ReqFlags::empty());
    }

    /// Waits for `n` completions; returns (user_data, ret) pairs.
    pub fn wait(&mut self, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::with_capacity(n);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + IO_TIMEOUT;
        while out.len() < n {
            let mut timeout = deadline.saturating_duration_since(Instant::now());
            let want = n - out.len();
            let got = self
                .q
                .do_io(&mut completions[..want], want, Some(&mut timeout), None)
                .unwrap_or_else(|e| {
                    panic!(
                        "waiting for {want} completion(s) failed after {} of {n}: {e} \
                         ({:?}); server stuck?",
                        out.len(),
                        e.errno()
                    )
                });
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` elements.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    fn wait_one(&mut self, user_data: usize) -> IoResult<()> {
        let done = self.wait(1);
        assert_eq!(done[0].0, user_data, "completion for an unexpected request");
        match done[0].1 {
            0 => Ok(()),
            ret => Err(ret),
        }
    }
}

/// Panics unless `r` is an error with a negative errno (what libblkio reports for
/// VIRTIO_BLK_S_IOERR / UNSUPP).
#[track_caller]
pub fn assert_io_error<T>(what: &str, r: IoResult<T>) -> i32 {
    match r {
        Ok(_) => panic!("{what}: succeeded, expected an error"),
        Err(ret) => {
            assert!(ret < 0, "{what}: ret {ret} is not a negative errno");
            ret
        }
    }
}

/// Unwraps an I/O result, naming the errno on failure.
#[track_caller]
pub fn ok<T>(what: &str, r: IoResult<T>) -> T {
    match r {
        Ok(v) => v,
        Err(ret) => panic!(
            "{what}: failed with {ret} ({})",
            std::io::Error::from_raw_os_error(-ret)
        ),
    }
}

/// Whether `tool` is on PATH. If it is not and the tests run as root, the test dependencies
/// are installed first (tests/install-deps.sh, once per test process; apt waits for other
/// processes' locks), unless VUBD_NO_INSTALL=1.
pub fn have_tool(tool: &str) -> bool {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let found = || {
        Command::new("sh")
            .args([
                "-c",
                &format!("PATH=\"$PATH:/usr/sbin:/sbin\" command -v {tool}"),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return true;
    }
    // SAFETY: getuid has no memory effects.
    let root = unsafe { libc::getuid() } == 0;
    if root && std::env::var("VUBD_NO_INSTALL").as_deref() != Ok("1") {
        INSTALL.call_once(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install-deps.sh");
            eprintln!("{tool} is missing: running {}", script.display());
            match Command::new("bash").arg(&script).status() {
                Ok(s) if s.success() => {}
                other => eprintln!("{} failed: {other:?}", script.display()),
            }
        });
    }
    found()
}

/// "Seccomp:" of every thread of `pid`: (thread name, mode).
pub fn seccomp_of_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    out
}

/// One vubd with two devices: "target" (a buffered file, `target.img`) where a test
/// misbehaves or looks closely, and "bystander" (RAM), which must keep serving meanwhile.
pub struct TargetAndBystander {
    pub _dir: tempfile::TempDir,
    pub server: Server,
    pub target: PathBuf,
    pub bystander: PathBuf,
    /// The target's file.
    pub img: PathBuf,
}

/// `target_and_bystander_with` with a 2-queue target.
pub fn target_and_bystander() -> TargetAndBystander {
    target_and_bystander_with(2)
}

pub fn target_and_bystander_with(target_queues: u16) -> TargetAndBystander {
    let dir = test_dir();
    let target = dir.path().join("target.sock");
    let bystander = dir.path().join("bystander.sock");
    let img = create_file(dir.path(), "target.img", 16 * MIB);
    let config = dir.path().join("vubd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"target\"\nsocket-path = \"{}\"\nblk-file = \"{}\"\nbuffered = true\nnum-queues = {target_queues}\n\n\
             [[device]]\nname = \"bystander\"\nsocket-path = \"{}\"\nram = \"16M\"\n",
            target.display(),
            img.display(),
            bystander.display()
        ),
    )
    .unwrap();
    let server = Server::start_config(
        dir.path(),
        "vubd",
        &config,
        &[target.clone(), bystander.clone()],
    );
    TargetAndBystander {
        _dir: dir,
        server,
        target,
        bystander,
        img,
    }
}
