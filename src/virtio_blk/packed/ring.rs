//! One packed ring as the device runs it: where the driver's next chain starts (avail
//! position) and where the next used descriptor goes (used position), each with its wrap
//! counter; taking chains, writing used descriptors back, and event suppression both ways.
//!
//! Everything in the ring comes from the driver and is checked before use: a chain longer
//! than the ring (NEXT set all the way round), a chain that runs into a descriptor the driver
//! has not made available, a buffer id beyond the queue size or still in flight, and more
//! descriptors in flight than the ring holds all end the queue (`RingError`). Every write
//! goes through `guestmem::access`, which marks the dirty log during a migration.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use super::chain::PackedChain;
use super::inflight::PackedInflight;
use super::{
    is_avail, PackedDesc, DESC_F_AVAIL, DESC_F_USED, DESC_F_WRITE, DESC_SIZE, EVENT_F_DESC,
    EVENT_F_DISABLE, EVENT_F_ENABLE, MAX_QUEUE_SIZE, OFF_EVENT_FLAGS, OFF_EVENT_OFF_WRAP,
    OFF_FLAGS, OFF_ID, OFF_LEN, WRAP_BIT,
};
use crate::guestmem::{access, GuestMemoryMmap};

/// Why a packed ring cannot go on: the queue stops until the frontend resets it.
pub type RingError = &'static str;

/// A slot of the ring and the wrap counter of the lap it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub idx: u16,
    pub wrap: bool,
}

impl Position {
    /// Where both rings start (virtio 1.1 §2.8.1: wrap counters start at 1).
    pub const START: Position = Position { idx: 0, wrap: true };

    /// `n` slots further in a ring of `size` (`n <= size`).
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> Position {
        let i = u32::from(self.idx) + u32::from(n);
        if i >= u32::from(size) {
            // Fits: below 2 * size <= 2^16, minus size.
            Position {
                idx: (i - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Position {
                idx: i as u16,
                wrap: self.wrap,
            }
        }
    }

    /// Slots from `earlier` to `self`, when `self` is at most one lap ahead of it.
    #[cfg(test)]
    pub fn since(self, earlier: Position, size: u16) -> u32 {
        let lin = |p: Position| u32::from(p.idx) + if p.wrap { 0 } else { u32::from(size) };
        (lin(self) + 2 * u32::from(size) - lin(earlier)) % (2 * u32::from(size))
    }

    /// The 16-bit form of vring bases and `off_wrap`: index in bits 0-14, wrap in bit 15.
    pub fn encode(self) -> u16 {
        self.idx | if self.wrap { WRAP_BIT } else { 0 }
    }

    /// The inverse of `encode`, for a ring of `size`: None if the index is beyond it.
    pub fn decode(v: u16, size: u16) -> Option<Position> {
        let idx = v & !WRAP_BIT;
        (idx < size).then_some(Position {
            idx,
            wrap: v & WRAP_BIT != 0,
        })
    }
}

/// SET/GET_VRING_BASE of a packed ring: the avail position in bits 0-15, the used one in
/// bits 16-31 (vhost-user: "vring descriptor indices for packed virtqueues").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringBase {
    pub avail: Position,
    pub used: Position,
}

impl VringBase {
    /// A fresh ring: QEMU's 0x8000_8000.
    pub const START: VringBase = VringBase {
        avail: Position::START,
        used: Position::START,
    };

    pub fn encode(self) -> u32 {
        u32::from(self.avail.encode()) | u32::from(self.used.encode()) << 16
    }

    /// None if either index is beyond a ring of `size`.
    pub fn decode(v: u32, size: u16) -> Option<VringBase> {
        // Fits: the low and the high half.
        Some(VringBase {
            avail: Position::decode(v as u16, size)?,
            used: Position::decode((v >> 16) as u16, size)?,
        })
    }
}

/// Where a packed ring lives (SET_VRING_NUM and SET_VRING_ADDR, translated to guest
/// addresses) and whether EVENT_IDX was negotiated.
#[derive(Clone, Copy, Debug)]
pub struct PackedRingConfig {
    pub size: u16,
    pub desc_table: GuestAddress,
    /// The driver area: the driver's event suppression structure, which we read.
    pub driver_event: GuestAddress,
    /// The device area: our event suppression structure, which the driver reads.
    pub device_event: GuestAddress,
    pub event_idx: bool,
}

impl PackedRingConfig {
    /// Sizes and alignments of virtio 1.1 §2.8.10.1, and every byte inside `mem`.
    pub fn check(&self, mem: &GuestMemoryMmap) -> Result<(), &'static str> {
        if self.size == 0 || self.size > MAX_QUEUE_SIZE {
            return Err("packed ring size out of range");
        }
        if !self.desc_table.raw_value().is_multiple_of(16)
            || !self.driver_event.raw_value().is_multiple_of(4)
            || !self.device_event.raw_value().is_multiple_of(4)
        {
            return Err("misaligned packed ring address");
        }
        let table = (u64::from(self.size) * DESC_SIZE) as usize;
        if !mem.check_range(self.desc_table, table, Permissions::ReadWrite)
            || !mem.check_range(self.driver_event, 4, Permissions::Read)
            || !mem.check_range(self.device_event, 4, Permissions::ReadWrite)
        {
            return Err("packed ring outside the shared memory");
        }
        Ok(())
    }
}

/// A packed ring, device side.
#[derive(Debug)]
pub struct PackedRing {
    cfg: PackedRingConfig,
    avail: Position,
    used: Position,
    /// The ring descriptors of the chain taken last: what its walk reads and its inflight
    /// record copies (the driver may reuse the slots before the request completes).
    chain: Vec<PackedDesc>,
    /// Per buffer id: the ring slots its chain took, 0 while the id is not in flight.
    slots_of: Vec<u16>,
    /// Slots taken and not used yet: never more than the ring has.
    outstanding: u32,
    /// Used slots written since the driver's event was last looked at.
    since_signal: u32,
    /// The driver's event was looked at once: before that, always signal.
    signalled: bool,
    /// Our event suppression structure as last written: (flags, off_wrap).
    device_event: Option<(u16, u16)>,
}

impl PackedRing {
    /// A ring starting at `base`. The configuration must have passed `check`.
    pub fn new(cfg: PackedRingConfig, base: VringBase) -> PackedRing {
        let size = usize::from(cfg.size);
        PackedRing {
            cfg,
            avail: base.avail,
            used: base.used,
            chain: Vec::with_capacity(size.min(usize::from(super::chain::MAX_CHAIN))),
            slots_of: vec![0; size],
            outstanding: 0,
            since_signal: 0,
            signalled: false,
            device_event: None,
        }
    }

    pub fn size(&self) -> u16 {
        self.cfg.size
    }

    #[cfg(test)]
    pub fn config(&self) -> &PackedRingConfig {
        &self.cfg
    }

    /// Where the ring stands: GET_VRING_BASE's answer once the queue has drained.
    pub fn base(&self) -> VringBase {
        VringBase {
            avail: self.avail,
            used: self.used,
        }
    }

    /// Ring slots taken and not used yet.
    #[cfg(test)]
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    fn slot(&self, idx: u16) -> GuestAddress {
        // Fits: idx < size, the table was checked to lie in memory.
        self.cfg
            .desc_table
            .unchecked_add(u64::from(idx) * DESC_SIZE)
    }

    fn read_flags(&self, mem: &GuestMemoryMmap, idx: u16) -> Option<u16> {
        access::read_obj::<u16>(mem, self.slot(idx).unchecked_add(OFF_FLAGS)).map(u16::from_le)
    }

    /// Whether the driver has made the descriptor at the avail position available.
    pub fn has_avail(&self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let flags = self
            .read_flags(mem, self.avail.idx)
            .ok_or("descriptor ring unreadable")?;
        Ok(is_avail(flags, self.avail.wrap))
    }

    /// Takes the chain at the avail position, if the driver made one available: its ring
    /// descriptors are kept for `chain` and the inflight record, and its buffer id (that
    /// of its last descriptor, virtio 1.1 §2.8.6) is returned.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, RingError> {
        if !self.has_avail(mem)? {
            return Ok(None);
        }
        // The driver wrote the chain's descriptors before the head's flags.
        fence(Ordering::Acquire);
        self.chain.clear();
        let size = self.cfg.size;
        let mut pos = self.avail;
        loop {
            let d = access::read_obj::<PackedDesc>(mem, self.slot(pos.idx))
                .ok_or("descriptor ring unreadable")?;
            if !is_avail(d.flags(), pos.wrap) {
                return Err("chain runs into a descriptor the driver did not make available");
            }
            self.chain.push(d);
            pos = pos.advance(1, size);
            if !d.has_next() {
                break;
            }
            if self.chain.len() == usize::from(size) {
                return Err("chain longer than the ring (NEXT all the way round)");
            }
        }
        let id = self.adopt()?;
        self.avail = pos;
        Ok(Some(id))
    }

    /// The descriptors of a chain that comes from elsewhere (a request in flight before a
    /// restart, from the inflight record): fill it, then `adopt`.
    pub fn chain_buf(&mut self) -> &mut Vec<PackedDesc> {
        self.chain.clear();
        &mut self.chain
    }

    /// Counts the chain in `self.chain` as in flight; returns its buffer id.
    pub fn adopt(&mut self) -> Result<u16, RingError> {
        let last = self.chain.last().ok_or("empty chain")?;
        let id = last.id();
        // Fits: at most the ring size (checked below).
        let n = self.chain.len() as u32;
        if n > u32::from(self.cfg.size) {
            return Err("chain longer than the ring");
        }
        if id >= self.cfg.size {
            return Err("buffer id beyond the queue size");
        }
        if self.slots_of[usize::from(id)] != 0 {
            return Err("buffer id reused while in flight");
        }
        if self.outstanding + n > u32::from(self.cfg.size) {
            return Err("more descriptors in flight than the ring holds");
        }
        self.slots_of[usize::from(id)] = n as u16;
        self.outstanding += n;
        Ok(id)
    }

    /// The ring descriptors of the chain taken last.
    pub fn chain_descs(&self) -> &[PackedDesc] {
        &self.chain
    }

    /// A walk over the chain taken last.
    pub fn chain<'a>(&'a self, mem: &'a GuestMemoryMmap) -> PackedChain<'a> {
        PackedChain::new(mem, &self.chain, self.cfg.size)
    }

    /// Writes the used descriptor of buffer `id` with `len` bytes written (id and length,
    /// then the flags, released after them) and moves the used position past its chain's
    /// slots. False if the id is not in flight or the ring is unwritable.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u16,
        len: u32,
        inflight: Option<&mut PackedInflight>,
    ) -> bool {
        let Some(&n) = self.slots_of.get(usize::from(id)).filter(|&&n| n != 0) else {
            return false;
        };
        let at = self.slot(self.used.idx);
        let next = self.used.advance(n, self.cfg.size);
        let mut inflight = inflight;
        if let Some(t) = inflight.as_deref_mut() {
            t.pre_complete(id, next);
        }
        let mut ok = access::write_obj(mem, at.unchecked_add(OFF_LEN), len.to_le())
            && access::write_obj(mem, at.unchecked_add(OFF_ID), id.to_le());
        // The driver reads id and length once it sees the flags.
        fence(Ordering::Release);
        let mut flags = if self.used.wrap {
            DESC_F_AVAIL | DESC_F_USED
        } else {
            0
        };
        if len > 0 {
            flags |= DESC_F_WRITE;
        }
        ok &= access::write_obj(mem, at.unchecked_add(OFF_FLAGS), flags.to_le());
        if let Some(t) = inflight {
            t.end(id);
        }
        self.used = next;
        self.slots_of[usize::from(id)] = 0;
        self.outstanding -= u32::from(n);
        self.since_signal += u32::from(n);
        ok
    }

    /// Whether the driver wants to hear about the used descriptors written since the last
    /// call (driver event suppression; EVENT_IDX as QEMU's `virtio_packed_should_notify`).
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        // Used descriptors must be visible before the driver's event is read.
        fence(Ordering::SeqCst);
        let since = std::mem::take(&mut self.since_signal);
        let first = !std::mem::replace(&mut self.signalled, true);
        let ev = self.cfg.driver_event;
        let Some(flags) = access::read_obj::<u16>(mem, ev.unchecked_add(OFF_EVENT_FLAGS)) else {
            return true;
        };
        match u16::from_le(flags) & 3 {
            EVENT_F_DISABLE => false,
            EVENT_F_DESC if self.cfg.event_idx && !first => {
                fence(Ordering::Acquire);
                match access::read_obj::<u16>(mem, ev.unchecked_add(OFF_EVENT_OFF_WRAP)) {
                    Some(off_wrap) => {
                        need_event(u16::from_le(off_wrap), self.used, since, self.cfg.size)
                    }
                    None => true,
                }
            }
            // ENABLE, DESC without EVENT_IDX, or the reserved value: signal.
            _ => true,
        }
    }

    fn write_device_event(&mut self, mem: &GuestMemoryMmap, flags: u16, off_wrap: u16) {
        if self.device_event == Some((flags, off_wrap)) {
            return;
        }
        self.device_event = Some((flags, off_wrap));
        let ev = self.cfg.device_event;
        if flags == EVENT_F_DESC {
            access::write_obj(mem, ev.unchecked_add(OFF_EVENT_OFF_WRAP), off_wrap.to_le());
            fence(Ordering::Release);
        }
        access::write_obj(mem, ev.unchecked_add(OFF_EVENT_FLAGS), flags.to_le());
    }

    /// Asks the driver to notify (kick) again: for the next descriptor it makes available
    /// (EVENT_IDX) or for any. Returns true if a chain is already available, so the caller
    /// polls instead of waiting; also true if the ring is unreadable (the poll then stops
    /// the queue).
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.cfg.event_idx {
            self.write_device_event(mem, EVENT_F_DESC, self.avail.encode());
        } else {
            self.write_device_event(mem, EVENT_F_ENABLE, 0);
        }
        // The flags must be visible before we look at the ring once more.
        fence(Ordering::SeqCst);
        self.has_avail(mem).unwrap_or(true)
    }

    /// Polling: the driver need not notify.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        self.write_device_event(mem, EVENT_F_DISABLE, 0);
    }
}

/// Whether the driver's event position `off_wrap` lies among the `delta` slots the used
/// position moved to reach `new` (vring_need_event in the packed ring's coordinates: an event
/// with the other wrap counter is a lap behind).
pub fn need_event(off_wrap: u16, new: Position, delta: u32, size: u16) -> bool {
    if delta == 0 {
        return false;
    }
    if delta >= u32::from(size) {
        return true;
    }
    let mut event = off_wrap & !WRAP_BIT;
    if (off_wrap & WRAP_BIT != 0) != new.wrap {
        event = event.wrapping_sub(size);
    }
    // Fits: delta < size <= 2^15.
    new.idx.wrapping_sub(event).wrapping_sub(1) < delta as u16
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockPackedQueue;
    use super::super::DESC_F_NEXT;
    use super::*;
    use vm_memory::Bytes;

    const W: u16 = DESC_F_WRITE;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn positions_advance_wrap_and_encode() {
        let p = Position::START.advance(3, 4);
        assert_eq!(p, Position { idx: 3, wrap: true });
        let q = p.advance(2, 4);
        assert_eq!(
            q,
            Position {
                idx: 1,
                wrap: false
            }
        );
        assert_eq!(q.since(p, 4), 2);
        assert_eq!(p.since(p, 4), 0);
        assert_eq!(Position::START.advance(4, 4).since(Position::START, 4), 4);
        assert_eq!(q.encode(), 1);
        assert_eq!(Position::decode(0x8003, 4), Some(p));
        assert_eq!(Position::decode(4, 4), None, "index beyond the ring");
        let b = VringBase { avail: q, used: p };
        assert_eq!(b.encode(), 0x8003_0001);
        assert_eq!(VringBase::decode(0x8003_0001, 4), Some(b));
        assert_eq!(VringBase::START.encode(), 0x8000_8000);
        assert_eq!(VringBase::decode(0x8000_0004, 4), None);
    }

    #[test]
    fn need_event_is_wrap_aware() {
        let size = 8;
        // Used moved from 2 to 5 in lap 1 (wrap 1): events at 2, 3, 4 were passed.
        let new = Position { idx: 5, wrap: true };
        for (off, want) in [(1, false), (2, true), (4, true), (5, false), (7, false)] {
            assert_eq!(
                need_event(off | WRAP_BIT, new, 3, size),
                want,
                "event {off}"
            );
        }
        // Crossing the end: from 6 (wrap 1) to 1 (wrap 0), 3 slots.
        let new = Position {
            idx: 1,
            wrap: false,
        };
        assert!(need_event(6 | WRAP_BIT, new, 3, size));
        assert!(need_event(7 | WRAP_BIT, new, 3, size));
        assert!(need_event(0, new, 3, size));
        assert!(!need_event(1, new, 3, size), "not reached yet");
        assert!(!need_event(5 | WRAP_BIT, new, 3, size), "before the window");
        assert!(!need_event(0, new, 0, size), "nothing used");
        assert!(
            need_event(3, new, 8, size),
            "a whole lap passes every event"
        );
    }

    #[test]
    fn chains_are_taken_across_the_end_and_used_in_any_order() {
        let mem = memory();
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        assert_eq!(ring.pop(&mem), Ok(None), "nothing offered");
        let a = drv.add_chain(&[(0x8000, 16, 0), (0x9000, 1, W)]);
        let b = drv.add_chain(&[(0xa000, 16, 0)]);
        assert_eq!(ring.pop(&mem), Ok(Some(a)));
        assert_eq!(ring.chain_descs().len(), 2);
        assert_eq!(ring.pop(&mem), Ok(Some(b)));
        assert_eq!(ring.pop(&mem), Ok(None));
        assert_eq!(ring.outstanding(), 3);
        // b completes first: its used descriptor goes to slot 0, the next one to slot 1.
        assert!(ring.add_used(&mem, b, 0, None));
        assert_eq!(drv.used(), Some((b, 0)));
        assert_eq!(drv.used(), None);
        assert!(ring.add_used(&mem, a, 7, None));
        assert_eq!(drv.used(), Some((a, 7)));
        assert_eq!(ring.base().used, Position { idx: 3, wrap: true });
        // A chain spanning the end: slots 3, 0, 1 (the latter two in lap 2).
        let c = drv.add_chain(&[(0x8000, 16, 0), (0xb000, 512, W), (0x9000, 1, W)]);
        assert_eq!(ring.pop(&mem), Ok(Some(c)));
        assert_eq!(
            ring.base().avail,
            Position {
                idx: 2,
                wrap: false
            }
        );
        assert!(!ring.add_used(&mem, 2, 1, None), "not in flight");
        assert!(ring.add_used(&mem, c, 513, None));
        assert_eq!(drv.used(), Some((c, 513)));
        assert_eq!(ring.base().used, ring.base().avail);
        assert_eq!(ring.outstanding(), 0);
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = memory();
        // NEXT all the way round the ring.
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.add_raw(&[
            (0x8000, 16, DESC_F_NEXT, 0),
            (0x8000, 16, DESC_F_NEXT, 0),
            (0x8000, 16, DESC_F_NEXT, 0),
            (0x8000, 16, DESC_F_NEXT, 0),
        ]);
        assert!(ring.pop(&mem).is_err());

        // A chain whose second descriptor the driver never made available.
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.add_raw(&[(0x8000, 16, DESC_F_NEXT, 0)]);
        assert_eq!(
            ring.pop(&mem),
            Err("chain runs into a descriptor the driver did not make available")
        );

        // A head without its AVAIL bit is simply not offered.
        let drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.write_desc(0, PackedDesc::new(0x8000, 16, 0, 0));
        assert_eq!(ring.pop(&mem), Ok(None));

        // Buffer ids beyond the ring and reused while in flight.
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.add_raw(&[(0x8000, 16, 0, 9)]);
        assert_eq!(ring.pop(&mem), Err("buffer id beyond the queue size"));
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.add_raw(&[(0x8000, 16, 0, 1)]);
        drv.add_raw(&[(0x8000, 16, 0, 1)]);
        assert_eq!(ring.pop(&mem), Ok(Some(1)));
        assert_eq!(ring.pop(&mem), Err("buffer id reused while in flight"));
    }

    #[test]
    fn more_descriptors_than_the_ring_holds_are_refused() {
        let mem = memory();
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        drv.add_raw(&[
            (0x8000, 16, DESC_F_NEXT, 0),
            (0x8000, 16, DESC_F_NEXT, 0),
            (0x8000, 1, W, 0),
        ]);
        assert_eq!(ring.pop(&mem), Ok(Some(0)));
        // Slots 3 and 0: the driver overwrites slot 0 while its chain is in flight.
        drv.add_raw(&[(0x8000, 16, DESC_F_NEXT, 1), (0x8000, 1, W, 1)]);
        assert_eq!(
            ring.pop(&mem),
            Err("more descriptors in flight than the ring holds")
        );
    }

    #[test]
    fn driver_event_suppression() {
        let mem = memory();
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 8);
        let mut ring = PackedRing::new(drv.config(true), VringBase::START);
        let ids: Vec<u16> = (0..3).map(|_| drv.add_chain(&[(0x8000, 1, W)])).collect();
        for _ in 0..3 {
            ring.pop(&mem).unwrap().unwrap();
        }
        drv.set_driver_event(EVENT_F_DISABLE, 0);
        assert!(ring.add_used(&mem, ids[0], 1, None));
        assert!(!ring.needs_notification(&mem), "disabled");
        // An event at slot 2 (wrap 1): used moves to 2 (not yet), then to 3 (passed).
        drv.set_driver_event(EVENT_F_DESC, 2 | WRAP_BIT);
        assert!(ring.add_used(&mem, ids[1], 1, None));
        assert!(!ring.needs_notification(&mem));
        assert!(ring.add_used(&mem, ids[2], 1, None));
        assert!(ring.needs_notification(&mem));
        drv.set_driver_event(EVENT_F_ENABLE, 0);
        assert!(ring.needs_notification(&mem));
    }

    #[test]
    fn device_event_suppression() {
        let mem = memory();
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 8);
        let cfg = drv.config(true);
        let mut ring = PackedRing::new(cfg, VringBase::START);
        let read = |off: u64| -> u16 { mem.read_obj(cfg.device_event.unchecked_add(off)).unwrap() };
        ring.disable_notification(&mem);
        assert_eq!(read(OFF_EVENT_FLAGS), EVENT_F_DISABLE);
        drv.add_chain(&[(0x8000, 1, W)]);
        ring.pop(&mem).unwrap().unwrap();
        assert!(!ring.enable_notification(&mem), "nothing more offered");
        assert_eq!(read(OFF_EVENT_FLAGS), EVENT_F_DESC);
        assert_eq!(
            read(OFF_EVENT_OFF_WRAP),
            1 | WRAP_BIT,
            "kick for slot 1, lap 1"
        );
        drv.add_chain(&[(0x8000, 1, W)]);
        assert!(ring.enable_notification(&mem), "work raced in");

        let mut ring = PackedRing::new(drv.config(false), VringBase::START);
        ring.enable_notification(&mem);
        assert_eq!(read(OFF_EVENT_FLAGS), EVENT_F_ENABLE);
    }

    #[test]
    fn configs_outside_memory_or_misaligned_are_refused() {
        let mem = memory();
        let drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 8);
        let cfg = drv.config(false);
        assert!(cfg.check(&mem).is_ok());
        let bad = [
            PackedRingConfig {
                desc_table: GuestAddress(0x1008),
                ..cfg
            },
            PackedRingConfig {
                device_event: GuestAddress(0x2002),
                ..cfg
            },
            PackedRingConfig {
                desc_table: GuestAddress(0x10_0000 - 0x40),
                ..cfg
            },
            PackedRingConfig {
                driver_event: GuestAddress(u64::MAX - 3),
                ..cfg
            },
            PackedRingConfig { size: 0, ..cfg },
        ];
        for c in bad {
            assert!(c.check(&mem).is_err(), "{c:?}");
        }
    }
}
