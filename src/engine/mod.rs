//! The engine: reactors (one pinned thread per core of the core mask), each running its
//! pollers over one io_uring, reached from other threads only by message.
//!
//! Owns: threads, pinning, the run loop, sleeping and waking, io_uring rings, busy/idle
//! accounting. Must not import the block, backend, virtio or vhost layers: it runs pollers
//! without knowing what they serve.

pub mod epoll;
pub mod eventfd;
pub mod poller;
pub mod ratelimit;
pub mod reactor;
mod spin;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod uring;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use eventfd::EventFd;
pub use poller::{Armed, Ctx, Poller, PollerId};
pub use reactor::Reactor;
use stats::{ticks_to_duration, ReactorStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Never sleep: lowest latency, one busy core per reactor.
    Poll,
    /// Poll while there is work, sleep on eventfds after `idle_spin` without any.
    Adaptive,
    /// Sleep as soon as a loop iteration finds no work.
    Interrupt,
}

impl PollMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PollMode::Poll => "poll",
            PollMode::Adaptive => "adaptive",
            PollMode::Interrupt => "interrupt",
        }
    }
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" => Ok(PollMode::Poll),
            "adaptive" => Ok(PollMode::Adaptive),
            "interrupt" => Ok(PollMode::Interrupt),
            _ => Err(format!(
                "poll mode must be poll, adaptive or interrupt, got {s:?}"
            )),
        }
    }
}

/// How reactors poll and when they sleep; can change at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: PollMode,
    /// Adaptive mode: idle time before sleeping.
    pub idle_spin: Duration,
}

pub enum Message {
    /// Runs on the reactor, with its state (SPDK's `spdk_thread_send_msg`).
    Run(Box<dyn FnOnce(&mut Reactor) + Send>),
    /// Stop every poller, then exit once they have drained.
    Shutdown,
}

/// Cheap to clone: how other threads reach one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    pub index: usize,
    pub cpu: usize,
    tx: Sender<Message>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reactor_{} (cpu {})", self.index, self.cpu)
    }
}

impl ReactorHandle {
    fn send(&self, msg: Message) {
        if self.tx.send(msg).is_ok() {
            self.wake.notify();
        }
    }

    /// Runs `f` on the reactor thread, without waiting.
    pub fn run(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) {
        self.send(Message::Run(Box::new(f)));
    }

    /// Runs `f` on the reactor thread and waits (at most `timeout`) for its answer.
    pub fn call<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Reactor) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.run(move |r| {
            let _ = tx.send(f(r));
        });
        rx.recv_timeout(timeout).ok()
    }
}

/// All reactors of the process.
pub struct Engine {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<ReactorStats>>,
}

impl Engine {
    /// Starts one reactor per CPU of `cpus`; returns once each has built its ring.
    pub fn start(cpus: &[usize], settings: Settings) -> std::io::Result<Engine> {
        // Measure the TSC rate before any reactor needs it, off the hot path.
        stats::ticks_per_sec();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (index, &cpu) in cpus.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(EventFd::new()?);
            let handle = ReactorHandle {
                index,
                cpu,
                tx,
                wake: Arc::clone(&wake),
            };
            let thread_handle = handle.clone();
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let thread = std::thread::Builder::new()
                .name(format!("reactor_{index}"))
                .spawn(
                    move || match Reactor::new(thread_handle, settings, rx, wake) {
                        Ok(r) => {
                            let _ = ready_tx.send(Ok(()));
                            r.run()
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            ReactorStats::default()
                        }
                    },
                )?;
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("reactor thread died at start"))??;
            handles.push(handle);
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
                     asleep {:.3}s ({} sleeps, {} woken by an fd)",
                    h.index,
                    h.cpu,
                    ticks_to_duration(s.busy_ticks).as_secs_f64(),
                    ticks_to_duration(s.idle_ticks).as_secs_f64(),
                    s.busy_percent(),
                    ticks_to_duration(s.sleep_ticks).as_secs_f64(),
                    s.sleeps,
                    s.wakeups,
                ),
                Err(_) => log::error!("reactor_{} panicked", h.index),
            }
        }
    }
}
