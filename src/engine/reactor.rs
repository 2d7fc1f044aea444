//! One reactor: a pinned thread that owns its pollers and its io_uring outright and runs
//! them in a loop, SPDK's `_reactor_run`: messages, completions, one pass over every poller,
//! one submission; then busy/idle accounting and, when idle long enough, sleep.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};

use super::epoll::Epoll;
use super::eventfd::EventFd;
use super::poller::{split_user_data, Armed, Ctx, Poller, PollerId, Spawned};
use super::spin::{Spin, SLEEP_WAITS_OVER};
use super::stats::{duration_to_ticks, ticks, ReactorStats};
use super::uring::Uring;
use super::{Message, PollMode, ReactorHandle, Settings};

/// A poller idle this long while its reactor stays busy is asked to park (`Poller::park`):
/// a busy reactor then polls only hot queues, however many idle devices it carries.
/// Waking a parked queue costs its driver one kick; at this distance between requests that
/// is noise.
pub const PARK_AFTER: Duration = Duration::from_millis(1);

const TOKEN_MESSAGE: u64 = u64::MAX;
const TOKEN_URING: u64 = u64::MAX - 1;

/// Called on the reactor with the poller once it has drained and left the reactor.
pub type OnStopped = Box<dyn FnOnce(Box<dyn Poller>) + Send>;

/// The context a poller in `slot` gets. A macro, not a method: the caller holds a mutable
/// borrow of the slot table while the context borrows the ring and the spawn list.
macro_rules! reactor_ctx {
    ($r:ident, $slot:expr) => {
        Ctx::with(
            &mut $r.ring,
            $slot,
            $r.index,
            &mut $r.spawned,
            Some(&$r.handle),
        )
    };
}

struct Slot {
    id: PollerId,
    poller: Box<dyn Poller>,
    wake_fds: Vec<RawFd>,
    on_stopped: Option<OnStopped>,
    /// Skipped by passes until a completion for it arrives.
    parked: bool,
    /// When its `poll` last found work (ticks).
    busy_at: u64,
}

pub struct Reactor {
    index: usize,
    cpu: usize,
    mode: PollMode,
    idle_spin: Duration,
    idle_spin_ticks: u64,
    park_ticks: u64,
    /// How long waits for I/O completions last (I/O in flight, pollers idle), and so
    /// whether to spin through the next one.
    io_wait: Spin,
    rx: Receiver<Message>,
    wake: Arc<EventFd>,
    /// This reactor as other threads reach it (handed to pollers that need it).
    handle: ReactorHandle,
    ring: Uring,
    /// Pollers spawned by pollers during a call, added right after it.
    spawned: Spawned,
    epoll: Epoll,
    /// Slot index = io_uring user data high bits; a slot is reused only after its poller has
    /// drained, so no stale CQE can reach a new poller.
    slots: Vec<Option<Slot>>,
    /// The slots passes visit: occupied and not parked. With hundreds of idle devices
    /// parked on a reactor, a pass costs what its hot queues cost, not a walk over all.
    active: Vec<usize>,
    /// Occupied slots.
    occupied: usize,
    stats: ReactorStats,
    shutting_down: bool,
}

impl Reactor {
    pub(super) fn new(
        handle: ReactorHandle,
        settings: Settings,
        rx: Receiver<Message>,
        wake: Arc<EventFd>,
    ) -> std::io::Result<Reactor> {
        let (index, cpu) = (handle.index, handle.cpu);
        // Built on the reactor's own thread: its state never crosses threads.
        let ring = Uring::new()?;
        // Edge-triggered: a kick fd is never read (a frontend may have made it blocking),
        // and each write to an eventfd raises a new edge.
        let epoll = Epoll::new()?;
        epoll.add_edge(wake.as_raw_fd(), TOKEN_MESSAGE)?;
        epoll.add_edge(ring.fd(), TOKEN_URING)?;
        let mut r = Reactor {
            index,
            cpu,
            mode: settings.mode,
            idle_spin: settings.idle_spin,
            idle_spin_ticks: 0,
            park_ticks: duration_to_ticks(PARK_AFTER),
            io_wait: Spin::new(0, duration_to_ticks(SLEEP_WAITS_OVER)),
            rx,
            wake,
            handle,
            ring,
            spawned: Vec::new(),
            epoll,
            slots: Vec::new(),
            active: Vec::new(),
            occupied: 0,
            stats: ReactorStats::default(),
            shutting_down: false,
        };
        r.set_mode(settings);
        Ok(r)
    }

    pub fn stats(&self) -> ReactorStats {
        self.stats
    }

    pub fn settings(&self) -> Settings {
        Settings {
            mode: self.mode,
            idle_spin: self.idle_spin,
        }
    }

    /// Changes the poll mode and idle spin; takes effect at the next loop iteration.
    pub fn set_mode(&mut self, s: Settings) {
        self.mode = s.mode;
        self.idle_spin = s.idle_spin;
        self.idle_spin_ticks = duration_to_ticks(s.idle_spin);
        self.io_wait.set_max(self.idle_spin_ticks);
    }

    /// How many pollers run here (stopping ones included).
    pub fn poller_count(&self) -> usize {
        self.occupied
    }

    /// How many of them are parked (not polled until a completion wakes them).
    pub fn parked_count(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.parked).count()
    }

    /// Adds a poller built on this thread by `make` (which may submit to the ring through
    /// its context; `None` if it could not be built). Its wake-up fds join the reactor's
    /// sleep set.
    pub fn add_poller(
        &mut self,
        id: PollerId,
        make: impl FnOnce(&mut Ctx<'_>) -> Option<Box<dyn Poller>>,
    ) {
        let slot = self.free_slot();
        let mut ctx = reactor_ctx!(self, slot);
        let poller = make(&mut ctx);
        if let Some(p) = poller {
            self.insert(slot, id, p);
        }
        self.add_spawned();
    }

    fn free_slot(&mut self) -> usize {
        match self.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        }
    }

    fn insert(&mut self, slot: usize, id: PollerId, poller: Box<dyn Poller>) {
        let wake_fds = poller.wake_fds();
        for &fd in &wake_fds {
            if let Err(e) = self.epoll.add_edge(fd, slot as u64) {
                log::warn!("reactor_{}: cannot watch fd {fd}: {e}", self.index);
            }
        }
        log::info!(
            "reactor_{} (cpu {}): polling {}",
            self.index,
            self.cpu,
            poller.describe()
        );
        self.slots[slot] = Some(Slot {
            id,
            poller,
            wake_fds,
            on_stopped: None,
            parked: false,
            busy_at: ticks(),
        });
        self.occupied += 1;
        self.active.push(slot);
    }

    /// Adds the pollers that pollers spawned.
    fn add_spawned(&mut self) {
        while let Some((id, p)) = self.spawned.pop() {
            // The slot must be reserved before insert: a spawned poller's context has none.
            let slot = self.free_slot();
            self.insert(slot, id, p);
        }
    }

    /// The running poller `id`, if it is here and not stopping.
    pub fn poller_mut(&mut self, id: PollerId) -> Option<&mut dyn Poller> {
        self.slots
            .iter_mut()
            .flatten()
            .find(|s| s.id == id && s.on_stopped.is_none())
            .map(|s| &mut *s.poller)
    }

    /// Asks poller `id` to stop; `on_stopped` gets it once drained. A poller that is not here
    /// (never started, or already stopping) is not waited for: `on_stopped` is dropped.
    pub fn stop_poller(&mut self, id: PollerId, on_stopped: OnStopped) {
        let Some((slot, s)) = self
            .slots
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| s.as_mut().filter(|s| s.id == id).map(|s| (i, s)))
        else {
            return;
        };
        if s.on_stopped.is_some() {
            return;
        }
        s.on_stopped = Some(on_stopped);
        if s.parked {
            // Passes (and `retire`) must see it until it has drained.
            s.parked = false;
            self.active.push(slot);
        }
        let mut ctx = reactor_ctx!(self, slot);
        s.poller.stop(&mut ctx);
        self.add_spawned();
    }

    pub(super) fn run(mut self) -> ReactorStats {
        if !crate::cpuset::pin_current_thread(self.cpu) {
            log::warn!("reactor_{}: could not pin to cpu {}", self.index, self.cpu);
        }
        if let Err(e) = crate::sandbox::confine(crate::sandbox::ThreadKind::Reactor) {
            log::error!(
                "reactor_{}: cannot install its seccomp filter: {e}",
                self.index
            );
            std::process::abort();
        }
        log::debug!("reactor_{} running on cpu {}", self.index, self.cpu);
        let mut last = ticks();
        let mut idle_since: Option<u64> = None;
        loop {
            let mut work = self.handle_messages();
            if self.shutting_down && self.occupied == 0 {
                break;
            }
            work += self.reap();
            let pass_start = ticks();
            let mut i = 0;
            while i < self.active.len() {
                let slot = self.active[i];
                let Some(s) = self.slots[slot].as_mut() else {
                    self.active.swap_remove(i);
                    continue;
                };
                let mut ctx = reactor_ctx!(self, slot);
                let n = s.poller.poll(&mut ctx);
                work += n;
                if n > 0 {
                    s.busy_at = pass_start;
                } else if pass_start.wrapping_sub(s.busy_at) >= self.park_ticks
                    && s.on_stopped.is_none()
                    && s.poller.park(&mut ctx)
                {
                    s.parked = true;
                    self.stats.parks += 1;
                    self.active.swap_remove(i);
                    continue;
                }
                i += 1;
            }
            self.add_spawned();
            self.end_pass();
            if let Err(e) = self.ring.submit() {
                log::error!("reactor_{}: io_uring submit failed: {e}", self.index);
            }
            self.retire();

            let now = ticks();
            let spent = now.wrapping_sub(last);
            last = now;
            if work > 0 {
                self.stats.busy_ticks += spent;
                idle_since = None;
                self.io_wait.worked(now);
                continue;
            }
            self.stats.idle_ticks += spent;
            let start = *idle_since.get_or_insert(now);
            let should_sleep = match self.mode {
                PollMode::Interrupt => true,
                PollMode::Adaptive => {
                    let spin = if self.ring.in_flight() > 0 {
                        self.io_wait.waiting(start);
                        self.io_wait.budget()
                    } else {
                        self.idle_spin_ticks
                    };
                    now.wrapping_sub(start) >= spin
                }
                // Nothing to poll: even poll mode sleeps until a poller arrives.
                PollMode::Poll => self.occupied == 0,
            };
            if !should_sleep && self.mode == PollMode::Adaptive && self.ring.in_flight() > 0 {
                // Waiting on the kernel's I/O: let whatever does it (an io-wq worker woken on
                // this CPU) run now rather than when we sleep (see `spin`).
                // SAFETY: sched_yield takes no arguments and cannot fail in a way that matters.
                unsafe { libc::sched_yield() };
            }
            if should_sleep {
                self.sleep();
                last = ticks();
                idle_since = None;
            }
        }
        self.stats
    }

    fn handle_messages(&mut self) -> u32 {
        let mut n = 0;
        loop {
            match self.rx.try_recv() {
                Ok(Message::Run(f)) => {
                    n += 1;
                    f(self);
                }
                Ok(Message::Shutdown) => {
                    n += 1;
                    self.shutting_down = true;
                    let ids: Vec<PollerId> = self.slots.iter().flatten().map(|s| s.id).collect();
                    for id in ids {
                        self.stop_poller(id, Box::new(drop));
                    }
                }
                Err(TryRecvError::Empty) => return n,
                Err(TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    return n;
                }
            }
        }
    }

    fn reap(&mut self) -> u32 {
        let (slots, ring, index) = (&mut self.slots, &mut self.ring, self.index);
        let active = &mut self.active;
        let (spawned, handle) = (&mut self.spawned, &self.handle);
        // Completions are collected first: a poller's `complete` may push to the ring.
        let mut done = [(0u64, 0i32); 64];
        let mut total = 0;
        loop {
            let n = ring.reap_into(&mut done);
            for &(ud, res) in &done[..n] {
                let (slot, tag) = split_user_data(ud);
                if let Some(Some(s)) = slots.get_mut(slot) {
                    if s.parked {
                        // Whatever it armed (or anything else of its own) came back: it is
                        // polled again from this pass on.
                        s.parked = false;
                        s.busy_at = ticks();
                        active.push(slot);
                    }
                    let mut ctx = Ctx::with(ring, slot, index, spawned, Some(handle));
                    s.poller.complete(&mut ctx, tag, res);
                }
            }
            total += n as u32;
            if n < done.len() {
                self.add_spawned();
                return total;
            }
        }
    }

    fn end_pass(&mut self) {
        for i in 0..self.active.len() {
            let slot = self.active[i];
            if let Some(s) = self.slots[slot].as_mut() {
                let mut ctx = reactor_ctx!(self, slot);
                s.poller.end_pass(&mut ctx);
            }
        }
        self.add_spawned();
    }

    /// Lets stopping pollers that have drained go, and pollers that say they are done.
    /// Parked pollers are not asked: a stopping poller is unparked, and a parked one has
    /// armed a completion it waits for, so it is not done.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let slot = self.active[i];
            let done = matches!(&self.slots[slot],
                Some(s) if (s.on_stopped.is_some() && s.poller.drained()) || s.poller.done());
            if !done {
                i += 1;
                continue;
            }
            self.active.swap_remove(i);
            let Some(s) = self.slots[slot].take() else {
                continue;
            };
            self.occupied -= 1;
            for &fd in &s.wake_fds {
                let _ = self.epoll.delete(fd);
            }
            log::info!("reactor_{}: stopped {}", self.index, s.poller.describe());
            if let Some(f) = s.on_stopped {
                f(s.poller);
            }
        }
    }

    /// Arms every wakeup source, re-checks for work that raced in, then blocks in epoll.
    fn sleep(&mut self) {
        // SQEs the kernel has not taken yet would never complete while we sleep.
        if self.ring.pending() > 0 {
            if let Err(e) = self.ring.submit() {
                log::error!("reactor_{}: io_uring submit failed: {e}", self.index);
            }
            if self.ring.pending() > 0 {
                return;
            }
        }
        let mut timeout_ms = -1;
        let mut raced = false;
        // A parked poller armed its wake-up when it parked.
        for &slot in &self.active {
            let Some(s) = self.slots[slot].as_mut() else {
                continue;
            };
            match s.poller.arm() {
                Armed::Ready => raced = true,
                // A frontend that gave no kick fd polls too: look again every millisecond.
                Armed::Poll => timeout_ms = 1,
                Armed::Sleep => {}
            }
        }
        // Completions wake the epoll wait through the ring's fd, race-free (see `Uring::fd`);
        // those that came before it are seen here. Background operations (notifications a
        // frontend has not consumed yet) complete whenever it reads its call fd and wake us
        // to reap them like any other.
        raced |= self.ring.has_completions();
        raced |= !self.rx.is_empty();
        if !raced {
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
            let t0 = ticks();
            let mut woken = false;
            match self.epoll.wait(&mut events, timeout_ms) {
                Ok(tokens) => {
                    for token in tokens {
                        woken = true;
                        // Kick fds and the ring are edge-triggered and never read: only the
                        // message eventfd is drained.
                        if token == TOKEN_MESSAGE {
                            self.wake.drain();
                        }
                    }
                }
                Err(e) => log::error!("reactor_{}: epoll_wait failed: {e}", self.index),
            }
            self.stats.sleeps += 1;
            self.stats.sleep_ticks += ticks().wrapping_sub(t0);
            if woken {
                self.stats.wakeups += 1;
            }
        }
        // A parked poller keeps its wake-up armed: it is not polled until it fires.
        for &slot in &self.active {
            if let Some(s) = self.slots[slot].as_mut() {
                s.poller.disarm();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use io_uring::{opcode, types, IoUring};

    use super::super::poller::{Armed, Ctx, Poller, PollerId};
    use super::super::{Engine, PollMode, Settings};

    /// Reports each completion it gets; does nothing else.
    struct Listener(crossbeam_channel::Sender<(u64, i32)>);

    impl Poller for Listener {
        fn poll(&mut self, _ctx: &mut Ctx<'_>) -> u32 {
            0
        }
        fn complete(&mut self, _ctx: &mut Ctx<'_>, tag: u64, result: i32) {
            let _ = self.0.send((tag, result));
        }
        fn arm(&mut self) -> Armed {
            Armed::Sleep
        }
        fn stop(&mut self, _ctx: &mut Ctx<'_>) {}
        fn drained(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "listener".into()
        }
    }

    #[test]
    fn a_sleeping_reactor_is_woken_by_a_completion_from_another_thread() {
        // A CQE another thread posts (a message from another ring; an io-wq worker's
        // completion) interrupts no system call: only the ring's fd in the sleep set wakes
        // the reactor, and nothing bounds the sleep.
        let settings = Settings {
            mode: PollMode::Interrupt,
            idle_spin: Duration::ZERO,
        };
        let engine = Engine::start(&[0], settings).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let reactor = engine.reactors()[0].clone();
        let (ring_fd, user_data) = reactor
            .call(Duration::from_secs(5), move |re| {
                let (slot_tx, slot_rx) = crossbeam_channel::bounded(1);
                re.add_poller(PollerId::next(), |ctx| {
                    let _ = slot_tx.send(ctx.user_data(7));
                    Some(Box::new(Listener(tx)))
                });
                (re.ring.fd(), slot_rx.recv().unwrap())
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let before = reactor.call(Duration::from_secs(5), |re| re.stats().sleeps);
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err());

        let mut sender = IoUring::new(2).unwrap();
        let sqe = opcode::MsgRingData::new(types::Fd(ring_fd), 42, user_data, None).build();
        // SAFETY: the entry points to no memory.
        unsafe { sender.submission().push(&sqe) }.unwrap();
        sender.submit_and_wait(1).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(got, Ok((7, 42)), "the completion did not wake the reactor");
        let after = reactor.call(Duration::from_secs(5), |re| re.stats().sleeps);
        assert!(after > before, "the reactor was not asleep");
        engine.shutdown();
    }
}
