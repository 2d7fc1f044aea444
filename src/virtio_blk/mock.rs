//! Test and bench support: a driver-side queue from virtio-queue's `MockSplitQueue`, with the
//! used ring moved out of the way. The mock in virtio-queue 0.18 places its used ring at
//! `avail.end()`, which adds the element count rather than the byte count, so the used ring
//! overlaps the avail ring and completions overwrite offered heads.

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest address of the used ring of queues built by [`queue`]: past any mock ring layout
/// of up to 1024 entries, below the buffers tests place at 1 MiB and up.
pub const USED_RING: u64 = 0x8000;

/// A device-side queue over `vq`'s descriptor table and avail ring, with its used ring at
/// [`USED_RING`].
pub fn queue(vq: &MockSplitQueue<GuestMemoryMmap>, size: u16) -> Queue {
    let mut q = Queue::new(size).expect("power-of-two size");
    q.set_size(size);
    q.try_set_desc_table_address(vq.desc_table_addr())
        .expect("aligned");
    q.try_set_avail_ring_address(vq.avail_addr())
        .expect("aligned");
    q.try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    q.set_ready(true);
    q
}
