//! The dirty log of live migration (VHOST_F_LOG_ALL with VHOST_USER_PROTOCOL_F_LOG_SHMFD):
//! a bitmap the frontend shares, one bit per 4 KiB guest page, in which the device sets the
//! bit of every page it writes while the frontend copies guest memory to the destination.
//! The frontend clears bits as it copies, concurrently: bits are set with an atomic OR.
//!
//! One `DirtyLog` per connection. Every region of the connection's memory carries it in its
//! bitmap (`FrontendBitmap`), so writes through vm-memory (used ring, used index, event
//! index) and through `access` (status bytes) mark their pages; the virtqueue marks the
//! buffers the backend filled on reads when they complete. While logging is off a mark costs
//! one atomic load.
//!
//! The log in use is published to reactors as a raw pointer: the control thread swaps it, and
//! keeps every log it ever published (`areas`) until `prune`, which its caller may run only
//! once every reactor that could hold the old pointer has passed a quiescent point.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::Mutex;

use super::fault::Owner;
use super::mapping::Mapping;

/// Bytes of guest memory one bit of the log stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 4096;
/// Largest log accepted: enough for 64 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 2 << 30;

/// One log the frontend shared (SET_LOG_BASE).
#[derive(Debug)]
pub struct LogArea {
    mapping: Mapping,
}

impl LogArea {
    /// Maps `size` bytes of `file` at `offset`, checked against the file's size (a
    /// frontend's file; SIGBUS containment covers it if it shrinks later).
    pub fn map(file: &File, offset: u64, size: u64, owner: Owner) -> io::Result<LogArea> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(bad("log size is zero or beyond 2 GiB"));
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        if !offset.is_multiple_of(page) {
            return Err(bad("log offset is not page aligned"));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bad("log offset + size overflows"))?;
        if file.metadata()?.len() < end {
            return Err(bad("log file is smaller than offset + size"));
        }
        // Fits: at most MAX_LOG_BYTES.
        let mapping = Mapping::map(file, offset, size as usize, owner)?;
        Ok(LogArea { mapping })
    }

    fn bits(&self) -> u64 {
        self.mapping.len() as u64 * 8
    }

    /// Sets the bits of the pages of `[gpa, gpa + len)`; pages beyond the log are ignored
    /// (a frontend that shared too small a log loses only its own migration).
    fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let end = last.saturating_add(1).min(self.bits());
        let base = self.mapping.as_ptr();
        let mut page = first;
        while page < end {
            let byte = page / 8;
            // Whole bytes at once when a range covers them (large reads).
            let mask: u8 = if page.is_multiple_of(8) && end - page >= 8 {
                0xff
            } else {
                let upto = (end - byte * 8).min(8);
                let from = page - byte * 8;
                // Bits from..upto of this byte.
                (((1u16 << upto) - (1u16 << from)) & 0xff) as u8
            };
            // SAFETY: byte < bits / 8 = the mapping's length; the mapping is shared memory
            // that lives as long as `self`; AtomicU8 has the layout of u8 and any byte is a
            // valid value; the frontend clears bits concurrently, hence the atomic OR.
            unsafe {
                (*base.add(byte as usize).cast::<AtomicU8>()).fetch_or(mask, Ordering::Relaxed)
            };
            page = (byte + 1) * 8;
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// LOG_ALL negotiated.
    enabled: bool,
    /// The newest log the frontend shared.
    current: Option<usize>,
    /// Every log published since the last prune; `current` indexes it. Boxed: `active`
    /// points into them, and a Vec moves its elements when it grows.
    #[allow(clippy::vec_box)]
    areas: Vec<Box<LogArea>>,
}

#[derive(Debug, Default)]
pub struct DirtyLog {
    /// The log to mark: the current area while logging is on, else null. Points into a box of
    /// `state.areas`.
    active: AtomicPtr<LogArea>,
    state: Mutex<State>,
}

impl DirtyLog {
    /// Whether writes are being logged (a hint for callers that would otherwise compute what
    /// to mark; `mark` checks again).
    #[inline]
    pub fn is_on(&self) -> bool {
        !self.active.load(Ordering::Relaxed).is_null()
    }

    /// Marks the guest pages of `[gpa, gpa + len)` dirty, if logging is on.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        let p = self.active.load(Ordering::Acquire);
        if p.is_null() {
            return;
        }
        // SAFETY: `active` only ever points into a box held in `state.areas`, and a box
        // leaves `areas` only in `prune`, whose caller guarantees that no thread still uses a
        // pointer it loaded before the area stopped being active.
        unsafe { &*p }.mark(gpa, len);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, s: &State) {
        let p = match (s.enabled, s.current) {
            (true, Some(i)) => &*s.areas[i] as *const LogArea as *mut LogArea,
            _ => std::ptr::null_mut(),
        };
        self.active.store(p, Ordering::SeqCst);
    }

    /// LOG_ALL negotiated (or not) in SET_FEATURES. True if that changed anything.
    pub fn set_enabled(&self, on: bool) -> bool {
        let mut s = self.lock();
        let was = self.is_on();
        s.enabled = on;
        self.publish(&s);
        was != self.is_on()
    }

    /// SET_LOG_BASE: the log to use from now on. True if logging is on.
    pub fn set_area(&self, area: LogArea) -> bool {
        let mut s = self.lock();
        s.areas.push(Box::new(area));
        s.current = Some(s.areas.len() - 1);
        self.publish(&s);
        self.is_on()
    }

    /// Logs no more, until LOG_ALL and a new log arrive (a device reset). The areas stay
    /// mapped until `prune` or the end of the connection.
    pub fn disable(&self) {
        let mut s = self.lock();
        s.enabled = false;
        s.current = None;
        self.publish(&s);
    }

    /// Unmaps every log but the current one.
    ///
    /// Run it only when no thread can still be marking through a pointer it loaded before
    /// the last change (every reactor that marks for this connection passed a quiescent
    /// point since, or none marks at all).
    pub fn prune(&self) {
        let mut s = self.lock();
        if let Some(i) = s.current.take() {
            let keep = s.areas.swap_remove(i);
            s.areas.clear();
            s.areas.push(keep);
            s.current = Some(0);
        } else {
            s.areas.clear();
        }
        // The box did not move (only the Vec's slots did): `active` stays valid.
        self.publish(&s);
    }

    /// How many logs are mapped.
    #[cfg(test)]
    pub fn mapped(&self) -> usize {
        self.lock().areas.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn log_file(bytes: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(bytes).unwrap();
        f
    }

    fn bytes_of(f: &mut File, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn marks_the_pages_of_a_range_only_while_on() {
        let mut f = log_file(4096);
        let log = DirtyLog::default();
        log.mark(0, 4096);
        assert!(
            !log.set_area(LogArea::map(&f, 0, 8, 1).unwrap()),
            "not enabled yet"
        );
        log.mark(0, 4096);
        assert_eq!(bytes_of(&mut f, 8), [0; 8], "off: nothing marked");
        assert!(log.set_enabled(true));
        // Page 1 (one byte in it), pages 3..=4 (a range crossing a page boundary).
        log.mark(LOG_PAGE + 100, 1);
        log.mark(3 * LOG_PAGE + 4000, 200);
        // Pages 8..=23: whole bytes 1 and 2.
        log.mark(8 * LOG_PAGE, 16 * LOG_PAGE);
        // Pages 30..=33: the end of byte 3, the start of byte 4.
        log.mark(30 * LOG_PAGE, 4 * LOG_PAGE);
        let b = bytes_of(&mut f, 8);
        assert_eq!(
            b,
            [0b0001_1010, 0xff, 0xff, 0b1100_0000, 0b0000_0011, 0, 0, 0]
        );
        // Beyond the log (64 pages): ignored, no fault.
        log.mark(63 * LOG_PAGE, 10 * LOG_PAGE);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(bytes_of(&mut f, 8)[7], 0x80);
        assert!(log.set_enabled(false));
        log.mark(40 * LOG_PAGE, 1);
        assert_eq!(bytes_of(&mut f, 8)[5], 0, "off again");
    }

    #[test]
    fn bits_the_frontend_cleared_are_set_again_and_others_kept() {
        let mut f = log_file(4096);
        let log = DirtyLog::default();
        log.set_enabled(true);
        log.set_area(LogArea::map(&f, 0, 4096, 1).unwrap());
        log.mark(0, 1);
        use std::io::Write;
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&[0b0100_0000]).unwrap();
        log.mark(0, 1);
        assert_eq!(bytes_of(&mut f, 1), [0b0100_0001]);
    }

    #[test]
    fn hostile_log_bases_are_refused() {
        let f = log_file(8192);
        assert!(LogArea::map(&f, 0, 0, 1).is_err(), "empty");
        assert!(LogArea::map(&f, 100, 16, 1).is_err(), "unaligned");
        assert!(LogArea::map(&f, 4096, 8192, 1).is_err(), "beyond the file");
        assert!(
            LogArea::map(&f, u64::MAX - 4095, 8192, 1).is_err(),
            "overflow"
        );
        assert!(
            LogArea::map(&f, 0, MAX_LOG_BYTES + 1, 1).is_err(),
            "too big"
        );
        assert!(LogArea::map(&f, 4096, 4096, 1).is_ok());
    }

    #[test]
    fn prune_keeps_the_current_log() {
        let mut a = log_file(4096);
        let mut b = log_file(4096);
        let log = DirtyLog::default();
        log.set_enabled(true);
        log.set_area(LogArea::map(&a, 0, 4096, 1).unwrap());
        log.set_area(LogArea::map(&b, 0, 4096, 1).unwrap());
        assert_eq!(log.mapped(), 2);
        log.prune();
        assert_eq!(log.mapped(), 1);
        log.mark(0, 1);
        assert_eq!(bytes_of(&mut b, 1), [1], "the newest log is marked");
        assert_eq!(bytes_of(&mut a, 1), [0]);
        log.disable();
        assert!(!log.is_on());
        log.mark(LOG_PAGE, 1);
        assert_eq!(bytes_of(&mut b, 1), [1]);
        log.prune();
        assert_eq!(log.mapped(), 0);
    }
}
