//! Reactors: one pinned thread per core of the core mask. A reactor owns its queue pollers
//! and its io_uring outright; other threads reach it only through messages.

pub mod message;
pub mod ratelimit;
pub mod stats;
pub mod uring;

use std::fs::File;
use std::io::Read;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::config::{EngineConfig, PollMode};
use crate::cpuset::pin_current_thread;
use crate::virtio_blk::poller::{split_user_data, QueuePoller};
use message::{Message, QueueKey};
use stats::{duration_to_ticks, ticks, ticks_to_duration, ReactorStats};
use uring::{new_eventfd, Uring};

/// Cheap to clone: how the control thread reaches one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    pub index: usize,
    pub cpu: usize,
    tx: Sender<Message>,
    wake: Arc<File>,
}

impl ReactorHandle {
    pub fn send(&self, msg: Message) {
        if self.tx.send(msg).is_ok() {
            let _ = (&*self.wake).write_all_ne(1);
        }
    }
}

trait WriteCounter {
    fn write_all_ne(self, v: u64) -> std::io::Result<()>;
}

impl WriteCounter for &File {
    fn write_all_ne(self, v: u64) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = self;
        f.write_all(&v.to_ne_bytes())
    }
}

/// All reactors of the process.
pub struct Engine {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<ReactorStats>>,
}

impl Engine {
    pub fn start(cfg: &EngineConfig) -> std::io::Result<Engine> {
        // Measure the TSC rate before any reactor needs it, off the hot path.
        stats::ticks_per_sec();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (index, &cpu) in cfg.cpumask.cpus().iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(new_eventfd()?);
            let ring = Uring::new()?;
            let epoll = reactor_epoll(&wake, &ring)?;
            let (cfg, thread_wake) = (cfg.clone(), Arc::clone(&wake));
            // Built on its own thread: a reactor's state never needs to cross threads.
            let thread = std::thread::Builder::new()
                .name(format!("reactor_{index}"))
                .spawn(move || {
                    Reactor::new(index, cpu, &cfg, rx, thread_wake, ring, epoll).run()
                })?;
            handles.push(ReactorHandle {
                index,
                cpu,
                tx,
                wake,
            });
            threads.push(thread);
        }
        Ok(Engine { handles, threads })
    }

    pub fn reactors(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// Tells every reactor to stop and waits for them; logs their accounting.
    pub fn shutdown(self) {
        for h in &self.handles {
            h.send(Message::Shutdown);
        }
        for (h, t) in self.handles.iter().zip(self.threads) {
            match t.join() {
                Ok(s) => log::info!(
                    "reactor_{} (cpu {}): busy {:.3}s idle {:.3}s ({:.1}% busy while awake), \
                     asleep {:.3}s ({} sleeps), {} requests, {} errors, {} notifications",
                    h.index,
                    h.cpu,
                    ticks_to_duration(s.busy_ticks).as_secs_f64(),
                    ticks_to_duration(s.idle_ticks).as_secs_f64(),
                    s.busy_percent(),
                    ticks_to_duration(s.sleep_ticks).as_secs_f64(),
                    s.sleeps,
                    s.requests,
                    s.errors,
                    s.notifications
                ),
                Err(_) => log::error!("reactor_{} panicked", h.index),
            }
        }
    }
}

/// Adaptive mode's spin while waiting only for io_uring completions; see `io_spin_ticks`.
const IO_SPIN: std::time::Duration = std::time::Duration::from_micros(5);

const TOKEN_MESSAGE: u64 = u64::MAX;
const TOKEN_URING: u64 = u64::MAX - 1;

struct Reactor {
    index: usize,
    cpu: usize,
    mode: PollMode,
    idle_spin_ticks: u64,
    /// Spin while only the kernel has work (I/O in flight, queues idle): short, because a
    /// completion is worth a wakeup but not a core.
    io_spin_ticks: u64,
    rx: Receiver<Message>,
    wake: Arc<File>,
    ring: Uring,
    epoll: File,
    /// Slot index = io_uring user data high bits; a slot is reused only after its poller has
    /// drained, so no stale CQE can reach a new queue.
    pollers: Vec<Option<QueuePoller>>,
    stats: ReactorStats,
    shutting_down: bool,
}

fn epoll_create() -> std::io::Result<File> {
    // SAFETY: plain syscall; the fd is checked and then owned by the File.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
}

fn epoll_ctl(epoll: &File, op: i32, fd: RawFd, token: u64) -> std::io::Result<()> {
    // Edge-triggered: kicks that arrive while polling must not keep a later epoll_wait
    // spinning, and the kick counter is never read on the hot path.
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: both fds are open; ev is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The reactor's sleep set: its message eventfd and its io_uring's completion eventfd;
/// queue kick fds join as queues arrive.
fn reactor_epoll(wake: &File, ring: &Uring) -> std::io::Result<File> {
    let epoll = epoll_create()?;
    epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, wake.as_raw_fd(), TOKEN_MESSAGE)?;
    epoll_ctl(
        &epoll,
        libc::EPOLL_CTL_ADD,
        ring.eventfd().as_raw_fd(),
        TOKEN_URING,
    )?;
    Ok(epoll)
}

fn drain_eventfd(f: &File) {
    let mut buf = [0u8; 8];
    let _ = (&*f).read(&mut buf);
}

impl Reactor {
    fn new(
        index: usize,
        cpu: usize,
        cfg: &EngineConfig,
        rx: Receiver<Message>,
        wake: Arc<File>,
        ring: Uring,
        epoll: File,
    ) -> Reactor {
        Reactor {
            index,
            cpu,
            mode: cfg.poll_mode,
            idle_spin_ticks: duration_to_ticks(cfg.idle_spin),
            io_spin_ticks: duration_to_ticks(cfg.idle_spin.min(IO_SPIN)),
            rx,
            wake,
            ring,
            epoll,
            pollers: Vec::new(),
            stats: ReactorStats::default(),
            shutting_down: false,
        }
    }

    fn run(mut self) -> ReactorStats {
        if !pin_current_thread(self.cpu) {
            log::warn!("reactor_{}: could not pin to cpu {}", self.index, self.cpu);
        }
        log::debug!("reactor_{} running on cpu {}", self.index, self.cpu);
        let mut last = ticks();
        let mut idle_since: Option<u64> = None;
        loop {
            let mut work = self.handle_messages();
            if self.shutting_down && self.pollers.iter().all(Option::is_none) {
                break;
            }
            work += self.reap();
            for slot in 0..self.pollers.len() {
                if let Some(p) = self.pollers[slot].as_mut() {
                    work += p.poll(slot, &mut self.ring);
                }
            }
            if let Err(e) = self.ring.submit() {
                log::error!("reactor_{}: io_uring submit failed: {e}", self.index);
            }
            self.notify_and_retire();

            let now = ticks();
            let spent = now.wrapping_sub(last);
            last = now;
            if work > 0 {
                self.stats.busy_ticks += spent;
                idle_since = None;
                continue;
            }
            self.stats.idle_ticks += spent;
            let start = *idle_since.get_or_insert(now);
            let should_sleep = match self.mode {
                PollMode::Interrupt => true,
                PollMode::Adaptive => {
                    let spin = if self.ring.in_flight() > 0 {
                        self.io_spin_ticks
                    } else {
                        self.idle_spin_ticks
                    };
                    now.wrapping_sub(start) >= spin
                }
                // Nothing to poll: even poll mode sleeps until a queue arrives.
                PollMode::Poll => self.pollers.iter().all(Option::is_none),
            };
            if should_sleep {
                self.sleep();
                last = ticks();
                idle_since = None;
            }
        }
        self.collect_queue_stats();
        self.stats
    }

    fn handle_messages(&mut self) -> u32 {
        let mut n = 0;
        loop {
            match self.rx.try_recv() {
                Ok(msg) => {
                    n += 1;
                    self.handle(msg);
                }
                Err(TryRecvError::Empty) => return n,
                Err(TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    return n;
                }
            }
        }
    }

    fn find(&mut self, key: QueueKey) -> Option<&mut QueuePoller> {
        self.pollers
            .iter_mut()
            .flatten()
            .find(|p| p.key() == key && !p.is_stopping())
    }

    fn handle(&mut self, msg: Message) {
        match msg {
            Message::AddQueue(start) => {
                let mut poller = QueuePoller::new(*start);
                poller.notify_driver();
                let slot = match self.pollers.iter().position(Option::is_none) {
                    Some(s) => s,
                    None => {
                        self.pollers.push(None);
                        self.pollers.len() - 1
                    }
                };
                if let Some(kick) = poller.kick() {
                    if let Err(e) = epoll_ctl(
                        &self.epoll,
                        libc::EPOLL_CTL_ADD,
                        kick.as_raw_fd(),
                        slot as u64,
                    ) {
                        log::warn!("reactor_{}: cannot watch kick fd: {e}", self.index);
                    }
                }
                log::info!(
                    "reactor_{} (cpu {}): polling device {} queue {}",
                    self.index,
                    self.cpu,
                    poller.key().device,
                    poller.key().queue
                );
                self.pollers[slot] = Some(poller);
            }
            Message::StopQueue { key, reply } => match self.find(key) {
                Some(p) => p.stop(reply),
                // Not here (never started or already stopped): nothing in flight.
                None => drop(reply),
            },
            Message::UpdateMemory { device, mem, reply } => {
                for p in self
                    .pollers
                    .iter_mut()
                    .flatten()
                    .filter(|p| p.key().device == device)
                {
                    p.set_memory(Arc::clone(&mem));
                }
                let _ = reply.send(());
            }
            Message::SetCall { key, call } => {
                if let Some(p) = self.find(key) {
                    p.set_call(call);
                }
            }
            Message::Shutdown => {
                self.shutting_down = true;
                for p in self.pollers.iter_mut().flatten() {
                    if !p.is_stopping() {
                        let (tx, _rx) = crossbeam_channel::bounded(1);
                        p.stop(tx);
                    }
                }
            }
        }
    }

    fn reap(&mut self) -> u32 {
        let pollers = &mut self.pollers;
        self.ring.reap(|ud, res| {
            let (slot, head) = split_user_data(ud);
            if let Some(Some(p)) = pollers.get_mut(slot) {
                p.complete(head, res);
            }
        })
    }

    /// Signals each queue at most once per pass, then lets drained stopping queues go.
    fn notify_and_retire(&mut self) {
        for slot in 0..self.pollers.len() {
            let Some(p) = self.pollers[slot].as_mut() else {
                continue;
            };
            p.notify();
            if p.is_stopping() && p.finish_stop() {
                let p = self.pollers[slot].take().expect("present");
                if let Some(kick) = p.kick() {
                    let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, kick.as_raw_fd(), 0);
                }
                self.add_queue_stats(&p);
                log::info!(
                    "reactor_{}: stopped device {} queue {}",
                    self.index,
                    p.key().device,
                    p.key().queue
                );
            }
        }
    }

    fn add_queue_stats(&mut self, p: &QueuePoller) {
        self.stats.requests += p.stats.requests;
        self.stats.errors += p.stats.errors;
        self.stats.notifications += p.stats.notifications;
    }

    fn collect_queue_stats(&mut self) {
        let pollers = std::mem::take(&mut self.pollers);
        for p in pollers.iter().flatten() {
            self.add_queue_stats(p);
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
        for p in self.pollers.iter_mut().flatten() {
            raced |= p.arm();
            if !p.can_sleep() {
                // A frontend that gave no kick fd polls too: look again every millisecond.
                timeout_ms = 1;
            }
        }
        if self.ring.in_flight() > 0 {
            self.ring.enable_eventfd();
            raced |= self.ring.has_completions();
            // The kernel reads the eventfd flag right after publishing a CQE without a full
            // barrier, so a completion racing with the line above can go unsignalled. With
            // I/O in flight, never sleep longer than a millisecond: a lost wakeup costs at
            // most that, never a hang. An idle reactor still sleeps indefinitely.
            timeout_ms = 1;
        }
        raced |= !self.rx.is_empty();
        if !raced {
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
            let t0 = ticks();
            // SAFETY: events is a valid buffer of the given length for the kernel to fill.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout_ms,
                )
            };
            self.stats.sleeps += 1;
            self.stats.sleep_ticks += ticks().wrapping_sub(t0);
            for ev in events.iter().take(n.max(0) as usize) {
                let token = ev.u64;
                match token {
                    TOKEN_MESSAGE => drain_eventfd(&self.wake),
                    TOKEN_URING => drain_eventfd(self.ring.eventfd()),
                    slot => {
                        if let Some(Some(p)) = self.pollers.get(slot as usize) {
                            if let Some(k) = p.kick() {
                                drain_eventfd(k);
                            }
                        }
                    }
                }
            }
        }
        self.ring.disable_eventfd();
        for p in self.pollers.iter_mut().flatten() {
            p.disarm();
        }
    }
}
