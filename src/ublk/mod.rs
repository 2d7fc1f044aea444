//! The ublk front end: `/dev/ublkbN`, whose requests arrive on the reactors' own io_uring as
//! command completions (FETCH_REQ / COMMIT_AND_FETCH_REQ) and go to the device's backend.
//!
//! - `uapi`: the kernel ABI (include/uapi/linux/ublk_cmd.h), by hand;
//! - `control`: /dev/ublk-control commands on a 128-byte-SQE ring, each with a deadline;
//! - `mapping`: the descriptor array mapped from /dev/ublkcN and the tags' data buffers;
//! - `queue`: one hardware queue as a poller on the reactor that owns it;
//! - `export`: a device's life as the registry sees it (`blk::Export`): add or recover,
//!   start, resize where the kernel can, remove.
//!
//! Owns: /dev/ublk-control, /dev/ublkcN, the per-queue command rings' protocol. Imports the
//! block core, the engine and the sandbox; must not import the backends, the virtio and
//! vhost layers, VDUSE or the registry.

mod control;
mod export;
mod mapping;
mod queue;
mod uapi;

use std::io;
use std::sync::Arc;

use crate::blk::{Device, Export};

/// Creates a ublk device (id `id`, or the first free one) for `device`, or takes over
/// device `id` if the vubd that served it died (user recovery). Returns once `/dev/ublkbN`
/// exists.
pub fn create(id: Option<u32>, device: Arc<Device>) -> io::Result<Box<dyn Export>> {
    Ok(Box::new(export::UblkExport::create(id, device)?))
}
