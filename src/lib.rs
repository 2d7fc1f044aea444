//! vubd: a vhost-user-blk server. The layers, top to bottom (arrows point down only):
//!
//! ```text
//!   registry (control thread): devices by name, add/remove, the control event loop
//!   vhost (vhost-user control plane: sockets, one thread per frontend, memory, vrings)
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
mod registry;
mod sandbox;
mod users;
mod vhost;
mod virtio_blk;

pub use cli::{Args, CAPABILITIES_JSON};
pub use config::{BackendSpec, Config, ConfigError, DeviceConfig, SocketSpec};

use registry::control::{block_signals, serve};
use registry::{AddError, Registry};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Add(#[from] AddError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Starts the reactors, adds every configured device (so bad arguments fail before anything
/// is served), then serves until SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<(), RunError> {
    sandbox::init(config.engine.seccomp)?;
    let signals = block_signals()?;
    let engine = engine::Engine::start(config.engine.cpumask.cpus(), config.engine.settings())?;
    let registry = Registry::new(engine.reactors(), config.engine.cpumask.clone())?;
    for dev in config.devices {
        if let Err(e) = registry.add(dev) {
            registry.shutdown();
            engine.shutdown();
            return Err(e.into());
        }
    }
    // Start-up is over: from here on the control plane makes only the calls it needs.
    sandbox::confine(sandbox::ThreadKind::Control)?;
    let result = serve(&registry, signals);
    engine.shutdown();
    result.map_err(RunError::from)
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
    pub use crate::sandbox::seccomp::{apply as apply_seccomp, EXIT_FORBIDDEN};
    pub use crate::sandbox::{SeccompMode, ThreadKind};
    pub use crate::vhost::device::VhostDevice;
    pub use crate::vhost::watchdog::Watchdog;
    pub use crate::virtio_blk::chain::Chain;
    pub use crate::virtio_blk::inflight::InflightRegion;
    pub use crate::virtio_blk::iovec::{self, GuestRange};
    pub use crate::virtio_blk::mock;
    pub use crate::virtio_blk::notify::{EventFdNotifier, SignalRing};
    pub use crate::virtio_blk::queue::{QueueStart, VirtQueue};
    pub use crate::virtio_blk::request::{
        ParseError, Parser, Request, RequestType, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
}
