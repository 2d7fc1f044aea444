//! The virtqueue front end: descriptor chains from split or packed virtqueues in guest memory become
//! block requests; completions go back through the used ring and a notifier. The vhost-user
//! control plane (and later VDUSE) sets queues up and hands them to reactors.
//!
//! Owns: chain walking, request parsing and every check the virtio spec asks of a device,
//! guest memory -> iovecs, INFLIGHT_SHMFD tracking, the virtio-blk feature bits and config
//! space. Must not import the vhost, registry or backend layers.

pub mod chain;
pub mod config;
pub mod features;
pub mod inflight;
pub mod iovec;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod notify;
pub mod packed;
pub mod queue;
pub mod request;
pub mod running;
pub mod split;
