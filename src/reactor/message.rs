//! Messages from the control thread to a reactor: the only way to touch a reactor's state.

use std::fs::File;
use std::sync::Arc;

use crossbeam_channel::Sender;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::io::Disk;
use crate::virtio_blk::inflight::InflightQueue;

/// Names one queue of one device across threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueKey {
    pub device: u32,
    pub queue: u16,
}

/// Everything a reactor needs to start polling a queue. The control thread has validated the
/// ring addresses against `mem` before sending it.
pub struct QueueStart {
    pub key: QueueKey,
    pub queue: Queue,
    pub mem: Arc<GuestMemoryMmap>,
    pub disk: Arc<Disk>,
    pub serial: [u8; crate::virtio_blk::ID_BYTES],
    pub kick: Option<File>,
    pub call: Option<File>,
    /// Inflight tracking, when the frontend shared a region (INFLIGHT_SHMFD).
    pub inflight: Option<InflightQueue>,
    /// Heads a previous backend took and never completed, oldest first.
    pub resubmit: Vec<u16>,
}

/// The answer to `StopQueue`, sent once the queue's in-flight requests have completed.
#[derive(Clone, Copy, Debug)]
pub struct QueueStopped {
    /// The next avail index the device would have processed: GET_VRING_BASE's answer.
    pub next_avail: u16,
}

pub enum Message {
    AddQueue(Box<QueueStart>),
    StopQueue {
        key: QueueKey,
        reply: Sender<QueueStopped>,
    },
    /// A new memory table for every queue of `device`; acknowledged once applied so that the
    /// frontend can use the new region as soon as its message is acked.
    UpdateMemory {
        device: u32,
        mem: Arc<GuestMemoryMmap>,
        reply: Sender<()>,
    },
    SetCall {
        key: QueueKey,
        call: Option<File>,
    },
    Shutdown,
}
