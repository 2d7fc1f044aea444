//! The ublk front end: `/dev/ublkbN`, whose requests arrive on the reactors' own io_uring as
//! command completions (FETCH_REQ / COMMIT_AND_FETCH_REQ) and go to the device's backend.
//!
//! Owns: /dev/ublk-control, /dev/ublkcN, the per-queue command rings' protocol. Imports the
//! block core and the engine.

use std::io;
use std::sync::Arc;

use crate::blk::{Device, Export};

/// Creates a ublk device (id `id`, or the first free one) for `device`.
pub fn create(id: Option<u32>, device: Arc<Device>) -> io::Result<Box<dyn Export>> {
    let _ = (id, device);
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "ublk export: not implemented yet",
    ))
}
