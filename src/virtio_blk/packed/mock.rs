//! Test and bench support: the driver side of a packed ring in guest memory, as a virtio
//! driver runs it (virtio 1.1 §2.8.21-22): chains written at the driver's avail position
//! with its wrap counter's AVAIL/USED bits, the head's flags last; used descriptors read
//! back at its used position, skipping each buffer's chain length.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress};

use super::ring::{PackedRing, PackedRingConfig, Position, VringBase};
use super::{
    is_used, PackedDesc, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_SIZE,
    OFF_EVENT_FLAGS, OFF_EVENT_OFF_WRAP,
};
use crate::blk::Backend;
use crate::engine::Ctx;
use crate::guestmem::GuestMemoryMmap;
use crate::virtio_blk::notify::EventFdNotifier;
use crate::virtio_blk::queue::{QueueStart, Ring, VirtQueue};

pub struct MockPackedQueue<'a> {
    mem: &'a GuestMemoryMmap,
    base: GuestAddress,
    size: u16,
    avail: Position,
    used: Position,
    /// Buffer ids not in flight, lowest first.
    free: Vec<u16>,
    /// Ring slots of each buffer id's chain.
    slots: Vec<u16>,
}

impl<'a> MockPackedQueue<'a> {
    /// A ring of `size` descriptors at `base`, its driver event structure right after the
    /// table and the device's 16 bytes further.
    pub fn new(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let q = MockPackedQueue {
            mem,
            base,
            size,
            avail: Position::START,
            used: Position::START,
            free: (0..size).rev().collect(),
            slots: vec![0; usize::from(size)],
        };
        let zeroes = vec![0u8; usize::from(size) * DESC_SIZE as usize + 0x20];
        mem.write_slice(&zeroes, base).expect("ring inside memory");
        q
    }

    /// What the device is told (SET_VRING_NUM/ADDR, features).
    pub fn config(&self, event_idx: bool) -> PackedRingConfig {
        let driver = self.base.unchecked_add(u64::from(self.size) * DESC_SIZE);
        PackedRingConfig {
            size: self.size,
            desc_table: self.base,
            driver_event: driver,
            device_event: driver.unchecked_add(0x10),
            event_idx,
        }
    }

    pub fn avail_position(&self) -> Position {
        self.avail
    }

    /// Writes descriptor `idx` as is.
    pub fn write_desc(&self, idx: u16, d: PackedDesc) {
        self.mem
            .write_obj(d, self.base.unchecked_add(u64::from(idx) * DESC_SIZE))
            .expect("slot inside memory");
    }

    /// Makes `(addr, len, flags, id)` descriptors available from the avail position, flags
    /// as given plus the AVAIL/USED bits of each slot's lap, the first one's flags last.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) {
        let head = self.avail;
        let mut head_flags = 0;
        for (k, &(addr, len, flags, id)) in descs.iter().enumerate() {
            let bits = if self.avail.wrap {
                DESC_F_AVAIL
            } else {
                DESC_F_USED
            };
            if k == 0 {
                head_flags = flags | bits;
                self.write_desc(self.avail.idx, PackedDesc::new(addr, len, id, 0));
            } else {
                self.write_desc(self.avail.idx, PackedDesc::new(addr, len, id, flags | bits));
            }
            self.avail = self.avail.advance(1, self.size);
        }
        if let Some(&(_, _, _, id)) = descs.last() {
            if let Some(s) = self.slots.get_mut(usize::from(id)) {
                *s = descs.len() as u16;
            }
        }
        fence(Ordering::Release);
        let at = self
            .base
            .unchecked_add(u64::from(head.idx) * DESC_SIZE + super::OFF_FLAGS);
        self.mem
            .write_obj(head_flags, at)
            .expect("slot inside memory");
    }

    /// Makes a chain of `(addr, len, flags)` buffers available under a free buffer id (NEXT
    /// added to all but the last); returns the id.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let id = self.free.pop().expect("a free buffer id");
        let n = bufs.len();
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(a, l, f))| (a, l, if k + 1 < n { f | DESC_F_NEXT } else { f }, id))
            .collect();
        self.add_raw(&descs);
        id
    }

    /// Writes the `(addr, len, flags)` entries as an indirect table at `table` and makes one
    /// descriptor referring to it available; returns the buffer id.
    pub fn add_indirect(&mut self, table: u64, bufs: &[(u64, u32, u16)]) -> u16 {
        for (i, &(a, l, f)) in bufs.iter().enumerate() {
            self.mem
                .write_obj(
                    PackedDesc::new(a, l, 0, f),
                    GuestAddress(table + 16 * i as u64),
                )
                .expect("table inside memory");
        }
        let id = self.free.pop().expect("a free buffer id");
        let len = (bufs.len() * 16) as u32;
        self.add_raw(&[(table, len, DESC_F_INDIRECT, id)]);
        id
    }

    /// The next used buffer, if the device has written one: (id, len).
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let d: PackedDesc = self
            .mem
            .read_obj(
                self.base
                    .unchecked_add(u64::from(self.used.idx) * DESC_SIZE),
            )
            .ok()?;
        if !is_used(d.flags(), self.used.wrap) {
            return None;
        }
        fence(Ordering::Acquire);
        let id = d.id();
        let n = *self.slots.get(usize::from(id))?;
        self.used = self.used.advance(n, self.size);
        self.free.push(id);
        Some((id, d.len()))
    }

    /// Sets the driver's event suppression structure.
    pub fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        let ev = self.config(false).driver_event;
        self.mem
            .write_obj(off_wrap, ev.unchecked_add(OFF_EVENT_OFF_WRAP))
            .unwrap();
        self.mem
            .write_obj(flags, ev.unchecked_add(OFF_EVENT_FLAGS))
            .unwrap();
    }
}

/// What a reactor gets to poll the packed ring `drv` drives (queue 0 of device "test") on
/// `backend`: no kick or call fd, no inflight tracking, at the ring's start.
pub fn queue_start(
    drv: &MockPackedQueue<'_>,
    mem: &Arc<GuestMemoryMmap>,
    backend: Arc<dyn Backend>,
    serial: &str,
    event_idx: bool,
) -> QueueStart {
    QueueStart {
        device: Arc::from("test"),
        index: 0,
        ring: Ring::Packed {
            ring: PackedRing::new(drv.config(event_idx), VringBase::START),
            inflight: None,
        },
        mem: Arc::clone(mem),
        model: crate::virtio_blk::mock::model(&*backend, serial),
        backend,
        kick: None,
        resubmit: Vec::new(),
        latency: true,
    }
}

/// The queue poller for `start`, built on the calling thread's test ring.
pub fn virt_queue(start: QueueStart, ctx: &mut Ctx<'_>) -> VirtQueue<EventFdNotifier> {
    VirtQueue::new(start, EventFdNotifier::new(None), ctx).expect("backend channel")
}
