//! Rate limit for logs a frontend can trigger: a burst, then one line per interval with a
//! count of what was dropped.

use std::time::{Duration, Instant};

const BURST: u32 = 10;
const INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct RateLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    reported: u64,
}

impl RateLimit {
    pub fn new() -> Self {
        RateLimit {
            window_start: None,
            in_window: 0,
            suppressed: 0,
            reported: 0,
        }
    }

    /// Only called on error paths, so reading the clock here is fine.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(t) if now.duration_since(t) < INTERVAL => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < BURST {
            self.in_window += 1;
            self.reported = self.suppressed;
            self.suppressed = 0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// " (N similar messages suppressed)" after a quiet spell, else "".
    pub fn suppressed_note(&self) -> String {
        if self.reported > 0 {
            format!(" ({} similar messages suppressed)", self.reported)
        } else {
            String::new()
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let mut r = RateLimit::new();
        let allowed = (0..100).filter(|_| r.allow()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(r.suppressed, 90);
    }
}
