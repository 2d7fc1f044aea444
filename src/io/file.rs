//! File backend: a regular file or a block device, driven through each reactor's io_uring.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use super::DiskError;

#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    block_device: bool,
}

/// BLKGETSIZE64 from linux/fs.h: _IOR(0x12, 114, size_t).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl FileDisk {
    pub fn open(path: &Path, read_only: bool, buffered: bool) -> Result<FileDisk, DiskError> {
        let name = path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if !buffered {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|err| DiskError::Open {
            path: name.clone(),
            err,
        })?;
        let meta = file.metadata().map_err(|err| DiskError::Io {
            path: name.clone(),
            err,
        })?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc != 0 {
                return Err(DiskError::Io {
                    path: name,
                    err: std::io::Error::last_os_error(),
                });
            }
            size
        } else {
            meta.len()
        };
        log::info!(
            "{name}: {} of {size} bytes, {}",
            if block_device { "block device" } else { "file" },
            if buffered { "buffered" } else { "O_DIRECT" }
        );
        Ok(FileDisk {
            file,
            size,
            block_device,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}
