//! The VDUSE front end: a virtio-blk device the kernel drives through its own virtio_blk
//! driver (`/dev/vdX`, after `vdpa dev add name NAME mgmtdev vduse`), served from vubd's
//! virtqueue front end on the shared reactors.
//!
//! Owns: /dev/vduse/control and /dev/vduse/NAME, the device's control messages, IOTLB
//! mappings. Imports the virtqueue front end, the block core, guest memory and the engine.

use std::io;
use std::sync::Arc;

use crate::blk::{Device, Export};

/// Creates the VDUSE device `name` for `device`.
pub fn create(name: &str, device: Arc<Device>) -> io::Result<Box<dyn Export>> {
    let _ = device;
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("VDUSE export {name:?}: not implemented yet"),
    ))
}
