//! vubd: a vhost-user-blk server. See DESIGN in the README for the thread model.

pub mod cli;
pub mod config;
pub mod cpuset;
pub mod io;
pub mod reactor;
pub mod vhost;
pub mod virtio_blk;

use config::Config;
use reactor::Engine;
use std::sync::Arc;

use vhost::control::{block_signals, listen, Control, MESSAGE_TIMEOUT};
use vhost::device::Device;
use vhost::watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("device {dev}: {err}")]
    Disk { dev: String, err: io::DiskError },
    #[error("device {dev}: {err}")]
    Socket {
        dev: String,
        err: vhost::control::SocketError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opens every backend and socket first (so bad arguments fail before anything runs), then
/// starts the reactors and serves until SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<(), RunError> {
    let mut opened = Vec::new();
    for dev in &config.devices {
        let disk = io::Disk::open(dev).map_err(|err| RunError::Disk {
            dev: dev.name.clone(),
            err,
        })?;
        let (listener, path) = listen(&dev.socket).map_err(|err| RunError::Socket {
            dev: dev.name.clone(),
            err,
        })?;
        opened.push((dev.clone(), disk, listener, path));
    }
    let signals = block_signals()?;
    let engine = Engine::start(&config.engine)?;
    let watchdog = Arc::new(Watchdog::start(MESSAGE_TIMEOUT)?);
    let mut control = Control::new(signals, Arc::clone(&watchdog))?;
    for (id, (dev, disk, listener, path)) in opened.into_iter().enumerate() {
        let mask = dev
            .cpumask
            .clone()
            .unwrap_or_else(|| config.engine.cpumask.clone());
        let reactors: Vec<_> = engine
            .reactors()
            .iter()
            .filter(|r| mask.contains(r.cpu))
            .cloned()
            .collect();
        let placement: Vec<String> = (0..dev.num_queues)
            .map(|q| format!("q{q}->cpu{}", reactors[usize::from(q) % reactors.len()].cpu))
            .collect();
        log::info!(
            "device {}: {} backend, {} bytes, {} queue(s) [{}], listening on {}",
            dev.name,
            disk.kind(),
            disk.capacity,
            dev.num_queues,
            placement.join(" "),
            path.as_ref()
                .map_or_else(|| format!("{:?}", dev.socket), |p| p.display().to_string())
        );
        let device = Device::new(id as u32, dev, disk, reactors, Arc::clone(&watchdog));
        control.add_device(listener, path, device)?;
    }
    let result = control.run();
    engine.shutdown();
    result.map_err(RunError::from)
}
