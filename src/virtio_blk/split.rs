//! The split ring on the request path, through `guestmem::access`: the avail index once per
//! pass, one avail entry and one used entry per request, the used event once per signal.
//! virtio-queue's `avail_idx`, `pop_descriptor_chain`, `add_used` and `needs_notification`
//! take vm-memory's general `Bytes` path (slice iterators) and read the avail index again
//! for every chain popped: together more than a tenth of a reactor's time at QD32 on the
//! null backend. virtio-queue keeps the ring's addresses and indices, and the rest of its
//! operations (notification enabling, set-up, validation). Writes mark the dirty log as
//! vm-memory's do.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress};

use crate::guestmem::{access, GuestMemoryMmap};

/// The driver's avail index (acquire: the entries it covers are read after it).
#[inline]
pub fn avail_idx(queue: &Queue, mem: &GuestMemoryMmap) -> Option<Wrapping<u16>> {
    let addr = GuestAddress(queue.avail_ring()).checked_add(2)?;
    let idx = access::read_obj::<u16>(mem, addr)?;
    fence(Ordering::Acquire);
    Some(Wrapping(u16::from_le(idx)))
}

/// The head of the next available chain; the caller knows it is there (below the avail
/// index it read). The head is the driver's: bounds are checked where it is used.
#[inline]
pub fn pop_head(queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    let next = queue.next_avail();
    let slot = u64::from(next % queue.size());
    let addr = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * slot)?;
    let head = u16::from_le(access::read_obj::<u16>(mem, addr)?);
    queue.set_next_avail(next.wrapping_add(1));
    Some(head)
}

/// Publishes a used entry for `head` and the new used index (release: the entry, and the
/// data the device wrote before it, are visible to the driver first). `added` counts the
/// entries since the last `needs_notification`, as virtio-queue's `num_added` does.
#[inline]
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    added: &mut u16,
) -> bool {
    if head >= queue.size() {
        return false;
    }
    let next = queue.next_used();
    let slot = u64::from(next % queue.size());
    let used = GuestAddress(queue.used_ring());
    let (Some(elem_at), Some(idx_at)) = (used.checked_add(4 + 8 * slot), used.checked_add(2))
    else {
        return false;
    };
    // The element is {le32 id, le32 len}: two words, 4-aligned like the ring.
    let elem = [u32::from(head).to_le(), len.to_le()];
    if !access::write_obj(mem, elem_at, elem) {
        return false;
    }
    let next = next.wrapping_add(1);
    fence(Ordering::Release);
    if !access::write_obj(mem, idx_at, next.to_le()) {
        return false;
    }
    queue.set_next_used(next);
    *added = added.wrapping_add(1);
    true
}

/// Whether the driver wants a notification for the `added` entries published since the last
/// call (EVENT_IDX: the used event index fell among them; without it, always), as
/// virtio-queue's `needs_notification` decides. Resets `added`.
#[inline]
pub fn needs_notification(queue: &Queue, mem: &GuestMemoryMmap, added: &mut u16) -> bool {
    // The used index stores must be visible before the used event is read.
    fence(Ordering::SeqCst);
    let added = std::mem::take(added);
    if !queue.event_idx_enabled() {
        return true;
    }
    let at = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()));
    let Some(event) = at.and_then(|a| access::read_obj::<u16>(mem, a)) else {
        return true;
    };
    let used = Wrapping(queue.next_used());
    let old = used - Wrapping(added);
    used - Wrapping(u16::from_le(event)) - Wrapping(1) < used - old
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const SIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// The used entries and index written here are what virtio-queue writes, and the
    /// notification decisions are its decisions, for every used event and batch size.
    #[test]
    fn used_ring_and_notifications_match_virtio_queue() {
        let (m1, m2) = (mem(), mem());
        let (v1, v2) = (
            MockSplitQueue::create(&m1, GuestAddress(0), SIZE),
            MockSplitQueue::create(&m2, GuestAddress(0), SIZE),
        );
        let (mut ours, mut theirs) = (
            v1.create_queue::<Queue>().unwrap(),
            v2.create_queue::<Queue>().unwrap(),
        );
        ours.set_event_idx(true);
        theirs.set_event_idx(true);
        let event_at = GuestAddress(ours.avail_ring() + 4 + 2 * u64::from(SIZE));
        let mut added = 0;
        let mut head = 0u16;
        let mut seen = [false; 2];
        for round in 0..40u16 {
            let batch = round % 5 + 1;
            for _ in 0..batch {
                head = (head + 3) % SIZE;
                assert!(add_used(&mut ours, &m1, head, u32::from(round), &mut added));
                theirs.add_used(&m2, head, u32::from(round)).unwrap();
            }
            let event = round.wrapping_mul(7) % 64;
            m1.write_obj(event, event_at).unwrap();
            m2.write_obj(event, event_at).unwrap();
            let wanted = needs_notification(&ours, &m1, &mut added);
            assert_eq!(
                wanted,
                theirs.needs_notification(&m2).unwrap(),
                "round {round}, used event {event}"
            );
            seen[usize::from(wanted)] = true;
            assert_eq!(added, 0);
            assert_eq!(ours.next_used(), theirs.next_used());
        }
        assert_eq!(seen, [true, true], "both decisions were exercised");
        let used = ours.used_ring();
        let mut a = [0u8; 4 + 8 * SIZE as usize];
        let mut b = [0u8; 4 + 8 * SIZE as usize];
        m1.read_slice(&mut a, GuestAddress(used)).unwrap();
        m2.read_slice(&mut b, GuestAddress(used)).unwrap();
        assert_eq!(a, b, "used rings differ");
        assert!(
            !add_used(&mut ours, &m1, SIZE, 0, &mut added),
            "head beyond the ring"
        );
    }

    #[test]
    fn avail_entries_are_popped_in_order() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), SIZE);
        let mut q = vq.create_queue::<Queue>().unwrap();
        for (i, h) in [5u16, 2, 9].iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(*h);
        }
        vq.avail().idx().store(3);
        assert_eq!(avail_idx(&q, &m), Some(Wrapping(3)));
        let heads: Vec<u16> = (0..3).filter_map(|_| pop_head(&mut q, &m)).collect();
        assert_eq!(heads, vec![5, 2, 9]);
        assert_eq!(q.next_avail(), 3);
    }
}
