//! The virtio-blk device model: feature bits, config space, request parsing.

pub mod config;
pub mod features;
pub mod request;

/// VIRTIO_BLK_S_*: the status byte the device writes last.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Bytes of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
pub mod chain;
pub mod inflight;
pub mod mock;
pub mod poller;
