//! The null backend: reads return zeroes, writes are dropped. Measures the server's own
//! overhead: every request completes inline, with no system call.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::blk::backend::{BackendInfo, Channel, ResizeError, Submitted};
use crate::blk::model::Caps;
use crate::blk::{Backend, BlockRequest, Op};
use crate::engine::Ctx;

#[derive(Debug)]
pub struct NullBackend {
    size: AtomicU64,
}

impl NullBackend {
    pub fn new(size: u64) -> NullBackend {
        NullBackend {
            size: AtomicU64::new(size),
        }
    }
}

impl Backend for NullBackend {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            size: self.size.load(Ordering::Relaxed),
            caps: Caps::ALL,
            read_only: false,
            single_reactor: false,
        }
    }

    fn open_channel(&self, _ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(NullChannel))
    }

    fn resize(&self, new: Option<u64>) -> Result<u64, ResizeError> {
        if let Some(n) = new {
            self.size.store(n, Ordering::Relaxed);
        }
        Ok(self.size.load(Ordering::Relaxed))
    }
}

struct NullChannel;

impl Channel for NullChannel {
    fn completes_inline(&self) -> bool {
        true
    }

    fn room(&self, _ctx: &Ctx<'_>) -> u32 {
        u32::MAX
    }

    unsafe fn submit(&mut self, _ctx: &mut Ctx<'_>, req: &BlockRequest) -> Submitted {
        if req.op == Op::Read {
            // SAFETY: the caller keeps the iovecs and their memory valid for this call.
            for v in unsafe { req.iovecs() } {
                // SAFETY: each iovec describes writable mapped memory (the caller's contract).
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
        }
        Submitted::Done(Ok(()))
    }
}
