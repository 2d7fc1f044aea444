//! A shared mapping of a frontend's file, registered with the SIGBUS table for as long as it
//! exists.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use super::fault::{self, Owner, Registration};

#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    registration: Option<Registration>,
}

// SAFETY: the mapping is plain shared memory owned by this value until Drop; the raw pointer
// is only an address, and accesses go through vm-memory's volatile slices or the owners'
// own volatile accessors.
unsafe impl Send for Mapping {}
// SAFETY: see Send; &Mapping hands out only the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` at `offset`, read-write and shared, for `owner`.
    pub fn map(file: &File, offset: u64, len: usize, owner: Owner) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: a new shared mapping of an fd we hold; no existing memory is affected;
        // failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut m = Mapping {
            ptr: p.cast(),
            len,
            registration: None,
        };
        m.registration =
            Some(fault::register(m.ptr, len, owner).map_err(|e| io::Error::other(e.to_string()))?);
        Ok(m)
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Out of the table first: nothing accesses the mapping any more, and the address
        // range must not be attributed to us once it is free for reuse.
        drop(self.registration.take());
        // SAFETY: the mapping was created in `map` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
