//! Command line -> validated [`Config`]. Flag names follow QEMU's conventions for vhost-user
//! backends (`--socket-path`, `--fd`, `--print-capabilities`). One device can be given with
//! flags (they make the same `DeviceTable` a `[[device]]` table of `--config` does); engine
//! flags override the config file's top-level keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{
    check_new_device, file_devices, load_file, parse_uids, Config, ConfigError, DeviceTable,
    EngineConfig, EngineTable, PollMode, SeccompMode, SizeValue, DEFAULT_IDLE_SPIN_US,
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
    /// Export the device to the kernel through VDUSE under this name (/dev/vduse/NAME; then
    /// `vdpa dev add name NAME mgmtdev vduse` gives /dev/vdX).
    #[arg(long, value_name = "NAME")]
    pub vduse: Option<String>,
    /// Export the device to the kernel as a ublk device (/dev/ublkbN).
    #[arg(long)]
    pub ublk: bool,
    /// ublk: the device id N (/dev/ublkbN); default: the first free one.
    #[arg(long, value_name = "N")]
    pub ublk_id: Option<u32>,
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
    #[arg(long, value_name = "SIZE")]
    pub ram: Option<String>,
    /// Backend: a null disk of this size (reads return zeroes, writes are dropped).
    #[arg(long, value_name = "SIZE")]
    pub null: Option<String>,
    /// Backend: an NBD export, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,
    /// NBD: how long in-flight requests wait for a lost server before they fail.
    #[arg(long, value_name = "SECONDS")]
    pub nbd_timeout_s: Option<u64>,
    /// Backend: a Ceph RBD image (librbd is loaded at run time).
    #[arg(long, value_name = "POOL/IMAGE")]
    pub rbd: Option<String>,
    /// RBD: the cluster's config file (default /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub rbd_conf: Option<PathBuf>,
    /// RBD: the client name without "client." (default admin).
    #[arg(long, value_name = "USER")]
    pub rbd_user: Option<String>,
    /// RBD: the keyring file.
    #[arg(long, value_name = "PATH")]
    pub rbd_keyring: Option<PathBuf>,
    /// Refuse writes; offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub read_only: bool,
    /// Maximum number of queues offered to the frontend (at most 256, the default).
    #[arg(long, value_name = "N")]
    pub num_queues: Option<u16>,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,
    /// Logical block size offered to the guest (512, the default, or 4096).
    #[arg(long, value_name = "512|4096")]
    pub logical_block_size: Option<u32>,
    /// File backend: use the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Start with the write cache off: every completed write is durable (the guest may
    /// turn the cache on through CONFIG_WCE).
    #[arg(long)]
    pub writethrough: bool,
    /// A TOML file: engine keys at the top, one [[device]] table per device.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = DEVICE_FLAGS)]
    pub config: Option<PathBuf>,
    /// Reactor cores: 0x3, [0,2-3] or 0-1. Default: one reactor on the last CPU.
    #[arg(short = 'm', long, value_name = "MASK")]
    pub cpumask: Option<String>,
    /// poll (never sleep), adaptive (sleep after --idle-spin-us idle; default) or interrupt.
    #[arg(long, value_name = "MODE")]
    pub poll_mode: Option<PollMode>,
    /// Adaptive mode: how long a reactor polls without finding work before it sleeps
    /// (default 50).
    #[arg(long, value_name = "N")]
    pub idle_spin_us: Option<u64>,
    /// System call filtering: on (default), off, or log (report forbidden calls in the
    /// kernel's audit log instead of stopping the process).
    #[arg(long, value_name = "on|off|log")]
    pub seccomp: Option<SeccompMode>,
    /// Per-request latency histograms (on or off).
    #[arg(long, value_name = "on|off")]
    pub latency_histograms: Option<OnOff>,
    /// The management socket: JSON-RPC 2.0, one request per line (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub rpc_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on GET /metrics at this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Print the vhost-user backend capabilities as JSON (QEMU's convention) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// The flags that describe a device (not allowed with --config).
const DEVICE_FLAGS: [&str; 23] = [
    "socket_path",
    "fd",
    "vduse",
    "ublk",
    "ublk_id",
    "socket_mode",
    "socket_owner",
    "allow_uid",
    "blk_file",
    "ram",
    "null",
    "nbd",
    "nbd_timeout_s",
    "rbd",
    "rbd_conf",
    "rbd_user",
    "rbd_keyring",
    "read_only",
    "num_queues",
    "serial",
    "logical_block_size",
    "buffered",
    "writethrough",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

impl std::str::FromStr for OnOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(OnOff::On),
            "off" => Ok(OnOff::Off),
            _ => Err(format!("expected on or off, got {s:?}")),
        }
    }
}

/// QEMU's vhost-user.json schema: the type and the optional features of a block backend.
pub const CAPABILITIES_JSON: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

impl Args {
    /// The device the flags describe, if any device flag was given.
    fn device_table(&self) -> Result<Option<DeviceTable>, ConfigError> {
        let t = DeviceTable {
            name: None,
            socket_path: self.socket_path.clone(),
            fd: self.fd,
            vduse: self.vduse.clone(),
            ublk: self.ublk,
            ublk_id: self.ublk_id,
            socket_mode: self.socket_mode.clone(),
            socket_owner: self.socket_owner.clone(),
            allow_uid: self.allow_uid.as_deref().map(parse_uids).transpose()?,
            blk_file: self.blk_file.clone(),
            ram: self.ram.clone().map(SizeValue::Text),
            null: self.null.clone().map(SizeValue::Text),
            nbd: self.nbd.clone(),
            nbd_timeout_s: self.nbd_timeout_s,
            rbd: self.rbd.clone(),
            rbd_conf: self.rbd_conf.clone(),
            rbd_user: self.rbd_user.clone(),
            rbd_keyring: self.rbd_keyring.clone(),
            buffered: self.buffered,
            read_only: self.read_only,
            writethrough: self.writethrough,
            num_queues: self.num_queues,
            serial: self.serial.clone(),
            logical_block_size: self.logical_block_size,
            cpumask: None,
        };
        Ok((t != DeviceTable::default()).then_some(t))
    }
}

/// An engine setting: the flag if given, else the file's key, else the default.
fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        let file = a.config.as_deref().map(load_file).transpose()?;
        let e = file.as_ref().map(|f| f.engine.clone()).unwrap_or_default();
        let engine = engine_from(&a, &e)?;
        let mut devices = match &file {
            Some(f) => file_devices(f)?,
            None => Vec::new(),
        };
        if let Some(t) = a.device_table()? {
            devices.push(t.to_config("dev0")?);
        }
        for (i, d) in devices.iter().enumerate() {
            check_new_device(&devices[..i], d, &engine.cpumask)?;
        }
        let rpc_socket = a.rpc_socket.clone().or(e.rpc_socket.clone());
        if devices.is_empty() && rpc_socket.is_none() {
            return Err(ConfigError::Other(
                "no device: give a backend (--blk-file, --ram, --null, --nbd or --rbd) with \
                 --socket-path, a --config file with [[device]] tables, or an --rpc-socket to \
                 add devices at run time"
                    .into(),
            ));
        }
        let metrics_addr = match a.metrics_addr.clone().or(e.metrics_addr.clone()) {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|err| {
                ConfigError::Other(format!("metrics-addr {text:?}: {err} (expected HOST:PORT)"))
            })?),
            None => None,
        };
        Ok(Config {
            engine,
            devices,
            rpc_socket,
            metrics_addr,
            file: a.config,
        })
    }
}

fn engine_from(a: &Args, e: &EngineTable) -> Result<EngineConfig, ConfigError> {
    let online = online_cpus();
    let cpumask = match a.cpumask.as_deref().or(e.cpumask.as_deref()) {
        Some(m) => CpuSet::parse(m)?,
        None => CpuSet::single(*online.cpus().last().unwrap_or(&0)),
    };
    cpumask.check_online(&online)?;
    let poll_mode = e
        .poll_mode
        .as_deref()
        .map(str::parse::<PollMode>)
        .transpose()
        .map_err(ConfigError::Other)?;
    let seccomp = e
        .seccomp
        .as_deref()
        .map(str::parse::<SeccompMode>)
        .transpose()
        .map_err(ConfigError::Other)?;
    let latency = a.latency_histograms.map(|v| v == OnOff::On);
    Ok(EngineConfig {
        cpumask,
        poll_mode: pick(a.poll_mode, poll_mode, PollMode::Adaptive),
        idle_spin: Duration::from_micros(pick(
            a.idle_spin_us,
            e.idle_spin_us,
            DEFAULT_IDLE_SPIN_US,
        )),
        seccomp: pick(a.seccomp, seccomp, SeccompMode::On),
        latency_histograms: pick(latency, e.latency_histograms, true),
    })
}
