//! virtio-driver's vhost-user transport, with the one thing a packed ring needs that it gets
//! wrong. `VhostUser::setup_queues` sends SET_VRING_BASE 0 whatever the ring layout; for a
//! packed ring that names both wrap counters 0 (vhost-user: bits 15 and 31), while its driver
//! starts them at 1 (virtio 1.1 §2.8.1), as QEMU's 0x8000_8000 says: the device would never
//! see a descriptor as available. So after its setup, each packed ring is stopped
//! (GET_VRING_BASE; nothing was offered yet) and started again at 0x8000_8000 with a kick fd
//! of ours, on the transport's own socket (the one connected socket it opened: its type is
//! private, and so is the `Iova` a wrapping transport would have to return). Everything else
//! is virtio-driver's.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use virtio_driver::{
    QueueNotifier, ScmSocket, VhostUser, VirtioBlkConfig, VirtioBlkReqBuf, VirtioFeatureFlags,
    VirtioTransport,
};

const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const VERSION_1: u32 = 1;
const NEED_REPLY: u32 = 1 << 3;

/// Where a fresh packed ring starts: both indices 0, both wrap counters 1.
pub const PACKED_START: u32 = 0x8000_8000;

/// The socket fds this process has open.
fn socket_fds() -> io::Result<HashSet<RawFd>> {
    let mut fds = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        if std::fs::metadata(e.path()).is_ok_and(|m| m.file_type().is_socket()) {
            fds.insert(fd);
        }
    }
    Ok(fds)
}

pub struct Connection {
    pub vhost: VhostUser<VirtioBlkConfig, VirtioBlkReqBuf>,
    /// A duplicate of the transport's socket.
    sock: UnixStream,
    packed: bool,
}

impl Connection {
    /// Connects and negotiates VERSION_1 and EVENT_IDX, and RING_PACKED if `packed`.
    pub fn connect(path: &str, packed: bool) -> io::Result<Connection> {
        let mut features =
            VirtioFeatureFlags::VERSION_1.bits() | VirtioFeatureFlags::RING_EVENT_IDX.bits();
        if packed {
            features |= VirtioFeatureFlags::RING_PACKED.bits();
        }
        let before = socket_fds()?;
        let inner = VhostUser::new(path, features)?;
        let new: Vec<RawFd> = socket_fds()?.difference(&before).copied().collect();
        let [fd] = new[..] else {
            return Err(io::Error::other(
                "cannot tell the vhost-user socket among this process's fds",
            ));
        };
        // SAFETY: fd is the open socket VhostUser connected (it lives as long as `inner`);
        // dup gives us a descriptor of our own, checked below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let negotiated = VirtioTransport::<VirtioBlkConfig, VirtioBlkReqBuf>::get_features(&inner);
        if packed && negotiated & VirtioFeatureFlags::RING_PACKED.bits() == 0 {
            return Err(io::Error::other(
                "the device does not offer VIRTIO_F_RING_PACKED",
            ));
        }
        Ok(Connection {
            vhost: inner,
            sock,
            packed,
        })
    }

    fn send(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        need_reply: bool,
    ) -> io::Result<()> {
        let flags = VERSION_1 | if need_reply { NEED_REPLY } else { 0 };
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            (&self.sock).write_all(&msg)
        } else {
            let n = self.sock.send_with_fds(&[IoSlice::new(&msg)], fds)?;
            if n == msg.len() {
                Ok(())
            } else {
                Err(io::Error::other("short vhost-user message"))
            }
        }
    }

    fn recv(&self, request: u32) -> io::Result<Vec<u8>> {
        let mut hdr = [0u8; 12];
        (&self.sock).read_exact(&mut hdr)?;
        let got = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
        let mut payload = vec![0u8; size as usize];
        (&self.sock).read_exact(&mut payload)?;
        if got != request {
            return Err(io::Error::other(format!(
                "reply to {got} where one to {request} was expected"
            )));
        }
        Ok(payload)
    }

    fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send(request, payload, fds, true)?;
        let r = self.recv(request)?;
        if r.len() == 8 && r == [0; 8] {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "vhost-user request {request} refused"
            )))
        }
    }

    /// After `VirtioBlkQueue::setup_queues`: how to kick ring `i`. A packed ring is stopped
    /// and started again at `PACKED_START` with a fresh kick eventfd first.
    pub fn kick(&self, i: u32) -> io::Result<Box<dyn QueueNotifier>> {
        let vhost: &dyn VirtioTransport<VirtioBlkConfig, VirtioBlkReqBuf> = &self.vhost;
        if !self.packed {
            return Ok(vhost.get_submission_notifier(i as usize));
        }
        let state = |num: u32| [i.to_le_bytes(), num.to_le_bytes()].concat();
        self.send(GET_VRING_BASE, &state(0), &[], false)?;
        self.recv(GET_VRING_BASE)?;
        self.ack(SET_VRING_BASE, &state(PACKED_START), &[])?;
        // SAFETY: plain syscall; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh eventfd owned by nobody else.
        let kick = Arc::new(unsafe { File::from_raw_fd(fd) });
        self.ack(
            SET_VRING_KICK,
            &u64::from(i).to_le_bytes(),
            &[kick.as_raw_fd()],
        )?;
        Ok(Box::new(Kick(kick)))
    }
}

/// A kick: one write to the ring's kick eventfd.
struct Kick(Arc<File>);

impl QueueNotifier for Kick {
    fn notify(&self) -> io::Result<()> {
        (&*self.0).write_all(&1u64.to_ne_bytes())
    }
}
