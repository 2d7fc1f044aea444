//! RAM disk: one anonymous mapping, huge pages when the host has them reserved. Requests
//! complete inline with a memcpy, no system call.
//!
//! It can grow in place: the mapping reserves address space beyond the disk (PROT_NONE,
//! costing nothing) and a resize makes more of it usable, so no pointer into it ever moves
//! while reactors copy. Shrinking gives the tail's memory back (it reads as zeroes) but keeps
//! it mapped: a request validated against the old size may still be copying there.

use std::alloc::Layout;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::BackendError;
use crate::blk::backend::{BackendInfo, Channel, ResizeError, Submitted};
use crate::blk::model::Caps;
use crate::blk::{Backend, BlockError, BlockRequest, Op};
use crate::engine::Ctx;

/// How far a RAM disk may grow: four times its first size (address space only).
const GROWTH: usize = 4;

#[derive(Debug)]
struct RamDisk {
    base: *mut u8,
    /// Bytes of the disk now (usable, read-write).
    len: AtomicUsize,
    /// Bytes reserved from `base` (PROT_NONE beyond those made usable).
    reserved: usize,
    /// Bytes ever made usable (a shrink keeps them mapped).
    usable: Mutex<usize>,
    huge: bool,
}

// SAFETY: the mapping is owned by the RamDisk and lives until Drop; concurrent access from
// several reactors is by raw copies into disjoint or racing byte ranges, which is what a
// disk shared by queues is: bytes have no validity invariant, and ordering between queues
// is the driver's business (virtio makes no promise across queues).
unsafe impl Send for RamDisk {}
// SAFETY: see Send; no method hands out references into the mapping.
unsafe impl Sync for RamDisk {}

fn free_huge_bytes() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") * 1024
}

impl RamDisk {
    fn new(size: u64) -> Result<RamDisk, BackendError> {
        let len = usize::try_from(size).map_err(|_| BackendError::Alloc {
            size,
            err: io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        if len > 0 && free_huge_bytes() >= size {
            if let Ok(layout) = Layout::from_size_align(len, 4096) {
                // SAFETY: layout has non-zero size (checked above).
                let p = unsafe { hugepage_rs::alloc(layout) };
                if !p.is_null() {
                    log::info!("RAM disk of {size} bytes on huge pages (cannot grow)");
                    return Ok(RamDisk {
                        base: p,
                        len: AtomicUsize::new(len),
                        reserved: len,
                        usable: Mutex::new(len),
                        huge: true,
                    });
                }
            }
            log::info!("RAM disk: huge page allocation failed, using normal pages");
        } else {
            log::info!(
                "RAM disk of {size} bytes on normal pages (not enough free huge pages reserved)"
            );
        }
        // MAP_NORESERVE: a large RAM disk costs memory only as it is written, like tmpfs.
        let reserved = len.saturating_mul(GROWTH);
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BackendError::Alloc {
                size,
                err: io::Error::last_os_error(),
            });
        }
        let disk = RamDisk {
            base: p.cast(),
            len: AtomicUsize::new(0),
            reserved,
            usable: Mutex::new(0),
            huge: false,
        };
        disk.set_len(len)
            .map_err(|err| BackendError::Alloc { size, err })?;
        Ok(disk)
    }

    /// Makes the disk `len` bytes: usable up to there (mprotect within the reservation),
    /// the tail beyond given back. Existing pointers stay valid.
    fn set_len(&self, len: usize) -> io::Result<()> {
        let mut usable = self.usable.lock().unwrap_or_else(|p| p.into_inner());
        if len > self.reserved {
            return Err(io::Error::other(format!(
                "a RAM disk can grow to {} bytes at most",
                self.reserved
            )));
        }
        if len > *usable {
            // SAFETY: [base + usable, base + len) lies inside our reservation (checked).
            let rc = unsafe {
                libc::mprotect(
                    self.base.add(*usable).cast(),
                    len - *usable,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            *usable = len;
        }
        let old = self.len.swap(len, Ordering::AcqRel);
        if len < old && !self.huge {
            // The tail's pages go back to the system and read as zeroes; they stay mapped
            // for requests validated against the old size.
            // SAFETY: [base + len, base + old) is inside the usable mapping.
            unsafe { libc::madvise(self.base.add(len).cast(), old - len, libc::MADV_DONTNEED) };
        }
        Ok(())
    }

    /// `[offset, offset + len)` of the disk, if it lies inside. Checked in release builds
    /// too: the copies below rely on it.
    fn range(&self, offset: u64, len: u64) -> Result<usize, BlockError> {
        let end = offset.checked_add(len).ok_or(BlockError::Overflow)?;
        if end > self.len.load(Ordering::Acquire) as u64 {
            return Err(BlockError::OutOfRange);
        }
        Ok(offset as usize)
    }

    /// Copies between the disk at `offset` and the iovecs, in the direction `to_iovecs`.
    ///
    /// # Safety
    /// Each iovec describes mapped memory of its length, writable if `to_iovecs`, valid for
    /// the duration of the call and not overlapping the disk.
    unsafe fn copy(
        &self,
        offset: u64,
        iovecs: &[libc::iovec],
        to_iovecs: bool,
    ) -> Result<(), BlockError> {
        let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let mut off = self.range(offset, total)?;
        for v in iovecs {
            // SAFETY: [off, off + iov_len) is inside the mapping (checked for the whole
            // transfer above); the iovec's memory is valid (the caller's contract); they are
            // different mappings, so they do not overlap.
            unsafe {
                let disk = self.base.add(off);
                if to_iovecs {
                    std::ptr::copy_nonoverlapping(disk, v.iov_base.cast(), v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(v.iov_base.cast(), disk, v.iov_len);
                }
            }
            off += v.iov_len;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let off = self.range(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.base.add(off), 0, len as usize) };
        Ok(())
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        if self.huge {
            if let Ok(layout) = Layout::from_size_align(self.reserved, 4096) {
                // SAFETY: allocated by hugepage_rs::alloc with this same layout.
                unsafe { hugepage_rs::dealloc(self.base, layout) };
            }
        } else {
            // SAFETY: the reservation was mapped in `new` with this length, unmapped once.
            unsafe { libc::munmap(self.base.cast(), self.reserved) };
        }
    }
}

#[derive(Debug)]
pub struct RamBackend {
    disk: Arc<RamDisk>,
}

impl RamBackend {
    pub fn new(size: u64) -> Result<RamBackend, BackendError> {
        Ok(RamBackend {
            disk: Arc::new(RamDisk::new(size)?),
        })
    }
}

impl Backend for RamBackend {
    fn kind(&self) -> &'static str {
        "ram"
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            size: self.disk.len.load(Ordering::Acquire) as u64,
            caps: Caps::ALL,
            read_only: false,
            single_reactor: false,
        }
    }

    fn process_local(&self) -> bool {
        true
    }

    fn open_channel(&self, _ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(RamChannel {
            disk: Arc::clone(&self.disk),
        }))
    }

    fn resize(&self, new: Option<u64>) -> Result<u64, ResizeError> {
        if let Some(n) = new {
            let len = usize::try_from(n)
                .map_err(|_| ResizeError::Invalid(format!("{n} bytes do not fit in memory")))?;
            if self.disk.huge && len > self.disk.reserved {
                return Err(ResizeError::Invalid(
                    "a RAM disk on huge pages cannot grow".into(),
                ));
            }
            self.disk.set_len(len)?;
        }
        Ok(self.disk.len.load(Ordering::Acquire) as u64)
    }
}

struct RamChannel {
    disk: Arc<RamDisk>,
}

impl Channel for RamChannel {
    fn completes_inline(&self) -> bool {
        true
    }

    fn room(&self, _ctx: &Ctx<'_>) -> u32 {
        u32::MAX
    }

    unsafe fn submit(&mut self, _ctx: &mut Ctx<'_>, req: &BlockRequest) -> Submitted {
        let d = &self.disk;
        Submitted::Done(match req.op {
            // SAFETY: the caller keeps the iovecs and their (guest) memory valid for this
            // call; guest memory is a different mapping from the disk.
            Op::Read => unsafe { d.copy(req.offset, req.iovecs(), true) },
            // SAFETY: as above.
            Op::Write { .. } => unsafe { d.copy(req.offset, req.iovecs(), false) },
            Op::Discard | Op::WriteZeroes { .. } => d.zero(req.offset, req.len),
            // Nothing is more durable than it already is.
            Op::Flush => Ok(()),
        })
    }
}
