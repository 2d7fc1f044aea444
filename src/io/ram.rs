//! RAM disk: one anonymous mapping, huge pages when the host has them reserved.

use std::alloc::Layout;

use super::DiskError;

#[derive(Debug)]
pub struct RamDisk {
    base: *mut u8,
    len: usize,
    huge: bool,
}

// SAFETY: the mapping is owned by the RamDisk and lives until Drop; concurrent access from
// several reactors is by raw copies into disjoint or racing byte ranges, which is what a
// disk shared by queues is: bytes have no validity invariant, and ordering between queues
// is the guest's business (virtio makes no promise across queues).
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
    pub fn new(size: u64) -> Result<RamDisk, DiskError> {
        let len = usize::try_from(size).map_err(|_| DiskError::Alloc {
            size,
            err: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        if free_huge_bytes() >= size {
            let layout = Layout::from_size_align(len, 4096).expect("page-aligned layout");
            // SAFETY: layout has non-zero size (config validation rejects size 0).
            let p = unsafe { hugepage_rs::alloc(layout) };
            if !p.is_null() {
                log::info!("RAM disk of {size} bytes on huge pages");
                return Ok(RamDisk {
                    base: p,
                    len,
                    huge: true,
                });
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
            return Err(DiskError::Alloc {
                size,
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(RamDisk {
            base: p.cast(),
            len,
            huge: false,
        })
    }

    /// Copies the disk at `offset` into the iovecs. The caller checked that the request lies
    /// inside the disk.
    pub fn read(&self, offset: u64, iovecs: &[libc::iovec]) {
        let mut off = offset as usize;
        for v in iovecs {
            debug_assert!(off + v.iov_len <= self.len);
            // SAFETY: [off, off+len) is inside the mapping (request validated against the
            // capacity, which equals self.len rounded down); the iovec points into mapped guest
            // memory kept alive by the caller; the two never overlap (different mappings).
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(off), v.iov_base.cast(), v.iov_len)
            };
            off += v.iov_len;
        }
    }

    pub fn write(&self, offset: u64, iovecs: &[libc::iovec]) {
        let mut off = offset as usize;
        for v in iovecs {
            debug_assert!(off + v.iov_len <= self.len);
            // SAFETY: as in `read`, with the direction reversed.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast(), self.base.add(off), v.iov_len)
            };
            off += v.iov_len;
        }
    }

    pub fn zero(&self, offset: u64, len: u64) {
        debug_assert!(offset + len <= self.len as u64);
        // SAFETY: the range is inside the mapping (validated against capacity by the caller).
        unsafe { std::ptr::write_bytes(self.base.add(offset as usize), 0, len as usize) };
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        if self.huge {
            let layout = Layout::from_size_align(self.len, 4096).expect("page-aligned layout");
            // SAFETY: allocated by hugepage_rs::alloc with this same layout.
            unsafe { hugepage_rs::dealloc(self.base, layout) };
        } else {
            // SAFETY: the mapping was created in `new` with this length and is unmapped once.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }
}
