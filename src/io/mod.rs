//! Backends: where the bytes of a device live. A [`Disk`] is shared by every reactor that
//! owns one of the device's queues; each reactor executes its own requests on it.

mod file;
pub mod iovec;
mod ram;

use std::sync::atomic::{AtomicBool, Ordering};

pub use file::FileDisk;
pub use ram::RamDisk;

use crate::config::{BackendSpec, DeviceConfig};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

#[derive(Debug)]
pub enum Backend {
    /// Reads return zeroes, writes are dropped: measures the server's own overhead.
    Null,
    Ram(RamDisk),
    File(FileDisk),
}

/// A device's storage plus what the guest is told about it.
#[derive(Debug)]
pub struct Disk {
    pub backend: Backend,
    /// Size in bytes, a multiple of the logical block size.
    pub capacity: u64,
    pub logical_block_size: u32,
    pub read_only: bool,
    /// Cleared by the guest through CONFIG_WCE (write-through); every completed write must
    /// then be durable. Read once per write request: a relaxed load is a plain load.
    writeback: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path} is smaller than one logical block ({lbs} bytes)")]
    TooSmall { path: String, lbs: u32 },
    #[error("cannot allocate a RAM disk of {size} bytes: {err}")]
    Alloc { size: u64, err: std::io::Error },
}

impl Disk {
    pub fn open(cfg: &DeviceConfig) -> Result<Disk, DiskError> {
        let lbs = u64::from(cfg.logical_block_size);
        let (backend, size) = match &cfg.backend {
            BackendSpec::Null { size } => (Backend::Null, *size),
            BackendSpec::Ram { size } => (Backend::Ram(RamDisk::new(*size)?), *size),
            BackendSpec::File { path, buffered } => {
                let f = FileDisk::open(path, cfg.read_only, *buffered)?;
                let size = f.size();
                (Backend::File(f), size)
            }
        };
        // A file whose size is not a multiple of the block size exposes its whole blocks only,
        // as QEMU does.
        let capacity = size - size % lbs;
        if capacity == 0 {
            return Err(DiskError::TooSmall {
                path: format!("{:?}", cfg.backend),
                lbs: cfg.logical_block_size,
            });
        }
        Ok(Disk {
            backend,
            capacity,
            logical_block_size: cfg.logical_block_size,
            read_only: cfg.read_only,
            writeback: AtomicBool::new(!cfg.writethrough),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity >> SECTOR_SHIFT
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Null => "null",
            Backend::Ram(_) => "ram",
            Backend::File(_) => "file",
        }
    }
}
