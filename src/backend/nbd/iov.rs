//! Byte ranges of a request's iovecs: the pieces a split command sends or receives, and the
//! copies the receive path makes when a payload arrives together with its header.
//!
//! Every function stops at the end of the iovecs, whatever range it is asked for: a
//! server's offsets are checked before they get here, and this is the second fence.

use libc::iovec;

use super::table::IovList;

/// Appends to `out` the pieces of `iov` that cover bytes `[off, off + len)`, until `out`
/// is full. Returns how many bytes the appended pieces cover.
pub fn append_range(iov: &[iovec], off: u64, len: u64, out: &mut IovList) -> u64 {
    let mut skip = off;
    let mut want = len;
    let mut got = 0;
    for v in iov {
        if want == 0 {
            break;
        }
        let vlen = v.iov_len as u64;
        if skip >= vlen {
            skip -= vlen;
            continue;
        }
        let take = (vlen - skip).min(want);
        let piece = iovec {
            // In bounds: skip < vlen. Pointer arithmetic only; nothing is dereferenced.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip as usize).cast(),
            iov_len: take as usize,
        };
        if !out.push(piece) {
            break;
        }
        skip = 0;
        want -= take;
        got += take;
    }
    got
}

/// Copies `src` into the iovecs' bytes from `off` on. Returns how many bytes were copied.
///
/// # Safety
/// The iovecs must describe writable memory that stays valid for the call, and that does
/// not overlap `src`.
pub unsafe fn copy_in(iov: &[iovec], off: u64, src: &[u8]) -> usize {
    let mut skip = off;
    let mut done = 0;
    for v in iov {
        if done == src.len() {
            break;
        }
        let vlen = v.iov_len as u64;
        if skip >= vlen {
            skip -= vlen;
            continue;
        }
        let n = ((vlen - skip) as usize).min(src.len() - done);
        // SAFETY: `skip + n <= iov_len`, so the destination lies inside this iovec, which
        // the caller promises is valid writable memory apart from `src`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(done),
                v.iov_base.cast::<u8>().add(skip as usize),
                n,
            )
        };
        skip = 0;
        done += n;
    }
    done
}

/// Zeroes `len` bytes of the iovecs from `off` on (a hole in a read reply).
///
/// # Safety
/// The iovecs must describe writable memory that stays valid for the call.
pub unsafe fn zero(iov: &[iovec], off: u64, len: u64) -> u64 {
    let mut skip = off;
    let mut left = len;
    for v in iov {
        if left == 0 {
            break;
        }
        let vlen = v.iov_len as u64;
        if skip >= vlen {
            skip -= vlen;
            continue;
        }
        let n = (vlen - skip).min(left);
        // SAFETY: `skip + n <= iov_len`: inside this iovec, valid writable memory (caller).
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>().add(skip as usize), 0, n as usize) };
        skip = 0;
        left -= n;
    }
    len - left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovs(bufs: &mut [Vec<u8>]) -> Vec<iovec> {
        bufs.iter_mut()
            .map(|b| iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn ranges_copies_and_holes() {
        let mut bufs = vec![vec![0u8; 3], vec![0u8; 5], vec![0u8; 2]];
        let v = iovs(&mut bufs);
        let mut out = IovList::new(16).unwrap();
        assert_eq!(append_range(&v, 2, 7, &mut out), 7);
        assert_eq!(
            out.as_slice().iter().map(|o| o.iov_len).collect::<Vec<_>>(),
            vec![1, 5, 1]
        );
        let mut two = IovList::new(2).unwrap();
        assert_eq!(append_range(&v, 2, 7, &mut two), 6, "stops when full");
        out.clear();
        assert_eq!(append_range(&v, 8, 100, &mut out), 2, "stops at the end");

        // SAFETY: the iovecs point into `bufs`, alive and not aliased by the source.
        let n = unsafe { copy_in(&v, 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) };
        assert_eq!(n, 9, "never past the end");
        assert_eq!(bufs.concat(), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let v = iovs(&mut bufs);
        // SAFETY: as above.
        assert_eq!(unsafe { zero(&v, 2, 5) }, 5);
        assert_eq!(bufs.concat(), vec![0, 1, 0, 0, 0, 0, 0, 7, 8, 9]);
    }
}
