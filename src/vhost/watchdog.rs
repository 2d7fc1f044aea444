//! Bounds the time one vhost-user message may take. The vhost crate reads a message with a
//! blocking loop that retries on EAGAIN, so a socket timeout cannot interrupt a frontend that
//! stops mid-message; shutting the socket down can. Each connection has its own thread, so a
//! stall holds up only that device; the watchdog frees the thread and the device's socket
//! for the next frontend.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Armed {
    deadline: Option<Instant>,
    sock: UnixStream,
    fired: bool,
}

#[derive(Default)]
struct State {
    armed: HashMap<u64, Armed>,
}

pub struct Watchdog {
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

impl Watchdog {
    pub fn start(timeout: Duration) -> std::io::Result<Arc<Watchdog>> {
        let w = Arc::new(Watchdog {
            state: Mutex::default(),
            cv: Condvar::new(),
            timeout,
        });
        let shared = Arc::clone(&w);
        std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || {
                if let Err(e) = crate::sandbox::confine(crate::sandbox::ThreadKind::Watchdog) {
                    log::error!("vhost-watchdog: cannot install its seccomp filter: {e}");
                    std::process::abort();
                }
                shared.run()
            })?;
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for a in st.armed.values_mut() {
                match a.deadline {
                    Some(d) if d <= now => {
                        let _ = a.sock.shutdown(std::net::Shutdown::Both);
                        a.deadline = None;
                        a.fired = true;
                    }
                    Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                    None => {}
                }
            }
            st = match next {
                None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    self.cv
                        .wait_timeout(st, d.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Runs `f` (which handles one message of connection `id` on `sock`); if it takes
    /// longer than the timeout the socket is shut down, which makes `f` return with an error.
    /// Returns `f`'s result and whether the watchdog fired.
    pub fn guard<T>(&self, id: u64, sock: &UnixStream, f: impl FnOnce() -> T) -> (T, bool) {
        if let Ok(sock) = sock.try_clone() {
            self.lock().armed.insert(
                id,
                Armed {
                    deadline: Some(Instant::now() + self.timeout),
                    sock,
                    fired: false,
                },
            );
            self.cv.notify_one();
        }
        let out = f();
        let fired = self.lock().armed.remove(&id).is_some_and(|a| a.fired);
        (out, fired)
    }

    /// Runs `f` with connection `id`'s clock stopped: time spent waiting on our own reactors
    /// (draining a queue's I/O) is not the frontend's stall. The message gets a fresh
    /// timeout afterwards.
    pub fn paused<T>(&self, id: u64, f: impl FnOnce() -> T) -> T {
        let was_armed = match self.lock().armed.get_mut(&id) {
            Some(a) => a.deadline.take().is_some(),
            None => false,
        };
        let out = f();
        if was_armed {
            if let Some(a) = self.lock().armed.get_mut(&id) {
                a.deadline = Some(Instant::now() + self.timeout);
            }
            self.cv.notify_one();
        }
        out
    }
}
