//! Why a block request failed, and what each front end tells its user about it: a virtio
//! status byte, an errno.

/// VIRTIO_BLK_S_*: the status byte a virtio-blk device writes last.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("beyond the end of the disk")]
    OutOfRange,
    #[error("not aligned to the logical block size")]
    Unaligned,
    #[error("range overflows")]
    Overflow,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("segment larger than the advertised limit")]
    TooLarge,
    #[error("operation not supported by this device")]
    Unsupported,
    #[error("data buffer outside guest memory")]
    BadBuffer,
    #[error("too many data segments")]
    TooManySegments,
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Io(i32),
    #[error("short transfer ({0} bytes)")]
    Short(u32),
}

impl BlockError {
    /// The virtio-blk status this error completes with.
    pub fn status(&self) -> u8 {
        match self {
            BlockError::Unsupported => status::UNSUPP,
            _ => status::IOERR,
        }
    }

    /// The errno a kernel front end (ublk) completes with.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Unsupported => libc::EOPNOTSUPP,
            BlockError::ReadOnly => libc::EROFS,
            BlockError::OutOfRange | BlockError::Overflow => libc::ENOSPC,
            BlockError::Unaligned | BlockError::TooLarge | BlockError::TooManySegments => {
                libc::EINVAL
            }
            BlockError::BadBuffer => libc::EFAULT,
            BlockError::Io(e) => *e,
            BlockError::Short(_) => libc::EIO,
        }
    }

    /// A kernel result (`-errno` or a byte count) for an operation that should have moved
    /// `expect` bytes.
    pub fn check_result(result: i32, expect: u64) -> Result<(), BlockError> {
        if result < 0 {
            Err(BlockError::Io(-result))
        } else if result as u64 != expect {
            Err(BlockError::Short(result as u32))
        } else {
            Ok(())
        }
    }
}
