//! The control thread: vhost-user sockets, one device per socket, one frontend at a time.

pub mod control;
pub mod device;
pub mod memory;
pub mod vring;
pub mod watchdog;
