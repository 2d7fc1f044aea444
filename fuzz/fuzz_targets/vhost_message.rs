//! Fuzzes the control plane: a hostile vhost-user frontend sends a sequence of messages to one
//! `Device` served by the vhost crate's `BackendReqHandler`, over a `UnixStream::pair()`.
//!
//! Messages are structured (a valid FrontendReq code, typed bodies built from fuzzed fields,
//! an optional NEED_REPLY flag, a correct or fuzzed size field, and memfds/eventfds passed as
//! SCM_RIGHTS where the request takes them) so the fuzzer gets past the header checks and
//! reaches the device: memory tables, vring setup/start/stop on a real reactor, config space.
//!
//! One iteration = one connection: every message is written up front, the write side is shut
//! down, then `handle_request()` runs until it errors (as the control thread does, which then
//! disconnects and resets the device). Replies are drained after each request so the device
//! never blocks on send. Nothing may panic, hang, or leak fds.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::BackendReqHandler;
use vubd::testing::{
    open_backend, Caps, Device, DeviceModel, Engine, PollMode, Settings, VhostDevice, Watchdog,
};
use vubd::BackendSpec;

/// At most this many messages per input.
const MAX_MESSAGES: usize = 48;
/// Frontend virtual address of memory slot 0; slot n is n MiB above.
const VA_BASE: u64 = 0x7f00_0000_0000;
/// Guest physical slot size (slot n at n MiB).
const SLOT: u64 = 0x10_0000;
/// Memfds are never larger than this (they cost nothing until touched, but keep it small).
const MAX_FILE: u64 = 4 << 20;

// FrontendReq codes.
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const RESET_DEVICE: u32 = 34;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

/// Every code the vhost crate knows (1..=44); the raw variant picks among them.
const ALL_CODES: u32 = 44;

const FLAG_VERSION: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = 0x8;
const VRING_NOFD: u64 = 0x100;

/// Virtio features the device offers (src/virtio_blk/features.rs) plus PROTOCOL_FEATURES.
const OFFERED_FEATURES: u64 = (1 << 1)
    | (1 << 2)
    | (1 << 6)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 28)
    | (1 << 29)
    | (1 << 32)
    | (1 << 30);
/// MQ | REPLY_ACK | CONFIG | INFLIGHT_SHMFD | RESET_DEVICE | CONFIGURE_MEM_SLOTS.
const OFFERED_PROTOCOL: u64 = 0x1 | 0x8 | 0x200 | 0x1000 | 0x2000 | 0x8000;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Bits64 {
    /// What the device offers, masked.
    Offered(u64),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Slot64 {
    Slot(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size64 {
    Pages(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FileSize {
    /// Exactly mmap_offset + memory_size (when that is small enough).
    Exact,
    Pages(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RegionFd {
    Memfd(FileSize),
    /// Not a regular file: must be refused.
    Eventfd,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Region {
    gpa: Slot64,
    size: Size64,
    user_addr: Slot64,
    mmap_offset: Size64,
    fd: RegionFd,
}

/// A frontend virtual address for a vring part: inside a memory slot, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Va {
    InSlot(u8, u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum VringFd {
    Eventfd,
    /// NOFD flag set, no fd attached.
    None,
    /// NOFD flag set and an fd attached anyway, or no flag and no fd: both must be refused.
    Mismatch(bool),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Index {
    Small(u8),
    Raw(u32),
}

/// A frontend-kept inflight region (vhost-user "Inflight I/O tracking" layout), with heads
/// marked in flight so that a ring start resubmits them.
#[derive(Arbitrary, Debug)]
struct Inflight {
    mmap_size: Size64,
    mmap_offset: Size64,
    num_queues: u8,
    queue_size: Index,
    file: FileSize,
    used_idx: [u16; 2],
    last_batch_head: [u16; 2],
    /// (queue, head, counter): desc[head].inflight = 1 with that counter.
    marks: Vec<(u8, u16, u64)>,
}

#[derive(Arbitrary, Debug)]
enum Body {
    GetFeatures,
    SetFeatures(Bits64),
    SetOwner,
    ResetOwner,
    ResetDevice,
    GetProtocolFeatures,
    SetProtocolFeatures(Bits64),
    GetQueueNum,
    GetMaxMemSlots,
    SetMemTable(Vec<Region>, i8),
    AddMemReg(Region),
    RemMemReg(Region, bool),
    SetVringNum(Index, u32),
    SetVringAddr {
        index: Index,
        flags: u32,
        desc: Va,
        used: Va,
        avail: Va,
        log: u64,
    },
    SetVringBase(Index, u32),
    GetVringBase(Index),
    SetVringKick(u8, VringFd),
    SetVringCall(u8, VringFd),
    SetVringErr(u8, VringFd),
    SetVringEnable(Index, u32),
    GetConfig {
        offset: u16,
        size: u16,
        flags: u32,
    },
    SetConfig {
        offset: u16,
        flags: u32,
        data: Vec<u8>,
    },
    GetInflightFd(u64, u16, u16),
    SetInflightFd(Inflight),
    SetLogBase(u64, u64),
    /// Any known code with arbitrary payload and optionally one memfd.
    Raw {
        code: u8,
        payload: Vec<u8>,
        fd: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum SizeField {
    Correct,
    Fuzzed(u16),
}

#[derive(Arbitrary, Debug)]
struct Msg {
    body: Body,
    need_reply: bool,
    size: SizeField,
    /// Rarely: raw header flags instead of VERSION(|NEED_REPLY).
    flags: Option<u32>,
}

/// A message ready to send: header+payload bytes and the fds to attach.
struct Wire {
    bytes: Vec<u8>,
    fds: Vec<File>,
}

fn memfd(size: u64) -> File {
    // SAFETY: plain syscalls on a fresh fd that the File then owns.
    unsafe {
        let fd = libc::memfd_create(c"vubd-fuzz".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        let f = File::from_raw_fd(fd);
        assert_eq!(libc::ftruncate(fd, size.min(MAX_FILE) as libc::off_t), 0);
        f
    }
}

fn eventfd() -> File {
    // SAFETY: plain syscall; the fd is checked and then owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

fn slot(s: Slot64, base: u64) -> u64 {
    match s {
        Slot64::Slot(n) => base + u64::from(n % 8) * SLOT,
        Slot64::Raw(v) => v,
    }
}

fn size64(s: Size64) -> u64 {
    match s {
        Size64::Pages(n) => u64::from(n % 64) * 4096,
        Size64::Raw(v) => v,
    }
}

/// The region's 32 bytes (guest_phys_addr, memory_size, user_addr, mmap_offset) and its fd.
fn region(r: &Region) -> ([u8; 32], File) {
    let gpa = slot(r.gpa, 0);
    let size = match r.size {
        Size64::Pages(n) => (u64::from(n % 64) + 1) * 4096,
        Size64::Raw(v) => v,
    };
    let ua = slot(r.user_addr, VA_BASE);
    let off = size64(r.mmap_offset);
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&gpa.to_le_bytes());
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b[16..24].copy_from_slice(&ua.to_le_bytes());
    b[24..32].copy_from_slice(&off.to_le_bytes());
    let f = match r.fd {
        RegionFd::Memfd(FileSize::Exact) => memfd(off.saturating_add(size)),
        RegionFd::Memfd(FileSize::Pages(n)) => memfd(u64::from(n) * 4096),
        RegionFd::Eventfd => eventfd(),
    };
    (b, f)
}

fn va(v: Va) -> u64 {
    match v {
        Va::InSlot(s, off) => VA_BASE + u64::from(s % 8) * SLOT + u64::from(off),
        Va::Raw(a) => a,
    }
}

fn index(i: Index) -> u32 {
    match i {
        Index::Small(n) => u32::from(n % 4),
        Index::Raw(v) => v,
    }
}

fn bits(b: Bits64, offered: u64) -> u64 {
    match b {
        Bits64::Offered(mask) => offered & mask,
        Bits64::Raw(v) => v,
    }
}

fn vring_fd(index: u8, how: VringFd, payload: &mut Vec<u8>, fds: &mut Vec<File>) {
    let mut v = u64::from(index % 4);
    match how {
        VringFd::Eventfd => fds.push(eventfd()),
        VringFd::None => v |= VRING_NOFD,
        VringFd::Mismatch(true) => {
            v |= VRING_NOFD;
            fds.push(eventfd());
        }
        VringFd::Mismatch(false) => {}
    }
    payload.extend_from_slice(&v.to_le_bytes());
}

fn u32s(p: &mut Vec<u8>, vals: &[u32]) {
    for v in vals {
        p.extend_from_slice(&v.to_le_bytes());
    }
}

fn u64s(p: &mut Vec<u8>, vals: &[u64]) {
    for v in vals {
        p.extend_from_slice(&v.to_le_bytes());
    }
}

fn inflight(p: &mut Vec<u8>, size: u64, nq: u16, qs: u16) {
    u64s(p, &[size.min(MAX_FILE), 0]);
    p.extend_from_slice(&nq.to_le_bytes());
    p.extend_from_slice(&qs.to_le_bytes());
    p.extend_from_slice(&[0; 4]); // repr(C) tail padding: 24 bytes
}

fn encode(m: &Msg) -> Wire {
    let mut p = Vec::new();
    let mut fds = Vec::new();
    let code = match &m.body {
        Body::GetFeatures => GET_FEATURES,
        Body::SetFeatures(b) => {
            u64s(&mut p, &[bits(*b, OFFERED_FEATURES)]);
            SET_FEATURES
        }
        Body::SetOwner => SET_OWNER,
        Body::ResetOwner => RESET_OWNER,
        Body::ResetDevice => RESET_DEVICE,
        Body::GetProtocolFeatures => GET_PROTOCOL_FEATURES,
        Body::SetProtocolFeatures(b) => {
            u64s(&mut p, &[bits(*b, OFFERED_PROTOCOL)]);
            SET_PROTOCOL_FEATURES
        }
        Body::GetQueueNum => GET_QUEUE_NUM,
        Body::GetMaxMemSlots => GET_MAX_MEM_SLOTS,
        Body::SetMemTable(regions, fd_delta) => {
            let regions = &regions[..regions.len().min(8)];
            u32s(&mut p, &[regions.len() as u32, 0]);
            for r in regions {
                let (b, f) = region(r);
                p.extend_from_slice(&b);
                fds.push(f);
            }
            // Occasionally one fd too many or too few.
            match fd_delta {
                1 => fds.push(memfd(4096)),
                -1 => {
                    fds.pop();
                }
                _ => {}
            }
            SET_MEM_TABLE
        }
        Body::AddMemReg(r) => {
            let (b, f) = region(r);
            u64s(&mut p, &[0]);
            p.extend_from_slice(&b);
            fds.push(f);
            ADD_MEM_REG
        }
        Body::RemMemReg(r, with_fd) => {
            let (b, f) = region(r);
            u64s(&mut p, &[0]);
            p.extend_from_slice(&b);
            if *with_fd {
                fds.push(f);
            }
            REM_MEM_REG
        }
        Body::SetVringNum(i, n) => {
            u32s(&mut p, &[index(*i), *n]);
            SET_VRING_NUM
        }
        Body::SetVringAddr {
            index: i,
            flags,
            desc,
            used,
            avail,
            log,
        } => {
            u32s(&mut p, &[index(*i), *flags & 1]);
            u64s(&mut p, &[va(*desc), va(*used), va(*avail), *log]);
            SET_VRING_ADDR
        }
        Body::SetVringBase(i, n) => {
            u32s(&mut p, &[index(*i), *n]);
            SET_VRING_BASE
        }
        Body::GetVringBase(i) => {
            u32s(&mut p, &[index(*i), 0]);
            GET_VRING_BASE
        }
        Body::SetVringKick(i, how) => {
            vring_fd(*i, *how, &mut p, &mut fds);
            SET_VRING_KICK
        }
        Body::SetVringCall(i, how) => {
            vring_fd(*i, *how, &mut p, &mut fds);
            SET_VRING_CALL
        }
        Body::SetVringErr(i, how) => {
            vring_fd(*i, *how, &mut p, &mut fds);
            SET_VRING_ERR
        }
        Body::SetVringEnable(i, n) => {
            u32s(&mut p, &[index(*i), *n]);
            SET_VRING_ENABLE
        }
        Body::GetConfig {
            offset,
            size,
            flags,
        } => {
            let size = u32::from(*size % 0x1000);
            u32s(&mut p, &[u32::from(*offset % 0x1000), size, *flags & 3]);
            // The frontend sends a buffer of the size it asks for.
            p.resize(12 + size as usize, 0);
            GET_CONFIG
        }
        Body::SetConfig {
            offset,
            flags,
            data,
        } => {
            let data = &data[..data.len().min(256)];
            u32s(
                &mut p,
                &[u32::from(*offset % 0x1000), data.len() as u32, *flags & 3],
            );
            p.extend_from_slice(data);
            SET_CONFIG
        }
        Body::GetInflightFd(size, nq, qs) => {
            inflight(&mut p, *size, *nq, *qs);
            GET_INFLIGHT_FD
        }
        Body::SetInflightFd(i) => {
            let qs = match i.queue_size {
                Index::Small(n) => 1u16 << (n % 11),
                Index::Raw(v) => v as u16,
            };
            let nq = u16::from(i.num_queues % 4);
            let size = size64(i.mmap_size);
            let off = size64(i.mmap_offset);
            let area = (16 + 16 * u64::from(qs)).div_ceil(64) * 64;
            let file_len = match i.file {
                FileSize::Exact => off.saturating_add(size.max(area * u64::from(nq))),
                FileSize::Pages(n) => u64::from(n) * 4096,
            };
            u64s(&mut p, &[size, off]);
            p.extend_from_slice(&nq.to_le_bytes());
            p.extend_from_slice(&qs.to_le_bytes());
            p.extend_from_slice(&[0; 4]); // repr(C) tail padding: 24 bytes
            let f = memfd(file_len);
            let put = |at: u64, b: &[u8]| {
                if at.saturating_add(b.len() as u64) <= file_len.min(MAX_FILE) {
                    let _ = f.write_all_at(b, at);
                }
            };
            for q in 0..2u64 {
                let base = off.saturating_add(q * area);
                put(base.saturating_add(8), &1u16.to_le_bytes()); // version
                put(base.saturating_add(10), &qs.to_le_bytes()); // desc_num
                put(
                    base.saturating_add(12),
                    &i.last_batch_head[q as usize].to_le_bytes(),
                );
                put(
                    base.saturating_add(14),
                    &i.used_idx[q as usize].to_le_bytes(),
                );
            }
            for &(q, head, counter) in i.marks.iter().take(32) {
                let d = off
                    .saturating_add(u64::from(q % 2) * area)
                    .saturating_add(16 + 16 * u64::from(head % qs.max(1)));
                put(d, &[1]);
                put(d.saturating_add(8), &counter.to_le_bytes());
            }
            fds.push(f);
            SET_INFLIGHT_FD
        }
        Body::SetLogBase(size, off) => {
            u64s(&mut p, &[(*size).min(MAX_FILE), *off]);
            fds.push(memfd(*size));
            SET_LOG_BASE
        }
        Body::Raw { code, payload, fd } => {
            p.extend_from_slice(&payload[..payload.len().min(512)]);
            if *fd {
                fds.push(memfd(4096));
            }
            u32::from(*code) % ALL_CODES + 1
        }
    };
    let flags = m.flags.unwrap_or(if m.need_reply {
        FLAG_VERSION | FLAG_NEED_REPLY
    } else {
        FLAG_VERSION
    });
    let size = match m.size {
        SizeField::Correct => p.len() as u32,
        SizeField::Fuzzed(s) => u32::from(s),
    };
    let mut bytes = Vec::with_capacity(12 + p.len());
    u32s(&mut bytes, &[code, flags, size]);
    bytes.extend_from_slice(&p);
    Wire { bytes, fds }
}

/// One sendmsg with the fds as SCM_RIGHTS. False if the socket would block.
fn send(sock: &UnixStream, w: &Wire) -> bool {
    let fds: Vec<RawFd> = w.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: w.bytes.as_ptr() as *mut libc::c_void,
        iov_len: w.bytes.len(),
    };
    // Room for up to 32 fds.
    let mut cmsg = [0u64; 32];
    // SAFETY: msghdr is plain data; every pointer in it refers to a live local buffer of the
    // stated length for the duration of sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let len = std::mem::size_of_val(fds.as_slice()) as u32;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
        let n = libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        n == w.bytes.len() as isize
    }
}

/// Reads and discards every reply waiting on the frontend side, closing any fds they carry.
fn drain(sock: &UnixStream) {
    let mut buf = [0u8; 8192];
    let mut cmsg = [0u64; 64];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as in `send`; received fds are taken over by `File`s and closed at once.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            let n = libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            );
            if n > 0 {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize)
                            / std::mem::size_of::<RawFd>();
                        let data = libc::CMSG_DATA(c).cast::<RawFd>();
                        for i in 0..count {
                            drop(File::from_raw_fd(data.add(i).read_unaligned()));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            n
        };
        if n <= 0 {
            return;
        }
    }
}

/// `VUBD_FUZZ_TRACE=1` prints what each input did (to check seeds by hand).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| {
        let on = std::env::var_os("VUBD_FUZZ_TRACE").is_some();
        if on {
            // The device's own log lines (RUST_LOG=info for ring starts and resubmissions).
            let _ = env_logger::try_init();
        }
        on
    })
}

/// The first CPU this process may run on.
fn usable_cpu() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) == 0 {
            for cpu in 0..libc::CPU_SETSIZE as usize {
                if libc::CPU_ISSET(cpu, &set) {
                    return cpu;
                }
            }
        }
    }
    0
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::start(
            &[usable_cpu()],
            Settings {
                mode: PollMode::Adaptive,
                idle_spin: Duration::from_micros(50),
            },
        )
        .expect("engine")
    })
}

/// A message that takes longer than this is a hang (the server's own limit is 5 s too).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

fn watchdog() -> &'static Arc<Watchdog> {
    static WATCHDOG: OnceLock<Arc<Watchdog>> = OnceLock::new();
    WATCHDOG.get_or_init(|| Watchdog::start(MESSAGE_TIMEOUT).expect("watchdog"))
}

/// A 2-queue null device, as the registry builds one.
fn device() -> VhostDevice {
    let backend = open_backend(&BackendSpec::Null { size: 1 << 20 }, false).expect("null");
    let model = DeviceModel::new(1 << 20, 512, false, true, "fuzz-serial", Caps::ALL, 2);
    let device = Device {
        name: Arc::from("fuzz"),
        model: Arc::new(model),
        backend,
        reactors: engine().reactors().to_vec(),
        queues: Default::default(),
        latency_histograms: true,
    };
    // Connection ids are never 0 (0 marks a free slot of the SIGBUS table) and never reused.
    static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let conn = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    VhostDevice::new(Arc::new(device), Arc::default(), conn, Arc::clone(watchdog()))
}

fuzz_target!(|msgs: Vec<Msg>| {
    trace();
    let (frontend, backend) = UnixStream::pair().expect("socketpair");
    let mut sent_bytes = 0usize;
    for m in msgs.iter().take(MAX_MESSAGES) {
        // A full socket buffer ends the input early (deterministically, by size).
        let w = encode(m);
        let ok = send(&frontend, &w);
        if trace() {
            eprintln!(
                "send {:?}: {} bytes {} fds: {}",
                m.body,
                w.bytes.len(),
                w.fds.len(),
                if ok {
                    "ok".to_string()
                } else {
                    std::io::Error::last_os_error().to_string()
                }
            );
        }
        if !ok {
            break;
        }
        sent_bytes += w.bytes.len();
    }
    // EOF after the last message: handle_request() never waits for more.
    frontend
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    // For the watchdog, as the control thread keeps one.
    let sock = backend.try_clone().expect("clone socket");

    let device = Arc::new(Mutex::new(device()));
    let mut handler = BackendReqHandler::from_stream(backend, Arc::clone(&device));
    // Each request consumes a 12-byte header at least (a wrong size field can make one message
    // look like several), so this bound is never the one that ends the loop.
    for _ in 0..sent_bytes / 12 + 2 {
        // As the control thread serves a message: under the watchdog.
        let (r, timed_out) = watchdog().guard(0, &sock, || handler.handle_request());
        assert!(
            !timed_out,
            "one message took longer than {MESSAGE_TIMEOUT:?}: {r:?}"
        );
        if trace() {
            eprintln!("handle_request: {r:?}");
        }
        drain(&frontend);
        if r.is_err() {
            break;
        }
    }
    // What the control thread does on disconnect: stop every ring and forget the frontend.
    device.lock().unwrap_or_else(|p| p.into_inner()).disconnect();
    drop(handler);
    drain(&frontend);
});
