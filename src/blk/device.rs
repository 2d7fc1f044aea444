//! A block device as every front end serves it: its name, model, backend, the reactors its
//! queues run on, and its running queues.

use std::sync::Arc;

use super::queues::Queues;
use super::{Backend, DeviceModel};
use crate::engine::ReactorHandle;

pub struct Device {
    pub name: Arc<str>,
    pub model: Arc<DeviceModel>,
    pub backend: Arc<dyn Backend>,
    /// The reactors of the device's core mask; queue i runs on `reactors[i % len]`.
    pub reactors: Vec<ReactorHandle>,
    pub queues: Queues,
    /// Time every request for the latency histograms (two TSC reads per request).
    pub latency_histograms: bool,
}

impl Device {
    /// Which reactor serves queue `q`: round-robin over the device's core mask.
    pub fn placement(&self, q: u16) -> &ReactorHandle {
        &self.reactors[usize::from(q) % self.reactors.len()]
    }
}
