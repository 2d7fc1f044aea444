//! The VDUSE front end: a virtio-blk device the kernel drives through its own virtio_blk
//! driver (`/dev/vdX`, after `vdpa dev add name NAME mgmtdev vduse`), served from vubd's
//! virtqueue front end on the shared reactors.
//!
//! - `uapi`: the kernel ABI (structs, ioctl numbers), by hand from linux/vduse.h;
//! - `control`: /dev/vduse/control and /dev/vduse/NAME, every ioctl;
//! - `iotlb`: the driver's DMA memory (VDUSE's IOTLB) mapped as guest memory, IOVA-addressed;
//! - `device`: one device's control messages and its queues on the reactors;
//! - `notify`: the queues' interrupts (VDUSE_VQ_INJECT_IRQ);
//! - `record`: the in-flight record that lets a restarted vubd finish a crashed one's I/O;
//! - `netlink`: `vdpa dev del` over generic netlink, for removal;
//! - `export`: creation, take-over after a restart, resize and removal (`blk::Export`).
//!
//! Owns: /dev/vduse/control and /dev/vduse/NAME, the device's control messages, IOTLB
//! mappings. Imports the virtqueue front end, the block core, guest memory, the engine and
//! the sandbox; never vhost, ublk, the registry or backends.

mod control;
mod device;
mod export;
#[cfg(test)]
mod fake;
mod iotlb;
mod netlink;
mod notify;
mod record;
mod uapi;

pub use export::create;
