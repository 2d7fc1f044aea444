//! Test and bench support: a driver-side queue from virtio-queue's `MockSplitQueue`, with the
//! used ring moved out of the way. The mock in virtio-queue 0.18 places its used ring at
//! `avail.end()`, which adds the element count rather than the byte count, so the used ring
//! overlaps the avail ring and completions overwrite offered heads.

use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::notify::EventFdNotifier;
use super::queue::{QueueStart, Ring, VirtQueue};
use crate::blk::model::Caps;
use crate::blk::{Backend, DeviceModel};
use crate::engine::Ctx;
use crate::guestmem::GuestMemoryMmap;

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

/// The device model of a test device on `backend`: 512-byte blocks, write-back, `serial`.
pub fn model(backend: &dyn Backend, serial: &str) -> Arc<DeviceModel> {
    let info = backend.info();
    Arc::new(DeviceModel::new(
        info.size,
        512,
        false,
        true,
        serial,
        Caps::ALL,
        1,
    ))
}

/// What a reactor gets to poll `vq` (queue 0 of device "test") on `backend`: no kick or
/// call fd, no inflight tracking.
pub fn queue_start(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    size: u16,
    mem: &Arc<GuestMemoryMmap>,
    backend: Arc<dyn Backend>,
    serial: &str,
) -> QueueStart {
    QueueStart {
        device: Arc::from("test"),
        index: 0,
        ring: Ring::Split {
            queue: queue(vq, size),
            inflight: None,
        },
        mem: Arc::clone(mem),
        model: model(&*backend, serial),
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

/// Offers `heads` on `vq`'s avail ring, wrapping around it as a driver does, and publishes
/// the new avail index.
pub fn offer(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    size: u16,
    heads: impl IntoIterator<Item = u16>,
) {
    let mut idx = vq.avail().idx().load();
    for head in heads {
        let slot = usize::from(idx % size);
        vq.avail()
            .ring()
            .ref_at(slot)
            .expect("slot < size")
            .store(head);
        idx = idx.wrapping_add(1);
    }
    vq.avail().idx().store(idx);
}
