//! Command line -> validated [`Config`]. Flag names follow QEMU's conventions for vhost-user
//! backends (`--socket-path`, `--fd`, `--print-capabilities`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{
    access_from, backend_from, check_new_device, load_devices, parse_size, parse_uids, socket_from,
    Config, ConfigError, DeviceConfig, EngineConfig, PollMode, SeccompMode, DEFAULT_IDLE_SPIN_US,
    MAX_QUEUES,
};
use crate::cpuset::{online_cpus, CpuSet};

#[derive(Debug, Parser)]
#[command(
    name = "vubd",
    version,
    about = "vhost-user-blk server: pinned polling reactors, io_uring, zero copy"
)]
pub struct Args {
    /// Listen for the frontend on this Unix socket path.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve an already listening Unix socket inherited as this fd.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Permissions of the socket file vubd creates (octal), e.g. 0660.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Owner of the socket file vubd creates: USER[:GROUP] (names or numbers).
    #[arg(long, value_name = "USER[:GROUP]")]
    pub socket_owner: Option<String>,
    /// Only peers with these uids may connect (comma-separated); others are disconnected.
    #[arg(long, value_name = "UID,...")]
    pub allow_uid: Option<String>,
    /// Backend: a regular file or a block device.
    #[arg(long, value_name = "PATH")]
    pub blk_file: Option<PathBuf>,
    /// Backend: a RAM disk of this size (e.g. 1G, 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub ram: Option<u64>,
    /// Backend: a null disk of this size (reads return zeroes, writes are dropped).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub null: Option<u64>,
    /// Refuse writes; offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub read_only: bool,
    /// Maximum number of queues offered to the frontend (at most 256, the default).
    #[arg(long, value_name = "N", default_value_t = MAX_QUEUES)]
    pub num_queues: u16,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR", default_value = "")]
    pub serial: String,
    /// Logical block size offered to the guest.
    #[arg(long, value_name = "512|4096", default_value_t = 512)]
    pub logical_block_size: u32,
    /// File backend: use the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Start with the write cache off: every completed write is durable (the guest may
    /// turn the cache on through CONFIG_WCE).
    #[arg(long)]
    pub writethrough: bool,
    /// Many devices: a TOML file with one [[device]] table per device.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["socket_path", "fd", "blk_file", "ram", "null", "socket_mode", "socket_owner", "allow_uid"])]
    pub config: Option<PathBuf>,
    /// Reactor cores: 0x3, [0,2-3] or 0-1. Default: one reactor on the last CPU.
    #[arg(short = 'm', long, value_name = "MASK")]
    pub cpumask: Option<String>,
    /// poll (never sleep), adaptive (sleep after --idle-spin-us idle) or interrupt.
    #[arg(long, value_name = "MODE", default_value = "adaptive")]
    pub poll_mode: PollMode,
    /// Adaptive mode: how long a reactor polls without finding work before it sleeps.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_IDLE_SPIN_US)]
    pub idle_spin_us: u64,
    /// System call filtering: on (default), off, or log (report forbidden calls in the
    /// kernel log instead of stopping the process).
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    pub seccomp: SeccompMode,
    /// Print the vhost-user backend capabilities as JSON (QEMU's convention) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// QEMU's vhost-user.json schema: the type and the optional features of a block backend.
pub const CAPABILITIES_JSON: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        let online = online_cpus();
        let cpumask = match &a.cpumask {
            Some(m) => CpuSet::parse(m)?,
            None => CpuSet::single(*online.cpus().last().unwrap_or(&0)),
        };
        cpumask.check_online(&online)?;
        let engine = EngineConfig {
            cpumask,
            poll_mode: a.poll_mode,
            idle_spin: Duration::from_micros(a.idle_spin_us),
            seccomp: a.seccomp,
        };
        let devices = match &a.config {
            Some(path) => load_devices(path)?,
            None => {
                let name = "dev0".to_string();
                let dev = DeviceConfig {
                    backend: backend_from(&name, a.blk_file, a.ram, a.null, a.buffered)?,
                    socket: socket_from(&name, a.socket_path, a.fd)?,
                    access: access_from(
                        a.socket_mode.as_deref(),
                        a.socket_owner.as_deref(),
                        a.allow_uid.as_deref().map(parse_uids).transpose()?,
                    )?,
                    name,
                    read_only: a.read_only,
                    num_queues: a.num_queues,
                    serial: a.serial,
                    logical_block_size: a.logical_block_size,
                    writethrough: a.writethrough,
                    cpumask: None,
                };
                dev.validate()?;
                vec![dev]
            }
        };
        for (i, d) in devices.iter().enumerate() {
            check_new_device(&devices[..i], d, &engine.cpumask)?;
        }
        Ok(Config { engine, devices })
    }
}
