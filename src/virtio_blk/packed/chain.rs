//! Walks one packed chain: the ring descriptors `PackedRing::pop` took (or their copies from
//! the inflight record), and the indirect table a lone ring descriptor may refer to. It yields
//! split `Descriptor`s, with NEXT set on every descriptor but the last, so the request parser
//! reads both ring layouts alike. The bounds are chain.rs's:
//! - at most `MAX_CHAIN` descriptors in all, zero-length ones included; the ring part was
//!   already bounded by the ring's size;
//! - one level of indirection: an INDIRECT entry inside a table ends the walk;
//! - an indirect table's length a non-zero multiple of 16, at most 65535 entries, and only
//!   as a chain's sole ring descriptor without NEXT (virtio 1.1 §2.8.19: a driver never sets
//!   INDIRECT and NEXT together);
//! - at most 4 GiB of buffers in total.
//!
//! In a packed indirect table, every entry belongs to the chain and only WRITE counts
//! (§2.8.19: NEXT, ids and other flags are reserved there). A walk that ends early leaves
//! its last descriptor with NEXT set, which the parser treats as a malformed chain.

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::{PackedDesc, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};
use crate::guestmem::access::GuestArray;
use crate::guestmem::GuestMemoryMmap;

/// Most descriptors one chain may have (chain.rs's limit, QEMU's).
pub const MAX_CHAIN: u16 = crate::virtio_blk::chain::MAX_CHAIN;

pub struct PackedChain<'a> {
    mem: &'a GuestMemoryMmap,
    ring: &'a [PackedDesc],
    /// The ring descriptor to yield next.
    next: usize,
    /// The indirect table being walked, and its next entry.
    table: Option<(GuestArray<'a, PackedDesc>, u32)>,
    bytes: u32,
    budget: u16,
    done: bool,
}

impl<'a> PackedChain<'a> {
    /// A walk over `ring`, the ring descriptors of one chain, in a ring of `queue_size`.
    pub fn new(mem: &'a GuestMemoryMmap, ring: &'a [PackedDesc], queue_size: u16) -> Self {
        PackedChain {
            mem,
            ring: &ring[..ring.len().min(usize::from(queue_size))],
            next: 0,
            table: None,
            bytes: 0,
            budget: MAX_CHAIN,
            done: false,
        }
    }

    fn end(&mut self) -> Option<Descriptor> {
        self.done = true;
        None
    }

    /// The next descriptor as the driver wrote it, and whether more follow.
    fn step(&mut self) -> Option<(PackedDesc, bool)> {
        if let Some((table, i)) = self.table.as_mut() {
            if *i == table.len() {
                return None;
            }
            let d = table.get(*i)?;
            *i += 1;
            // Nested tables end the walk.
            return (!d.is_indirect()).then_some((d, *i < table.len()));
        }
        let d = *self.ring.get(self.next)?;
        self.next += 1;
        if !d.is_indirect() {
            return Some((d, d.has_next()));
        }
        let len = d.len();
        if self.ring.len() != 1
            || d.has_next()
            || len == 0
            || !len.is_multiple_of(DESC_SIZE as u32)
            || len / DESC_SIZE as u32 > u32::from(u16::MAX)
        {
            return None;
        }
        self.table = Some((
            GuestArray::new(self.mem, GuestAddress(d.addr()), len / DESC_SIZE as u32),
            0,
        ));
        self.step()
    }
}

impl Iterator for PackedChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.done || self.budget == 0 {
            return None;
        }
        let Some((d, more)) = self.step() else {
            return self.end();
        };
        let Some(bytes) = self.bytes.checked_add(d.len()) else {
            return self.end();
        };
        self.bytes = bytes;
        self.budget -= 1;
        if !more {
            self.done = true;
        }
        let flags = (d.flags() & DESC_F_WRITE) | if more { DESC_F_NEXT } else { 0 };
        Some(Descriptor::new(d.addr(), d.len(), flags, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DESC_F_INDIRECT, DESC_F_NEXT as N, DESC_F_WRITE as W};
    use super::*;
    use vm_memory::Bytes;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap()
    }

    fn walk(mem: &GuestMemoryMmap, ring: &[PackedDesc]) -> Vec<Descriptor> {
        PackedChain::new(mem, ring, 8).collect()
    }

    fn table(mem: &GuestMemoryMmap, at: u64, entries: &[(u64, u32, u16)]) {
        for (i, &(a, l, f)) in entries.iter().enumerate() {
            mem.write_obj(
                PackedDesc::new(a, l, 0, f),
                GuestAddress(at + 16 * i as u64),
            )
            .unwrap();
        }
    }

    #[test]
    fn direct_chains_keep_write_and_next() {
        let mem = memory();
        let ring = [
            PackedDesc::new(0x1000, 16, 3, N),
            PackedDesc::new(0x2000, 512, 3, N | W),
            PackedDesc::new(0x3000, 1, 3, W),
        ];
        let c = walk(&mem, &ring);
        assert_eq!(c.len(), 3);
        assert!(c[0].has_next() && !c[0].is_write_only());
        assert!(c[1].has_next() && c[1].is_write_only());
        assert!(!c[2].has_next() && c[2].is_write_only());
        assert_eq!((c[1].addr().0, c[1].len()), (0x2000, 512));
    }

    #[test]
    fn indirect_tables_ignore_next_and_reserved_flags() {
        let mem = memory();
        // No NEXT in the table: every entry belongs to the chain; ids and other flags are
        // ignored.
        table(
            &mem,
            0x8000,
            &[(0x1000, 16, 0), (0x2000, 4096, W | 0x40), (0x3000, 1, W)],
        );
        let ring = [PackedDesc::new(0x8000, 48, 0, DESC_F_INDIRECT | W)];
        let c = walk(&mem, &ring);
        assert_eq!(c.len(), 3);
        assert!(c[0].has_next() && !c[0].is_write_only());
        assert!(c[1].has_next() && c[1].is_write_only());
        assert!(!c[2].has_next());
        assert_eq!(c[1].len(), 4096);
    }

    #[test]
    fn malformed_chains_end_with_next_set_or_empty() {
        let mem = memory();
        table(
            &mem,
            0x8000,
            &[(0x1000, 16, 0), (0x9000, 32, DESC_F_INDIRECT)],
        );
        let nested = [PackedDesc::new(0x8000, 32, 0, DESC_F_INDIRECT)];
        let c = walk(&mem, &nested);
        assert_eq!(c.len(), 1);
        assert!(c[0].has_next(), "indirect inside indirect");

        for len in [0, 20, 16 * 65536] {
            let bad = [PackedDesc::new(0x8000, len, 0, DESC_F_INDIRECT)];
            assert!(walk(&mem, &bad).is_empty(), "table length {len}");
        }
        let with_next = [
            PackedDesc::new(0x8000, 48, 0, DESC_F_INDIRECT | N),
            PackedDesc::new(0x1000, 1, 0, W),
        ];
        assert!(walk(&mem, &with_next).is_empty(), "INDIRECT with NEXT");
        let after_direct = [
            PackedDesc::new(0x1000, 16, 0, N),
            PackedDesc::new(0x8000, 48, 0, DESC_F_INDIRECT),
        ];
        let c = walk(&mem, &after_direct);
        assert_eq!(c.len(), 1);
        assert!(c[0].has_next(), "a table after direct descriptors");

        let outside = [PackedDesc::new(0x3_fff0, 32, 0, DESC_F_INDIRECT)];
        let c = walk(&mem, &outside);
        assert_eq!(c.len(), 1);
        assert!(c[0].has_next(), "table running out of memory");

        let overflow = [
            PackedDesc::new(0x1000, u32::MAX, 0, N),
            PackedDesc::new(0x1000, 2, 0, W),
        ];
        let c = walk(&mem, &overflow);
        assert!(c.last().unwrap().has_next(), "4 GiB overflow");

        // A copy from the inflight record whose last descriptor still says NEXT.
        let cut = [PackedDesc::new(0x1000, 16, 0, N)];
        assert!(walk(&mem, &cut)[0].has_next());
    }

    #[test]
    fn long_indirect_tables_stop_at_the_chain_limit() {
        let mem = memory();
        let entries: Vec<_> = (0..2000).map(|_| (0x1000, 0, 0)).collect();
        table(&mem, 0x8000, &entries);
        let ring = [PackedDesc::new(0x8000, 2000 * 16, 0, DESC_F_INDIRECT)];
        let c = walk(&mem, &ring);
        assert_eq!(c.len(), usize::from(MAX_CHAIN));
        assert!(
            c.last().unwrap().has_next(),
            "cut short: the parser refuses it"
        );
    }
}
