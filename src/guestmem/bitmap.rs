//! The bitmap type of frontend memory regions (vm-memory's per-region hook). It keeps the
//! region's `Mapping` alive: vm-memory gets a raw pointer and never unmaps, and the mapping
//! goes (out of the SIGBUS table, then unmapped) when the last snapshot holding the region
//! drops it. Memory vubd allocates itself (tests) has no mapping.

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::mapping::Mapping;

#[derive(Clone, Debug, Default)]
pub struct FrontendBitmap {
    /// Held, never read: the mapping lives as long as any clone of the region.
    _mapping: Option<Arc<Mapping>>,
}

impl FrontendBitmap {
    pub fn new(mapping: Arc<Mapping>) -> FrontendBitmap {
        FrontendBitmap {
            _mapping: Some(mapping),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for FrontendBitmap {
    type S = RefSlice<'a, FrontendBitmap>;
}

impl Bitmap for FrontendBitmap {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

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
