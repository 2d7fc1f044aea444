//! Inflight I/O tracking for packed rings (vhost-user INFLIGHT_SHMFD, "Inflight I/O
//! tracking", the packed layout). Per queue:
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
//! u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
//! u8 padding[7];                                    (desc[] starts at 32, C alignment)
//! struct { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
//!          u16 id; u16 flags; u32 len; u64 addr; } desc[desc_num];     (32 bytes each)
//! ```
//! each queue's area rounded up to 64 bytes (DPDK's rte_vhost layout, which SPDK uses).
//!
//! Unlike a split ring, a packed ring keeps neither index in guest memory, and a used
//! descriptor overwrites whatever chain was in its slot: so the record holds copies of the
//! ring descriptors of every chain taken (entries from a free list, linked by `next`, the
//! head entry holding `num`, `last`, `counter` and `inflight`), and the used position with
//! its wrap counter. The avail position follows: the used position plus the slots of every
//! chain still in flight.
//!
//! A completion is recorded in two steps around the write of its used descriptor's flags:
//! `pre_complete` returns the chain's entries to the free list and stores the used position
//! after it (`free_head`, `used_idx`, `used_wrap_counter`); `end` clears the head's
//! `inflight` and commits (`old_*` = current). A vubd killed between the two is resolved on
//! restart by looking at the ring: the used descriptor at the committed position tells
//! whether that completion was published. Everything read back comes from the frontend and is
//! checked: a record that does not hold together is dropped (its requests are lost, as
//! without INFLIGHT_SHMFD), never trusted.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::{Address, GuestAddress};

use super::ring::{Position, VringBase};
use super::{is_used, PackedDesc, DESC_SIZE, OFF_FLAGS};
use crate::guestmem::{access, GuestMemoryMmap};
use crate::virtio_blk::inflight::{Area, InflightRegion, Layout};

const HEADER: usize = 32;
const ENTRY: usize = 32;
const ALIGN: usize = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_FREE_HEAD: usize = 12;
const OFF_OLD_FREE_HEAD: usize = 14;
const OFF_USED_IDX: usize = 16;
const OFF_OLD_USED_IDX: usize = 18;
const OFF_USED_WRAP: usize = 20;
const OFF_OLD_USED_WRAP: usize = 21;

const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

/// Bytes of one queue's area for a ring of `queue_size` descriptors.
pub fn area_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

fn entry(e: u16) -> usize {
    HEADER + ENTRY * usize::from(e)
}

/// A fresh area (GET_INFLIGHT_FD): both rings at their start, every entry free.
pub fn init(area: &Area, queue_size: u16) {
    area.write_u16(OFF_VERSION, 1);
    area.write_u16(OFF_DESC_NUM, queue_size);
    reset_area(area, queue_size, Position::START);
}

fn write_used(area: &Area, used: Position, old_too: bool) {
    area.write_u16(OFF_USED_IDX, used.idx);
    area.write_u8(OFF_USED_WRAP, u8::from(used.wrap));
    if old_too {
        area.write_u16(OFF_OLD_USED_IDX, used.idx);
        area.write_u8(OFF_OLD_USED_WRAP, u8::from(used.wrap));
    }
}

/// Nothing in flight, the used ring at `used`, entries free in order.
fn reset_area(area: &Area, size: u16, used: Position) {
    for e in 0..size {
        area.write_u8(entry(e) + E_INFLIGHT, 0);
        area.write_u16(entry(e) + E_NEXT, e + 1);
    }
    area.write_u16(OFF_FREE_HEAD, 0);
    area.write_u16(OFF_OLD_FREE_HEAD, 0);
    write_used(area, used, true);
}

/// What a restarted queue learns from the record.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Where both rings stand.
    pub base: VringBase,
    /// Head entries of the chains in flight, oldest first: resubmit them.
    pub heads: Vec<u16>,
}

/// The tracker one packed queue poller owns.
pub struct PackedInflight {
    area: Area,
    size: u16,
    /// Order in which chains were taken; resubmission follows it.
    counter: u64,
    /// The head entry of each buffer id in flight.
    head_of: Vec<u16>,
    /// Mirror of the area's `free_head`.
    free_head: u16,
    _region: Arc<InflightRegion>,
}

// SAFETY: the area belongs to exactly one queue, and the queue to exactly one reactor.
unsafe impl Send for PackedInflight {}

impl PackedInflight {
    /// The tracker of queue `q`, if the region has the packed layout and covers the queue
    /// with the same size.
    pub fn of(region: &Arc<InflightRegion>, q: u16, queue_size: u16) -> Option<PackedInflight> {
        if region.layout() != Layout::Packed
            || q >= region.num_queues
            || queue_size != region.queue_size
        {
            return None;
        }
        let area = region.area(q);
        Some(PackedInflight {
            area,
            size: queue_size,
            counter: 1,
            head_of: vec![0; usize::from(queue_size)],
            free_head: area.read_u16(OFF_FREE_HEAD),
            _region: Arc::clone(region),
        })
    }

    fn next(&self, e: u16) -> u16 {
        self.area.read_u16(entry(e) + E_NEXT)
    }

    /// A chain was taken (buffer `id`, its ring descriptors `descs`): copies them into free
    /// entries, then marks the head in flight.
    pub fn begin(&mut self, id: u16, descs: &[PackedDesc]) {
        if descs.is_empty() || id >= self.size {
            return;
        }
        let head = self.free_head;
        let mut e = head;
        let mut last = head;
        for d in descs {
            // The ring never has more slots in flight than entries exist, and the free list
            // was rebuilt when the queue started: only a frontend writing the area can get
            // here.
            if e >= self.size {
                return;
            }
            let at = entry(e);
            self.area.write_u16(at + E_ID, d.id());
            self.area.write_u16(at + E_FLAGS, d.flags());
            self.area.write_u32(at + E_LEN, d.len());
            self.area.write_u64(at + E_ADDR, d.addr());
            last = e;
            e = self.next(e);
        }
        let at = entry(head);
        // Fits: a chain has at most the ring's size of descriptors.
        self.area.write_u16(at + E_NUM, descs.len() as u16);
        self.area.write_u16(at + E_LAST, last);
        self.area.write_u64(at + E_COUNTER, self.counter);
        self.counter += 1;
        fence(Ordering::SeqCst);
        self.area.write_u8(at + E_INFLIGHT, 1);
        fence(Ordering::SeqCst);
        self.free_head = e;
        self.area.write_u16(OFF_FREE_HEAD, e);
        self.area.write_u16(OFF_OLD_FREE_HEAD, e);
        self.head_of[usize::from(id)] = head;
    }

    /// A chain resubmitted from the record (its head entry `head`) runs as buffer `id`.
    pub fn adopt(&mut self, id: u16, head: u16) {
        if id < self.size {
            self.head_of[usize::from(id)] = head;
        }
    }

    /// About to publish the used descriptor of buffer `id`; `used` is the used position
    /// after it. The chain's entries go back to the free list.
    pub fn pre_complete(&mut self, id: u16, used: Position) {
        let Some(&head) = self.head_of.get(usize::from(id)) else {
            return;
        };
        let last = self.area.read_u16(entry(head) + E_LAST);
        if last < self.size {
            self.area.write_u16(entry(last) + E_NEXT, self.free_head);
        }
        self.free_head = head;
        self.area.write_u16(OFF_FREE_HEAD, head);
        write_used(&self.area, used, false);
        fence(Ordering::SeqCst);
    }

    /// The used descriptor of buffer `id` is published: commit.
    pub fn end(&mut self, id: u16) {
        let Some(&head) = self.head_of.get(usize::from(id)) else {
            return;
        };
        self.area.write_u8(entry(head) + E_INFLIGHT, 0);
        fence(Ordering::SeqCst);
        self.area.write_u16(OFF_OLD_FREE_HEAD, self.free_head);
        let used = Position {
            idx: self.area.read_u16(OFF_USED_IDX),
            wrap: self.area.read_u8(OFF_USED_WRAP) != 0,
        };
        self.area.write_u16(OFF_OLD_USED_IDX, used.idx);
        self.area.write_u8(OFF_OLD_USED_WRAP, u8::from(used.wrap));
    }

    /// A record the frontend handed back fresh from GET_INFLIGHT_FD, or one we cannot use:
    /// start over at `base` (SET_VRING_BASE) with nothing in flight.
    pub fn reset(&mut self, base: VringBase) {
        reset_area(&self.area, self.size, base.used);
        self.free_head = 0;
        self.counter = 1;
    }

    fn used_pair(&self, idx: usize, wrap: usize) -> Option<Position> {
        let p = Position {
            idx: self.area.read_u16(idx),
            wrap: self.area.read_u8(wrap) != 0,
        };
        (p.idx < self.size).then_some(p)
    }

    /// After a restart, before the queue runs: settles a completion cut short (is its used
    /// descriptor in the ring at `desc_table`?), rebuilds the free list and returns where
    /// both rings stand and the chains to resubmit. Err if the record does not hold together;
    /// the caller then `reset`s it.
    pub fn recover(
        &mut self,
        mem: &GuestMemoryMmap,
        desc_table: GuestAddress,
    ) -> Result<Recovered, &'static str> {
        let size = self.size;
        let area = self.area;
        let old = self
            .used_pair(OFF_OLD_USED_IDX, OFF_OLD_USED_WRAP)
            .ok_or("used index beyond the ring")?;
        let mut used = old;
        if let Some(new) = self.used_pair(OFF_USED_IDX, OFF_USED_WRAP) {
            if new != old {
                // pre_complete ran for the chain now at the free list's head.
                let h = area.read_u16(OFF_FREE_HEAD);
                if h >= size {
                    return Err("free list head beyond the ring");
                }
                if area.read_u8(entry(h) + E_INFLIGHT) == 0 {
                    // `end` had begun: published, and `new` is whole.
                    used = new;
                } else {
                    let slot = desc_table.checked_add(u64::from(old.idx) * DESC_SIZE + OFF_FLAGS);
                    let flags = slot
                        .and_then(|a| access::read_obj::<u16>(mem, a))
                        .map(u16::from_le)
                        .ok_or("descriptor ring unreadable")?;
                    if is_used(flags, old.wrap) {
                        // Published: that chain is done.
                        area.write_u8(entry(h) + E_INFLIGHT, 0);
                        used = new;
                    }
                }
            }
        }
        // The chains in flight, and which entries they hold.
        let mut owned = vec![false; usize::from(size)];
        let mut heads = Vec::new();
        let mut slots: u32 = 0;
        for h in 0..size {
            if area.read_u8(entry(h) + E_INFLIGHT) == 0 {
                continue;
            }
            let num = area.read_u16(entry(h) + E_NUM);
            if num == 0 || num > size {
                return Err("chain length out of range");
            }
            let mut e = h;
            for k in 0..num {
                if e >= size || owned[usize::from(e)] {
                    return Err("chains overlap or leave the record");
                }
                owned[usize::from(e)] = true;
                if k + 1 < num {
                    e = self.next(e);
                }
            }
            slots += u32::from(num);
            heads.push((area.read_u64(entry(h) + E_COUNTER), h));
        }
        if slots > u32::from(size) {
            return Err("more descriptors in flight than the ring holds");
        }
        heads.sort_unstable();
        self.counter = heads.last().map_or(1, |(c, _)| c.saturating_add(1));
        // Free entries, in order.
        let free: Vec<u16> = (0..size).filter(|&e| !owned[usize::from(e)]).collect();
        for w in free.windows(2) {
            area.write_u16(entry(w[0]) + E_NEXT, w[1]);
        }
        let first = free.first().copied().unwrap_or(size);
        if let Some(&l) = free.last() {
            area.write_u16(entry(l) + E_NEXT, size);
        }
        self.free_head = first;
        area.write_u16(OFF_FREE_HEAD, first);
        area.write_u16(OFF_OLD_FREE_HEAD, first);
        write_used(&area, used, true);
        // Fits: at most the ring's size.
        let avail = used.advance(slots as u16, size);
        Ok(Recovered {
            base: VringBase { avail, used },
            heads: heads.into_iter().map(|(_, h)| h).collect(),
        })
    }

    /// The ring descriptors recorded for the chain at head entry `head`, into `out`.
    pub fn chain(&self, head: u16, out: &mut Vec<PackedDesc>) {
        out.clear();
        if head >= self.size {
            return;
        }
        let num = self.area.read_u16(entry(head) + E_NUM).min(self.size);
        let mut e = head;
        for k in 0..num {
            if e >= self.size {
                return;
            }
            let at = entry(e);
            out.push(PackedDesc::new(
                self.area.read_u64(at + E_ADDR),
                self.area.read_u32(at + E_LEN),
                self.area.read_u16(at + E_ID),
                self.area.read_u16(at + E_FLAGS),
            ));
            if k + 1 < num {
                e = self.next(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockPackedQueue;
    use super::super::ring::PackedRing;
    use super::super::{DESC_F_NEXT, DESC_F_WRITE as W};
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn region(size: u16) -> Arc<InflightRegion> {
        Arc::new(InflightRegion::create_layout(Layout::Packed, 2, size, 1).unwrap())
    }

    /// The same file mapped again, as a restarted vubd does.
    fn reopen(r: &InflightRegion) -> Arc<InflightRegion> {
        let f = r.file().try_clone().unwrap();
        Arc::new(
            InflightRegion::open_layout(
                Layout::Packed,
                f,
                0,
                r.mmap_size(),
                r.num_queues,
                r.queue_size,
                1,
            )
            .unwrap(),
        )
    }

    /// A ring and its tracker, the ring taking every chain the driver offers.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        ring: PackedRing,
        t: PackedInflight,
    }

    impl Rig<'_> {
        fn take(&mut self) -> u16 {
            let id = self.ring.pop(self.mem).unwrap().unwrap();
            self.t.begin(id, self.ring.chain_descs());
            id
        }
        fn complete(&mut self, id: u16) {
            assert!(self.ring.add_used(self.mem, id, 1, Some(&mut self.t)));
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(area_size(8), 320);
        assert_eq!(area_size(256), 8256);
        let r = region(8);
        assert_eq!(r.mmap_size(), 2 * 320);
        let t = PackedInflight::of(&r, 1, 8).unwrap();
        assert_eq!(t.area.read_u16(OFF_VERSION), 1);
        assert_eq!(t.area.read_u16(OFF_DESC_NUM), 8);
        assert_eq!(t.area.read_u8(OFF_USED_WRAP), 1);
        assert_eq!(t.area.read_u8(OFF_OLD_USED_WRAP), 1);
        assert_eq!(t.area.read_u16(entry(7) + E_NEXT), 8);
        assert!(PackedInflight::of(&r, 2, 8).is_none());
        assert!(PackedInflight::of(&r, 0, 16).is_none());
        let split = Arc::new(InflightRegion::create(1, 8, 1).unwrap());
        assert!(PackedInflight::of(&split, 0, 8).is_none());
        assert!(
            r.queue(0, 8).is_none(),
            "no split tracker on a packed region"
        );
    }

    #[test]
    fn restart_resubmits_in_order_and_knows_both_positions() {
        let mem = memory();
        let r = region(8);
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 8);
        let cfg = drv.config(false);
        let mut rig = Rig {
            mem: &mem,
            ring: PackedRing::new(cfg, VringBase::START),
            t: PackedInflight::of(&r, 1, 8).unwrap(),
        };
        let a = drv.add_chain(&[(0x8000, 16, 0), (0x9000, 1, W)]);
        let b = drv.add_chain(&[(0xa000, 16, 0), (0xb000, 512, W), (0xc000, 1, W)]);
        let c = drv.add_chain(&[(0xd000, 16, 0), (0xe000, 1, W)]);
        for want in [a, b, c] {
            assert_eq!(rig.take(), want);
        }
        // b completes first; its used descriptor overwrites a's head slot.
        rig.complete(b);
        assert_eq!(drv.used(), Some((b, 1)));
        // Killed: a restarted vubd maps the same record.
        let again = reopen(&r);
        let mut t = PackedInflight::of(&again, 1, 8).unwrap();
        let rec = t.recover(&mem, cfg.desc_table).unwrap();
        assert_eq!(
            rec.base,
            VringBase {
                used: Position { idx: 3, wrap: true },
                avail: Position { idx: 7, wrap: true },
            }
        );
        assert_eq!(rec.heads.len(), 2);
        let mut descs = Vec::new();
        t.chain(rec.heads[0], &mut descs);
        assert_eq!(
            descs,
            vec![
                PackedDesc::new(0x8000, 16, a, DESC_F_NEXT | super::super::DESC_F_AVAIL),
                PackedDesc::new(0x9000, 1, a, W | super::super::DESC_F_AVAIL),
            ],
            "a's descriptors, though its slot now holds b's used descriptor"
        );
        t.chain(rec.heads[1], &mut descs);
        assert_eq!(descs.len(), 2);
        assert_eq!(descs[1].id(), c);

        // The restarted queue completes them and goes on with new chains.
        let mut ring = PackedRing::new(cfg, rec.base);
        for &h in &rec.heads {
            t.chain(h, ring.chain_buf());
            let id = ring.adopt().unwrap();
            t.adopt(id, h);
            assert!(ring.add_used(&mem, id, 1, Some(&mut t)));
        }
        assert_eq!(drv.used(), Some((a, 1)));
        assert_eq!(drv.used(), Some((c, 1)));
        let d = drv.add_chain(&[(0x8000, 16, 0), (0x9000, 1, W)]);
        let mut rig = Rig { mem: &mem, ring, t };
        assert_eq!(rig.take(), d);
        rig.complete(d);
        assert_eq!(drv.used(), Some((d, 1)));
        let rec = rig.t.recover(&mem, cfg.desc_table).unwrap();
        assert!(rec.heads.is_empty());
        assert_eq!(rec.base, rig.ring.base());
    }

    #[test]
    fn a_completion_cut_short_is_settled_by_the_ring() {
        let mem = memory();
        for published in [false, true] {
            let r = region(4);
            let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), 4);
            let cfg = drv.config(false);
            let mut ring = PackedRing::new(cfg, VringBase::START);
            let mut t = PackedInflight::of(&r, 0, 4).unwrap();
            let a = drv.add_chain(&[(0x8000, 16, 0), (0x9000, 1, W)]);
            let id = ring.pop(&mem).unwrap().unwrap();
            t.begin(id, ring.chain_descs());
            // Killed after pre_complete, before (or after) the flags reached the ring.
            t.pre_complete(a, Position { idx: 2, wrap: true });
            if published {
                let mut ring2 = PackedRing::new(cfg, VringBase::START);
                ring2.pop(&mem).unwrap();
                assert!(ring2.add_used(&mem, a, 1, None));
            }
            let again = reopen(&r);
            let mut t = PackedInflight::of(&again, 0, 4).unwrap();
            let rec = t.recover(&mem, cfg.desc_table).unwrap();
            if published {
                assert!(rec.heads.is_empty(), "not run twice");
                assert_eq!(rec.base.used, Position { idx: 2, wrap: true });
            } else {
                assert_eq!(rec.heads.len(), 1, "resubmitted");
                assert_eq!(rec.base.used, Position::START);
            }
            assert_eq!(rec.base.avail, Position { idx: 2, wrap: true });
        }
    }

    #[test]
    fn records_that_do_not_hold_together_are_refused() {
        let mem = memory();
        let r = region(4);
        let t = PackedInflight::of(&r, 0, 4).unwrap();
        let area = t.area;
        let fresh = |t: &mut PackedInflight| t.reset(VringBase::START);
        let mut t = t;
        area.write_u16(OFF_OLD_USED_IDX, 9);
        assert!(
            t.recover(&mem, GuestAddress(0x1000)).is_err(),
            "index beyond the ring"
        );
        fresh(&mut t);
        area.write_u8(entry(1) + E_INFLIGHT, 1);
        area.write_u16(entry(1) + E_NUM, 5);
        assert!(
            t.recover(&mem, GuestAddress(0x1000)).is_err(),
            "chain too long"
        );
        fresh(&mut t);
        for h in [0, 1] {
            area.write_u8(entry(h) + E_INFLIGHT, 1);
            area.write_u16(entry(h) + E_NUM, 2);
        }
        assert!(
            t.recover(&mem, GuestAddress(0x1000)).is_err(),
            "chains overlap"
        );
        fresh(&mut t);
        let rec = t.recover(&mem, GuestAddress(0x1000)).unwrap();
        assert_eq!(rec.base, VringBase::START);
    }
}
