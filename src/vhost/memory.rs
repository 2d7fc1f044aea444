//! The frontend's memory table: regions mapped from its fds (MAP_SHARED, registered with the
//! SIGBUS table under the connection's id), published to reactors as immutable
//! `Arc<GuestMemoryMmap>` snapshots.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use crate::guestmem::dirty::DirtyLog;
use crate::guestmem::fault::Owner;
use crate::guestmem::mapping::Mapping;
use crate::guestmem::{FrontendBitmap, GuestMemoryMmap, GuestRegionMmap};

/// Slots offered with CONFIGURE_MEM_SLOTS (the number libvhost-user offers on x86).
pub const MAX_MEM_SLOTS: u64 = 509;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("memory region is empty or its addresses overflow")]
    Invalid,
    #[error("memory region overlaps an existing one")]
    Overlap,
    #[error("too many memory regions (at most {MAX_MEM_SLOTS})")]
    TooMany,
    #[error("memory region fd is not a regular file large enough for the region")]
    BadFile,
    #[error("mmap of the memory region failed: {0}")]
    Map(String),
    #[error("no such memory region")]
    NotFound,
}

#[derive(Clone)]
struct Region {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mapped: Arc<GuestRegionMmap>,
}

pub struct MemoryTable {
    /// The connection the mappings belong to (SIGBUS containment).
    owner: Owner,
    /// The connection's dirty log, which every region marks.
    log: Arc<DirtyLog>,
    regions: Vec<Region>,
    snapshot: Option<Arc<GuestMemoryMmap>>,
}

fn check_region(r: &VhostUserMemoryRegion, file: &File) -> Result<(), MemoryError> {
    let valid = r.memory_size != 0
        && r.guest_phys_addr.checked_add(r.memory_size).is_some()
        && r.user_addr.checked_add(r.memory_size).is_some()
        && r.mmap_offset.checked_add(r.memory_size).is_some()
        && usize::try_from(r.memory_size).is_ok();
    if !valid {
        return Err(MemoryError::Invalid);
    }
    // Mapping past the end of the file would turn the first access into SIGBUS: a frontend
    // must not be able to kill the server that way.
    let meta = file.metadata().map_err(|_| MemoryError::BadFile)?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) || meta.len() < r.mmap_offset + r.memory_size {
        return Err(MemoryError::BadFile);
    }
    Ok(())
}

fn overlaps(a_start: u64, a_size: u64, b_start: u64, b_size: u64) -> bool {
    a_start < b_start + b_size && b_start < a_start + a_size
}

impl MemoryTable {
    pub fn new(owner: Owner, log: Arc<DirtyLog>) -> MemoryTable {
        MemoryTable {
            owner,
            log,
            regions: Vec::new(),
            snapshot: None,
        }
    }

    fn map(&self, r: &VhostUserMemoryRegion, file: File) -> Result<Region, MemoryError> {
        check_region(r, &file)?;
        // Fits: check_region made sure the size fits a usize.
        let len = r.memory_size as usize;
        let mapping = Arc::new(
            Mapping::map(&file, r.mmap_offset, len, self.owner)
                .map_err(|e| MemoryError::Map(e.to_string()))?,
        );
        let ptr = mapping.as_ptr();
        // SAFETY: `ptr` is a live mapping of `len` bytes, read-write and shared, owned by the
        // `Mapping` that the region's bitmap keeps alive for as long as the region exists;
        // vm-memory does not own it and never unmaps it.
        let mmap = unsafe {
            MmapRegionBuilder::new_with_bitmap(
                len,
                FrontendBitmap::new(mapping, Arc::clone(&self.log), r.guest_phys_addr),
            )
            .with_raw_mmap_pointer(ptr)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
        }
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        let mapped = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
            .ok_or(MemoryError::Invalid)?;
        Ok(Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
            mapped: Arc::new(mapped),
        })
    }

    fn insert(regions: &mut Vec<Region>, new: Region) -> Result<(), MemoryError> {
        if regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany);
        }
        let clash = regions.iter().any(|r| {
            overlaps(r.gpa, r.size, new.gpa, new.size)
                || overlaps(r.user_addr, r.size, new.user_addr, new.size)
        });
        if clash {
            return Err(MemoryError::Overlap);
        }
        regions.push(new);
        regions.sort_by_key(|r| r.gpa);
        Ok(())
    }

    fn publish(&mut self, regions: Vec<Region>) -> Result<(), MemoryError> {
        self.snapshot = if regions.is_empty() {
            None
        } else {
            let arcs = regions.iter().map(|r| Arc::clone(&r.mapped)).collect();
            let mem = GuestMemoryMmap::from_arc_regions(arcs).map_err(|_| MemoryError::Overlap)?;
            Some(Arc::new(mem))
        };
        self.regions = regions;
        Ok(())
    }

    /// SET_MEM_TABLE: replaces the whole table; on error the old table stays.
    pub fn set_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        let mut new = Vec::new();
        for (r, f) in regions.iter().zip(files) {
            Self::insert(&mut new, self.map(r, f)?)?;
        }
        self.publish(new)
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, r: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
        let mut regions = self.regions.clone();
        Self::insert(&mut regions, self.map(r, file)?)?;
        self.publish(regions)
    }

    /// REM_MEM_REG: the region with this guest address and size. Requests in flight keep
    /// their own snapshot, so the mapping goes away only when the last of them completes.
    pub fn remove(&mut self, gpa: u64, size: u64) -> Result<(), MemoryError> {
        let mut regions = self.regions.clone();
        let i = regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
            .ok_or(MemoryError::NotFound)?;
        regions.remove(i);
        self.publish(regions)
    }

    pub fn clear(&mut self) {
        self.regions.clear();
        self.snapshot = None;
    }

    pub fn snapshot(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.snapshot.clone()
    }

    /// Frontend virtual address -> guest physical address, for vring addresses. The whole
    /// `len` bytes must lie in one region.
    pub fn vva_to_gpa(&self, vva: u64, len: u64) -> Option<GuestAddress> {
        let r = self
            .regions
            .iter()
            .find(|r| vva >= r.user_addr && vva - r.user_addr < r.size)?;
        let off = vva - r.user_addr;
        if off.checked_add(len)? > r.size {
            return None;
        }
        Some(GuestAddress(r.gpa + off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfile(size: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn translate_add_remove() {
        let mut t = MemoryTable::new(1, Arc::default());
        let r = VhostUserMemoryRegion::new(0x10000, 0x4000, 0x7f00_0000, 0);
        t.add(&r, memfile(0x4000)).unwrap();
        assert_eq!(t.vva_to_gpa(0x7f00_0010, 16), Some(GuestAddress(0x10010)));
        assert_eq!(t.vva_to_gpa(0x7f00_3ff8, 16), None, "crosses the end");
        assert_eq!(t.vva_to_gpa(0x1000, 1), None);
        assert!(t.snapshot().is_some());
        t.remove(0x10000, 0x4000).unwrap();
        assert!(t.snapshot().is_none());
        assert_eq!(t.remove(0x10000, 0x4000), Err(MemoryError::NotFound));
    }

    #[test]
    fn hostile_regions_are_refused() {
        let mut t = MemoryTable::new(1, Arc::default());
        let zero = VhostUserMemoryRegion::new(0, 0, 0x1000, 0);
        assert_eq!(t.add(&zero, memfile(0x1000)), Err(MemoryError::Invalid));
        let overflow = VhostUserMemoryRegion::new(u64::MAX - 0xfff, 0x2000, 0x1000, 0);
        assert_eq!(t.add(&overflow, memfile(0x2000)), Err(MemoryError::Invalid));
        let too_big = VhostUserMemoryRegion::new(0, 0x4000, 0x1000, 0);
        assert_eq!(t.add(&too_big, memfile(0x1000)), Err(MemoryError::BadFile));
        let a = VhostUserMemoryRegion::new(0, 0x2000, 0x10000, 0);
        t.add(&a, memfile(0x2000)).unwrap();
        let b = VhostUserMemoryRegion::new(0x1000, 0x2000, 0x40000, 0);
        assert_eq!(t.add(&b, memfile(0x2000)), Err(MemoryError::Overlap));
        let c = VhostUserMemoryRegion::new(0x8000, 0x2000, 0x11000, 0);
        assert_eq!(
            t.add(&c, memfile(0x2000)),
            Err(MemoryError::Overlap),
            "user range overlaps"
        );
    }
}
