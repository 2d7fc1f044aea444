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

/// An array of `T` in guest memory that the device reads entry by entry: a descriptor
/// table. Its region is looked up once. When the whole array lies in one region and is
/// aligned for `T` (always, for a driver that follows the spec), an entry is one load;
/// otherwise each entry takes `read_obj`'s path.
pub struct GuestArray<'a, T> {
    mem: &'a GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    host: Option<*const T>,
}

impl<'a, T: ByteValued> GuestArray<'a, T> {
    pub fn new(mem: &'a GuestMemoryMmap, addr: GuestAddress, len: u32) -> Self {
        let host = (len as usize)
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|bytes| host_range(mem, addr, bytes))
            .map(|(p, _, _)| p.cast_const().cast::<T>())
            .filter(|p| p.is_aligned());
        GuestArray {
            mem,
            addr,
            len,
            host,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    /// Entry `i`, if it is below the length and in guest memory.
    #[inline]
    pub fn get(&self, i: u32) -> Option<T> {
        if i >= self.len {
            return None;
        }
        if let Some(p) = self.host {
            // SAFETY: `new` checked that all `len` entries lie in one mapped region and that
            // `p` is aligned for T; `i` is below `len`; the region stays mapped while `mem`
            // is borrowed; T is plain data. Volatile: the driver owns the memory.
            return Some(unsafe { std::ptr::read_volatile(p.add(i as usize)) });
        }
        let at = self
            .addr
            .checked_add(u64::from(i) * std::mem::size_of::<T>() as u64)?;
        read_obj(self.mem, at)
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
    fn arrays_off_alignment_or_across_regions_are_read_entry_by_entry() {
        // Two regions; an array at an odd address, and one that crosses into the second.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        for at in [0x101u64, 0xfe0] {
            for i in 0..4u64 {
                mem.write_obj(i * 0x1111, GuestAddress(at + 8 * i)).unwrap();
            }
            let a = GuestArray::<u64>::new(&mem, GuestAddress(at), 6);
            assert!(a.host.is_none(), "array at {at:#x}");
            assert_eq!(a.get(3), Some(0x3333));
            assert_eq!(a.get(6), None, "beyond the length");
        }
        let a = GuestArray::<u64>::new(&mem, GuestAddress(0x100), 4);
        assert!(a.host.is_some(), "the fast path is taken when it can be");
        mem.write_obj(0x4242u64, GuestAddress(0x118)).unwrap();
        assert_eq!(a.get(3), Some(0x4242));
        assert_eq!(a.get(4), None, "beyond the length");
        assert!(GuestArray::<u64>::new(&mem, GuestAddress(0x1ff8), 2)
            .get(1)
            .is_none());
    }

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
