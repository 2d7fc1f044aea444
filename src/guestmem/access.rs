//! The request path's accesses to guest memory: one region lookup (binary search) and a
//! bounds check, then a plain volatile access. vm-memory's general `Bytes` paths (slice
//! iterators, per-access error plumbing) cost several times more per request and their
//! inlining varies from build to build. A range that crosses regions (rare: regions are
//! large and requests small) goes the general way. Writes mark the region's bitmap, as
//! vm-memory's own writes do.

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::GuestMemoryMmap;

/// The host address of `[addr, addr + len)`, if it lies inside one region, and that region's
/// offset of `addr` (for its bitmap).
#[inline]
pub fn host_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<(*mut u8, &super::GuestRegionMmap, usize)> {
    let r = mem.find_region(addr)?;
    let off = addr.raw_value() - r.start_addr().raw_value();
    let end = off.checked_add(len as u64)?;
    if end > r.len() {
        return None;
    }
    let p = r.get_host_address(MemoryRegionAddress(off)).ok()?;
    // Fits: `off` is inside a region, which is mapped, so below usize::MAX.
    Some((p, r, off as usize))
}

/// Reads a plain-data object (a descriptor, a request header).
#[inline]
pub fn read_obj<T: ByteValued>(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<T> {
    match host_range(mem, addr, std::mem::size_of::<T>()) {
        // SAFETY: the range lies inside a mapped region (checked); T is plain data, valid
        // for any bytes; the read is volatile and unaligned because the driver owns the
        // memory and may change it at any time.
        Some((p, _, _)) => Some(unsafe { std::ptr::read_volatile(p.cast::<T>()) }),
        None => mem.read_obj(addr).ok(),
    }
}

/// Copies `out.len()` bytes at `addr` out of guest memory.
#[inline]
pub fn read_bytes(mem: &GuestMemoryMmap, addr: GuestAddress, out: &mut [u8]) -> bool {
    match host_range(mem, addr, out.len()) {
        Some((p, _, _)) => {
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: p + i lies inside the checked range.
                *b = unsafe { std::ptr::read_volatile(p.add(i)) };
            }
            true
        }
        None => mem.read_slice(out, addr).is_ok(),
    }
}

/// Writes one byte (a status byte).
#[inline]
pub fn write_u8(mem: &GuestMemoryMmap, addr: GuestAddress, v: u8) -> bool {
    match host_range(mem, addr, 1) {
        Some((p, r, off)) => {
            // SAFETY: the byte lies inside a mapped region (checked).
            unsafe { std::ptr::write_volatile(p, v) };
            r.bitmap().mark_dirty(off, 1);
            true
        }
        None => mem.write_obj(v, addr).is_ok(),
    }
}

/// Marks dirty the guest pages behind `[p, p + len)`, a host range inside one region of
/// `mem` (an iovec the backend filled). For the dirty log while it is on: a linear walk over
/// the regions, which are few.
pub fn mark_host_range(mem: &GuestMemoryMmap, p: *const u8, len: usize) {
    let a = p as usize;
    for r in mem.iter() {
        let Ok(base) = r.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let off = a.wrapping_sub(base as usize);
        if a >= base as usize && (off as u64) < r.len() {
            r.bitmap().mark_dirty(off, len);
            return;
        }
    }
}
