//! A device exported to the kernel (VDUSE, ublk): the kernel's own driver is the frontend,
//! and the export lives exactly as long as the device. The registry holds it; the front end
//! modules build it.

use super::backend::ResizeError;

pub trait Export: Send {
    /// `vduse` or `ublk`.
    fn kind(&self) -> &'static str;

    /// The block device the kernel made (`/dev/vda`, `/dev/ublkb0`), once it exists.
    fn node(&self) -> Option<String>;

    /// The kernel's driver is using the device (VDUSE: DRIVER_OK; ublk: started).
    fn in_use(&self) -> bool;

    /// Whether the kernel can be told of a new capacity (checked before the backend
    /// changes size, so an export that cannot refuses the resize).
    fn can_resize(&self) -> Result<(), ResizeError>;

    /// The device's capacity changed (the model has it): tell the kernel.
    fn capacity_changed(&self) -> Result<(), ResizeError>;

    /// Tears the kernel device down (device removal, shutdown): the queues stop, requests
    /// in flight complete first or fail.
    fn shut_down(self: Box<Self>);
}
