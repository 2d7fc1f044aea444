//! Fixed tables in anonymous mappings of their own, for the connection's large, long-lived
//! state (request and command slots, the receive buffer, iovec arrays).
//!
//! Why not `Vec`: a connection is built and dropped on its reactor, and its tables are large
//! (about 200 KiB) and live as long as it does. From the reactor's malloc arena they would
//! fragment it, and freeing them makes glibc shrink the arena's heap, which first opens
//! /proc/sys/vm/overcommit_memory: a call the reactor's seccomp filter refuses (with EACCES
//! now; it used to stop vubd). A mapping of their own is returned to the kernel whole with
//! `munmap`, which every thread may call, and never touches the arena.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

pub struct Table<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
}

impl<T> Table<T> {
    pub fn new(len: usize, mut init: impl FnMut() -> T) -> io::Result<Table<T>> {
        assert!(std::mem::align_of::<T>() <= 4096);
        let bytes = (len * std::mem::size_of::<T>())
            .max(1)
            .next_multiple_of(4096);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<T>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        for i in 0..len {
            // SAFETY: slot `i` is inside the mapping (len * size_of::<T>() <= bytes) and
            // page-aligned base + i * size_of::<T>() is aligned for T.
            unsafe { ptr.as_ptr().add(i).write(init()) };
        }
        Ok(Table { ptr, len, bytes })
    }
}

impl<T> Deref for Table<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialized values at `ptr`, owned by this table.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for Table<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for Table<T> {
    fn drop(&mut self) {
        // SAFETY: the values were initialized in `new` and are dropped once, here; then
        // the mapping made in `new` with `bytes` bytes is unmapped, once.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

/// A list of at most `capacity` iovecs whose storage never moves (SQEs point into it).
pub struct IovList {
    table: Table<libc::iovec>,
    len: usize,
}

impl IovList {
    pub fn new(capacity: usize) -> io::Result<IovList> {
        Ok(IovList {
            table: Table::new(capacity, || libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            })?,
            len: 0,
        })
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.table.len()
    }

    /// False when full.
    pub fn push(&mut self, v: libc::iovec) -> bool {
        if self.len == self.table.len() {
            return false;
        }
        self.table[self.len] = v;
        self.len += 1;
        true
    }

    #[cfg(test)]
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.table[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [libc::iovec] {
        &mut self.table[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_hold_and_drop_their_values() {
        let rc = std::rc::Rc::new(());
        {
            let mut t = Table::new(1000, || std::rc::Rc::clone(&rc)).unwrap();
            assert_eq!(std::rc::Rc::strong_count(&rc), 1001);
            t[999] = std::rc::Rc::clone(&rc);
            assert_eq!(std::rc::Rc::strong_count(&rc), 1001);
        }
        assert_eq!(std::rc::Rc::strong_count(&rc), 1);
        let mut l = IovList::new(2).unwrap();
        let v = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 1,
        };
        assert!(l.push(v) && l.push(v) && !l.push(v));
        assert_eq!(l.as_slice().len(), 2);
    }
}
