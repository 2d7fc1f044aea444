//! Bounds the time one vhost-user message may take. The vhost crate reads a message with a
//! blocking loop that retries on EAGAIN, so a socket timeout cannot interrupt a frontend that
//! stops mid-message; shutting the socket down can. Without this, one stalled frontend would
//! hold the control thread, and with it every other device's control plane.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Armed {
    deadline: Option<Instant>,
    sock: Option<UnixStream>,
    fired: bool,
}

pub struct Watchdog {
    state: Arc<(Mutex<Armed>, Condvar)>,
    timeout: Duration,
}

impl Watchdog {
    pub fn start(timeout: Duration) -> std::io::Result<Watchdog> {
        let state: Arc<(Mutex<Armed>, Condvar)> = Arc::default();
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*shared;
                let mut armed = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match armed.deadline {
                        None => armed = cv.wait(armed).unwrap_or_else(|p| p.into_inner()),
                        Some(d) if Instant::now() >= d => {
                            if let Some(s) = armed.sock.take() {
                                let _ = s.shutdown(std::net::Shutdown::Both);
                            }
                            armed.deadline = None;
                            armed.fired = true;
                        }
                        Some(d) => {
                            let wait = d.saturating_duration_since(Instant::now());
                            armed = cv
                                .wait_timeout(armed, wait)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
            })?;
        Ok(Watchdog { state, timeout })
    }

    /// Runs `f` (which handles one message on `sock`); if it takes longer than the timeout the
    /// socket is shut down, which makes `f` return with an error. Returns `f`'s result and
    /// whether the watchdog fired.
    pub fn guard<T>(&self, sock: &UnixStream, f: impl FnOnce() -> T) -> (T, bool) {
        let (lock, cv) = &*self.state;
        {
            let mut a = lock.lock().unwrap_or_else(|p| p.into_inner());
            a.deadline = Some(Instant::now() + self.timeout);
            a.sock = sock.try_clone().ok();
            a.fired = false;
        }
        cv.notify_one();
        let out = f();
        let mut a = lock.lock().unwrap_or_else(|p| p.into_inner());
        a.deadline = None;
        a.sock = None;
        (out, std::mem::take(&mut a.fired))
    }

    /// Runs `f` with the clock stopped: time spent waiting on our own reactors (draining a
    /// queue's I/O) is not the frontend's stall. The message gets a fresh timeout afterwards.
    pub fn paused<T>(&self, f: impl FnOnce() -> T) -> T {
        let (lock, cv) = &*self.state;
        let was_armed = {
            let mut a = lock.lock().unwrap_or_else(|p| p.into_inner());
            a.deadline.take().is_some()
        };
        let out = f();
        if was_armed {
            let mut a = lock.lock().unwrap_or_else(|p| p.into_inner());
            if a.sock.is_some() {
                a.deadline = Some(Instant::now() + self.timeout);
            }
            cv.notify_one();
        }
        out
    }
}
