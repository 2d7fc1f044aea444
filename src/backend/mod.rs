//! Backends: where the bytes of a device live. Each implements the block core's `Backend`
//! (one per device) and `Channel` (one per queue, on the queue's reactor).
//!
//! Owns: files, RAM disks, the null disk, and the unsafe raw memory and FFI they need. Must
//! not import the virtio, vhost or registry layers.

mod file;
mod nbd;
mod null;
mod ram;
mod rbd;

use std::path::Path;
use std::sync::Arc;

pub use file::FileBackend;
pub use null::NullBackend;
pub use ram::RamBackend;

use crate::blk::Backend;
use crate::config::BackendSpec;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("cannot allocate a RAM disk of {size} bytes: {err}")]
    Alloc { size: u64, err: std::io::Error },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Connect(String),
}

/// Opens the backend a device's configuration names.
pub fn open(spec: &BackendSpec, read_only: bool) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match spec {
        BackendSpec::Null { size } => Arc::new(NullBackend::new(*size)),
        BackendSpec::Ram { size } => Arc::new(RamBackend::new(*size)?),
        BackendSpec::File { path, buffered } => {
            Arc::new(FileBackend::open(Path::new(path), read_only, *buffered)?)
        }
        BackendSpec::Nbd { uri, timeout } => nbd::open(uri, *timeout, read_only)?,
        BackendSpec::Rbd {
            pool,
            image,
            conf,
            user,
            keyring,
        } => rbd::open(pool, image, conf, user, keyring.as_deref(), read_only)?,
    })
}
