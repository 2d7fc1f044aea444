//! Connecting and the handshake: fixed newstyle negotiation, structured replies when the
//! server offers them, then NBD_OPT_GO (NBD_OPT_EXPORT_NAME for servers that do not know
//! GO), or NBD_OPT_INFO to learn the size without taking the export.
//!
//! Blocking, with a deadline on the whole exchange, on a thread that may block (the control
//! thread that opens the device, or the backend's connector thread): a reactor never waits
//! for a server. Everything the server sends is checked and bounded; a server that
//! misbehaves here only fails this attempt.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::io::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::proto::*;
use super::uri::{Address, Target};

/// Largest option reply vubd reads; a longer one is a hostile or broken server.
const MAX_OPT_REPLY: u32 = 64 << 10;
/// Replies to one option before vubd gives up on the server.
const MAX_OPT_REPLIES: usize = 64;

/// A connected socket in the transmission phase, and what was negotiated on it.
#[derive(Debug)]
pub struct Connected {
    pub fd: OwnedFd,
    pub neg: Negotiated,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A stream with a deadline for the whole exchange: each read and write gets the time that
/// is left, so a server dripping one byte at a time cannot hold the thread forever.
struct Conn {
    s: Stream,
    deadline: Instant,
}

impl Conn {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ))
        } else {
            Ok(left)
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let t = self.left()?;
            let n = match &mut self.s {
                Stream::Tcp(s) => {
                    s.set_read_timeout(Some(t))?;
                    s.read(&mut buf[done..])
                }
                Stream::Unix(s) => {
                    s.set_read_timeout(Some(t))?;
                    s.read(&mut buf[done..])
                }
            };
            match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake timed out",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let t = self.left()?;
        match &mut self.s {
            Stream::Tcp(s) => {
                s.set_write_timeout(Some(t))?;
                s.write_all(buf)
            }
            Stream::Unix(s) => {
                s.set_write_timeout(Some(t))?;
                s.write_all(buf)
            }
        }
    }

    fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The socket for the data path: no timeouts left on it (the reactor's io_uring never
    /// blocks on it anyway), the deadline's job is done.
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(match self.s {
            Stream::Tcp(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.into()
            }
            Stream::Unix(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.into()
            }
        })
    }
}

fn proto_err(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn dial(target: &Target, timeout: Duration) -> io::Result<Stream> {
    match &target.address {
        Address::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        Address::Tcp { host, port } => {
            let mut last = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) if connected_to_itself(&s, &addr) => {
                        last = Some(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("nothing listens on {addr} (the connection met itself)"),
                        ));
                    }
                    Ok(s) => {
                        // Requests are small and latency-bound: never wait to coalesce.
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"))
            }))
        }
    }
}

/// Whether `s` is connected to itself. A server on this host whose port is in the ephemeral
/// range and that is down (restarting) leaves that port free; Linux may then pick it as
/// the source port of a connect to it, and TCP's simultaneous open joins the socket to
/// itself. Such a "server" never sends its greeting: the handshake would wait out its
/// whole timeout instead of failing at once and retrying (Go's net package checks the same).
/// `peer` is the address connected to: asking the socket (getpeername) is not in the
/// seccomp filter, and need not be.
fn connected_to_itself(s: &TcpStream, peer: &std::net::SocketAddr) -> bool {
    matches!(s.local_addr(), Ok(l) if l == *peer)
}

/// What the client asks for at the end of option haggling.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Enter transmission (NBD_OPT_GO).
    Go,
    /// Only learn the size and flags (NBD_OPT_INFO), then leave.
    Info,
}

/// Connects to `target` and negotiates, all within `timeout`.
pub fn connect(target: &Target, timeout: Duration, goal: Goal) -> io::Result<Connected> {
    let deadline = Instant::now() + timeout;
    let s = dial(target, timeout)?;
    let mut c = Conn { s, deadline };
    let neg = negotiate(&mut c, &target.export, goal)?;
    if goal == Goal::Info {
        // A polite goodbye; the server's answer is not worth waiting for.
        let _ = send_option(&mut c, OPT_ABORT, &[]);
    }
    Ok(Connected {
        fd: c.into_fd()?,
        neg,
    })
}

fn send_option(c: &mut Conn, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    // Callers send at most a 4 KiB export name plus a few bytes.
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    c.write_all(&msg)
}

/// One option reply: (type, data), checked against the option it answers.
fn read_reply(c: &mut Conn, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    c.read_exact(&mut h)?;
    if be64(&h) != OPT_REPLY_MAGIC {
        return Err(proto_err("bad option reply magic"));
    }
    if be32(&h[8..]) != opt {
        return Err(proto_err(format!(
            "option reply for option {} while waiting for {opt}",
            be32(&h[8..])
        )));
    }
    let kind = be32(&h[12..]);
    let len = be32(&h[16..]);
    if len > MAX_OPT_REPLY {
        return Err(proto_err(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data)?;
    Ok((kind, data))
}

/// An error reply as a readable message (its data is a string for humans).
fn rep_error(opt: &str, kind: u32, data: &[u8]) -> io::Error {
    let name = match kind & !REP_FLAG_ERROR {
        1 => "unsupported",
        2 => "forbidden by policy",
        3 => "invalid",
        4 => "unsupported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size constraints required",
        9 => "too big",
        _ => "error",
    };
    let text: String = String::from_utf8_lossy(&data[..data.len().min(256)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let kind_err = if kind & !REP_FLAG_ERROR == 6 {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::Other
    };
    if text.is_empty() {
        io::Error::new(kind_err, format!("{opt}: {name}"))
    } else {
        io::Error::new(kind_err, format!("{opt}: {name}: {text}"))
    }
}

fn negotiate(c: &mut Conn, export: &str, goal: Goal) -> io::Result<Negotiated> {
    let magic = c.u64()?;
    if magic != INIT_MAGIC {
        return Err(proto_err("not an NBD server (bad magic)"));
    }
    match c.u64()? {
        OPTS_MAGIC => {}
        OLDSTYLE_MAGIC => return Err(proto_err("oldstyle NBD servers are not supported")),
        _ => return Err(proto_err("bad handshake magic")),
    }
    let hflags = c.u16()?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err(
            "the server does not speak fixed newstyle negotiation",
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    c.write_all(&cflags.to_be_bytes())?;

    // Structured replies make every reply self-describing (a read error no longer leaves
    // the stream ambiguous); servers that do not know them answer with an error.
    send_option(c, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_reply(c, OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        REP_ACK => true,
        k if k & REP_FLAG_ERROR != 0 => false,
        k => {
            return Err(proto_err(format!(
                "unexpected reply {k} to STRUCTURED_REPLY"
            )))
        }
    };

    let opt = match goal {
        Goal::Go => OPT_GO,
        Goal::Info => OPT_INFO,
    };
    let mut data = Vec::with_capacity(8 + export.len());
    // The URI parser bounds export names to 4096 bytes.
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    // One information request: block size constraints (the largest payload per command).
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(c, opt, &data)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block: Option<(u32, u32, u32)> = None;
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPT_REPLIES {
            return Err(proto_err("too many option replies"));
        }
        let (kind, d) = read_reply(c, opt)?;
        match kind {
            REP_INFO => {
                if d.len() < 2 {
                    return Err(proto_err("short NBD_REP_INFO"));
                }
                match be16(&d) {
                    INFO_EXPORT if d.len() == 12 => {
                        export_info = Some((be64(&d[2..]), be16(&d[10..])))
                    }
                    INFO_BLOCK_SIZE if d.len() == 14 => {
                        block = Some((be32(&d[2..]), be32(&d[6..]), be32(&d[10..])))
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(proto_err("NBD_REP_INFO of the wrong length"))
                    }
                    // Names, descriptions, future information: not needed.
                    _ => {}
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP if goal == Goal::Go => {
                // A server older than GO: the old way in, which cannot report errors.
                return export_name(c, export, no_zeroes, structured);
            }
            k if k & REP_FLAG_ERROR != 0 => {
                let what = if goal == Goal::Go {
                    "NBD_OPT_GO"
                } else {
                    "NBD_OPT_INFO"
                };
                return Err(rep_error(&format!("{what} for export {export:?}"), k, &d));
            }
            k => return Err(proto_err(format!("unexpected option reply type {k}"))),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| proto_err("no NBD_INFO_EXPORT before ACK"))?;
    finish(size, flags, structured, block)
}

fn export_name(
    c: &mut Conn,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> io::Result<Negotiated> {
    send_option(c, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = c.u64()?;
    let flags = c.u16()?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        c.read_exact(&mut z)?;
    }
    finish(size, flags, structured, None)
}

fn finish(
    size: u64,
    flags: u16,
    structured: bool,
    block: Option<(u32, u32, u32)>,
) -> io::Result<Negotiated> {
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(proto_err("transmission flags without NBD_FLAG_HAS_FLAGS"));
    }
    if size > i64::MAX as u64 {
        return Err(proto_err(format!("export size {size} is not plausible")));
    }
    // Constraints that make sense (powers of two, min <= max, max at least 512) are
    // honoured; others are ignored, as the protocol says a client may.
    let (min_block, max_payload) = match block {
        Some((min, _pref, max))
            if min.is_power_of_two() && min <= 64 << 10 && max >= min.max(512) =>
        {
            (min, max.min(DEFAULT_MAX_PAYLOAD))
        }
        _ => (1, DEFAULT_MAX_PAYLOAD),
    };
    // Payloads stay whole sectors, so a split request's pieces stay aligned.
    let max_payload = (max_payload & !511).max(512);
    Ok(Negotiated {
        size,
        flags,
        structured,
        min_block,
        max_payload,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::io::FromRawFd;
    use std::os::unix::net::UnixListener;

    /// A TCP socket bound to a free loopback port and connected to that same port: what a
    /// connect to a down server's ephemeral port becomes when Linux picks that port as its
    /// source (here forced by binding it).
    fn self_connected() -> TcpStream {
        let sin = |port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a socket this function owns, with a sockaddr_in
        // that lives across each call and the matching length.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let a = sin(0);
            assert_eq!(
                libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len),
                0
            );
            let mut bound = sin(0);
            let mut blen = len;
            assert_eq!(
                libc::getsockname(fd, (&mut bound as *mut libc::sockaddr_in).cast(), &mut blen),
                0
            );
            let rc = libc::connect(fd, (&bound as *const libc::sockaddr_in).cast(), len);
            assert_eq!(rc, 0, "self-connect: {}", io::Error::last_os_error());
            TcpStream::from_raw_fd(fd)
        }
    }

    #[test]
    fn a_connection_that_met_itself_is_told_from_a_server() {
        let s = self_connected();
        let me = s.local_addr().unwrap();
        assert!(connected_to_itself(&s, &me), "{me:?}");
        // A real server: not itself.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = l.local_addr().unwrap();
        let c = TcpStream::connect(server).unwrap();
        assert!(!connected_to_itself(&c, &server));
    }

    /// Plays the server side of a handshake on `s`: fixed newstyle, structured replies if
    /// `structured`, GO answered with `size`/`flags` and a 1 MiB maximum block size.
    pub fn serve_handshake(s: &mut UnixStream, size: u64, flags: u16, structured: bool) {
        s.write_all(&INIT_MAGIC.to_be_bytes()).unwrap();
        s.write_all(&OPTS_MAGIC.to_be_bytes()).unwrap();
        s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = be32(&h[8..]);
            let mut d = vec![0u8; be32(&h[12..]) as usize];
            s.read_exact(&mut d).unwrap();
            let reply = |s: &mut UnixStream, kind: u32, data: &[u8]| {
                s.write_all(&OPT_REPLY_MAGIC.to_be_bytes()).unwrap();
                s.write_all(&opt.to_be_bytes()).unwrap();
                s.write_all(&kind.to_be_bytes()).unwrap();
                s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
                s.write_all(data).unwrap();
            };
            match opt {
                OPT_STRUCTURED_REPLY if structured => reply(s, REP_ACK, &[]),
                OPT_STRUCTURED_REPLY => reply(s, REP_ERR_UNSUP, &[]),
                OPT_GO | OPT_INFO => {
                    let mut e = INFO_EXPORT.to_be_bytes().to_vec();
                    e.extend_from_slice(&size.to_be_bytes());
                    e.extend_from_slice(&flags.to_be_bytes());
                    reply(s, REP_INFO, &e);
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [1u32, 4096, 1 << 20] {
                        b.extend_from_slice(&v.to_be_bytes());
                    }
                    reply(s, REP_INFO, &b);
                    reply(s, REP_ACK, &[]);
                    if opt == OPT_GO {
                        return;
                    }
                }
                OPT_ABORT => return,
                _ => reply(s, REP_ERR_UNSUP, &[]),
            }
        }
    }

    fn target(dir: &std::path::Path) -> Target {
        Target {
            address: Address::Unix(dir.join("s")),
            export: "e".into(),
        }
    }

    #[test]
    fn negotiates_go_with_structured_replies_and_block_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            serve_handshake(&mut s, 1 << 30, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH, true);
        });
        let c = connect(&target(dir.path()), Duration::from_secs(5), Goal::Go).unwrap();
        t.join().unwrap();
        assert_eq!(
            c.neg,
            Negotiated {
                size: 1 << 30,
                flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
                structured: true,
                min_block: 1,
                max_payload: 1 << 20,
            }
        );
    }

    /// Starts a server thread that writes `bytes` after reading the client flags, then
    /// reads until EOF; returns the client's error.
    fn hostile(bytes: Vec<u8>) -> io::Error {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(&bytes);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let e = connect(&target(dir.path()), Duration::from_millis(500), Goal::Go).unwrap_err();
        t.join().unwrap();
        e
    }

    fn greeting() -> Vec<u8> {
        let mut v = INIT_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        v.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        v
    }

    #[test]
    fn hostile_handshakes_fail_cleanly() {
        // Oldstyle.
        let mut v = INIT_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(hostile(v).to_string().contains("oldstyle"));
        // Not NBD at all.
        assert!(hostile(b"HTTP/1.1 200 OK\r\n\r\n".to_vec())
            .to_string()
            .contains("magic"));
        // An option reply claiming 4 GiB of data.
        let mut v = greeting();
        v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        v.extend_from_slice(&REP_ACK.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(hostile(v).to_string().contains("bytes"));
        // A greeting, then silence: the deadline ends it.
        let e = hostile(greeting());
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // A short greeting, then EOF.
        let e = hostile(INIT_MAGIC.to_be_bytes()[..5].to_vec());
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }
}
