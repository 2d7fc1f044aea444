//! The vhost-user front end's control plane: listening sockets, one thread per connected
//! frontend, negotiation, the frontend's memory table, vring setup. The data path is the
//! virtqueue front end (`virtio_blk`), which this layer starts on reactors.
//!
//! Owns: the vhost-user protocol. Must not import the registry or the backend
//! implementations: a device arrives as a `blk::Device`.

pub mod connection;
pub mod device;
pub mod listener;
pub mod memory;
pub mod vring;
pub mod watchdog;
