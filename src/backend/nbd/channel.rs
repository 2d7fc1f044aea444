//! How the reactor and the front end reach a connection: the connection's poller (spawned
//! by the first channel opened on a reactor) and the channels (one per queue), which share
//! the connection through reactor-local state. Nothing here crosses threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use super::conn::Conn;
#[cfg(test)]
use super::conn::State;
use crate::blk::{BlockError, BlockRequest, Channel, Submitted};
use crate::engine::{Armed, Ctx, Poller};

thread_local! {
    /// This reactor's connection per NBD backend (by backend id). Weak: the poller owns the
    /// connection, and a retired poller's entry just fails to upgrade.
    static CONNS: RefCell<HashMap<u64, Weak<RefCell<Conn>>>> = RefCell::new(HashMap::new());
}

/// The connection of backend `id` on this reactor, if one runs.
pub fn find(id: u64) -> Option<Rc<RefCell<Conn>>> {
    CONNS.with(|m| m.borrow().get(&id).and_then(Weak::upgrade))
}

pub fn register(id: u64, conn: &Rc<RefCell<Conn>>) {
    CONNS.with(|m| {
        let mut m = m.borrow_mut();
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(id, Rc::downgrade(conn));
    });
}

pub struct ConnPoller {
    pub conn: Rc<RefCell<Conn>>,
    pub describe: String,
}

impl Poller for ConnPoller {
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        self.conn.borrow_mut().poll(ctx)
    }

    fn complete(&mut self, ctx: &mut Ctx<'_>, tag: u64, result: i32) {
        self.conn.borrow_mut().complete(ctx, tag, result);
    }

    fn end_pass(&mut self, ctx: &mut Ctx<'_>) {
        self.conn.borrow_mut().end_pass(ctx);
    }

    /// Replies arrive through a background receive, whose wake-up may be lost in the
    /// reactor's race with the kernel: while replies are due (or a timer runs), poll.
    fn arm(&mut self) -> Armed {
        if self.conn.borrow().needs_polling() {
            Armed::Poll
        } else {
            Armed::Sleep
        }
    }

    fn stop(&mut self, _ctx: &mut Ctx<'_>) {
        self.conn.borrow_mut().stop();
    }

    fn drained(&self) -> bool {
        self.conn.borrow().idle()
    }

    fn done(&self) -> bool {
        self.conn.borrow().idle()
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

pub struct NbdChannel {
    pub conn: Rc<RefCell<Conn>>,
    pub idx: usize,
}

impl Channel for NbdChannel {
    fn room(&self, _ctx: &Ctx<'_>) -> u32 {
        self.conn.borrow().room()
    }

    unsafe fn submit(&mut self, _ctx: &mut Ctx<'_>, req: &BlockRequest) -> Submitted {
        // The connection's poller sends at the end of the pass, with its own context (its
        // completions must come back to it, not to this queue).
        // SAFETY: forwarded from the caller: the iovecs stay valid until completion.
        unsafe { self.conn.borrow_mut().submit(self.idx, req) }
    }

    fn reap(
        &mut self,
        _ctx: &mut Ctx<'_>,
        done: &mut dyn FnMut(u64, Result<(), BlockError>),
    ) -> u32 {
        self.conn.borrow_mut().take_completions(self.idx, done)
    }
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        self.conn.borrow_mut().remove_channel(self.idx);
    }
}

/// For tests: the state of this reactor's connection of backend `id`.
#[cfg(test)]
pub fn state(id: u64) -> Option<State> {
    find(id).map(|c| c.borrow().state())
}
