//! The bitmap type of frontend memory regions (vm-memory's per-region hook). It keeps the
//! region's `Mapping` alive: vm-memory gets a raw pointer and never unmaps, and the mapping
//! goes (out of the SIGBUS table, then unmapped) when the last snapshot holding the region
//! drops it. And it carries the connection's dirty log with the region's guest address, so
//! every write through vm-memory or `access` marks its pages while a migration runs. Memory
//! vubd allocates itself (tests) has neither.

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::dirty::DirtyLog;
use super::mapping::Mapping;

#[derive(Clone, Debug, Default)]
pub struct FrontendBitmap {
    /// Held, never read: the mapping lives as long as any clone of the region.
    _mapping: Option<Arc<Mapping>>,
    /// The connection's log and the guest address of the region's first byte.
    log: Option<(Arc<DirtyLog>, u64)>,
}

impl FrontendBitmap {
    pub fn new(mapping: Arc<Mapping>, log: Arc<DirtyLog>, gpa: u64) -> FrontendBitmap {
        FrontendBitmap {
            _mapping: Some(mapping),
            log: Some((log, gpa)),
        }
    }

    /// The connection's dirty log, if the region has one.
    pub fn log(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref().map(|(l, _)| l)
    }
}

impl<'a> WithBitmapSlice<'a> for FrontendBitmap {
    type S = RefSlice<'a, FrontendBitmap>;
}

impl Bitmap for FrontendBitmap {
    /// `offset` is relative to the region.
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((log, gpa)) = &self.log {
            log.mark(gpa.wrapping_add(offset as u64), len as u64);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, FrontendBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for FrontendBitmap {
    fn with_len(_len: usize) -> Self {
        FrontendBitmap::default()
    }
}
