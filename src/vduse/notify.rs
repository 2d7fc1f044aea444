//! The "call" of a VDUSE queue: VDUSE_VQ_INJECT_IRQ on the device fd, from the queue's
//! reactor, at most once per pass. The kernel only queues a work item that runs the
//! driver's virtqueue callback, so the ioctl never blocks on the driver (the reactors'
//! seccomp filter allows this one ioctl). Before DRIVER_OK (a queue's first signal can come
//! that early) and after a reset the kernel answers EINVAL: nothing to tell then.

use std::sync::Arc;

use super::control::DevicePort;
use crate::engine::Ctx;
use crate::virtio_blk::notify::Notifier;

pub struct IrqNotifier {
    port: Arc<dyn DevicePort>,
    index: u32,
    wanted: bool,
    /// An injection failed for another reason than "not running" (logged once).
    failed: bool,
}

impl IrqNotifier {
    pub fn new(port: Arc<dyn DevicePort>, index: u16) -> IrqNotifier {
        IrqNotifier {
            port,
            index: u32::from(index),
            wanted: false,
            failed: false,
        }
    }
}

impl Notifier for IrqNotifier {
    fn notify(&mut self) {
        self.wanted = true;
    }

    fn flush(&mut self, _ctx: &mut Ctx<'_>) -> bool {
        if !std::mem::take(&mut self.wanted) {
            return false;
        }
        match self.port.inject_vq_irq(self.index) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
            Err(e) => {
                if !std::mem::replace(&mut self.failed, true) {
                    log::error!("VDUSE queue {}: VDUSE_VQ_INJECT_IRQ: {e}", self.index);
                }
                false
            }
        }
    }

    fn complete(&mut self, _tag: u64, _result: i32) {}

    fn idle(&self) -> bool {
        true
    }
}
