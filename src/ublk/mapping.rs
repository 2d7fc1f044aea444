//! The memory a ublk queue shares with the kernel: the read-only array of request
//! descriptors mapped from `/dev/ublkcN`, and the per-tag data buffers the kernel copies
//! request data into and out of (anonymous memory, page-aligned, so O_DIRECT backends can
//! use it as it is).

use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;

use super::uapi::IoDesc;

/// A mapping of this process, unmapped when dropped.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it between threads moves
// the ownership (the queue is built on one thread and runs on its reactor).
unsafe impl Send for Mapping {}

impl Mapping {
    /// Private anonymous memory of `len` bytes (reserved lazily: pages are allocated as the
    /// kernel first writes them).
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    }

    /// `len` bytes of `fd` at `offset`, shared and read-only (the kernel refuses writable
    /// mappings of /dev/ublkcN).
    pub fn shared_read_only(fd: RawFd, offset: i64, len: usize) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            offset,
        )
    }

    fn map(len: usize, prot: i32, flags: i32, fd: RawFd, offset: i64) -> io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel chooses; nothing existing is touched.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of this length; nothing refers to it any more (its owner
        // is being dropped, and the queue leaks buffers the kernel may still use).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One queue's request descriptors: `depth` of them, written by the kernel.
#[derive(Debug)]
pub struct Descriptors {
    map: Mapping,
    depth: u16,
}

impl Descriptors {
    /// Maps queue `q`'s array from the char device `fd`: at `q * max_cmd_buf_size`,
    /// `cmd_buf_size(depth)` bytes.
    pub fn map(fd: RawFd, q: u16, depth: u16) -> io::Result<Descriptors> {
        let page = page_size();
        let offset = usize::from(q) * super::uapi::max_cmd_buf_size(page);
        let len = super::uapi::cmd_buf_size(depth, page);
        let offset = i64::try_from(offset).map_err(|_| io::Error::other("offset overflows"))?;
        Ok(Descriptors {
            map: Mapping::shared_read_only(fd, offset, len)?,
            depth,
        })
    }

    /// The descriptor of `tag`, as the kernel wrote it before the tag's fetch completed.
    pub fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth);
        // SAFETY: `tag < depth`, and the mapping holds `depth` descriptors (cmd_buf_size);
        // the kernel wrote this one before posting the completion we are handling (the CQE
        // read orders it), and does not touch it again until we commit the tag. Volatile:
        // the kernel writes this memory.
        unsafe {
            std::ptr::read_volatile(
                self.map
                    .as_ptr()
                    .cast::<IoDesc>()
                    .add(usize::from(tag))
                    .cast_const(),
            )
        }
    }
}

/// Every tag's data buffer, one after the other, `size` bytes each.
#[derive(Debug)]
pub struct Buffers {
    /// Unmapped on drop unless `leaked`.
    map: ManuallyDrop<Mapping>,
    size: usize,
    leaked: bool,
}

impl Buffers {
    pub fn new(depth: u16, size: usize) -> io::Result<Buffers> {
        let total = usize::from(depth)
            .checked_mul(size)
            .ok_or_else(|| io::Error::other("buffers overflow"))?;
        Ok(Buffers {
            map: ManuallyDrop::new(Mapping::anonymous(total)?),
            size,
            leaked: false,
        })
    }

    /// The address of `tag`'s buffer (page-aligned: `size` is a multiple of the page size).
    pub fn addr(&self, tag: u16) -> *mut u8 {
        let offset = usize::from(tag) * self.size;
        assert!(offset + self.size <= self.map.len());
        // SAFETY: inside the mapping (checked just above).
        unsafe { self.map.as_ptr().add(offset) }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Keeps the memory mapped for ever: the kernel may still copy into it.
    pub fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: dropped once, here; nothing uses the buffers any more (the queue that
            // owns them has no request in flight, or it called `leak`).
            unsafe { ManuallyDrop::drop(&mut self.map) };
        }
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_disjoint() {
        let b = Buffers::new(4, 512 << 10).unwrap();
        let page = page_size();
        for t in 0..4u16 {
            assert_eq!(b.addr(t) as usize % page, 0);
        }
        assert_eq!(b.addr(1) as usize - b.addr(0) as usize, 512 << 10);
        // Writable.
        // SAFETY: inside tag 3's buffer.
        unsafe { b.addr(3).write_bytes(0xa5, 4096) };
    }
}
