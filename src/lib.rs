//! vubd: a vhost-user-blk server. The layers, top to bottom (arrows point down only):
//!
//! ```text
//!   registry (control thread): devices by name, add/remove, the control event loop
//!   vhost (vhost-user control plane: sockets, one thread per frontend, memory, vrings)
//!   vduse (VDUSE: a kernel virtio-blk device)     ublk (ublk: /dev/ublkbN)
//!   virtio_blk (virtqueue front end: chains -> block requests, completions, notify)
//!   blk (block core: requests, errors, device model, the backend contract, statistics)
//!   backend (null, ram, file)          engine (reactors, pollers, io_uring, messages)
//! ```
//!
//! The binary needs [`Args`], [`Config`] and [`run`]; tests, benches and fuzz targets reach
//! the layers through [`testing`] (feature `test-utils`).

mod backend;
mod blk;
mod cli;
mod config;
mod cpuset;
mod engine;
mod guestmem;
mod mgmt;
mod registry;
mod rlimit;
mod sandbox;
mod service;
mod ublk;
mod users;
mod vduse;
mod vhost;
mod virtio_blk;

pub use cli::{Args, CAPABILITIES_JSON};
pub use config::{BackendSpec, Config, ConfigError, DeviceConfig, FrontEndSpec, SocketSpec};

use std::sync::Arc;

use config::EngineTable;
use registry::control::{block_signals, serve};
use registry::{AddError, Origin, Registry};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Add(#[from] AddError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The engine keys that start the same engine again (what `config_save` writes).
fn engine_table(config: &Config) -> EngineTable {
    let e = &config.engine;
    EngineTable {
        cpumask: Some(e.cpumask.to_string()),
        poll_mode: Some(e.poll_mode.as_str().into()),
        idle_spin_us: Some(e.idle_spin.as_micros() as u64),
        rpc_socket: config.rpc_socket.clone(),
        metrics_addr: config.metrics_addr.map(|a| a.to_string()),
        seccomp: Some(e.seccomp.as_str().into()),
        latency_histograms: Some(e.latency_histograms),
    }
}

/// Starts the reactors, adds every configured device (so bad arguments fail before anything
/// is served), starts the management socket and the metrics endpoint, tells systemd it is
/// ready, then serves until SIGINT/SIGTERM.
pub fn run(mut config: Config) -> Result<(), RunError> {
    // Sockets from systemd's socket activation replace the socket-path of the devices they
    // are named after (FileDescriptorName=).
    for (name, fd) in service::listen_fds() {
        match config.devices.iter_mut().find(|d| d.name == name) {
            Some(d) if d.front.socket().is_some() => {
                log::info!("device {name}: serving the socket passed as fd {fd}");
                d.front = FrontEndSpec::VhostUser(SocketSpec::Fd(fd));
                d.access.mode = None;
                d.access.owner = None;
            }
            Some(d) => log::warn!(
                "socket activation passed {name:?} (fd {fd}): that device is a {} export, not a socket",
                d.front.kind()
            ),
            None => {
                log::warn!("socket activation passed {name:?} (fd {fd}): no device has that name")
            }
        }
    }
    match rlimit::raise_nofile() {
        Ok((old, new)) if old != new => {
            log::info!("open files: soft limit raised from {old} to {new}")
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
    sandbox::init(config.engine.seccomp)?;
    let signals = block_signals()?;
    let engine = engine::Engine::start(config.engine.cpumask.cpus(), config.engine.settings())?;
    let registry = Arc::new(Registry::new(
        engine.reactors(),
        config.engine.cpumask.clone(),
        config.engine.settings(),
        engine_table(&config),
        config.file.clone(),
    )?);
    let origin = if config.file.is_some() {
        Origin::File
    } else {
        Origin::Runtime
    };
    let started = (|| -> Result<_, RunError> {
        for dev in std::mem::take(&mut config.devices) {
            registry.add(dev, origin)?;
        }
        let rpc = match &config.rpc_socket {
            Some(path) => Some(mgmt::rpc::RpcServer::start(path, Arc::clone(&registry))?),
            None => None,
        };
        if let Some(addr) = config.metrics_addr {
            mgmt::metrics::start(addr, Arc::clone(&registry))?;
        }
        Ok(rpc)
    })();
    let _rpc = match started {
        Ok(rpc) => rpc,
        Err(e) => {
            registry.shutdown();
            engine.shutdown();
            return Err(e);
        }
    };
    // Start-up is over: from here on the control plane makes only the calls it needs.
    sandbox::confine(sandbox::ThreadKind::Control)?;
    service::notify(&format!(
        "READY=1\nSTATUS=serving {} device(s)\nMAINPID={}",
        registry.list().len(),
        std::process::id()
    ));
    let result = serve(&registry, signals);
    service::notify("STOPPING=1");
    engine.shutdown();
    result.map_err(RunError::from)
}

/// Initializes logging on stderr (`RUST_LOG`, default info); under journald with syslog
/// priority prefixes instead of timestamps.
pub fn init_logging() {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if service::stderr_is_journal() {
        use std::io::Write;
        b.format(|f, r| {
            writeln!(
                f,
                "<{}>{}: {}",
                service::priority(r.level()),
                r.target(),
                r.args()
            )
        });
    }
    b.init();
}

/// What tests, benches and fuzz targets use of the layers.
#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    pub use crate::backend::open as open_backend;
    pub use crate::blk::model::Caps;
    pub use crate::blk::stats::IoStats;
    pub use crate::blk::{Backend, BlockError, BlockRequest, Device, DeviceModel, Op};
    pub use crate::config::{EngineConfig, PollMode};
    pub use crate::cpuset::CpuSet;
    pub use crate::engine::eventfd::EventFd;
    pub use crate::engine::testing::Harness;
    pub use crate::engine::uring::Uring;
    pub use crate::engine::{Ctx, Engine, Poller, ReactorHandle, Settings};
    pub use crate::guestmem::GuestMemoryMmap;
    pub use crate::mgmt::rpc::{decode_line as decode_rpc_line, Decoded as RpcDecoded};
    pub use crate::sandbox::seccomp::{apply as apply_seccomp, EXIT_FORBIDDEN};
    pub use crate::sandbox::{SeccompMode, ThreadKind};
    pub use crate::vhost::device::VhostDevice;
    pub use crate::vhost::watchdog::Watchdog;
    pub use crate::virtio_blk::chain::Chain;
    pub use crate::virtio_blk::inflight::{InflightRegion, Layout as InflightLayout};
    pub use crate::virtio_blk::iovec::{self, GuestRange};
    pub use crate::virtio_blk::mock;
    pub use crate::virtio_blk::notify::{EventFdNotifier, SignalRing};
    pub use crate::virtio_blk::packed::mock::{self as packed_mock, MockPackedQueue};
    pub use crate::virtio_blk::packed::{PackedInflight, PackedRing, PackedRingConfig, VringBase};
    pub use crate::virtio_blk::queue::{QueueStart, Ring, VirtQueue};
    pub use crate::virtio_blk::request::{
        ParseError, Parser, Request, RequestType, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
}
