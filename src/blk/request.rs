//! One block request as every front end hands it to a backend.

/// What a request asks of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    /// `fua`: the write must be durable when it completes (write cache off).
    Write {
        fua: bool,
    },
    Flush,
    /// A hint: a backend that cannot deallocate still succeeds.
    Discard,
    /// `unmap`: the range may be deallocated, as long as it reads back as zeroes.
    WriteZeroes {
        unmap: bool,
    },
}

impl Op {
    /// Index into per-op statistics.
    pub fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Write { .. } => 1,
            Op::Flush => 2,
            Op::Discard => 3,
            Op::WriteZeroes { .. } => 4,
        }
    }

    pub const COUNT: usize = 5;
    pub const NAMES: [&'static str; Op::COUNT] =
        ["read", "write", "flush", "discard", "write_zeroes"];

    /// Reads and writes move data through the iovecs; the others describe a range only.
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write { .. })
    }
}

/// A request after the front end has parsed it and the device model has validated it.
///
/// `iov` points to `iov_count` iovecs owned by the front end, which point into memory the
/// front end keeps mapped: both stay valid until the request completes (the contract of
/// [`Channel::submit`](super::Channel::submit)).
#[derive(Clone, Copy, Debug)]
pub struct BlockRequest {
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Bytes of data (read, write) or of the range (discard, write-zeroes); 0 for flush.
    pub len: u64,
    pub iov: *const libc::iovec,
    pub iov_count: u32,
    /// The front end's name for the request; completions carry it back.
    pub tag: u64,
}

impl Default for BlockRequest {
    fn default() -> Self {
        BlockRequest {
            op: Op::Flush,
            offset: 0,
            len: 0,
            iov: std::ptr::null(),
            iov_count: 0,
            tag: 0,
        }
    }
}

impl BlockRequest {
    /// The iovecs.
    ///
    /// # Safety
    /// Only while the request has not completed (see the type's contract).
    pub unsafe fn iovecs(&self) -> &[libc::iovec] {
        if self.iov_count == 0 {
            return &[];
        }
        // SAFETY: the front end built `iov_count` iovecs at `iov` and keeps them until the
        // request completes, which the caller promises it has not.
        unsafe { std::slice::from_raw_parts(self.iov, self.iov_count as usize) }
    }
}
