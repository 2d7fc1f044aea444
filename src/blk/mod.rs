//! The block core, transport-neutral: what a block request is, how it fails, what a device
//! looks like to its user (the device model), what a backend must do (the `Backend` and
//! `Channel` traits) and per-queue I/O statistics.
//!
//! Owns: request and error types, validation against the device model, the backend
//! contract. Must not import the virtio, vhost or backend implementations: front ends turn
//! their rings into `BlockRequest`s, backends execute them.

pub mod backend;
pub mod device;
pub mod error;
pub mod export;
pub mod model;
pub mod queues;
pub mod request;
pub mod stats;

pub use backend::{Backend, Channel, Submitted};
pub use device::Device;
pub use error::BlockError;
pub use export::Export;
pub use model::DeviceModel;
pub use request::{BlockRequest, Op};

pub const SECTOR_SHIFT: u32 = 9;
