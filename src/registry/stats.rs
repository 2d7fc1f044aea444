//! What the registry reports about devices and reactors: the device list, per-queue I/O
//! statistics (asked of the reactors by message, never by stopping anything), reactor
//! accounting. The registry lock is held only to copy handles: the reactors are asked after.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{DeviceError, Registry};
use crate::blk::queues::QueueSnapshot;
use crate::blk::Device;
use crate::config::{DeviceTable, SocketSpec};
use crate::engine::stats::ReactorStats;
use crate::engine::Settings;
use crate::vhost::listener::Peer;

/// How long a reactor may take to answer a statistics message.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One device as `device_list` shows it.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    pub name: String,
    pub socket_path: Option<PathBuf>,
    pub fd: Option<i32>,
    /// vhost-user, vduse or ublk.
    pub front_end: &'static str,
    /// The kernel's block device of a VDUSE or ublk export.
    pub kernel_device: Option<String>,
    pub backend: &'static str,
    pub capacity: u64,
    pub logical_block_size: u32,
    pub read_only: bool,
    pub num_queues: u16,
    pub connected: bool,
    pub frontend: Option<Peer>,
    /// Running queues: (index, reactor, cpu).
    pub queues: Vec<(u16, usize, usize)>,
    /// The device's configuration, with the TOML keys.
    pub config: DeviceTable,
}

/// One device's I/O statistics, per queue.
#[derive(Clone, Debug)]
pub struct DeviceIo {
    pub name: String,
    pub capacity: u64,
    pub queues: Vec<QueueSnapshot>,
}

/// One reactor's accounting.
#[derive(Clone, Debug)]
pub struct ReactorSnapshot {
    pub index: usize,
    pub cpu: usize,
    pub stats: ReactorStats,
    pub pollers: usize,
    /// Pollers not polled until a completion wakes them (idle queues on notifications).
    pub parked: usize,
    pub settings: Settings,
}

impl Registry {
    pub fn list(&self) -> Vec<DeviceSummary> {
        let inner = self.lock();
        inner
            .devices
            .values()
            .map(|e| {
                let (socket_path, fd) = match e.cfg.front.socket() {
                    Some(SocketSpec::Path(p)) => (Some(p.clone()), None),
                    Some(SocketSpec::Fd(fd)) => (None, Some(*fd)),
                    None => (None, None),
                };
                let export = e.export();
                let model = &e.device.model;
                DeviceSummary {
                    name: e.cfg.name.clone(),
                    socket_path,
                    fd,
                    backend: e.device.backend.kind(),
                    capacity: model.capacity(),
                    logical_block_size: model.logical_block_size(),
                    read_only: model.read_only(),
                    num_queues: model.num_queues(),
                    front_end: e.cfg.front.kind(),
                    kernel_device: export.and_then(|x| x.node()),
                    connected: e.conn.is_some() || export.is_some_and(|x| x.in_use()),
                    frontend: e.conn.as_ref().and_then(|(_, c)| c.peer),
                    queues: e
                        .device
                        .queues
                        .running()
                        .iter()
                        .map(|q| (q.index, q.reactor.index, q.reactor.cpu))
                        .collect(),
                    config: e.cfg.table.clone(),
                }
            })
            .collect()
    }

    fn devices(&self, name: Option<&str>) -> Result<Vec<Arc<Device>>, DeviceError> {
        let inner = self.lock();
        match name {
            Some(n) => inner
                .devices
                .get(n)
                .map(|e| vec![Arc::clone(&e.device)])
                .ok_or_else(|| DeviceError::NoSuchDevice(n.into())),
            None => Ok(inner
                .devices
                .values()
                .map(|e| Arc::clone(&e.device))
                .collect()),
        }
    }

    /// Per-queue statistics since the device was added: what metrics export (monotonic).
    pub fn io_totals(&self) -> Vec<DeviceIo> {
        self.devices(None)
            .unwrap_or_default()
            .iter()
            .map(|d| DeviceIo {
                name: d.name.to_string(),
                capacity: d.model.capacity(),
                queues: d.queues.snapshot(ASK_TIMEOUT),
            })
            .collect()
    }

    /// `iostat`: per-queue statistics since the last reset (of `name`, or of every device),
    /// then, with `reset`, a new zero. Resets never touch what metrics export.
    pub fn iostat(&self, name: Option<&str>, reset: bool) -> Result<Vec<DeviceIo>, DeviceError> {
        let devices = self.devices(name)?;
        let mut out = Vec::new();
        for d in devices {
            let now = d.queues.snapshot(ASK_TIMEOUT);
            let mut inner = self.lock();
            let Some(e) = inner.devices.get_mut(&*d.name) else {
                continue;
            };
            let queues = now
                .iter()
                .map(|q| {
                    let base = e.iostat_base.get(&q.index).cloned().unwrap_or_default();
                    QueueSnapshot {
                        stats: q.stats.since(&base),
                        ..q.clone()
                    }
                })
                .collect();
            if reset {
                e.iostat_base = now.iter().map(|q| (q.index, q.stats.clone())).collect();
            }
            out.push(DeviceIo {
                name: d.name.to_string(),
                capacity: d.model.capacity(),
                queues,
            });
        }
        Ok(out)
    }

    /// Every reactor's accounting, asked of each by message.
    pub fn reactor_stats(&self) -> Vec<ReactorSnapshot> {
        self.reactors
            .iter()
            .map(|h| {
                let got = h.call(ASK_TIMEOUT, |r| {
                    (r.stats(), r.poller_count(), r.parked_count(), r.settings())
                });
                let (stats, pollers, parked, settings) =
                    got.unwrap_or_else(|| (ReactorStats::default(), 0, 0, self.settings()));
                ReactorSnapshot {
                    index: h.index,
                    cpu: h.cpu,
                    stats,
                    pollers,
                    parked,
                    settings,
                }
            })
            .collect()
    }
}
