//! Guest memory as vubd maps it from frontends: every mapping of a frontend's file is
//! registered with the SIGBUS handler's table (`fault`), so a frontend that shrinks its file
//! under us loses its own connection and nothing else; and each region carries a bitmap
//! (`bitmap`) that keeps its mapping alive exactly as long as any snapshot uses it and marks
//! the connection's dirty log (`dirty`) while a live migration runs.
//!
//! Owns: mapping frontend fds, fault containment. Must not import any other vubd layer but
//! the engine's utilities.

pub mod access;
pub mod bitmap;
pub mod dirty;
pub mod fault;
pub mod mapping;

pub use bitmap::FrontendBitmap;

/// Guest memory shared by a frontend (vm-memory's type, with our bitmap).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<FrontendBitmap>;
/// One region of it.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<FrontendBitmap>;
