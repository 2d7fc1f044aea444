//! Guest ranges -> `iovec`s pointing straight into mapped guest memory. The only place raw
//! pointers into guest memory are made.

use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::guestmem::{access, GuestMemoryMmap};

/// A guest physical range of a request's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Most iovecs one request may need (the kernel's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum IovecError {
    /// A range is not entirely inside the frontend's memory regions.
    OutsideMemory,
    /// More pieces than `MAX_IOVECS` (a range may split where guest regions meet).
    TooMany,
}

/// Appends the host mappings of `ranges` to `out`.
///
/// The pointers stay valid as long as the `GuestMemoryMmap` they come from (or a clone of its
/// `Arc`) is alive: its regions are unmapped only when their last reference drops. Callers keep
/// the snapshot alive until the kernel is done with the iovecs.
pub fn build(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    write: bool,
    out: &mut Vec<libc::iovec>,
) -> Result<(), IovecError> {
    let access = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for r in ranges {
        if let Some((p, _, _)) = access::host_range(mem, r.addr, r.len as usize) {
            // The common case: the range lies in one region. Frontend regions are mapped
            // read-write, so both directions are allowed.
            if out.len() == MAX_IOVECS {
                return Err(IovecError::TooMany);
            }
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: r.len as usize,
            });
            continue;
        }
        let slices = mem
            .get_slices(r.addr, r.len as usize, access)
            .map_err(|_| IovecError::OutsideMemory)?;
        for slice in slices {
            let slice = slice.map_err(|_| IovecError::OutsideMemory)?;
            if out.len() == MAX_IOVECS {
                return Err(IovecError::TooMany);
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_map_into_guest_memory_and_split_across_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(0xff8)).unwrap();
        let mut out = Vec::new();
        build(
            &mem,
            &[GuestRange {
                addr: GuestAddress(0xff8),
                len: 16,
            }],
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len + out[1].iov_len, 16);
        // SAFETY: the iovec points into `mem`, alive for this whole test.
        let first = unsafe { std::slice::from_raw_parts(out[0].iov_base as *const u8, 8) };
        assert_eq!(first, &[7u8; 8]);
    }

    #[test]
    fn outside_memory_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut out = Vec::new();
        let r = [GuestRange {
            addr: GuestAddress(0xf00),
            len: 0x200,
        }];
        assert_eq!(
            build(&mem, &r, true, &mut out),
            Err(IovecError::OutsideMemory)
        );
        let r = [GuestRange {
            addr: GuestAddress(u64::MAX - 4),
            len: 0x200,
        }];
        assert_eq!(
            build(&mem, &r, true, &mut out),
            Err(IovecError::OutsideMemory)
        );
    }
}
