//! Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1 §2.8), device side. virtio-queue has
//! split rings only, so vubd runs packed rings itself:
//! - `ring`: where the ring stands (avail and used positions with their wrap counters),
//!   which chain the driver offers next, used descriptors written back, event suppression in
//!   both directions, and the vhost-user vring base that carries both positions;
//! - `chain`: the walk over one chain's descriptors, indirect table included, yielding the
//!   split `Descriptor`s the request parser reads, with chain.rs's bounds;
//! - `inflight`: INFLIGHT_SHMFD's packed layout, so a restarted vubd finds the requests a
//!   killed one had taken, and where both rings stood.
//!
//! A packed ring is one descriptor array the driver and the device both write: the driver
//! marks a descriptor available by setting its AVAIL bit to, and its USED bit to the inverse
//! of, the driver's wrap counter; the device marks the first descriptor of a finished chain's
//! slot used by setting both bits to its own wrap counter. Each counter flips when its index
//! passes the end of the ring. Buffers complete in any order: used descriptors are written one
//! after another from the used position, each skipping as many slots as its chain had.

pub mod chain;
pub mod inflight;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod ring;

use vm_memory::ByteValued;

pub use inflight::PackedInflight;
pub use ring::{PackedRing, PackedRingConfig, VringBase};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const DESC_F_AVAIL: u16 = 1 << 7;
pub const DESC_F_USED: u16 = 1 << 15;

/// Event suppression flags (`pvirtq_event_suppress.flags`).
pub const EVENT_F_ENABLE: u16 = 0;
pub const EVENT_F_DISABLE: u16 = 1;
/// Only with VIRTIO_RING_F_EVENT_IDX: an event when the ring passes `off_wrap`.
pub const EVENT_F_DESC: u16 = 2;
/// The wrap counter bit of `off_wrap` (and of vring base halves).
pub const WRAP_BIT: u16 = 1 << 15;

/// Most entries a packed ring may have (virtio 1.1: 2^15).
pub const MAX_QUEUE_SIZE: u16 = 1 << 15;

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// One descriptor of a packed ring or of an indirect table (`struct pvirtq_desc`), as stored
/// in guest memory (little endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

// SAFETY: four integers, no padding (8 + 4 + 2 + 2 = 16 bytes, align 8): any bytes are a
// valid value.
unsafe impl ByteValued for PackedDesc {}

impl PackedDesc {
    pub fn new(addr: u64, len: u32, id: u16, flags: u16) -> PackedDesc {
        PackedDesc {
            addr: addr.to_le(),
            len: len.to_le(),
            id: id.to_le(),
            flags: flags.to_le(),
        }
    }
    pub fn addr(&self) -> u64 {
        u64::from_le(self.addr)
    }
    pub fn len(&self) -> u32 {
        u32::from_le(self.len)
    }
    pub fn id(&self) -> u16 {
        u16::from_le(self.id)
    }
    pub fn flags(&self) -> u16 {
        u16::from_le(self.flags)
    }
    pub fn has_next(&self) -> bool {
        self.flags() & DESC_F_NEXT != 0
    }
    pub fn is_indirect(&self) -> bool {
        self.flags() & DESC_F_INDIRECT != 0
    }
}

/// Offsets inside a descriptor and an event suppression structure.
pub(crate) const OFF_LEN: u64 = 8;
pub(crate) const OFF_ID: u64 = 12;
pub(crate) const OFF_FLAGS: u64 = 14;
pub(crate) const OFF_EVENT_OFF_WRAP: u64 = 0;
pub(crate) const OFF_EVENT_FLAGS: u64 = 2;

/// Whether descriptor flags say "available" to a device whose avail wrap counter is `wrap`.
#[inline]
pub fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
}

/// Whether descriptor flags say "used" in the lap whose wrap counter is `wrap`.
#[inline]
pub fn is_used(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) == wrap
}
