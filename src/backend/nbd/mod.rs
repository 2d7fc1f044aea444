//! NBD client backend (`--nbd URI`): a native client on the reactors' io_uring, no C library
//! and no thread on the data path.
//!
//! - `uri`: `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`.
//! - `handshake`: fixed newstyle, structured replies, NBD_OPT_GO (blocking, bounded; never
//!   on a reactor).
//! - `connector`: one thread per device that makes later connections with backoff.
//! - `conn`: one connection per reactor serving the device, its whole data path.
//! - `channel`: the connection's poller and the per-queue channels that share it.
//!
//! One connection per reactor only when the server says NBD_FLAG_CAN_MULTI_CONN: without it
//! a flush on one connection need not cover writes completed on another, so the device asks
//! for a single reactor (`BackendInfo::single_reactor`) and gets exactly one connection.
//! The export's size and flags become the device's: read-only, flush, discard (TRIM) and
//! write-zeroes are offered when the server offers them.

mod channel;
mod conn;
mod connector;
mod handshake;
mod iov;
mod proto;
mod table;
mod uri;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::BackendError;
use crate::blk::backend::{BackendInfo, Channel, ResizeError};
use crate::blk::model::Caps;
use crate::blk::Backend;
use crate::engine::stats::duration_to_ticks;
use crate::engine::{Ctx, PollerId};
use channel::{ConnPoller, NbdChannel};
use connector::{Mailbox, Msg, Spare};
use handshake::Goal;
use proto::*;

/// The longest any one connection attempt (connect and handshake) may take: a server that
/// is slower than this to say hello is retried rather than waited for.
const MAX_HANDSHAKE: Duration = Duration::from_secs(10);

/// What every connection of one device shares (read-only after `open`, but for the spare
/// connection and the count).
pub struct Shared {
    /// Unique per backend instance: keys the reactors' connection maps.
    id: u64,
    /// The URI, for logs.
    name: String,
    target: uri::Target,
    timeout: Duration,
    timeout_ticks: u64,
    handshake_timeout: Duration,
    /// What the first connection negotiated: the device is built from it.
    info: Negotiated,
    /// The first connection, until a reactor takes it (and idle ones handed back).
    spare: Spare,
    connector: Sender<Msg>,
    /// Connection pollers alive (one per reactor serving the device).
    conns: AtomicUsize,
}

pub struct NbdBackend {
    shared: Arc<Shared>,
    read_only: bool,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdBackend({})", self.shared.name)
    }
}

pub fn open(
    uri: &str,
    timeout: Duration,
    read_only: bool,
) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(open_nbd(uri, timeout, read_only)?))
}

fn open_nbd(uri: &str, timeout: Duration, read_only: bool) -> Result<NbdBackend, BackendError> {
    let target = uri::parse(uri).map_err(BackendError::Connect)?;
    let name = target.to_string();
    let handshake_timeout = timeout.clamp(Duration::from_secs(1), MAX_HANDSHAKE);
    // The first connection is made here, on the thread that adds the device (it may block
    // for the handshake's deadline): the device's size and flags come from it, and a wrong
    // URI or a missing export fails the device before anything is served.
    let first = handshake::connect(&target, handshake_timeout, Goal::Go)
        .map_err(|e| BackendError::Connect(format!("nbd {name}: {e}")))?;
    let info = first.neg;
    log::info!(
        "nbd {name}: {} bytes, flags {:#x} ({}{}{}{}{}{}), {} replies, max payload {} bytes",
        info.size,
        info.flags,
        if info.has(TFLAG_READ_ONLY) {
            "read-only"
        } else {
            "read-write"
        },
        if info.has(TFLAG_SEND_FLUSH) {
            ", flush"
        } else {
            ""
        },
        if info.has(TFLAG_SEND_FUA) {
            ", fua"
        } else {
            ""
        },
        if info.has(TFLAG_SEND_TRIM) {
            ", trim"
        } else {
            ""
        },
        if info.has(TFLAG_SEND_WRITE_ZEROES) {
            ", write-zeroes"
        } else {
            ""
        },
        if info.has(TFLAG_CAN_MULTI_CONN) {
            ", multi-conn"
        } else {
            ", one connection"
        },
        if info.structured {
            "structured"
        } else {
            "simple"
        },
        info.max_payload,
    );
    if info.min_block > 512 {
        log::warn!(
            "nbd {name}: the server's minimum block size is {} bytes: give the device at \
             least that logical block size (--logical-block-size 4096)",
            info.min_block
        );
    }
    let spare: Spare = Arc::new(Mutex::new(Some(first)));
    let connector = connector::spawn(
        name.clone(),
        target.clone(),
        handshake_timeout,
        Arc::clone(&spare),
    )
    .map_err(|e| BackendError::Connect(format!("nbd {name}: cannot start a thread: {e}")))?;
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let shared = Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name,
        target,
        timeout,
        timeout_ticks: duration_to_ticks(timeout),
        handshake_timeout,
        info,
        spare,
        connector,
        conns: AtomicUsize::new(0),
    };
    Ok(NbdBackend {
        shared: Arc::new(shared),
        read_only,
    })
}

impl Backend for NbdBackend {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn info(&self) -> BackendInfo {
        let i = &self.shared.info;
        BackendInfo {
            size: i.size,
            caps: Caps {
                flush: i.has(TFLAG_SEND_FLUSH),
                discard: i.has(TFLAG_SEND_TRIM),
                write_zeroes: i.has(TFLAG_SEND_WRITE_ZEROES),
            },
            read_only: self.read_only || i.has(TFLAG_READ_ONLY),
            single_reactor: !i.has(TFLAG_CAN_MULTI_CONN),
        }
    }

    fn open_channel(&self, ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>> {
        let s = &self.shared;
        let conn = match channel::find(s.id) {
            Some(c) => c,
            None => {
                if !s.info.has(TFLAG_CAN_MULTI_CONN) && s.conns.load(Ordering::Acquire) > 0 {
                    // A flush on one connection would not cover another's writes.
                    return Err(io::Error::other(format!(
                        "nbd {}: the server does not allow several connections; every queue \
                         of the device must run on one reactor",
                        s.name
                    )));
                }
                let mailbox = Mailbox::new(ctx.handle().cloned());
                let conn = Rc::new(RefCell::new(conn::Conn::new(Arc::clone(s), mailbox)?));
                let poller = ConnPoller {
                    conn: Rc::clone(&conn),
                    describe: format!("nbd connection to {}", s.name),
                };
                if !ctx.spawn(PollerId::next(), Box::new(poller)) {
                    return Err(io::Error::other("nbd: no reactor to run the connection on"));
                }
                channel::register(s.id, &conn);
                conn.borrow_mut().start();
                conn
            }
        };
        let idx = conn.borrow_mut().add_channel();
        Ok(Box::new(NbdChannel { conn, idx }))
    }

    /// Asks the server on a connection of its own (NBD_OPT_INFO): the export may have been
    /// resized behind it. Connections already open keep serving meanwhile.
    fn resize(&self, new: Option<u64>) -> Result<u64, ResizeError> {
        if new.is_some() {
            return Err(ResizeError::NotSupported);
        }
        let s = &self.shared;
        let c = handshake::connect(&s.target, s.handshake_timeout, Goal::Info).map_err(|e| {
            if e.kind() == io::ErrorKind::Other && e.to_string().contains("unsupported") {
                ResizeError::NotSupported
            } else {
                ResizeError::Io(e)
            }
        })?;
        Ok(c.neg.size)
    }
}

#[cfg(test)]
mod tests;
