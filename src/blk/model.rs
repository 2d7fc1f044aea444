//! The device model: what a device looks like to whoever uses it, whatever the transport
//! (vhost-user, VDUSE, ublk): capacity (which may change at run time), block size, read-only,
//! the volatile write cache, what operations it supports, its serial. Every request is
//! checked against it before a backend sees it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{BlockError, BlockRequest, Op, SECTOR_SHIFT};

/// Bytes of a serial number (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = 20;

/// Largest DISCARD / WRITE_ZEROES range, in sectors (1 GiB), as offered to drivers.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// What the backend can do beyond reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Data can sit in a volatile cache: flush is meaningful and the write cache can be
    /// turned off.
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

impl Caps {
    pub const ALL: Caps = Caps {
        flush: true,
        discard: true,
        write_zeroes: true,
    };
}

#[derive(Debug)]
pub struct DeviceModel {
    /// Bytes, a multiple of the logical block size. Read with Acquire on every request, so a
    /// resize is seen from the next request on.
    capacity: AtomicU64,
    logical_block_size: u32,
    read_only: bool,
    /// The volatile write cache is on (write-back). Off: every completed write is durable.
    writeback: AtomicBool,
    /// What a reset returns the cache to.
    default_writeback: bool,
    serial: [u8; SERIAL_BYTES],
    caps: Caps,
    /// Queues offered to the frontend.
    num_queues: u16,
}

impl DeviceModel {
    /// `logical_block_size` must be a power of two.
    pub fn new(
        capacity: u64,
        logical_block_size: u32,
        read_only: bool,
        writeback: bool,
        serial: &str,
        caps: Caps,
        num_queues: u16,
    ) -> DeviceModel {
        assert!(logical_block_size.is_power_of_two());
        let mut s = [0u8; SERIAL_BYTES];
        let n = serial.len().min(SERIAL_BYTES);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        DeviceModel {
            capacity: AtomicU64::new(capacity),
            logical_block_size,
            read_only,
            writeback: AtomicBool::new(writeback),
            default_writeback: writeback,
            serial: s,
            caps,
            num_queues,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity() >> SECTOR_SHIFT
    }

    /// A resize: requests are checked against the new capacity from now on.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Release);
    }

    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Read once per write request: a relaxed load is a plain load.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// A device reset: the write cache goes back to how the device was configured.
    pub fn reset(&self) {
        self.set_writeback(self.default_writeback);
    }

    pub fn serial(&self) -> &[u8; SERIAL_BYTES] {
        &self.serial
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The write op a front end issues: with the cache off, every write is durable.
    pub fn write_op(&self) -> Op {
        Op::Write {
            fua: !self.writeback(),
        }
    }

    /// Checks a request against the device: ranges inside the capacity with checked
    /// arithmetic, offsets and lengths aligned to the logical block size, no change to a
    /// read-only device, only operations the device offers.
    pub fn check(&self, req: &BlockRequest) -> Result<(), BlockError> {
        let in_range = || -> Result<(), BlockError> {
            // The block size is a power of two (512 or 4096): a mask, not a division.
            let mask = u64::from(self.logical_block_size) - 1;
            if (req.offset | req.len) & mask != 0 {
                return Err(BlockError::Unaligned);
            }
            let end = req
                .offset
                .checked_add(req.len)
                .ok_or(BlockError::Overflow)?;
            if end > self.capacity() {
                return Err(BlockError::OutOfRange);
            }
            Ok(())
        };
        match req.op {
            Op::Read => in_range(),
            Op::Write { .. } => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                in_range()
            }
            Op::Discard | Op::WriteZeroes { .. } => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                let offered = match req.op {
                    Op::Discard => self.caps.discard,
                    _ => self.caps.write_zeroes,
                };
                if !offered {
                    return Err(BlockError::Unsupported);
                }
                if req.len > u64::from(MAX_DISCARD_SECTORS) << SECTOR_SHIFT {
                    return Err(BlockError::TooLarge);
                }
                in_range()
            }
            Op::Flush => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, offset: u64, len: u64) -> BlockRequest {
        BlockRequest {
            op,
            offset,
            len,
            ..BlockRequest::default()
        }
    }

    #[test]
    fn requests_are_checked_against_the_model() {
        let m = DeviceModel::new(1 << 20, 4096, false, true, "s", Caps::ALL, 1);
        assert_eq!(m.check(&req(Op::Read, 0, 4096)), Ok(()));
        assert_eq!(
            m.check(&req(Op::Read, 512, 4096)),
            Err(BlockError::Unaligned)
        );
        assert_eq!(
            m.check(&req(Op::Read, (1 << 20) - 4096, 8192)),
            Err(BlockError::OutOfRange)
        );
        assert_eq!(
            m.check(&req(Op::Read, u64::MAX - 4095, 8192)),
            Err(BlockError::Overflow)
        );
        m.set_capacity(2 << 20);
        assert_eq!(m.check(&req(Op::Read, (1 << 20) - 4096, 8192)), Ok(()));
        let ro = DeviceModel::new(1 << 20, 512, true, true, "", Caps::ALL, 1);
        assert_eq!(
            ro.check(&req(Op::Write { fua: false }, 0, 512)),
            Err(BlockError::ReadOnly)
        );
        let no_discard = DeviceModel::new(
            1 << 20,
            512,
            false,
            true,
            "",
            Caps {
                discard: false,
                ..Caps::ALL
            },
            1,
        );
        assert_eq!(
            no_discard.check(&req(Op::Discard, 0, 512)),
            Err(BlockError::Unsupported)
        );
        assert_eq!(no_discard.check(&req(Op::Flush, 0, 0)), Ok(()));
    }
}
