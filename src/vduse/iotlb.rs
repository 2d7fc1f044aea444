//! The device's view of the driver's memory: VDUSE's IOTLB, mapped. The kernel driver hands
//! the device I/O virtual addresses (IOVAs); each IOTLB region is a range of them backed by
//! a file the kernel gives us (VDUSE_IOTLB_GET_FD: fd, offset, permission), which we map
//! shared. The mappings become a `GuestMemoryMmap` whose "guest addresses" are IOVAs, so
//! the virtqueue front end runs unchanged on it.
//!
//! What Linux 6.12 puts there for virtio_vdpa (drivers/vdpa/vdpa_user/iova_domain.c): one
//! region per coherent allocation (the rings), added when the driver allocates them, and one
//! region `[0, bounce_size)` for streaming DMA (every data buffer, request header and
//! indirect table is copied through these bounce pages), added at the driver's first
//! streaming mapping and removed at reset. The kernel sends UPDATE_IOTLB only when it
//! replaces mappings wholesale (vhost-vdpa), never for these: the control thread reads the
//! IOTLB again when it needs to (`device.rs`).

use std::io;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use super::control::DevicePort;
use super::uapi::{self, IotlbEntry};
use crate::guestmem::dirty::DirtyLog;
use crate::guestmem::fault::Owner;
use crate::guestmem::mapping::Mapping;
use crate::guestmem::{FrontendBitmap, GuestMemoryMmap, GuestRegionMmap};

/// Regions read in one refresh at most (the kernel has a handful: one per queue, one for
/// the bounce buffer).
const MAX_REGIONS: usize = 4096;
/// Largest region mapped (VDUSE's whole IOVA space is 1 GiB of bounce buffer + 128 MiB).
const MAX_REGION: u64 = 16 << 30;

#[derive(Debug, thiserror::Error)]
pub enum IotlbError {
    #[error("VDUSE_IOTLB_GET_FD failed: {0}")]
    Kernel(io::Error),
    #[error("IOTLB region {start:#x}..={last:#x}: {why}")]
    Region {
        start: u64,
        last: u64,
        why: &'static str,
    },
    #[error("mapping IOTLB region {start:#x}..={last:#x}: {err}")]
    Map { start: u64, last: u64, err: String },
    #[error("more than {MAX_REGIONS} IOTLB regions")]
    TooMany,
}

#[derive(Clone)]
struct Region {
    start: u64,
    /// Inclusive.
    last: u64,
    mapped: Arc<GuestRegionMmap>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory side effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

pub struct Iotlb {
    /// Who the mappings belong to in the SIGBUS table.
    owner: Owner,
    /// Never enabled (no migration through VDUSE): the regions' bitmaps need one.
    log: Arc<DirtyLog>,
    regions: Vec<Region>,
    snapshot: Option<Arc<GuestMemoryMmap>>,
}

impl Iotlb {
    pub fn new(owner: Owner) -> Iotlb {
        Iotlb {
            owner,
            log: Arc::new(DirtyLog::default()),
            regions: Vec::new(),
            snapshot: None,
        }
    }

    /// Forgets every mapping (reset: the driver frees its rings, and a coherent IOVA may be
    /// reused for other pages). Requests in flight keep their own snapshot.
    pub fn clear(&mut self) {
        self.regions.clear();
        self.snapshot = None;
    }

    /// The memory the queues use, if anything is mapped.
    pub fn snapshot(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.snapshot.clone()
    }

    /// The streaming DMA region (VDUSE's bounce buffer, at IOVA 0) is mapped: the driver
    /// has made its first streaming mapping, so every buffer it can offer is covered.
    pub fn has_streaming_region(&self) -> bool {
        self.regions.first().is_some_and(|r| r.start == 0)
    }

    /// How many regions are mapped.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Drops the mappings that overlap `[start, last]` and maps what the IOTLB holds there
    /// now. On error the table keeps what it had before.
    pub fn refresh(
        &mut self,
        port: &dyn DevicePort,
        start: u64,
        last: u64,
    ) -> Result<(), IotlbError> {
        let mut regions: Vec<Region> = self
            .regions
            .iter()
            .filter(|r| !overlaps((r.start, r.last), (start, last)))
            .cloned()
            .collect();
        let mut at = start;
        loop {
            let (file, e) = match port.iotlb_get_fd(at, last) {
                Ok(v) => v,
                Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                Err(err) => return Err(IotlbError::Kernel(err)),
            };
            if e.start > e.last || e.last < at || e.start > last {
                return Err(IotlbError::Region {
                    start: e.start,
                    last: e.last,
                    why: "the kernel answered a region outside the range asked",
                });
            }
            if regions.len() >= MAX_REGIONS {
                return Err(IotlbError::TooMany);
            }
            // A region that now overlaps an older mapping replaced it.
            regions.retain(|r| !overlaps((r.start, r.last), (e.start, e.last)));
            if e.perm == uapi::ACCESS_RW {
                regions.push(self.map(&file, &e)?);
            } else {
                // virtio_vdpa's regions are all read-write; vhost-vdpa's may not be, and
                // vubd maps read-write only: buffers there fail their requests.
                log::warn!(
                    "IOTLB region {:#x}..={:#x} has permission {} (not read-write): not mapped",
                    e.start,
                    e.last,
                    e.perm
                );
            }
            if e.last >= last {
                break;
            }
            at = e.last + 1;
        }
        regions.sort_by_key(|r| r.start);
        let snapshot = if regions.is_empty() {
            None
        } else {
            let arcs = regions.iter().map(|r| Arc::clone(&r.mapped)).collect();
            let mem = GuestMemoryMmap::from_arc_regions(arcs).map_err(|_| IotlbError::Region {
                start,
                last,
                why: "regions overlap",
            })?;
            Some(Arc::new(mem))
        };
        self.regions = regions;
        self.snapshot = snapshot;
        Ok(())
    }

    fn map(&self, file: &std::fs::File, e: &IotlbEntry) -> Result<Region, IotlbError> {
        let bad = |why| IotlbError::Region {
            start: e.start,
            last: e.last,
            why,
        };
        let len = e.last - e.start + 1;
        let page = page_size();
        if !e.start.is_multiple_of(page) || !e.offset.is_multiple_of(page) {
            return Err(bad("not page-aligned"));
        }
        if len > MAX_REGION || e.offset.checked_add(len).is_none() {
            return Err(bad("too large"));
        }
        // Whole pages: a coherent allocation's last page is mapped whole by the kernel too.
        let map_len = len.div_ceil(page) * page;
        // Fits: at most MAX_REGION rounded up to a page, below usize::MAX on 64-bit.
        let mapping = Arc::new(
            Mapping::map(file, e.offset, map_len as usize, self.owner).map_err(|err| {
                IotlbError::Map {
                    start: e.start,
                    last: e.last,
                    err: err.to_string(),
                }
            })?,
        );
        let ptr = mapping.as_ptr();
        // SAFETY: `ptr` is a live shared read-write mapping of `map_len >= len` bytes owned
        // by `mapping`, which the region's bitmap keeps alive for as long as the region (and
        // every snapshot holding it) exists; vm-memory never unmaps a raw pointer.
        let mmap = unsafe {
            MmapRegionBuilder::new_with_bitmap(
                len as usize,
                FrontendBitmap::new(mapping, Arc::clone(&self.log), e.start),
            )
            .with_raw_mmap_pointer(ptr)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
        }
        .map_err(|err| IotlbError::Map {
            start: e.start,
            last: e.last,
            err: err.to_string(),
        })?;
        let mapped = GuestRegionMmap::new(mmap, GuestAddress(e.start)).ok_or(bad("overflows"))?;
        Ok(Region {
            start: e.start,
            last: e.last,
            mapped: Arc::new(mapped),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeKernel;
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn maps_every_region_and_refreshes_a_range() {
        let k = FakeKernel::new(8 << 20);
        k.add_region(0, 4 << 20);
        k.add_region(4 << 20, 0x1800);
        let mut t = Iotlb::new(1 << 62);
        t.refresh(&k, 0, u64::MAX).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.has_streaming_region());
        let mem = t.snapshot().unwrap();
        assert_eq!(mem.num_regions(), 2);
        // Both views share the memfd: what the "driver" writes in the file, we read.
        let f = k.file.as_ref().unwrap();
        std::os::unix::fs::FileExt::write_at(f, b"ring", 4 << 20).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(4 << 20)).unwrap();
        assert_eq!(&b, b"ring");
        assert!(
            mem.read_slice(&mut b, GuestAddress((4 << 20) + 0x1800))
                .is_err(),
            "past the region"
        );
        // The streaming region goes (reset) and a refresh of its range drops it only.
        k.regions.lock().unwrap().retain(|e| e.start != 0);
        t.refresh(&k, 0, (4 << 20) - 1).unwrap();
        assert_eq!(t.len(), 1);
        assert!(!t.has_streaming_region());
        t.clear();
        assert!(t.snapshot().is_none());
    }

    #[test]
    fn hostile_answers_are_refused() {
        let k = FakeKernel::new(1 << 20);
        k.regions.lock().unwrap().push(IotlbEntry {
            offset: 0x10,
            start: 0,
            last: 0xfff,
            perm: uapi::ACCESS_RW,
        });
        let mut t = Iotlb::new(1 << 62);
        assert!(matches!(
            t.refresh(&k, 0, u64::MAX),
            Err(IotlbError::Region { .. })
        ));
        assert_eq!(t.len(), 0);
        // Read-only regions are skipped, not mapped writable.
        k.regions.lock().unwrap()[0] = IotlbEntry {
            offset: 0,
            start: 0,
            last: 0xfff,
            perm: uapi::ACCESS_RO,
        };
        t.refresh(&k, 0, u64::MAX).unwrap();
        assert_eq!(t.len(), 0);
    }
}
