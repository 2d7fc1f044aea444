//! Walks one descriptor chain from its head index. virtio-queue's `DescriptorChain` can only
//! be obtained by popping the avail ring; resubmitting in-flight requests after a restart
//! needs a chain for a head taken from the inflight region, so vubd walks chains itself, on
//! every path, with the same bounds as the virtio spec sets:
//! - at most `queue size` descriptors per table (a loop ends the walk),
//! - one level of indirection (an indirect table inside an indirect table ends the walk),
//! - an indirect table's length a non-zero multiple of 16, at most 65535 entries,
//! - at most 4 GiB of buffers in total,
//! - at most `MAX_CHAIN` descriptors in all, direct and indirect, zero-length ones included
//!   (QEMU's limit): a guest cannot make one request cost more than that many reads.
//!
//! A walk that ends early leaves its last descriptor with NEXT set, which the parser treats
//! as a malformed chain.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::GuestAddress;

use crate::guestmem::access::GuestArray;
use crate::guestmem::GuestMemoryMmap;

const DESC_SIZE: u64 = 16;

/// Most descriptors one chain may have.
pub const MAX_CHAIN: u16 = 1024;

pub struct Chain<'a> {
    mem: &'a GuestMemoryMmap,
    table: GuestArray<'a, RawDescriptor>,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
    /// Descriptors still allowed in this chain.
    budget: u16,
    done: bool,
}

impl<'a> Chain<'a> {
    pub fn new(
        mem: &'a GuestMemoryMmap,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Self {
        Chain {
            mem,
            table: GuestArray::new(mem, desc_table, u32::from(queue_size)),
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
            budget: MAX_CHAIN,
            done: false,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        self.table.get(u32::from(index)).map(Descriptor::from)
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.done || self.ttl == 0 || self.budget == 0 {
            return None;
        }
        let mut d = self.read(self.next);
        if let Some(desc) = d.filter(Descriptor::refers_to_indirect_table) {
            let len = desc.len();
            // Nested tables and empty, ragged or oversized tables end the walk.
            if self.indirect
                || len == 0
                || !len.is_multiple_of(DESC_SIZE as u32)
                || len / 16 > u32::from(u16::MAX)
            {
                self.done = true;
                return None;
            }
            self.indirect = true;
            // Fits: at most u16::MAX entries (checked above).
            let entries = (len / DESC_SIZE as u32) as u16;
            self.table = GuestArray::new(self.mem, desc.addr(), u32::from(entries));
            self.ttl = entries;
            self.next = 0;
            d = self.read(0).filter(|d| !d.refers_to_indirect_table());
        }
        let Some(desc) = d else {
            self.done = true;
            return None;
        };
        match self.bytes.checked_add(desc.len()) {
            Some(b) => self.bytes = b,
            None => {
                self.done = true;
                return None;
            }
        }
        self.ttl -= 1;
        self.budget -= 1;
        if desc.has_next() {
            self.next = desc.next();
        } else {
            self.done = true;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use vm_memory::Bytes;

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;

    fn put(mem: &GuestMemoryMmap, table: u64, i: u64, d: Descriptor) {
        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i))
            .unwrap();
    }

    fn walk(mem: &GuestMemoryMmap, head: u16) -> Vec<Descriptor> {
        Chain::new(mem, GuestAddress(0), 8, head).collect()
    }

    #[test]
    fn direct_and_indirect_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put(&mem, 0, 0, Descriptor::new(0x1000, 16, N, 5));
        put(&mem, 0, 5, Descriptor::new(0x2000, 1, 0, 0));
        let c = walk(&mem, 0);
        assert_eq!(c.len(), 2);
        assert!(!c[1].has_next());

        put(&mem, 0, 1, Descriptor::new(0x4000, 48, I, 0));
        for i in 0..3 {
            put(
                &mem,
                0x4000,
                i,
                Descriptor::new(0x1000 * (i + 1), 8, if i < 2 { N } else { 0 }, i as u16 + 1),
            );
        }
        let c = walk(&mem, 1);
        assert_eq!(c.len(), 3);
        assert!(!c[2].has_next());
    }

    #[test]
    fn loops_nesting_and_bad_tables_end_with_next_set() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put(&mem, 0, 0, Descriptor::new(0x1000, 16, N, 1));
        put(&mem, 0, 1, Descriptor::new(0x1000, 16, N, 0));
        let c = walk(&mem, 0);
        assert_eq!(c.len(), 8, "bounded by the table size");
        assert!(c.last().unwrap().has_next());

        put(&mem, 0, 2, Descriptor::new(0x4000, 16, I, 0));
        put(&mem, 0x4000, 0, Descriptor::new(0x5000, 16, I, 0));
        assert!(walk(&mem, 2).is_empty(), "indirect inside indirect");

        put(&mem, 0, 3, Descriptor::new(0x4000, 20, I, 0));
        assert!(walk(&mem, 3).is_empty(), "ragged indirect table");

        put(&mem, 0, 4, Descriptor::new(0x1000, 16, N, 99));
        let c = walk(&mem, 4);
        assert_eq!(c.len(), 1);
        assert!(c[0].has_next(), "next index beyond the table");

        assert!(walk(&mem, 200).is_empty(), "head beyond the table");

        put(&mem, 0, 6, Descriptor::new(0x1000, u32::MAX, N, 7));
        put(&mem, 0, 7, Descriptor::new(0x1000, 2, 0, 0));
        let c = walk(&mem, 6);
        assert!(c.last().unwrap().has_next(), "4 GiB overflow");
    }

    #[test]
    fn long_indirect_tables_stop_at_the_chain_limit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        // 2000 zero-length descriptors chained in one indirect table.
        let table = 0x4000;
        for i in 0..2000u64 {
            put(&mem, table, i, Descriptor::new(0x1000, 0, N, i as u16 + 1));
        }
        put(&mem, 0, 0, Descriptor::new(table, 2000 * 16, I, 0));
        let c = walk(&mem, 0);
        assert_eq!(c.len(), usize::from(MAX_CHAIN));
        assert!(
            c.last().unwrap().has_next(),
            "cut short: the parser refuses it"
        );
    }
}
