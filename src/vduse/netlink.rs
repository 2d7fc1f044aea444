//! `vdpa dev del NAME`, done by vubd itself over generic netlink (what iproute2's vdpa tool
//! sends): the kernel refuses VDUSE_DESTROY_DEV while a vdpa device sits on the VDUSE
//! device, so removing a device starts by taking it off the vDPA bus. Two requests on a
//! NETLINK_GENERIC socket: CTRL_CMD_GETFAMILY for the "vdpa" family's id, then
//! VDPA_CMD_DEV_DEL with VDPA_ATTR_DEV_NAME, acknowledged.
//!
//! The kernel handles the deletion inside our sendto: the virtio_blk driver goes away
//! (del_gendisk waits for requests in flight, which the still-running queues complete) and
//! the device is reset, which sends SET_STATUS 0 to the device's control thread. So this
//! must run on another thread than that one.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// include/uapi/linux/vdpa.h (VDPA_ATTR_PAD = VDPA_ATTR_UNSPEC = 0, so DEV_NAME is 4)
const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 1;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_ATTR_DEV_NAME: u16 = 4;

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One generic netlink request: header, genl header, one string attribute (NUL-terminated).
fn request(family: u16, flags: u16, seq: u32, cmd: u8, version: u8, attr: u16, s: &str) -> Vec<u8> {
    let payload = s.len() + 1;
    let attr_len = 4 + payload;
    let total = NLMSG_HDR + GENL_HDR + align4(attr_len);
    let mut m = Vec::with_capacity(total);
    // Fits: names are short (< 256 bytes).
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr.to_ne_bytes());
    m.extend_from_slice(s.as_bytes());
    m.resize(total, 0);
    m
}

/// What one reply message says.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// NLMSG_ERROR: 0 is an acknowledgement, else a negative errno.
    Error(i32),
    /// A family description: its id.
    Family(Option<u16>),
    Other,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages of one datagram, answering request `seq`.
fn parse(buf: &[u8], seq: u32) -> Vec<Reply> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind), Some(s)) =
        (u32_at(buf, at), u16_at(buf, at + 4), u32_at(buf, at + 8))
    {
        let len = len as usize;
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        let body = &buf[at + NLMSG_HDR..at + len];
        if s == seq {
            out.push(match kind {
                NLMSG_ERROR => Reply::Error(u32_at(body, 0).map_or(-libc::EIO, |e| e as i32)),
                GENL_ID_CTRL => {
                    let mut id = None;
                    let mut a = GENL_HDR;
                    while let (Some(alen), Some(atype)) = (u16_at(body, a), u16_at(body, a + 2)) {
                        let alen = usize::from(alen);
                        if alen < 4 || a + alen > body.len() {
                            break;
                        }
                        if atype & 0x3fff == CTRL_ATTR_FAMILY_ID {
                            id = u16_at(body, a + 4);
                        }
                        a += align4(alen);
                    }
                    Reply::Family(id)
                }
                _ => Reply::Other,
            });
        }
        at += align4(len);
    }
    out
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is checked and then owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero with the family set addresses the
        // kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `to` are live for the call, with the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads datagrams until one answers `seq`.
    fn answer(&self, seq: u32) -> io::Result<Reply> {
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: `buf` is live and writable for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Fits: 0 <= n <= buf.len().
            if let Some(r) = parse(&buf[..n as usize], seq).into_iter().next() {
                return Ok(r);
            }
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(-e)
}

/// `vdpa dev del NAME`. Ok(false) when there was no such vdpa device (or no vdpa module).
pub fn vdpa_dev_del(name: &str) -> io::Result<bool> {
    let sock = Socket::open()?;
    sock.send(&request(
        GENL_ID_CTRL,
        NLM_F_REQUEST,
        1,
        CTRL_CMD_GETFAMILY,
        1,
        CTRL_ATTR_FAMILY_NAME,
        VDPA_GENL_NAME,
    ))?;
    let family = match sock.answer(1)? {
        Reply::Family(Some(id)) => id,
        // No "vdpa" family: the vdpa module is not loaded, so no vdpa device exists.
        Reply::Error(e) if -e == libc::ENOENT => return Ok(false),
        Reply::Error(e) => return Err(errno(e)),
        _ => return Err(io::Error::other("unexpected answer to CTRL_CMD_GETFAMILY")),
    };
    sock.send(&request(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        2,
        VDPA_CMD_DEV_DEL,
        VDPA_GENL_VERSION,
        VDPA_ATTR_DEV_NAME,
        name,
    ))?;
    match sock.answer(2)? {
        Reply::Error(0) => Ok(true),
        Reply::Error(e) if -e == libc::ENODEV => Ok(false),
        Reply::Error(e) => Err(errno(e)),
        _ => Err(io::Error::other("unexpected answer to VDPA_CMD_DEV_DEL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_del_request_bytes() {
        let m = request(
            0x1c,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            VDPA_CMD_DEV_DEL,
            1,
            VDPA_ATTR_DEV_NAME,
            "vd0",
        );
        // 16 header + 4 genl + attr (4 + "vd0\0") = 28
        assert_eq!(m.len(), 28);
        assert_eq!(u32_at(&m, 0), Some(28));
        assert_eq!(u16_at(&m, 4), Some(0x1c));
        assert_eq!(u16_at(&m, 6), Some(5), "flags REQUEST|ACK");
        assert_eq!(u32_at(&m, 8), Some(2));
        assert_eq!(&m[16..20], &[4, 1, 0, 0]);
        assert_eq!(u16_at(&m, 20), Some(8));
        assert_eq!(u16_at(&m, 22), Some(4));
        assert_eq!(&m[24..28], b"vd0\0");
        // Padding to 4 bytes: "vdpa\0" is 5 bytes, attr 9, padded 12.
        let f = request(
            GENL_ID_CTRL,
            NLM_F_REQUEST,
            1,
            CTRL_CMD_GETFAMILY,
            1,
            CTRL_ATTR_FAMILY_NAME,
            "vdpa",
        );
        assert_eq!(f.len(), 32);
        assert_eq!(u16_at(&f, 20), Some(9));
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    #[test]
    fn replies_parse() {
        // genl header, then FAMILY_NAME "vdpa" (padded), then FAMILY_ID 0x1d.
        let mut body = vec![1, 2, 0, 0];
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
        body.extend_from_slice(b"vdpa\0\0\0\0");
        body.extend_from_slice(&6u16.to_ne_bytes());
        body.extend_from_slice(&CTRL_ATTR_FAMILY_ID.to_ne_bytes());
        body.extend_from_slice(&0x1du16.to_ne_bytes());
        body.extend_from_slice(&[0, 0]);
        let mut buf = message(GENL_ID_CTRL, 7, &body);
        assert_eq!(parse(&buf, 7), vec![Reply::Family(Some(0x1d))]);
        assert!(parse(&buf, 8).is_empty(), "another request's answer");
        buf.extend(message(NLMSG_ERROR, 8, &(-libc::ENODEV).to_ne_bytes()));
        assert_eq!(parse(&buf, 8), vec![Reply::Error(-libc::ENODEV)]);
        // Truncated or lying lengths stop the walk.
        assert!(parse(&buf[..10], 7).is_empty());
        let mut bad = message(NLMSG_ERROR, 1, &0i32.to_ne_bytes());
        bad[0] = 200;
        assert!(parse(&bad, 1).is_empty());
    }
}
