//! Running virtqueues from a control plane's thread (vhost-user's connection thread, a
//! VDUSE device's thread): stopping one on its reactor and publishing a new memory table to
//! those that run. Each call returns receivers, so the caller decides how long to wait and
//! under what (vhost-user pauses its stall watchdog meanwhile).
//!
//! Owns: the messages to reactors and the downcast back to `VirtQueue`. Must not import the
//! vhost, VDUSE or registry layers.

use std::any::Any;
use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::notify::Notifier;
use super::queue::{QueueStopped, VirtQueue};
use crate::blk::stats::IoStats;
use crate::blk::Device;
use crate::engine::PollerId;
use crate::guestmem::GuestMemoryMmap;

/// Asks queue `q`'s reactor to stop poller `id` once its requests drained. The receiver gets
/// what is left of the queue; it disconnects without a value if the poller never started
/// (its backend channel failed).
pub fn stop<N: Notifier + 'static>(
    device: &Device,
    q: u16,
    id: PollerId,
) -> Receiver<QueueStopped> {
    let (tx, rx) = crossbeam_channel::bounded::<QueueStopped>(1);
    device.placement(q).run(move |r| {
        r.stop_poller(
            id,
            Box::new(move |p| {
                let any: Box<dyn Any> = p;
                if let Ok(q) = any.downcast::<VirtQueue<N>>() {
                    let stopped = q.stopped();
                    // Dropped before the answer: whatever it held (a device fd) is released.
                    drop(q);
                    let _ = tx.send(stopped);
                }
            }),
        )
    });
    rx
}

/// Books a stop's outcome in the device's queue table and logs it; the queue's remains when
/// it drained.
pub fn stopped(
    device: &Device,
    q: u16,
    id: PollerId,
    outcome: Result<QueueStopped, RecvTimeoutError>,
    timeout: std::time::Duration,
) -> Option<QueueStopped> {
    match outcome {
        Ok(stopped) => {
            device.queues.stopped(q, id, &stopped.stats);
            let s = &stopped.stats;
            let at = match stopped.packed {
                Some(b) => format!(
                    "packed avail {}/{} used {}/{}",
                    b.avail.idx,
                    u8::from(b.avail.wrap),
                    b.used.idx,
                    u8::from(b.used.wrap)
                ),
                None => format!("avail index {}", stopped.next_avail),
            };
            log::info!(
                "device {}: queue {q} stopped at {at}: {} requests, {} errors, {} notifications",
                device.name,
                s.requests(),
                s.error_count(),
                s.notifications
            );
            Some(stopped)
        }
        Err(RecvTimeoutError::Disconnected) => {
            device.queues.stopped(q, id, &IoStats::default());
            None
        }
        Err(RecvTimeoutError::Timeout) => {
            log::error!(
                "device {}: queue {q} did not drain within {timeout:?}",
                device.name
            );
            None
        }
    }
}

/// Hands `mem` to every running queue in `running` (queue index, poller); each receiver
/// answers once that reactor applied it.
pub fn publish_memory<N: Notifier + 'static>(
    device: &Device,
    running: impl Iterator<Item = (u16, PollerId)>,
    mem: &Arc<GuestMemoryMmap>,
) -> Vec<Receiver<()>> {
    running
        .map(|(q, id)| {
            let mem = Arc::clone(mem);
            let (tx, rx) = crossbeam_channel::bounded(1);
            device.placement(q).run(move |r| {
                if let Some(p) = r.poller_mut(id) {
                    let any: &mut dyn Any = p;
                    if let Some(q) = any.downcast_mut::<VirtQueue<N>>() {
                        q.set_memory(mem);
                    }
                }
                let _ = tx.send(());
            });
            rx
        })
        .collect()
}
