//! RAM disk: one anonymous mapping, huge pages when the host has them reserved. Requests
//! complete inline with a memcpy, no system call.

use std::alloc::Layout;
use std::io;
use std::sync::Arc;

use super::BackendError;
use crate::blk::backend::{BackendInfo, Channel, Submitted};
use crate::blk::model::Caps;
use crate::blk::{Backend, BlockError, BlockRequest, Op};
use crate::engine::Ctx;

#[derive(Debug)]
struct RamDisk {
    base: *mut u8,
    len: usize,
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
                    log::info!("RAM disk of {size} bytes on huge pages");
                    return Ok(RamDisk {
                        base: p,
                        len,
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
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
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
        Ok(RamDisk {
            base: p.cast(),
            len,
            huge: false,
        })
    }

    /// `[offset, offset + len)` of the disk, if it lies inside. Checked in release builds
    /// too: the copies below rely on it.
    fn range(&self, offset: u64, len: u64) -> Result<usize, BlockError> {
        let end = offset.checked_add(len).ok_or(BlockError::Overflow)?;
        if end > self.len as u64 {
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
            if let Ok(layout) = Layout::from_size_align(self.len, 4096) {
                // SAFETY: allocated by hugepage_rs::alloc with this same layout.
                unsafe { hugepage_rs::dealloc(self.base, layout) };
            }
        } else {
            // SAFETY: the mapping was created in `new` with this length and is unmapped once.
            unsafe { libc::munmap(self.base.cast(), self.len) };
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
            size: self.disk.len as u64,
            caps: Caps::ALL,
            read_only: false,
            single_reactor: false,
        }
    }

    fn open_channel(&self, _ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(RamChannel {
            disk: Arc::clone(&self.disk),
        }))
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
