//! The backend's connector: one thread per NBD device that makes every connection after the
//! first (which `open` makes) and says goodbye to connections nobody needs any more.
//!
//! Why a thread: a reactor must never wait for a server, and its seccomp filter (rightly)
//! allows neither `socket` nor `connect` nor `clone`. The connector is spawned by the thread
//! that opens the device (a control thread), runs under the control filter, sleeps on a
//! channel, and does blocking, deadline-bounded work: resolving, connecting, the handshake,
//! backoff between attempts. A connection it makes goes into the asking connection's
//! mailbox, and the reactor is woken by an empty message so it looks there at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::handshake::{self, Connected, Goal};
use super::proto;
use super::uri::Target;
use crate::engine::ratelimit::RateLimit;
use crate::engine::ReactorHandle;

/// Where a new connection for one reactor's connection poller is left.
pub struct Mailbox {
    slot: Mutex<Option<Connected>>,
    /// The poller is gone: stop trying for it.
    closed: AtomicBool,
    /// Woken (with an empty message) when a connection is left here.
    waker: Option<ReactorHandle>,
}

impl Mailbox {
    pub fn new(waker: Option<ReactorHandle>) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            slot: Mutex::new(None),
            closed: AtomicBool::new(false),
            waker,
        })
    }

    pub fn put(&self, c: Connected) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        if let Some(h) = &self.waker {
            h.run(|_| {});
        }
    }

    pub fn take(&self) -> Option<Connected> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The poller is gone; a connection already delivered is handed back.
    pub fn close(&self) -> Option<Connected> {
        self.closed.store(true, Ordering::Release);
        self.take()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

pub enum Msg {
    /// Connect for this mailbox, after `delay` (backoff when connections keep breaking).
    Connect(Arc<Mailbox>, Duration),
    /// A healthy idle connection whose poller retired: kept for the next poller, or closed
    /// with NBD_CMD_DISC if one is kept already.
    Park(Connected),
}

/// The first connection, kept until a reactor's connection poller takes it.
pub type Spare = Arc<Mutex<Option<Connected>>>;

/// Time between attempts: quick at first (a restarting server is back in well under a
/// second), then at most two seconds apart, for as long as anyone wants the connection.
fn backoff(attempt: u32) -> Duration {
    match attempt {
        0 => Duration::ZERO,
        n => Duration::from_millis(50u64 << (n - 1).min(6)).min(Duration::from_secs(2)),
    }
}

struct Wanted {
    mb: Arc<Mailbox>,
    attempt: u32,
    at: Instant,
}

pub fn spawn(
    name: String,
    target: Target,
    timeout: Duration,
    spare: Spare,
) -> std::io::Result<Sender<Msg>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("nbd-connect".into())
        .spawn(move || {
            confine();
            run(&name, &target, timeout, &spare, &rx);
            // The backend is gone: say goodbye on the connection nobody took.
            let kept = spare.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(c) = kept {
                disconnect(c);
            }
        })?;
    Ok(tx)
}

/// The thread runs under the control filter: inherited when spawned by a confined control
/// thread, installed here when the device was opened at start-up, before the control
/// thread confined itself.
fn confine() {
    // SAFETY: PR_GET_SECCOMP takes no pointers; it returns the calling thread's mode.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode == 0 {
        if let Err(e) = crate::sandbox::confine(crate::sandbox::ThreadKind::Control) {
            log::error!("nbd connector: cannot install its seccomp filter: {e}");
            std::process::abort();
        }
    } else {
        crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
    }
}

fn run(name: &str, target: &Target, timeout: Duration, spare: &Spare, rx: &Receiver<Msg>) {
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut log = RateLimit::new();
    loop {
        let next = wanted.iter().map(|w| w.at).min();
        let msg = match next {
            None => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        match msg {
            Some(Msg::Connect(mb, delay)) => wanted.push(Wanted {
                mb,
                attempt: 0,
                at: Instant::now() + delay,
            }),
            Some(Msg::Park(c)) => {
                let mut s = spare.lock().unwrap_or_else(|e| e.into_inner());
                if s.is_none() {
                    *s = Some(c);
                } else {
                    drop(s);
                    disconnect(c);
                }
            }
            None => {}
        }
        wanted.retain(|w| !w.mb.is_closed());
        let now = Instant::now();
        let mut i = 0;
        while i < wanted.len() {
            if wanted[i].at > now {
                i += 1;
                continue;
            }
            // An idle connection handed back by a retiring poller serves first (it may be
            // stale: then the poller finds out and asks again).
            let kept = spare.lock().unwrap_or_else(|e| e.into_inner()).take();
            let reused = kept.is_some();
            let result = match kept {
                Some(c) => Ok(c),
                None => handshake::connect(target, timeout, Goal::Go),
            };
            match result {
                Ok(c) => {
                    let w = wanted.swap_remove(i);
                    if reused {
                        log::debug!("nbd {name}: handing on an idle connection");
                    } else {
                        log::info!(
                            "nbd {name}: connected ({} bytes, flags {:#x}{})",
                            c.neg.size,
                            c.neg.flags,
                            if w.attempt > 0 {
                                format!(", after {} failed attempts", w.attempt)
                            } else {
                                String::new()
                            }
                        );
                    }
                    w.mb.put(c);
                }
                Err(e) => {
                    let w = &mut wanted[i];
                    w.attempt += 1;
                    let wait = backoff(w.attempt);
                    w.at = Instant::now() + wait;
                    if log.allow() {
                        log::warn!(
                            "nbd {name}: connecting failed: {e}; retrying in {wait:?}{}",
                            log.suppressed_note()
                        );
                    }
                    i += 1;
                }
            }
        }
    }
}

/// A soft disconnect (NBD_CMD_DISC), as the protocol asks of a client that leaves; the
/// socket closes right after. Never waits: a server that cannot take 28 bytes now gets a
/// hard disconnect instead.
fn disconnect(c: Connected) {
    use std::os::unix::io::AsRawFd;
    let h = proto::request(0, proto::CMD_DISC, 0, 0, 0);
    // SAFETY: sends from a live 28-byte buffer on a socket this function owns.
    unsafe {
        libc::send(
            c.fd.as_raw_fd(),
            h.as_ptr().cast(),
            h.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(2));
    }
}
