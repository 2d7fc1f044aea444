//! One connection to the NBD server on one reactor: every channel of the device on that
//! reactor submits into it, and its poller moves the bytes through the reactor's io_uring.
//!
//! Data path:
//! - A block request becomes an `Io`; an `Io` becomes one or more NBD commands (`Cmd`): a
//!   read or write larger than the server's payload limit is split, a FUA write to a server
//!   without FUA gets a FLUSH after it. The NBD cookie is the command's slot and a
//!   generation, so a late, repeated or invented reply never matches a live command.
//! - Sending: one SENDMSG at a time per socket (two in flight could interleave their bytes),
//!   carrying every queued command: each header from the command's slot, each write's
//!   payload straight from the guest's iovecs. What queues up while a send is in flight
//!   goes out in the next one, so under load one system call carries many requests.
//! - Receiving: one receive at a time, into a 64 KiB buffer that headers (and small payloads
//!   arriving with them) are parsed from; the rest of a read payload is received straight
//!   into the guest's iovecs (RECVMSG with MSG_WAITALL): zero copy for the bulk of large
//!   reads, a few-KiB memcpy instead of a second system call for small ones.
//! - A request completes only when no SQE still refers to its memory: a write whose reply
//!   beats its SENDMSG's CQE waits for the CQE.
//!
//! Failure: a send or receive error, EOF, a protocol violation (logged, rate-limited) or no
//! progress for the timeout while requests wait breaks the connection: outstanding SQEs are
//! cancelled, the socket closed once they are reaped, and the connector asked for a new one.
//! Commands not yet answered are sent again, in their original order, on the new connection.
//! When the server has been unreachable (or unhelpful) for the timeout, the waiting requests
//! fail with EIO, and new ones fail at once until a connection is back.
//!
//! Memory: every table is sized when the connection is made, in mappings of its own (see
//! `table`); nothing allocates per request. Completed requests wait for their channel's
//! `reap` on an intrusive list through their slots.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, types};
use libc::iovec;

use super::connector::{Mailbox, Msg};
use super::handshake::Connected;
use super::iov;
use super::proto::*;
use super::table::{IovList, Table};
use super::Shared;
use crate::blk::{BlockError, BlockRequest, Op, Submitted};
use crate::engine::poller::BACKGROUND;
use crate::engine::ratelimit::RateLimit;
use crate::engine::stats::ticks;
use crate::engine::Ctx;

/// Requests one connection holds (shared by the channels of its reactor); the front end
/// sees it as back-pressure through `room`.
pub const MAX_IOS: usize = 512;
/// NBD commands in flight: a request may need several (a split, a flush after a write).
const MAX_CMDS: usize = 512;
/// Most iovecs one SENDMSG / RECVMSG takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// The receive buffer: replies are parsed from it. Bounded chunks (errors with their
/// message) must fit whole. 64 KiB takes a whole burst of small replies (write replies,
/// a dozen 4 KiB reads) in one receive, and bounds what a large read's payload costs in
/// memcpy before the rest goes straight to the guest (measured: 32 KiB to 256 KiB made no
/// difference beyond this machine's noise for 4 KiB reads at QD32).
const RX_BUF: usize = 64 << 10;
/// Largest error chunk: error, message length, a 4096-byte message, an offset.
const MAX_ERR_CHUNK: u32 = 6 + 4096 + 8;
/// Largest range of one TRIM / WRITE_ZEROES command (the device offers at most 1 GiB).
const MAX_RANGE: u64 = 1 << 30;

// What an SQE of the connection is, in the low bits of its tag; the socket generation above.
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_CANCEL: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No socket: waiting for the connector (or retiring).
    Down,
    Up,
    /// Broken: waiting for the cancelled operations' CQEs before closing.
    Closing,
    /// No channel left: stopping the receive so the idle socket can be handed back.
    Parking,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmdState {
    Free,
    /// Waiting to be sent (first time or after a reconnect).
    Queued,
    /// In a SENDMSG not yet completed.
    Sending,
    /// Sent, waiting for the reply.
    Sent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Data,
    /// The data commands are answered; the FLUSH that makes a FUA write durable follows.
    Flush,
}

struct Io {
    busy: bool,
    chan: u16,
    tag: u64,
    op: Op,
    offset: u64,
    len: u64,
    iov: *const iovec,
    iov_count: u32,
    stage: Stage,
    /// Bytes of the range turned into commands so far.
    issued: u64,
    issued_all: bool,
    /// Commands of this request not yet answered.
    parts: u32,
    /// FUA through the command flag.
    fua: bool,
    /// FUA through a FLUSH after the writes (the server has FLUSH but not FUA).
    flush_after: bool,
    error: Option<BlockError>,
    /// Completed, waiting for its channel's `reap`.
    done: bool,
    /// The next completed request of the same channel.
    next_done: u16,
}

/// End of a completion list.
const NONE: u16 = u16::MAX;

impl Default for Io {
    fn default() -> Self {
        Io {
            busy: false,
            chan: 0,
            tag: 0,
            op: Op::Flush,
            offset: 0,
            len: 0,
            iov: std::ptr::null(),
            iov_count: 0,
            stage: Stage::Data,
            issued: 0,
            issued_all: false,
            parts: 0,
            fua: false,
            flush_after: false,
            error: None,
            done: false,
            next_done: NONE,
        }
    }
}

struct Cmd {
    state: CmdState,
    gen: u32,
    io: u16,
    kind: u16,
    fua: bool,
    no_hole: bool,
    offset: u64,
    len: u32,
    /// Where the command's data starts in the request's iovecs.
    io_off: u64,
    /// Submission order, kept across reconnects.
    seq: u64,
    /// The request header, encoded when sent; a SENDMSG points here.
    hdr: [u8; REQUEST_LEN],
    /// Answered while its SENDMSG was still in flight: finished when the CQE comes.
    replied: Option<Result<(), BlockError>>,
    /// Structured read: bytes the chunks covered so far.
    got: u64,
    /// Structured reply: the first error chunk's error.
    err: Option<u32>,
}

impl Default for Cmd {
    fn default() -> Self {
        Cmd {
            state: CmdState::Free,
            gen: 0,
            io: 0,
            kind: 0,
            fua: false,
            no_hole: false,
            offset: 0,
            len: 0,
            io_off: 0,
            seq: 0,
            hdr: [0; REQUEST_LEN],
            replied: None,
            got: 0,
            err: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// Parsing reply headers from the buffer.
    Header,
    /// Receiving `left` payload bytes of a read into its iovecs at `io_off`; `done`: the
    /// reply ends with them.
    Data {
        cmd: u16,
        io_off: u64,
        left: u64,
        done: bool,
    },
}

/// One channel's completed requests, oldest first (slots linked through `next_done`).
#[derive(Clone, Copy)]
struct Completions {
    head: u16,
    tail: u16,
}

/// The iovecs of a request.
///
/// # Safety
/// Only while the request is pending: the front end keeps them valid until it completes.
unsafe fn iovecs<'a>(ptr: *const iovec, n: u32) -> &'a [iovec] {
    if n == 0 || ptr.is_null() {
        return &[];
    }
    // SAFETY: `n` iovecs at `ptr`, valid while the request is pending (the caller).
    unsafe { std::slice::from_raw_parts(ptr, n as usize) }
}

/// A protocol violation: why the connection is dropped.
type Violation = &'static str;

pub struct Conn {
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox>,
    sock: Option<OwnedFd>,
    neg: Negotiated,
    state: State,
    /// Bumped per socket; in the SQE tags.
    sock_gen: u32,
    connect_requested: bool,
    /// Connections lost without progress in a row: the next connection waits longer.
    flaps: u32,
    ever_connected: bool,
    send_busy: bool,
    recv_busy: bool,
    cancel_pending: bool,
    stopping: bool,
    /// When the server stopped answering (ticks); cleared by a reply.
    outage_since: Option<u64>,
    /// The outage outlived the timeout: requests fail at once until a connection is back.
    expired: bool,
    last_progress: u64,
    progress: bool,

    ios: Table<Io>,
    free_ios: Vec<u16>,
    /// Requests submitted and not completed.
    busy_ios: usize,
    cmds: Table<Cmd>,
    free_cmds: Vec<u16>,
    /// Commands sent or being sent and not answered.
    in_server: u32,
    issue: VecDeque<u16>,
    sendq: VecDeque<u16>,
    seq: u64,

    send_iov: IovList,
    send_pos: usize,
    batch: Vec<u16>,
    /// The command at the front of `sendq` whose header and this many payload bytes went
    /// into earlier SENDMSGs (a write with more iovecs than one SENDMSG takes).
    partial: Option<(u16, u64)>,
    batch_partial: bool,
    send_msg: Box<libc::msghdr>,

    rx_buf: Table<u8>,
    rx_start: usize,
    rx_end: usize,
    rx: Rx,
    recv_iov: IovList,
    recv_msg: Box<libc::msghdr>,
    /// The user data of the receive in flight (for cancelling it).
    recv_ud: u64,

    chans: Vec<Option<Completions>>,
    requeue: Vec<u16>,
    log: RateLimit,
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is an empty message.
    unsafe { std::mem::zeroed() }
}

impl Conn {
    pub fn new(shared: Arc<Shared>, mailbox: Arc<Mailbox>) -> std::io::Result<Conn> {
        let neg = shared.info;
        let ios = Table::new(MAX_IOS, Io::default)?;
        let cmds = Table::new(MAX_CMDS, Cmd::default)?;
        let rx_buf = Table::new(RX_BUF, || 0u8)?;
        let send_iov = IovList::new(IOV_MAX)?;
        let recv_iov = IovList::new(IOV_MAX)?;
        shared.conns.fetch_add(1, Ordering::AcqRel);
        Ok(Conn {
            shared,
            mailbox,
            sock: None,
            neg,
            state: State::Down,
            sock_gen: 0,
            connect_requested: false,
            flaps: 0,
            ever_connected: false,
            send_busy: false,
            recv_busy: false,
            cancel_pending: false,
            stopping: false,
            outage_since: None,
            expired: false,
            last_progress: 0,
            progress: false,
            ios,
            free_ios: (0..MAX_IOS as u16).rev().collect(),
            busy_ios: 0,
            cmds,
            free_cmds: (0..MAX_CMDS as u16).rev().collect(),
            in_server: 0,
            issue: VecDeque::with_capacity(MAX_IOS),
            sendq: VecDeque::with_capacity(MAX_CMDS),
            seq: 0,
            send_iov,
            send_pos: 0,
            batch: Vec::with_capacity(MAX_CMDS),
            partial: None,
            batch_partial: false,
            send_msg: Box::new(empty_msghdr()),
            rx_buf,
            rx_start: 0,
            rx_end: 0,
            rx: Rx::Header,
            recv_iov,
            recv_msg: Box::new(empty_msghdr()),
            recv_ud: 0,
            chans: Vec::new(),
            requeue: Vec::with_capacity(MAX_CMDS),
            log: RateLimit::new(),
        })
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// First use: the connection `open` made if nobody took it yet, else a new one.
    pub fn start(&mut self) {
        let spare = self
            .shared
            .spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match spare {
            Some(c) => {
                self.connect_requested = true;
                self.mailbox.put(c);
            }
            None => self.request_connection(),
        }
    }

    fn request_connection(&mut self) {
        if self.connect_requested {
            return;
        }
        self.connect_requested = true;
        // Requests wait for this connection from now on (at most the timeout).
        self.outage_since.get_or_insert_with(ticks);
        // Quick the first time; slower when connections keep breaking without a reply.
        let delay = match self.flaps {
            0 | 1 => std::time::Duration::ZERO,
            n => std::time::Duration::from_millis(100u64 << (n - 2).min(4)),
        };
        let _ = self
            .shared
            .connector
            .send(Msg::Connect(Arc::clone(&self.mailbox), delay));
    }

    pub fn add_channel(&mut self) -> usize {
        let q = Completions {
            head: NONE,
            tail: NONE,
        };
        if let Some(i) = self.chans.iter().position(Option::is_none) {
            self.chans[i] = Some(q);
            i
        } else {
            self.chans.push(Some(q));
            self.chans.len() - 1
        }
    }

    pub fn remove_channel(&mut self, idx: usize) {
        let pending = self
            .ios
            .iter()
            .filter(|io| io.busy && !io.done && usize::from(io.chan) == idx)
            .count();
        if pending > 0 {
            log::error!(
                "nbd {}: a channel closed with {pending} requests in flight",
                self.shared.name
            );
        }
        // Completed requests nobody will reap: their slots are free again.
        self.take_completions(idx, &mut |_, _| {});
        if let Some(c) = self.chans.get_mut(idx) {
            *c = None;
        }
    }

    fn has_channels(&self) -> bool {
        self.chans.iter().any(Option::is_some)
    }

    pub fn room(&self) -> u32 {
        self.free_ios.len() as u32
    }

    /// Completions for channel `idx`.
    pub fn take_completions(
        &mut self,
        idx: usize,
        done: &mut dyn FnMut(u64, Result<(), BlockError>),
    ) -> u32 {
        let Some(Some(q)) = self.chans.get_mut(idx) else {
            return 0;
        };
        let mut i = std::mem::replace(&mut q.head, NONE);
        q.tail = NONE;
        let mut n = 0;
        while i != NONE {
            let io = &mut self.ios[usize::from(i)];
            let next = io.next_done;
            io.busy = false;
            io.done = false;
            done(io.tag, io.error.map_or(Ok(()), Err));
            self.free_ios.push(i);
            n += 1;
            i = next;
        }
        n
    }

    /// Takes a request from channel `chan`.
    ///
    /// # Safety
    /// `req`'s iovecs and memory stay valid until its completion is reaped.
    pub unsafe fn submit(&mut self, chan: usize, req: &BlockRequest) -> Submitted {
        let caps = self.shared.info;
        match req.op {
            // Nothing volatile to flush, or nothing to do.
            Op::Flush if !caps.has(TFLAG_SEND_FLUSH) => return Submitted::Done(Ok(())),
            Op::Discard if !caps.has(TFLAG_SEND_TRIM) || req.len == 0 => {
                return Submitted::Done(Ok(()))
            }
            Op::WriteZeroes { .. } if !caps.has(TFLAG_SEND_WRITE_ZEROES) => {
                return Submitted::Done(Err(BlockError::Unsupported))
            }
            Op::Read | Op::Write { .. } | Op::WriteZeroes { .. } if req.len == 0 => {
                return Submitted::Done(Ok(()))
            }
            _ => {}
        }
        if req.op.has_data() {
            // SAFETY: the caller keeps the iovecs valid while the request is pending.
            let v = unsafe { iovecs(req.iov, req.iov_count) };
            if v.iter().map(|v| v.iov_len as u64).sum::<u64>() < req.len {
                // Never send a short payload (it would desynchronize the stream) nor
                // receive past the buffers.
                return Submitted::Done(Err(BlockError::BadBuffer));
            }
        }
        if self.expired && self.state != State::Up {
            return Submitted::Done(Err(BlockError::Io(libc::EIO)));
        }
        let Some(i) = self.free_ios.pop() else {
            return Submitted::Done(Err(BlockError::Io(libc::EBUSY)));
        };
        let fua = matches!(req.op, Op::Write { fua: true });
        let io = &mut self.ios[usize::from(i)];
        *io = Io {
            busy: true,
            // Channels are few (one per queue on this reactor).
            chan: chan as u16,
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            iov: req.iov,
            iov_count: req.iov_count,
            stage: Stage::Data,
            issued: 0,
            issued_all: false,
            parts: 0,
            fua: fua && self.neg.has(TFLAG_SEND_FUA),
            flush_after: fua && !self.neg.has(TFLAG_SEND_FUA) && self.neg.has(TFLAG_SEND_FLUSH),
            error: None,
            done: false,
            next_done: NONE,
        };
        self.busy_ios += 1;
        self.issue.push_back(i);
        Submitted::Pending
    }

    fn tag(&self, op: u64) -> u64 {
        op | (u64::from(self.sock_gen) << 4)
    }

    // ---- poller entry points -------------------------------------------------------------

    /// One reactor pass: a new connection, timers, retiring the socket.
    pub fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let mut work = 0;
        if self.state == State::Down && self.connect_requested {
            if let Some(c) = self.mailbox.take() {
                self.attach(ctx, c);
                work += 1;
            }
        }
        if self.cancel_pending {
            self.push_cancels(ctx);
        }
        if self.busy_ios > 0 || self.state != State::Up {
            work += self.timers(ctx);
        }
        // Nothing left to serve: stop receiving, then hand the idle socket back.
        if self.state == State::Up && !self.has_channels() && self.busy_ios == 0 {
            self.state = State::Parking;
            if self.recv_busy {
                self.cancel_pending = true;
                self.push_cancels(ctx);
            }
            self.finish_closing(ctx);
        }
        if self.state == State::Down && self.has_channels() && !self.connect_requested {
            self.request_connection();
        }
        work
    }

    fn timers(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let now = ticks();
        let timeout = self.shared.timeout_ticks;
        if self.progress || self.in_server == 0 {
            self.progress = false;
            self.last_progress = now;
        }
        match self.state {
            State::Up => {
                if self.in_server > 0 && now.wrapping_sub(self.last_progress) > timeout {
                    // A server that accepts requests and never answers is as gone as one
                    // that closed: the requests have waited the whole timeout already.
                    self.outage_since = Some(self.last_progress);
                    self.break_conn(ctx, "no reply within the timeout");
                    return 1;
                }
                0
            }
            State::Down => {
                let over = self
                    .outage_since
                    .is_some_and(|t| now.wrapping_sub(t) >= timeout);
                if over && !self.expired {
                    self.expired = true;
                    if self.log.allow() {
                        log::error!(
                            "nbd {}: server unreachable for {:?}: failing {} requests{}",
                            self.shared.name,
                            self.shared.timeout,
                            self.busy_ios,
                            self.log.suppressed_note()
                        );
                    }
                }
                if (self.expired || self.stopping) && self.busy_ios > 0 {
                    self.fail_all(BlockError::Io(libc::EIO));
                    return 1;
                }
                0
            }
            State::Closing | State::Parking => 0,
        }
    }

    pub fn complete(&mut self, ctx: &mut Ctx<'_>, tag: u64, res: i32) {
        let op = tag & 0xf;
        if op == OP_CANCEL {
            return;
        }
        if (tag >> 4) as u32 != self.sock_gen {
            log::debug!("nbd {}: stale completion {tag:#x}", self.shared.name);
            return;
        }
        match op {
            OP_SEND => self.send_done(ctx, res),
            OP_RECV => self.recv_done(ctx, res),
            _ => {}
        }
    }

    /// After every poller polled: turn new requests into commands and send them.
    pub fn end_pass(&mut self, ctx: &mut Ctx<'_>) {
        self.issue_cmds();
        self.start_send(ctx);
        self.start_recv(ctx);
    }

    /// Work the reactor must come back for without an fd to wake it: replies that are due
    /// (the receive's wake-up is a background completion), timers, a connection to pick up.
    pub fn needs_polling(&self) -> bool {
        self.in_server > 0
            || self.cancel_pending
            || (self.state == State::Up && (!self.sendq.is_empty() || !self.issue.is_empty()))
            || (self.state != State::Up && self.busy_ios > 0)
    }

    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Nothing in flight, no socket, no channel: the poller may go.
    pub fn idle(&self) -> bool {
        self.state == State::Down
            && !self.send_busy
            && !self.recv_busy
            && self.busy_ios == 0
            && !self.has_channels()
    }

    // ---- connection life ------------------------------------------------------------------

    fn attach(&mut self, ctx: &mut Ctx<'_>, c: Connected) {
        let old = self.neg;
        self.sock = Some(c.fd);
        self.neg = c.neg;
        self.state = State::Up;
        self.sock_gen = self.sock_gen.wrapping_add(1);
        self.connect_requested = false;
        self.expired = false;
        if self.busy_ios == 0 {
            // Nothing waited through the outage: it is over. With requests waiting it ends
            // only with a reply (a server that accepts and then fails them is no better).
            self.outage_since = None;
        }
        self.rx = Rx::Header;
        self.rx_start = 0;
        self.rx_end = 0;
        self.progress = true;
        if self.ever_connected {
            log::info!(
                "nbd {} (reactor {}): connection back; sending {} unanswered commands again",
                self.shared.name,
                ctx.reactor(),
                self.sendq.len()
            );
            if (old.flags ^ self.neg.flags) & !TFLAG_READ_ONLY != 0 || old.size != self.neg.size {
                log::warn!(
                    "nbd {}: the server changed: size {} -> {}, flags {:#x} -> {:#x}",
                    self.shared.name,
                    old.size,
                    self.neg.size,
                    old.flags,
                    self.neg.flags
                );
            }
        } else {
            log::info!(
                "nbd {} (reactor {}): connected",
                self.shared.name,
                ctx.reactor()
            );
        }
        self.ever_connected = true;
        self.start_recv(ctx);
        self.issue_cmds();
        self.start_send(ctx);
    }

    /// The connection is unusable: cancel what the kernel still has, close when reaped.
    fn break_conn(&mut self, ctx: &mut Ctx<'_>, why: &str) {
        if self.state != State::Up {
            return;
        }
        if self.log.allow() {
            log::warn!(
                "nbd {} (reactor {}): connection lost: {why}; {} requests wait for a new one{}",
                self.shared.name,
                ctx.reactor(),
                self.busy_ios,
                self.log.suppressed_note()
            );
        }
        self.state = State::Closing;
        self.flaps = self.flaps.saturating_add(1);
        self.outage_since.get_or_insert_with(ticks);
        if self.send_busy || self.recv_busy {
            self.cancel_pending = true;
            self.push_cancels(ctx);
        }
        self.finish_closing(ctx);
    }

    fn push_cancels(&mut self, ctx: &mut Ctx<'_>) {
        if ctx.ring.room() < 2 {
            return; // next pass
        }
        for (busy, op) in [(self.send_busy, OP_SEND), (self.recv_busy, OP_RECV)] {
            if !busy {
                continue;
            }
            let target = if op == OP_RECV {
                self.recv_ud
            } else {
                ctx.user_data(self.tag(op))
            };
            let sqe = opcode::AsyncCancel::new(target)
                .build()
                .user_data(ctx.user_data(OP_CANCEL));
            // SAFETY: a cancel refers to no memory.
            if unsafe { ctx.ring.push(&sqe) }.is_err() {
                return; // next pass
            }
        }
        self.cancel_pending = false;
    }

    /// Closing or parking, once the kernel has given back every operation on the socket.
    fn finish_closing(&mut self, ctx: &mut Ctx<'_>) {
        if self.send_busy || self.recv_busy {
            return;
        }
        self.cancel_pending = false;
        match self.state {
            State::Closing => {
                self.sock = None;
                self.state = State::Down;
                self.requeue();
                if self.has_channels() || self.busy_ios > 0 {
                    self.request_connection();
                }
            }
            State::Parking if self.has_channels() || self.busy_ios > 0 => {
                // A channel came back meanwhile: keep serving on this socket.
                self.state = State::Up;
                self.start_recv(ctx);
            }
            State::Parking => {
                self.state = State::Down;
                if let Some(fd) = self.sock.take() {
                    let c = Connected { fd, neg: self.neg };
                    if let Err(e) = self.shared.connector.send(Msg::Park(c)) {
                        drop(e.into_inner());
                    }
                }
            }
            State::Up | State::Down => {}
        }
    }

    /// After the socket closed: answered commands finish, the others go back to the send
    /// queue in their original order.
    fn requeue(&mut self) {
        for c in 0..MAX_CMDS {
            if let Some(r) = self.cmds[c].replied.take() {
                self.finish_cmd(c as u16, r);
            }
        }
        self.requeue.clear();
        for (c, cmd) in self.cmds.iter_mut().enumerate() {
            if cmd.state != CmdState::Free {
                cmd.state = CmdState::Queued;
                cmd.got = 0;
                cmd.err = None;
                self.requeue.push(c as u16);
            }
        }
        let cmds = &self.cmds;
        self.requeue
            .sort_unstable_by_key(|&c| cmds[usize::from(c)].seq);
        self.sendq.clear();
        self.sendq.extend(self.requeue.iter().copied());
        self.in_server = 0;
        self.partial = None;
        self.batch.clear();
        self.send_iov.clear();
        self.rx = Rx::Header;
        self.rx_start = 0;
        self.rx_end = 0;
    }

    /// Fails every request (no SQE refers to their memory any more: the socket is closed).
    fn fail_all(&mut self, e: BlockError) {
        debug_assert!(!self.send_busy && !self.recv_busy);
        for cmd in self.cmds.iter_mut() {
            if cmd.state != CmdState::Free {
                cmd.state = CmdState::Free;
                cmd.replied = None;
            }
        }
        self.free_cmds.clear();
        self.free_cmds.extend((0..MAX_CMDS as u16).rev());
        self.in_server = 0;
        self.issue.clear();
        self.sendq.clear();
        self.partial = None;
        for i in 0..MAX_IOS {
            if self.ios[i].busy && !self.ios[i].done {
                self.ios[i].error = Some(e);
                self.complete_io(i as u16);
            }
        }
    }

    // ---- requests and commands ------------------------------------------------------------

    /// Turns waiting requests into commands while command slots are free.
    fn issue_cmds(&mut self) {
        while let Some(&i) = self.issue.front() {
            let Some(c) = self.free_cmds.pop() else {
                return;
            };
            let max_payload = u64::from(self.neg.max_payload);
            let io = &mut self.ios[usize::from(i)];
            let left = io.len - io.issued;
            let (kind, len, fua, no_hole) = match (io.stage, io.op) {
                (Stage::Flush, _) | (_, Op::Flush) => (CMD_FLUSH, 0, false, false),
                (_, Op::Read) => (CMD_READ, left.min(max_payload), false, false),
                (_, Op::Write { .. }) => (CMD_WRITE, left.min(max_payload), io.fua, false),
                (_, Op::Discard) => (CMD_TRIM, left.min(MAX_RANGE), false, false),
                (_, Op::WriteZeroes { unmap }) => {
                    // Without UNMAP the range must stay allocated.
                    (CMD_WRITE_ZEROES, left.min(MAX_RANGE), io.fua, !unmap)
                }
            };
            let (offset, io_off) = if kind == CMD_FLUSH {
                (0, 0)
            } else {
                (io.offset + io.issued, io.issued)
            };
            io.issued += len;
            io.parts += 1;
            if kind == CMD_FLUSH || io.issued >= io.len {
                io.issued_all = true;
                self.issue.pop_front();
            }
            let seq = self.seq;
            self.seq += 1;
            let cmd = &mut self.cmds[usize::from(c)];
            *cmd = Cmd {
                state: CmdState::Queued,
                gen: cmd.gen.wrapping_add(1),
                io: i,
                kind,
                fua,
                no_hole,
                offset,
                // At most the payload limit or MAX_RANGE: fits.
                len: len as u32,
                io_off,
                seq,
                hdr: [0; REQUEST_LEN],
                replied: None,
                got: 0,
                err: None,
            };
            self.sendq.push_back(c);
        }
    }

    fn finish_cmd(&mut self, c: u16, result: Result<(), BlockError>) {
        let cmd = &mut self.cmds[usize::from(c)];
        if matches!(cmd.state, CmdState::Sending | CmdState::Sent) {
            self.in_server -= 1;
        }
        cmd.state = CmdState::Free;
        cmd.replied = None;
        let i = cmd.io;
        self.free_cmds.push(c);
        let io = &mut self.ios[usize::from(i)];
        if let Err(e) = result {
            io.error.get_or_insert(e);
        }
        io.parts -= 1;
        if io.parts == 0 && io.issued_all {
            if io.stage == Stage::Data && io.flush_after && io.error.is_none() {
                io.stage = Stage::Flush;
                io.issued_all = false;
                self.issue.push_back(i);
            } else {
                self.complete_io(i);
            }
        }
    }

    fn complete_io(&mut self, i: u16) {
        self.busy_ios -= 1;
        let io = &mut self.ios[usize::from(i)];
        let Some(Some(q)) = self.chans.get_mut(usize::from(io.chan)) else {
            // Its channel is gone: nobody to tell.
            io.busy = false;
            self.free_ios.push(i);
            return;
        };
        io.done = true;
        io.next_done = NONE;
        let tail = std::mem::replace(&mut q.tail, i);
        if tail == NONE {
            q.head = i;
        } else {
            self.ios[usize::from(tail)].next_done = i;
        }
    }

    // ---- sending --------------------------------------------------------------------------

    fn start_send(&mut self, ctx: &mut Ctx<'_>) {
        if self.state != State::Up
            || self.send_busy
            || self.sendq.is_empty()
            || ctx.ring.room() == 0
        {
            return;
        }
        self.send_iov.clear();
        self.batch.clear();
        self.send_pos = 0;
        self.batch_partial = false;
        let neg = self.neg;
        while let Some(&c) = self.sendq.front() {
            if self.send_iov.is_full() {
                break;
            }
            let from = match self.partial {
                Some((p, done)) if p == c => done,
                _ => {
                    let cmd = &mut self.cmds[usize::from(c)];
                    let mut flags = 0;
                    if cmd.fua && neg.has(TFLAG_SEND_FUA) {
                        flags |= CMD_FLAG_FUA;
                    }
                    if cmd.no_hole {
                        flags |= CMD_FLAG_NO_HOLE;
                    }
                    let cookie = (u64::from(cmd.gen) << 32) | u64::from(c);
                    cmd.hdr = request(flags, cmd.kind, cookie, cmd.offset, cmd.len);
                    cmd.state = CmdState::Sending;
                    self.in_server += 1;
                    self.send_iov.push(iovec {
                        iov_base: cmd.hdr.as_mut_ptr().cast(),
                        iov_len: REQUEST_LEN,
                    });
                    0
                }
            };
            self.batch.push(c);
            let cmd = &self.cmds[usize::from(c)];
            if cmd.kind == CMD_WRITE {
                let io = &self.ios[usize::from(cmd.io)];
                // SAFETY: the request is pending (it has a live command).
                let v = unsafe { iovecs(io.iov, io.iov_count) };
                let want = u64::from(cmd.len) - from;
                let got = iov::append_range(v, cmd.io_off + from, want, &mut self.send_iov);
                if got < want {
                    // Only the SENDMSG's iovec limit stops a range early: `submit` checked
                    // that the iovecs cover the request.
                    self.partial = Some((c, from + got));
                    self.batch_partial = true;
                    break;
                }
            }
            self.partial = None;
            self.sendq.pop_front();
        }
        if self.send_iov.is_empty() {
            return;
        }
        self.push_send(ctx);
    }

    fn push_send(&mut self, ctx: &mut Ctx<'_>) {
        let Some(fd) = self.sock.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        let rest = &mut self.send_iov.as_mut_slice()[self.send_pos..];
        *self.send_msg = empty_msghdr();
        self.send_msg.msg_iov = rest.as_mut_ptr();
        self.send_msg.msg_iovlen = rest.len();
        let sqe = opcode::SendMsg::new(types::Fd(fd), &*self.send_msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(ctx.user_data(self.tag(OP_SEND)));
        // SAFETY: the msghdr (boxed) and the iovec array (a fixed table) belong to this
        // connection and are not touched until the CQE; headers live in the command slots,
        // which stay Sending until then; payloads are guest memory of pending requests,
        // which complete only after the CQE.
        match unsafe { ctx.ring.push(&sqe) } {
            Ok(()) => self.send_busy = true,
            Err(e) => self.break_conn(ctx, &format!("io_uring: {e}")),
        }
    }

    fn send_done(&mut self, ctx: &mut Ctx<'_>, res: i32) {
        self.send_busy = false;
        if self.state != State::Up {
            return self.finish_closing(ctx);
        }
        if res <= 0 {
            let why = if res == 0 {
                "send made no progress".to_string()
            } else {
                format!("send: {}", std::io::Error::from_raw_os_error(-res))
            };
            return self.break_conn(ctx, &why);
        }
        self.progress = true;
        let mut n = res as usize;
        while n > 0 && self.send_pos < self.send_iov.len() {
            let v = &mut self.send_iov.as_mut_slice()[self.send_pos];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.send_pos += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        if self.send_pos < self.send_iov.len() {
            // A short send (a full socket buffer): the rest, from where it stopped.
            return self.push_send(ctx);
        }
        let last = if self.batch_partial {
            self.batch.len() - 1
        } else {
            self.batch.len()
        };
        for k in 0..last {
            let c = self.batch[k];
            let cmd = &mut self.cmds[usize::from(c)];
            if cmd.state != CmdState::Sending {
                continue;
            }
            cmd.state = CmdState::Sent;
            if let Some(r) = cmd.replied.take() {
                self.finish_cmd(c, r);
            }
        }
        self.batch.clear();
        self.issue_cmds();
        self.start_send(ctx);
    }

    // ---- receiving ------------------------------------------------------------------------

    fn start_recv(&mut self, ctx: &mut Ctx<'_>) {
        if self.state != State::Up || self.recv_busy || ctx.ring.room() == 0 {
            return;
        }
        let Some(fd) = self.sock.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        let sqe = match self.rx {
            Rx::Data {
                cmd, io_off, left, ..
            } if self.rx_start == self.rx_end => {
                let io = &self.ios[usize::from(self.cmds[usize::from(cmd)].io)];
                // SAFETY: the read is pending (its command waits for this payload).
                let v = unsafe { iovecs(io.iov, io.iov_count) };
                self.recv_iov.clear();
                if iov::append_range(v, io_off, left, &mut self.recv_iov) == 0 {
                    // Checked against the command's range when the header came: the front
                    // end's iovecs are shorter than its request. Give up on this socket.
                    return self.break_conn(ctx, "read buffer shorter than the request");
                }
                *self.recv_msg = empty_msghdr();
                self.recv_msg.msg_iov = self.recv_iov.as_mut_slice().as_mut_ptr();
                self.recv_msg.msg_iovlen = self.recv_iov.len();
                opcode::RecvMsg::new(types::Fd(fd), &mut *self.recv_msg)
                    .flags(libc::MSG_WAITALL as u32)
                    .build()
            }
            _ => {
                if self.rx_start == self.rx_end {
                    self.rx_start = 0;
                    self.rx_end = 0;
                } else if RX_BUF - self.rx_end < MAX_ERR_CHUNK as usize + STRUCTURED_REPLY_LEN {
                    // Keep room for the largest message that must be parsed whole.
                    self.rx_buf.copy_within(self.rx_start..self.rx_end, 0);
                    self.rx_end -= self.rx_start;
                    self.rx_start = 0;
                }
                if self.rx_end == RX_BUF {
                    return self.violation(ctx, "a reply larger than any it may send");
                }
                let free = &mut self.rx_buf[self.rx_end..];
                // At most RX_BUF: fits.
                opcode::Recv::new(types::Fd(fd), free.as_mut_ptr(), free.len() as u32).build()
            }
        };
        // With replies due, the receive is I/O the reactor waits for, like a file read: it
        // spins briefly, then sleeps until the CQE. With none due it may wait for as long as
        // the server is quiet (only an EOF or a protocol error would end it), so it is a
        // background operation that must not keep the reactor awake; a request sent while
        // it waits is covered by `needs_polling`.
        let mut tag = self.tag(OP_RECV);
        if self.in_server == 0 {
            tag |= BACKGROUND;
        }
        let ud = ctx.user_data(tag);
        let sqe = sqe.user_data(ud);
        // SAFETY: the receive buffer and msghdr are owned by this connection and not
        // touched until the CQE; a direct receive targets the iovecs of a pending read,
        // which completes only after this CQE is reaped.
        match unsafe { ctx.ring.push(&sqe) } {
            Ok(()) => {
                self.recv_busy = true;
                self.recv_ud = ud;
            }
            Err(e) => self.break_conn(ctx, &format!("io_uring: {e}")),
        }
    }

    fn recv_done(&mut self, ctx: &mut Ctx<'_>, res: i32) {
        self.recv_busy = false;
        match self.state {
            State::Up => {}
            State::Parking if res > 0 => {
                // Bytes nobody asked for: not a connection to keep.
                self.state = State::Closing;
                return self.finish_closing(ctx);
            }
            State::Parking if res == 0 || (res < 0 && res != -libc::ECANCELED) => {
                self.state = State::Closing;
                return self.finish_closing(ctx);
            }
            _ => return self.finish_closing(ctx),
        }
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            return self.break_conn(ctx, &format!("receive: {e}"));
        }
        if res == 0 {
            return self.break_conn(ctx, "the server closed the connection");
        }
        let n = res as usize;
        match &mut self.rx {
            Rx::Data {
                cmd,
                io_off,
                left,
                done,
            } if self.rx_start == self.rx_end => {
                // Payload moving is progress; headers alone are not (a server could chat
                // forever without answering anything).
                self.progress = true;
                *io_off += n as u64;
                *left -= (n as u64).min(*left);
                if *left == 0 {
                    let (c, d) = (*cmd, *done);
                    self.rx = Rx::Header;
                    if let Err(v) = self.data_done(ctx, c, d) {
                        return self.violation(ctx, v);
                    }
                }
            }
            _ => self.rx_end += n,
        }
        if let Err(v) = self.parse(ctx) {
            return self.violation(ctx, v);
        }
        self.start_recv(ctx);
    }

    fn violation(&mut self, ctx: &mut Ctx<'_>, why: Violation) {
        self.break_conn(ctx, &format!("protocol violation: {why}"));
    }

    /// Parses everything complete in the receive buffer.
    fn parse(&mut self, ctx: &mut Ctx<'_>) -> Result<(), Violation> {
        while self.state == State::Up {
            let avail = self.rx_end - self.rx_start;
            match self.rx {
                Rx::Data {
                    cmd,
                    io_off,
                    left,
                    done,
                } => {
                    if avail == 0 {
                        return Ok(());
                    }
                    let n = (avail as u64).min(left) as usize;
                    let io = &self.ios[usize::from(self.cmds[usize::from(cmd)].io)];
                    // SAFETY: the read is pending; the bytes come from our own buffer,
                    // which guest memory never overlaps; `copy_in` stops at the iovecs' end.
                    unsafe {
                        let v = iovecs(io.iov, io.iov_count);
                        iov::copy_in(v, io_off, &self.rx_buf[self.rx_start..self.rx_start + n]);
                    }
                    self.rx_start += n;
                    self.progress = true;
                    if left == n as u64 {
                        self.rx = Rx::Header;
                        self.data_done(ctx, cmd, done)?;
                    } else {
                        self.rx = Rx::Data {
                            cmd,
                            io_off: io_off + n as u64,
                            left: left - n as u64,
                            done,
                        };
                        return Ok(());
                    }
                }
                Rx::Header => {
                    if avail < 4 {
                        return Ok(());
                    }
                    let b = &self.rx_buf[self.rx_start..self.rx_end];
                    match be32(b) {
                        SIMPLE_REPLY_MAGIC => {
                            if avail < SIMPLE_REPLY_LEN {
                                return Ok(());
                            }
                            let (err, cookie) = (be32(&b[4..]), be64(&b[8..]));
                            self.rx_start += SIMPLE_REPLY_LEN;
                            self.simple_reply(ctx, err, cookie)?;
                        }
                        STRUCTURED_REPLY_MAGIC => {
                            if avail < STRUCTURED_REPLY_LEN {
                                return Ok(());
                            }
                            if !self.structured_chunk(ctx)? {
                                return Ok(()); // waiting for the rest of the chunk
                            }
                        }
                        _ => return Err("bad reply magic"),
                    }
                }
            }
        }
        Ok(())
    }

    /// The command a reply names, if it is one that waits for a reply.
    fn lookup(&self, cookie: u64) -> Result<u16, Violation> {
        let idx = (cookie & 0xffff_ffff) as usize;
        let gen = (cookie >> 32) as u32;
        match self.cmds.get(idx) {
            Some(c)
                if c.gen == gen
                    && matches!(c.state, CmdState::Sending | CmdState::Sent)
                    && c.replied.is_none() =>
            {
                Ok(idx as u16)
            }
            _ => Err("reply for an unknown handle"),
        }
    }

    fn simple_reply(&mut self, ctx: &mut Ctx<'_>, err: u32, cookie: u64) -> Result<(), Violation> {
        let c = self.lookup(cookie)?;
        let cmd = &self.cmds[usize::from(c)];
        if cmd.kind == CMD_READ && err == 0 {
            if self.neg.structured {
                return Err("simple reply with data after structured replies were agreed");
            }
            self.rx = Rx::Data {
                cmd: c,
                io_off: cmd.io_off,
                left: u64::from(cmd.len),
                done: true,
            };
            return Ok(());
        }
        // A failed read with a simple reply carries no payload (the protocol's rule).
        self.reply_done(ctx, c, err);
        Ok(())
    }

    /// Handles a structured chunk at the buffer's start. Ok(false): more bytes are needed.
    fn structured_chunk(&mut self, ctx: &mut Ctx<'_>) -> Result<bool, Violation> {
        let b = &self.rx_buf[self.rx_start..self.rx_end];
        let flags = be16(&b[4..]);
        let kind = be16(&b[6..]);
        let cookie = be64(&b[8..]);
        let length = be32(&b[16..]);
        let avail = b.len();
        if !self.neg.structured {
            return Err("structured reply that was not agreed");
        }
        let c = self.lookup(cookie)?;
        let cmd = &self.cmds[usize::from(c)];
        let done = flags & REPLY_FLAG_DONE != 0;
        let hdr = STRUCTURED_REPLY_LEN;
        let end = cmd.offset + u64::from(cmd.len);
        match kind {
            REPLY_TYPE_NONE => {
                if length != 0 || !done {
                    return Err("bad NBD_REPLY_TYPE_NONE");
                }
                self.rx_start += hdr;
                self.chunk_done(ctx, c, true)?;
            }
            REPLY_TYPE_OFFSET_DATA => {
                if cmd.kind != CMD_READ || length < 9 {
                    return Err("bad data chunk");
                }
                if avail < hdr + 8 {
                    return Ok(false);
                }
                let off = be64(&b[hdr..]);
                let n = u64::from(length - 8);
                if off < cmd.offset || off.checked_add(n).is_none_or(|e| e > end) {
                    return Err("data chunk outside the request");
                }
                let io_off = cmd.io_off + (off - cmd.offset);
                self.cmds[usize::from(c)].got += n;
                self.rx_start += hdr + 8;
                self.rx = Rx::Data {
                    cmd: c,
                    io_off,
                    left: n,
                    done,
                };
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if cmd.kind != CMD_READ || length != 12 {
                    return Err("bad hole chunk");
                }
                if avail < hdr + 12 {
                    return Ok(false);
                }
                let off = be64(&b[hdr..]);
                let n = u64::from(be32(&b[hdr + 8..]));
                if n == 0 || off < cmd.offset || off.checked_add(n).is_none_or(|e| e > end) {
                    return Err("hole chunk outside the request");
                }
                let io = &self.ios[usize::from(cmd.io)];
                // SAFETY: the read is pending; `zero` stops at the iovecs' end.
                unsafe {
                    iov::zero(
                        iovecs(io.iov, io.iov_count),
                        cmd.io_off + (off - cmd.offset),
                        n,
                    )
                };
                self.cmds[usize::from(c)].got += n;
                self.rx_start += hdr + 12;
                self.chunk_done(ctx, c, done)?;
            }
            k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_ERR_CHUNK).contains(&length) {
                    return Err("bad error chunk length");
                }
                let total = hdr + length as usize;
                if avail < total {
                    return Ok(false);
                }
                let p = &b[hdr..total];
                let err = be32(p);
                let msg_len = usize::from(be16(&p[4..]));
                if msg_len > length as usize - 6 {
                    return Err("error message longer than its chunk");
                }
                if self.log.allow() {
                    let msg: String = String::from_utf8_lossy(&p[6..6 + msg_len.min(200)])
                        .chars()
                        .filter(|ch| !ch.is_control())
                        .collect();
                    log::warn!(
                        "nbd {}: server error {err} on {} at {}: {msg}{}",
                        self.shared.name,
                        cmd_name(cmd.kind),
                        cmd.offset,
                        self.log.suppressed_note()
                    );
                }
                // An error chunk must carry an error; one that does not still failed.
                let cmd = &mut self.cmds[usize::from(c)];
                cmd.err.get_or_insert(if err == 0 { 5 } else { err });
                self.rx_start += total;
                self.chunk_done(ctx, c, done)?;
            }
            _ => return Err("unexpected chunk type"),
        }
        Ok(true)
    }

    /// The payload of a data chunk (or a simple read reply) is in.
    fn data_done(&mut self, ctx: &mut Ctx<'_>, c: u16, done: bool) -> Result<(), Violation> {
        if !done {
            return Ok(());
        }
        if self.neg.structured {
            self.chunk_done(ctx, c, true)
        } else {
            self.reply_done(ctx, c, 0);
            Ok(())
        }
    }

    fn chunk_done(&mut self, ctx: &mut Ctx<'_>, c: u16, done: bool) -> Result<(), Violation> {
        if !done {
            return Ok(());
        }
        let cmd = &self.cmds[usize::from(c)];
        if cmd.kind == CMD_READ && cmd.err.is_none() && cmd.got != u64::from(cmd.len) {
            return Err("read reply does not cover the request");
        }
        let err = cmd.err.unwrap_or(0);
        self.reply_done(ctx, c, err);
        Ok(())
    }

    /// A command's reply is complete with server error `err` (0: success).
    fn reply_done(&mut self, ctx: &mut Ctx<'_>, c: u16, err: u32) {
        if err == ESHUTDOWN {
            // The server is going away and asks us to leave: the command was not done, and
            // goes to the next connection with the others.
            self.cmds[usize::from(c)].err = None;
            self.break_conn(ctx, "the server is shutting down");
            return;
        }
        self.settle(c, err);
    }

    fn settle(&mut self, c: u16, err: u32) {
        // A reply is progress: the server is there and working.
        self.progress = true;
        self.outage_since = None;
        self.flaps = 0;
        let cmd = &mut self.cmds[usize::from(c)];
        let result = match err {
            0 => Ok(()),
            e => {
                let errno = errno(e);
                // A discard is a hint: a server that cannot do it still succeeded.
                if cmd.kind == CMD_TRIM && errno == libc::EOPNOTSUPP {
                    Ok(())
                } else {
                    Err(BlockError::Io(errno))
                }
            }
        };
        if cmd.state == CmdState::Sending {
            cmd.replied = Some(result);
        } else {
            self.finish_cmd(c, result);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.conns.fetch_sub(1, Ordering::AcqRel);
        // A connection the connector delivered after this poller retired goes back to it.
        if let Some(c) = self.mailbox.close() {
            let _ = self.shared.connector.send(Msg::Park(c));
        }
    }
}

fn cmd_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write-zeroes",
        _ => "command",
    }
}
