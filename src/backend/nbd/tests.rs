//! Unit tests of the NBD client's data path against an in-process server (a thread on a
//! Unix socket) that can fragment its replies, and misbehave: the connection poller runs in
//! the test harness exactly as on a reactor, pass by pass.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::handshake::tests::serve_handshake;
use super::proto::*;
use crate::blk::{Backend, BlockError, BlockRequest, Channel, Op};
use crate::engine::testing::Harness;
use crate::engine::{Ctx, Poller};

fn open(uri: &str, timeout: Duration, ro: bool) -> Result<super::NbdBackend, super::BackendError> {
    super::open_nbd(uri, timeout, ro)
}

const SIZE: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    /// Reply with a handle nobody sent.
    WrongHandle,
    /// Half a reply header, then close.
    ShortThenClose,
    /// A structured error chunk claiming a huge length.
    Oversized,
    /// A data chunk beyond the request's range.
    OutOfRange,
    /// Read the request, never answer.
    Silent,
    /// Close the connection as soon as a request arrives.
    Close,
    /// Answer with ESHUTDOWN (the server is going away).
    Shutdown,
    /// Error chunks without the final flag, forever: talks, never answers.
    Chatty,
}

#[derive(Clone, Copy)]
struct Opts {
    structured: bool,
    /// Structured reads come in pieces, out of order, zeroes as holes.
    fragment: bool,
    flags: u16,
    bad: Option<Bad>,
    /// Connections that misbehave before the server behaves.
    bad_conns: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            structured: true,
            fragment: false,
            flags: TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
                | TFLAG_CAN_MULTI_CONN,
            bad: None,
            bad_conns: 0,
        }
    }
}

struct Server {
    path: PathBuf,
    disk: Arc<Mutex<Vec<u8>>>,
    conns: Arc<AtomicUsize>,
    commands: Arc<Mutex<Vec<(u16, u16)>>>,
}

fn server(dir: &Path, opts: Opts) -> Server {
    let path = dir.join("nbd.sock");
    let l = UnixListener::bind(&path).unwrap();
    let disk = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let conns = Arc::new(AtomicUsize::new(0));
    let commands = Arc::new(Mutex::new(Vec::new()));
    let (d, n, cmds) = (disk.clone(), conns.clone(), commands.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let k = n.fetch_add(1, Ordering::SeqCst);
            let (d, cmds) = (d.clone(), cmds.clone());
            // The first connection is the one `open` makes, which serves the first channel.
            let bad = if k < opts.bad_conns { opts.bad } else { None };
            std::thread::spawn(move || {
                serve_handshake(&mut s, SIZE, opts.flags, opts.structured);
                let _ = serve(&mut s, &d, &cmds, opts, bad);
            });
        }
    });
    Server {
        path,
        disk,
        conns,
        commands,
    }
}

fn chunk(
    s: &mut UnixStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    h.extend_from_slice(payload);
    s.write_all(&h)
}

fn simple(s: &mut UnixStream, err: u32, cookie: u64, data: &[u8]) -> std::io::Result<()> {
    let mut h = Vec::with_capacity(16 + data.len());
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&err.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(data);
    s.write_all(&h)
}

fn serve(
    s: &mut UnixStream,
    disk: &Mutex<Vec<u8>>,
    cmds: &Mutex<Vec<(u16, u16)>>,
    o: Opts,
    bad: Option<Bad>,
) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h)?;
        assert_eq!(be32(&h), REQUEST_MAGIC);
        let (flags, kind, cookie) = (be16(&h[4..]), be16(&h[6..]), be64(&h[8..]));
        let (off, len) = (be64(&h[16..]) as usize, be32(&h[24..]) as usize);
        cmds.lock().unwrap().push((kind, flags));
        let mut payload = vec![0u8; if kind == CMD_WRITE { len } else { 0 }];
        s.read_exact(&mut payload)?;
        match bad {
            Some(Bad::WrongHandle) => simple(s, 0, cookie ^ 0x5555, &[])?,
            Some(Bad::ShortThenClose) => {
                s.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes()[..3])?;
                return Ok(());
            }
            Some(Bad::Oversized) => {
                let mut c = Vec::new();
                c.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                c.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                c.extend_from_slice(&(REPLY_TYPE_ERROR_BIT | 1).to_be_bytes());
                c.extend_from_slice(&cookie.to_be_bytes());
                c.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
                s.write_all(&c)?;
            }
            Some(Bad::OutOfRange) => {
                let mut p = ((off + len) as u64).to_be_bytes().to_vec();
                p.extend_from_slice(&[7u8; 512]);
                chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p)?;
            }
            Some(Bad::Silent) => {}
            Some(Bad::Chatty) => loop {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&0u16.to_be_bytes());
                chunk(s, 0, REPLY_TYPE_ERROR_BIT | 1, cookie, &p)?;
                std::thread::sleep(Duration::from_millis(20));
            },
            Some(Bad::Close) => return Ok(()),
            Some(Bad::Shutdown) => {
                simple(s, ESHUTDOWN, cookie, &[])?;
                return Ok(());
            }
            None => {}
        }
        if bad.is_some() {
            continue;
        }
        let mut d = disk.lock().unwrap();
        match kind {
            CMD_READ => {
                let data = d[off..off + len].to_vec();
                drop(d);
                if !o.structured {
                    simple(s, 0, cookie, &data)?;
                } else if !o.fragment {
                    let mut p = (off as u64).to_be_bytes().to_vec();
                    p.extend_from_slice(&data);
                    chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p)?;
                } else {
                    // 4 KiB pieces, last first; all-zero pieces as holes.
                    let mut at = len;
                    while at > 0 {
                        let start = at.saturating_sub(4096);
                        let piece = &data[start..at];
                        let o = (off + start) as u64;
                        if piece.iter().all(|&b| b == 0) {
                            let mut p = o.to_be_bytes().to_vec();
                            p.extend_from_slice(&(piece.len() as u32).to_be_bytes());
                            chunk(s, 0, REPLY_TYPE_OFFSET_HOLE, cookie, &p)?;
                        } else {
                            let mut p = o.to_be_bytes().to_vec();
                            p.extend_from_slice(piece);
                            chunk(s, 0, REPLY_TYPE_OFFSET_DATA, cookie, &p)?;
                        }
                        at = start;
                    }
                    chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])?;
                }
            }
            CMD_WRITE => {
                d[off..off + len].copy_from_slice(&payload);
                drop(d);
                simple(s, 0, cookie, &[])?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                d[off..off + len].fill(0);
                drop(d);
                simple(s, 0, cookie, &[])?;
            }
            CMD_FLUSH => {
                drop(d);
                simple(s, 0, cookie, &[])?;
            }
            CMD_DISC => return Ok(()),
            _ => {
                drop(d);
                simple(s, 22, cookie, &[])?;
            }
        }
    }
}

/// A front end for the harness: submits its requests as room allows, collects results.
struct Driver {
    chan: Box<dyn Channel>,
    todo: Vec<BlockRequest>,
    done: Vec<(u64, Result<(), BlockError>)>,
}

impl Poller for Driver {
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let done = &mut self.done;
        let mut n = self.chan.reap(ctx, &mut |t, r| done.push((t, r)));
        while !self.todo.is_empty() && self.chan.room(ctx) > 0 {
            let req = self.todo.remove(0);
            // SAFETY: the test keeps every request's buffers alive until it has its result.
            match unsafe { self.chan.submit(ctx, &req) } {
                crate::blk::Submitted::Done(r) => self.done.push((req.tag, r)),
                crate::blk::Submitted::Pending => {}
            }
            n += 1;
        }
        n
    }
    fn complete(&mut self, _: &mut Ctx<'_>, _: u64, _: i32) {}
    fn stop(&mut self, _: &mut Ctx<'_>) {}
    fn drained(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "test driver".into()
    }
}

/// A request's data buffer and its iovecs (several, of uneven sizes).
struct Buf {
    data: Vec<u8>,
    iov: Vec<libc::iovec>,
}

impl Buf {
    fn new(len: usize, fill: u8) -> Box<Buf> {
        let mut b = Box::new(Buf {
            data: vec![fill; len],
            iov: Vec::new(),
        });
        let base = b.data.as_mut_ptr();
        let mut at = 0;
        let mut k = 0;
        while at < len {
            let n = [512usize, 3584, 8192, 1 << 20][k % 4].min(len - at);
            b.iov.push(libc::iovec {
                iov_base: base.wrapping_add(at).cast(),
                iov_len: n,
            });
            at += n;
            k += 1;
        }
        b
    }

    fn req(&self, op: Op, offset: u64, tag: u64) -> BlockRequest {
        BlockRequest {
            op,
            offset,
            len: self.data.len() as u64,
            iov: self.iov.as_ptr(),
            iov_count: self.iov.len() as u32,
            tag,
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn uri(s: &Server) -> String {
    format!("nbd+unix:///?socket={}", s.path.display())
}

fn harness(backend: &dyn Backend) -> Harness<Driver> {
    let _ = env_logger::builder().is_test(true).try_init();
    Harness::new(|ctx| Driver {
        chan: backend.open_channel(ctx).unwrap(),
        todo: Vec::new(),
        done: Vec::new(),
    })
}

/// Runs `reqs` to completion; returns results by tag order.
fn run(h: &mut Harness<Driver>, reqs: Vec<BlockRequest>, secs: u64) -> Vec<Result<(), BlockError>> {
    let n = reqs.len();
    h.poller.done.clear();
    h.poller.todo = reqs;
    assert!(
        h.run_until(Duration::from_secs(secs), |d| d.done.len() == n),
        "requests did not complete"
    );
    let mut done = std::mem::take(&mut h.poller.done);
    done.sort_by_key(|d| d.0);
    done.into_iter().map(|d| d.1).collect()
}

fn roundtrip(opts: Opts) {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), opts);
    let backend = open(&uri(&srv), Duration::from_secs(5), false).unwrap();
    let info = backend.info();
    assert_eq!(info.size, SIZE);
    assert!(info.caps.flush && info.caps.discard && info.caps.write_zeroes);
    let mut h = harness(&backend);

    // Writes of several sizes, one larger than the server's 1 MiB payload limit (split).
    let sizes = [512usize, 4096, 65536, 3 << 20];
    let offs = [0u64, 8192, 1 << 20, 4 << 20];
    let bufs: Vec<Box<Buf>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut b = Buf::new(n, 0);
            b.data.copy_from_slice(&pattern(i as u8, n));
            b
        })
        .collect();
    let reqs = bufs
        .iter()
        .zip(offs)
        .enumerate()
        .map(|(i, (b, o))| b.req(Op::Write { fua: i == 1 }, o, i as u64))
        .collect();
    assert!(run(&mut h, reqs, 10).iter().all(Result::is_ok));
    for (b, &o) in bufs.iter().zip(&offs) {
        assert_eq!(
            &srv.disk.lock().unwrap()[o as usize..o as usize + b.data.len()],
            &b.data[..]
        );
    }

    // Read everything back, with a hole in the middle of the last range.
    let zeroes = Buf::new(8192, 0);
    let z = zeroes.req(Op::WriteZeroes { unmap: true }, (4 << 20) + 65536, 0);
    let flush = BlockRequest {
        op: Op::Flush,
        tag: 1,
        ..BlockRequest::default()
    };
    let discard = BlockRequest {
        op: Op::Discard,
        offset: 1 << 20,
        len: 4096,
        tag: 2,
        ..BlockRequest::default()
    };
    let zr = BlockRequest {
        iov: std::ptr::null(),
        iov_count: 0,
        ..z
    };
    assert!(run(&mut h, vec![zr, flush, discard], 10)
        .iter()
        .all(Result::is_ok));
    let back: Vec<Box<Buf>> = sizes.iter().map(|&n| Buf::new(n, 0xa5)).collect();
    let reqs = back
        .iter()
        .zip(offs)
        .enumerate()
        .map(|(i, (b, o))| b.req(Op::Read, o, i as u64))
        .collect();
    assert!(run(&mut h, reqs, 10).iter().all(Result::is_ok));
    for (i, (b, w)) in back.iter().zip(&bufs).enumerate() {
        let mut want = w.data.clone();
        if i == 2 {
            want[..4096].fill(0); // discarded
        }
        if i == 3 {
            want[65536..65536 + 8192].fill(0); // zeroed
        }
        assert!(b.data == want, "read {i} differs");
    }
}

#[test]
fn roundtrip_structured() {
    roundtrip(Opts::default());
}

#[test]
fn roundtrip_simple_replies() {
    roundtrip(Opts {
        structured: false,
        ..Opts::default()
    });
}

#[test]
fn roundtrip_fragmented_replies_with_holes() {
    roundtrip(Opts {
        fragment: true,
        ..Opts::default()
    });
}

#[test]
fn fua_without_server_fua_becomes_write_then_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Opts::default();
    o.flags &= !TFLAG_SEND_FUA;
    let srv = server(dir.path(), o);
    let backend = open(&uri(&srv), Duration::from_secs(5), false).unwrap();
    let mut h = harness(&backend);
    let b = Buf::new(4096, 9);
    assert!(run(&mut h, vec![b.req(Op::Write { fua: true }, 0, 0)], 10)[0].is_ok());
    let cmds = srv.commands.lock().unwrap().clone();
    assert_eq!(cmds, vec![(CMD_WRITE, 0), (CMD_FLUSH, 0)]);
}

#[test]
fn fua_with_server_fua_is_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), Opts::default());
    let backend = open(&uri(&srv), Duration::from_secs(5), false).unwrap();
    let mut h = harness(&backend);
    let b = Buf::new(4096, 9);
    assert!(run(&mut h, vec![b.req(Op::Write { fua: true }, 0, 0)], 10)[0].is_ok());
    assert_eq!(
        srv.commands.lock().unwrap().clone(),
        vec![(CMD_WRITE, CMD_FLAG_FUA)]
    );
}

/// The server misbehaves on the first `bad_conns` connections; the client must reconnect
/// and finish the request without an error.
fn survives(bad: Bad, bad_conns: usize) {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(
        dir.path(),
        Opts {
            bad: Some(bad),
            bad_conns,
            ..Opts::default()
        },
    );
    let backend = open(&uri(&srv), Duration::from_secs(10), false).unwrap();
    let mut h = harness(&backend);
    let w = Buf::new(8192, 0x3c);
    assert!(
        run(&mut h, vec![w.req(Op::Write { fua: false }, 4096, 0)], 10)[0].is_ok(),
        "{bad:?}"
    );
    assert_eq!(&srv.disk.lock().unwrap()[4096..4096 + 8192], &w.data[..]);
    let r = Buf::new(8192, 0);
    assert!(run(&mut h, vec![r.req(Op::Read, 4096, 1)], 10)[0].is_ok());
    assert_eq!(r.data, w.data);
    assert!(
        srv.conns.load(Ordering::SeqCst) > bad_conns,
        "{bad:?}: reconnected"
    );
}

#[test]
fn reconnects_after_protocol_violations_and_resends() {
    for bad in [
        Bad::WrongHandle,
        Bad::ShortThenClose,
        Bad::Oversized,
        Bad::Close,
        Bad::Shutdown,
    ] {
        survives(bad, 2);
    }
}

#[test]
fn reconnects_after_a_read_reply_outside_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(
        dir.path(),
        Opts {
            bad: Some(Bad::OutOfRange),
            bad_conns: 1,
            ..Opts::default()
        },
    );
    let backend = open(&uri(&srv), Duration::from_secs(10), false).unwrap();
    let mut h = harness(&backend);
    let r = Buf::new(4096, 0xee);
    assert!(run(&mut h, vec![r.req(Op::Read, 0, 0)], 10)[0].is_ok());
    assert_eq!(r.data, vec![0u8; 4096], "the bad chunk wrote nothing");
}

/// A server that is always hostile: requests fail with EIO once the timeout has passed,
/// and new ones fail at once while it stays that way.
fn fails_after_timeout(bad: Bad) {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(
        dir.path(),
        Opts {
            bad: Some(bad),
            bad_conns: usize::MAX,
            ..Opts::default()
        },
    );
    let backend = open(&uri(&srv), Duration::from_secs(1), false).unwrap();
    let mut h = harness(&backend);
    let b = Buf::new(4096, 1);
    let t0 = std::time::Instant::now();
    let r = run(
        &mut h,
        vec![b.req(Op::Read, 0, 0), b.req(Op::Write { fua: false }, 0, 1)],
        10,
    );
    assert_eq!(r, vec![Err(BlockError::Io(libc::EIO)); 2], "{bad:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "{bad:?}: {took:?}"
    );
}

#[test]
fn hostile_servers_fail_requests_after_the_timeout() {
    for bad in [
        Bad::WrongHandle,
        Bad::Oversized,
        Bad::Silent,
        Bad::ShortThenClose,
        Bad::Chatty,
    ] {
        fails_after_timeout(bad);
    }
}

#[test]
fn server_gone_fails_after_timeout_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // A server that takes the first connection (open's) and dies with it.
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        serve_handshake(&mut s, SIZE, Opts::default().flags, true);
        let mut h = [0u8; REQUEST_LEN];
        let _ = s.read_exact(&mut h);
        drop(l);
    });
    let backend = open(
        &format!("nbd+unix:///?socket={}", path.display()),
        Duration::from_secs(1),
        false,
    )
    .unwrap();
    let mut h = harness(&backend);
    let b = Buf::new(4096, 1);
    let r = run(&mut h, vec![b.req(Op::Read, 0, 0)], 10);
    t.join().unwrap();
    assert_eq!(r, vec![Err(BlockError::Io(libc::EIO))]);
    // While it stays away, new requests fail at once.
    let t0 = std::time::Instant::now();
    assert_eq!(
        run(&mut h, vec![b.req(Op::Read, 0, 1)], 10),
        vec![Err(BlockError::Io(libc::EIO))]
    );
    assert!(t0.elapsed() < Duration::from_millis(500));
    // It comes back: requests work again.
    std::fs::remove_file(&path).unwrap();
    let srv = server(dir.path(), Opts::default());
    srv.disk.lock().unwrap()[..4096].fill(0x77);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = Buf::new(4096, 0);
        if run(&mut h, vec![r.req(Op::Read, 0, 2)], 10)[0].is_ok() {
            assert_eq!(r.data, vec![0x77; 4096]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn last_channel_gone_parks_the_connection_and_the_next_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), Opts::default());
    let backend = open(&uri(&srv), Duration::from_secs(5), false).unwrap();
    {
        let mut h = harness(&backend);
        let b = Buf::new(4096, 1);
        assert!(run(&mut h, vec![b.req(Op::Write { fua: false }, 0, 0)], 10)[0].is_ok());
        // The queue goes away: the connection stops receiving and is handed back.
        h.poller.chan = Box::new(NullChannel);
        let id = backend.shared.id;
        assert!(
            h.run_until(Duration::from_secs(5), |_| super::channel::state(id)
                .is_none())
        );
    }
    // Parked with the connector: the next poller gets it without a new connection.
    std::thread::sleep(Duration::from_millis(100));
    let mut h = harness(&backend);
    let b = Buf::new(4096, 0);
    assert!(run(&mut h, vec![b.req(Op::Read, 0, 0)], 10)[0].is_ok());
    assert_eq!(b.data, vec![1; 4096]);
    assert_eq!(
        srv.conns.load(Ordering::SeqCst),
        1,
        "one connection all along"
    );
}

struct NullChannel;
impl Channel for NullChannel {
    fn room(&self, _: &Ctx<'_>) -> u32 {
        0
    }
    unsafe fn submit(&mut self, _: &mut Ctx<'_>, _: &BlockRequest) -> crate::blk::Submitted {
        crate::blk::Submitted::Done(Ok(()))
    }
}
