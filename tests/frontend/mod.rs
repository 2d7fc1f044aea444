//! A minimal vhost-user frontend speaking raw messages, so tests can send exactly what a
//! hostile or crashing frontend would: bad memory tables, rings outside memory, malformed
//! descriptor chains, dropped connections, a restart with an inflight region.
//!
//! Guest memory is one memfd mapped here and shared with vubd. The driver side of a split
//! ring is written by hand into that memory.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;
pub const SET_CONFIG: u32 = 25;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;

const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_LOG_ALL: u64 = 1 << 26;
pub const PF_MQ: u64 = 1 << 0;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_LOG_SHMFD: u64 = 1 << 1;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

/// The frontend's (pretend) virtual address of guest physical address 0: vring addresses
/// are sent as frontend virtual addresses, as QEMU does.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
/// Each ring's area: descriptor table, avail ring, used ring, 4 KiB apart.
pub const RING_AREA: u64 = 0x4000;
/// Where test buffers may go.
pub const DATA_BASE: u64 = 0x10_0000;

pub struct GuestMemory {
    pub file: File,
    base: *mut u8,
    pub size: u64,
}

impl GuestMemory {
    pub fn new(size: u64) -> GuestMemory {
        // SAFETY: NUL-terminated literal name; result checked.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fresh fd owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        GuestMemory::map(file, size)
    }

    /// Maps `size` bytes of a shared file (a memfd of ours, or one vubd handed us).
    pub fn map(file: File, size: u64) -> GuestMemory {
        // SAFETY: a new shared mapping of a file we hold; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        GuestMemory {
            file,
            base: p.cast(),
            size,
        }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa + bytes.len() as u64 <= self.size);
        // SAFETY: in bounds of our mapping (asserted); the server may access it concurrently,
        // which for plain bytes is what shared guest memory is.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa + len as u64 <= self.size);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of our mapping (asserted).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) }
        v
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes())
    }
    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

pub struct Frontend {
    pub sock: UnixStream,
}

pub struct Reply {
    pub request: u32,
    pub payload: Vec<u8>,
    pub files: Vec<File>,
}

pub fn eventfd() -> File {
    // SAFETY: plain syscall; fd checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    unsafe { File::from_raw_fd(fd) }
}

pub fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// The messages that set ring `q` up and start it, as QEMU sends them: NUM, BASE, ADDR (the
/// SET_VRING_ADDR payload `addr`), KICK, CALL, ENABLE. False if one is refused.
fn set_up_vring(
    fe: &mut Frontend,
    q: u32,
    size: u16,
    base: u32,
    addr: &[u8],
    kick: &impl AsRawFd,
    call: &impl AsRawFd,
) -> bool {
    fe.ack(SET_VRING_NUM, &vring_state(q, u32::from(size)), &[])
        .unwrap()
        && fe.ack(SET_VRING_BASE, &vring_state(q, base), &[]).unwrap()
        && fe.ack(SET_VRING_ADDR, addr, &[]).unwrap()
        && fe
            .ack(
                SET_VRING_KICK,
                &u64_payload(u64::from(q)),
                &[kick.as_raw_fd()],
            )
            .unwrap()
        && fe
            .ack(
                SET_VRING_CALL,
                &u64_payload(u64::from(q)),
                &[call.as_raw_fd()],
            )
            .unwrap()
        && fe.ack(SET_VRING_ENABLE, &vring_state(q, 1), &[]).unwrap()
}

pub fn region(gpa: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    [gpa, size, user, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

impl Frontend {
    pub fn connect(path: &Path) -> Frontend {
        let sock = UnixStream::connect(path).expect("connect to vubd");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Frontend { sock }
    }

    /// Sends one message; `need_reply` asks for REPLY_ACK.
    pub fn send(
        &mut self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        need_reply: bool,
    ) -> std::io::Result<()> {
        let flags = VERSION | if need_reply { NEED_REPLY } else { 0 };
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        self.send_raw(&msg, fds)
    }

    /// Writes bytes with optional SCM_RIGHTS fds.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut _,
            iov_len: bytes.len(),
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
        // SAFETY: msghdr is plain data; zeroed is valid, fields set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points to `space` bytes; CMSG_FIRSTHDR is within it, and the
            // data area holds fds.len() ints (CMSG_LEN of that size).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(n as usize, bytes.len(), "short sendmsg");
        Ok(())
    }

    /// Receives one reply (header, payload, fds).
    pub fn recv(&mut self) -> std::io::Result<Reply> {
        let mut hdr = [0u8; 12];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: 12,
        };
        // SAFETY: plain data, fields set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n != 12 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("reply header of {n} bytes"),
            ));
        }
        let mut files = Vec::new();
        // SAFETY: walking the control messages the kernel filled in, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        files.push(File::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        assert!(flags & REPLY != 0, "not a reply: flags {flags:#x}");
        let mut payload = vec![0u8; size];
        self.sock.read_exact(&mut payload)?;
        Ok(Reply {
            request,
            payload,
            files,
        })
    }

    /// A request that has a reply of its own (GET_*).
    pub fn get(&mut self, request: u32, payload: &[u8]) -> std::io::Result<Reply> {
        self.send(request, payload, &[], false)?;
        let r = self.recv()?;
        assert_eq!(r.request, request);
        Ok(r)
    }

    pub fn get_u64(&mut self, request: u32) -> u64 {
        let r = self.get(request, &[]).expect("reply");
        u64::from_le_bytes(r.payload[..8].try_into().unwrap())
    }

    /// A request acknowledged through REPLY_ACK: Ok(true) when vubd accepted it, Ok(false)
    /// when it answered with a failure, Err when the connection is gone.
    pub fn ack(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<bool> {
        self.send(request, payload, fds, true)?;
        let r = self.recv()?;
        assert_eq!(r.request, request);
        Ok(u64::from_le_bytes(r.payload[..8].try_into().unwrap()) == 0)
    }

    /// True once vubd has closed the connection (reads EOF within the timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Feature and protocol negotiation as QEMU does it, with REPLY_ACK.
    pub fn handshake(&mut self, extra_protocol: u64) {
        self.handshake_features(0, extra_protocol)
    }

    /// `handshake` acking `extra_features` virtio features too.
    pub fn handshake_features(&mut self, extra_features: u64, extra_protocol: u64) {
        let features = self.get_u64(GET_FEATURES);
        let acked = F_VERSION_1 | F_PROTOCOL_FEATURES | extra_features;
        assert_eq!(features & acked, acked, "vubd offers {features:#x}");
        let proto = self.get_u64(GET_PROTOCOL_FEATURES);
        let want = PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_CONFIGURE_MEM_SLOTS | extra_protocol;
        assert_eq!(proto & want, want, "vubd offers {proto:#x}");
        self.send(SET_FEATURES, &u64_payload(acked), &[], false)
            .unwrap();
        self.send(SET_PROTOCOL_FEATURES, &u64_payload(want), &[], false)
            .unwrap();
        assert!(self.ack(SET_OWNER, &[], &[]).unwrap());
    }

    /// SET_MEM_TABLE with one region covering all of `mem` at guest address 0.
    pub fn share(&mut self, mem: &GuestMemory) -> bool {
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend(region(0, mem.size, USER_BASE, 0));
        self.ack(SET_MEM_TABLE, &p, &[mem.file.as_raw_fd()])
            .unwrap()
    }
}

/// The driver side of one split ring laid out at `RING_AREA * (q + 1)`.
pub struct Ring {
    pub q: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: File,
    pub call: File,
    pub avail_idx: u16,
    next_free: u16,
}

impl Ring {
    /// Configures ring `q` as QEMU does (num, base, addr, kick, call, enable), with REPLY_ACK.
    /// Returns None if vubd refused any step.
    pub fn setup(
        fe: &mut Frontend,
        mem: &GuestMemory,
        q: u32,
        size: u16,
        base: u16,
    ) -> Option<Ring> {
        Ring::setup_with(fe, mem, q, size, base, eventfd(), eventfd())
    }

    /// `setup` with the kick and call fds given (a hostile frontend's choice).
    pub fn setup_with(
        fe: &mut Frontend,
        mem: &GuestMemory,
        q: u32,
        size: u16,
        base: u16,
        kick: File,
        call: File,
    ) -> Option<Ring> {
        let area = RING_AREA * (u64::from(q) + 1);
        let ring = Ring {
            q,
            size,
            desc: area,
            avail: area + 0x1000,
            used: area + 0x2000,
            kick,
            call,
            avail_idx: base,
            next_free: 0,
        };
        mem.write_u16(ring.avail + 2, base);
        mem.write_u16(ring.used + 2, base);
        ring.configure(fe, base).then_some(ring)
    }

    pub fn configure(&self, fe: &mut Frontend, base: u16) -> bool {
        let mut addr = self.q.to_le_bytes().to_vec();
        addr.extend_from_slice(&0u32.to_le_bytes());
        for a in [self.desc, self.used, self.avail, 0] {
            let a = if a == 0 { 0 } else { USER_BASE + a };
            addr.extend_from_slice(&a.to_le_bytes());
        }
        set_up_vring(
            fe,
            self.q,
            self.size,
            u32::from(base),
            &addr,
            &self.kick,
            &self.call,
        )
    }

    /// Writes descriptor `i`.
    pub fn put_desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(i), &d);
    }

    /// Puts `head` on the avail ring and kicks.
    pub fn offer(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_u16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_u16(self.avail + 2, self.avail_idx);
        self.kick_now();
    }

    pub fn kick_now(&self) {
        let _ = (&self.kick).write(&1u64.to_ne_bytes());
    }

    /// Writes a chain of (addr, len, flags) descriptors at free table slots, offers it, and
    /// returns its head.
    pub fn submit(&mut self, mem: &GuestMemory, chain: &[(u64, u32, u16)]) -> u16 {
        if usize::from(self.next_free) + chain.len() > usize::from(self.size) {
            self.next_free = 0;
        }
        let head = self.next_free;
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let i = head + k as u16;
            let last = k + 1 == chain.len();
            let flags = if last { flags } else { flags | DESC_F_NEXT };
            self.put_desc(mem, i, addr, len, flags, i + 1);
        }
        self.next_free = (head + chain.len() as u16) % self.size;
        self.offer(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_u16(self.used + 2)
    }

    /// Waits until the used index reaches `idx`; false on timeout.
    pub fn wait_used(&self, mem: &GuestMemory, idx: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.used_idx(mem) == idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The used element at position `pos`: (head, len).
    pub fn used_elem(&self, mem: &GuestMemory, pos: u16) -> (u32, u32) {
        let off = self.used + 4 + 8 * u64::from(pos % self.size);
        let b = mem.read(off, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }
}

/// GET_CONFIG payload asking for `size` bytes at `offset`.
pub fn config_request(offset: u32, size: u32) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend(vec![0u8; size as usize]);
    p
}

/// SET_CONFIG payload writing `bytes` at `offset` (flags: writable).
pub fn config_write(offset: u32, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(bytes);
    p
}

/// Writes a virtio-blk request header at `gpa`.
pub fn blk_header(mem: &GuestMemory, gpa: u64, kind: u32, sector: u64) {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    mem.write(gpa, &h);
}

pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_PACKED: u64 = 1 << 34;
pub const DESC_F_AVAIL: u16 = 1 << 7;
pub const DESC_F_USED: u16 = 1 << 15;
/// SET_VRING_BASE of a fresh packed ring: both indices 0, both wrap counters 1.
pub const PACKED_START: u32 = 0x8000_8000;

/// The driver side of one packed ring laid out at `RING_AREA * (q + 1)`: the descriptor
/// ring, the driver's event suppression structure 4 KiB further, the device's 8 KiB further.
pub struct PackedRing {
    pub q: u32,
    pub size: u16,
    pub desc: u64,
    pub driver_event: u64,
    pub device_event: u64,
    pub kick: File,
    pub call: File,
    /// The driver's avail position and wrap counter.
    pub avail_idx: u16,
    pub avail_wrap: bool,
    /// Where the driver expects the next used descriptor.
    pub used_idx: u16,
    pub used_wrap: bool,
    /// Ring slots of each buffer id's chain.
    slots: Vec<u16>,
    next_id: u16,
}

impl PackedRing {
    /// Configures packed ring `q` as QEMU does, starting at `PACKED_START`. None if vubd
    /// refused any step.
    pub fn setup(fe: &mut Frontend, mem: &GuestMemory, q: u32, size: u16) -> Option<PackedRing> {
        Self::setup_at(fe, mem, q, size, PACKED_START)
    }

    /// `setup` with a vring base of the caller's choice (positions as vhost-user encodes them).
    pub fn setup_at(
        fe: &mut Frontend,
        mem: &GuestMemory,
        q: u32,
        size: u16,
        base: u32,
    ) -> Option<PackedRing> {
        let area = RING_AREA * (u64::from(q) + 1);
        let ring = PackedRing {
            q,
            size,
            desc: area,
            driver_event: area + 0x1000,
            device_event: area + 0x2000,
            kick: eventfd(),
            call: eventfd(),
            avail_idx: (base & 0x7fff) as u16,
            avail_wrap: base & 0x8000 != 0,
            used_idx: ((base >> 16) & 0x7fff) as u16,
            used_wrap: base & 0x8000_0000 != 0,
            slots: vec![0; usize::from(size)],
            next_id: 0,
        };
        mem.write(area, &vec![0u8; 16 * usize::from(size)]);
        mem.write(ring.driver_event, &[0; 4]);
        ring.configure(fe, base).then_some(ring)
    }

    pub fn configure(&self, fe: &mut Frontend, base: u32) -> bool {
        let mut addr = self.q.to_le_bytes().to_vec();
        addr.extend_from_slice(&0u32.to_le_bytes());
        // desc, used (the device area), avail (the driver area), log.
        for a in [self.desc, self.device_event, self.driver_event] {
            addr.extend_from_slice(&(USER_BASE + a).to_le_bytes());
        }
        addr.extend_from_slice(&0u64.to_le_bytes());
        set_up_vring(fe, self.q, self.size, base, &addr, &self.kick, &self.call)
    }

    /// Writes descriptor `i` as is.
    pub fn put_desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, id: u16, flags: u16) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&id.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(i), &d);
    }

    /// The AVAIL/USED bits that make a descriptor available in the driver's current lap.
    pub fn avail_bits(&self) -> u16 {
        if self.avail_wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// Writes `(addr, len, flags, id)` descriptors from the avail position (flags exactly as
    /// given: the caller adds the AVAIL/USED bits, or leaves them out), the first one's flags
    /// last, and kicks. Each descriptor's bits must match its slot's lap: `lap_bits` adds
    /// them as a driver does.
    pub fn offer_raw(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16, u16)], lap_bits: bool) {
        let head = self.avail_idx;
        let mut head_flags = 0;
        for (k, &(addr, len, flags, id)) in descs.iter().enumerate() {
            let flags = if lap_bits {
                flags | self.avail_bits()
            } else {
                flags
            };
            if k == 0 {
                head_flags = flags;
                self.put_desc(mem, self.avail_idx, addr, len, id, 0);
            } else {
                self.put_desc(mem, self.avail_idx, addr, len, id, flags);
            }
            self.avail_idx += 1;
            if self.avail_idx == self.size {
                self.avail_idx = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        if let Some(&(_, _, _, id)) = descs.last() {
            if let Some(s) = self.slots.get_mut(usize::from(id)) {
                *s = descs.len() as u16;
            }
        }
        mem.write(
            self.desc + 16 * u64::from(head) + 14,
            &head_flags.to_le_bytes(),
        );
        self.kick_now();
    }

    pub fn kick_now(&self) {
        let _ = (&self.kick).write(&1u64.to_ne_bytes());
    }

    /// `submit` without the kick (it goes to an eventfd nobody watches).
    pub fn submit_quiet(&mut self, mem: &GuestMemory, chain: &[(u64, u32, u16)]) -> u16 {
        let real = std::mem::replace(&mut self.kick, eventfd());
        let id = self.submit(mem, chain);
        self.kick = real;
        id
    }

    fn fresh_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % self.size;
        id
    }

    /// Offers a chain of `(addr, len, flags)` buffers (NEXT added to all but the last) under
    /// a fresh buffer id; returns the id.
    pub fn submit(&mut self, mem: &GuestMemory, chain: &[(u64, u32, u16)]) -> u16 {
        let id = self.fresh_id();
        let n = chain.len();
        let descs: Vec<_> = chain
            .iter()
            .enumerate()
            .map(|(k, &(a, l, f))| (a, l, if k + 1 < n { f | DESC_F_NEXT } else { f }, id))
            .collect();
        self.offer_raw(mem, &descs, true);
        id
    }

    /// Writes `chain` as an indirect table at `table` (no NEXT: every entry belongs to the
    /// chain) and offers one descriptor referring to it; returns the buffer id.
    pub fn submit_indirect(
        &mut self,
        mem: &GuestMemory,
        table: u64,
        chain: &[(u64, u32, u16)],
    ) -> u16 {
        for (i, &(a, l, f)) in chain.iter().enumerate() {
            let mut d = a.to_le_bytes().to_vec();
            d.extend_from_slice(&l.to_le_bytes());
            d.extend_from_slice(&0u16.to_le_bytes());
            d.extend_from_slice(&f.to_le_bytes());
            mem.write(table + 16 * i as u64, &d);
        }
        let id = self.fresh_id();
        self.offer_raw(
            mem,
            &[(table, 16 * chain.len() as u32, DESC_F_INDIRECT, id)],
            true,
        );
        id
    }

    /// The flags of descriptor `i`.
    pub fn flags_at(&self, mem: &GuestMemory, i: u16) -> u16 {
        mem.read_u16(self.desc + 16 * u64::from(i) + 14)
    }

    /// The next used buffer if the device wrote one: (id, len).
    pub fn poll_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let at = self.desc + 16 * u64::from(self.used_idx);
        let d = mem.read(at, 16);
        let flags = u16::from_le_bytes([d[14], d[15]]);
        let used = (flags & DESC_F_AVAIL != 0) == self.used_wrap
            && (flags & DESC_F_USED != 0) == self.used_wrap;
        if !used {
            return None;
        }
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let id = u16::from_le_bytes([d[12], d[13]]);
        let n = *self.slots.get(usize::from(id))?;
        self.used_idx += n;
        if self.used_idx >= self.size {
            self.used_idx -= self.size;
            self.used_wrap = !self.used_wrap;
        }
        Some((id, len))
    }

    /// Waits for the next used buffer; None on timeout.
    pub fn wait_used(&mut self, mem: &GuestMemory, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(u) = self.poll_used(mem) {
                return Some(u);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// The positions as GET/SET_VRING_BASE carry them (avail low half, used high half).
    pub fn base(&self) -> u32 {
        let enc = |i: u16, w: bool| u32::from(i) | if w { 0x8000 } else { 0 };
        enc(self.avail_idx, self.avail_wrap) | enc(self.used_idx, self.used_wrap) << 16
    }
}
