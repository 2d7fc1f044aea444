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
        // A driver places rings and descriptor tables where it likes: an address not aligned
        // for T (hostile, or a frontend's odd region) takes vm-memory's byte-wise path.
        Some((p, _, _)) if p.align_offset(std::mem::align_of::<T>()) == 0 => {
            // SAFETY: the range lies inside a mapped region and is aligned for T (both
            // checked); T is plain data, valid for any bytes; the read is volatile because
            // the driver owns the memory and may change it at any time.
            Some(unsafe { std::ptr::read_volatile(p.cast::<T>()) })
        }
        _ => mem.read_obj(addr).ok(),
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

/// Writes a plain-data object (a packed ring's used descriptor fields, its event suppression
/// words), and marks it. An aligned object is one volatile store of its size, as drivers
/// expect of a ring's flags; callers order such stores with fences.
#[inline]
pub fn write_obj<T: ByteValued>(mem: &GuestMemoryMmap, addr: GuestAddress, v: T) -> bool {
    let len = std::mem::size_of::<T>();
    match host_range(mem, addr, len) {
        Some((p, r, off)) => {
            if p.align_offset(std::mem::align_of::<T>()) == 0 {
                // SAFETY: the range lies inside a mapped region (checked) and is aligned for
                // T (checked); T is plain data. Volatile: the driver reads it concurrently.
                unsafe { std::ptr::write_volatile(p.cast::<T>(), v) };
            } else {
                // Only a frontend that placed a region at an odd guest address gets here.
                for (i, b) in v.as_slice().iter().enumerate() {
                    // SAFETY: p + i lies inside the checked range.
                    unsafe { std::ptr::write_volatile(p.add(i), *b) };
                }
            }
            r.bitmap().mark_dirty(off, len);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_at_unaligned_guest_addresses_are_read_whole() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x101))
            .unwrap();
        assert_eq!(
            read_obj::<u64>(&mem, GuestAddress(0x101)),
            Some(0x1122_3344_5566_7788)
        );
        mem.write_obj(0xabcdu16, GuestAddress(0x200)).unwrap();
        assert_eq!(read_obj::<u16>(&mem, GuestAddress(0x200)), Some(0xabcd));
        assert_eq!(
            read_obj::<u64>(&mem, GuestAddress(0xffc)),
            None,
            "crosses the end"
        );
    }
}
