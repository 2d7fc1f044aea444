//! The command line. Device flags are named exactly like the TOML keys of a `[[device]]`
//! table (and vubd's own flags), so one vocabulary works in files, on vubd's command line
//! and here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use serde::Serialize;

/// Used when neither -s nor $VUBD_RPC_SOCKET names the socket.
pub const DEFAULT_SOCKET: &str = "/run/vubd/rpc.sock";
/// The environment variable naming the socket (clap's `env` feature is not enabled).
pub const SOCKET_ENV: &str = "VUBD_RPC_SOCKET";
/// Where -s, --json and --timeout appear in every command's help, apart from its own flags.
const GLOBAL: &str = "Global options";

#[derive(Debug, Parser)]
#[command(
    name = "vubdctl",
    version,
    about = "Manage a running vubd through its management socket (JSON-RPC 2.0)",
    after_help = "Exit status: 0 success, 1 vubd refused or failed the request, \
                  2 bad usage or no vubd listening on the socket."
)]
pub struct Cli {
    /// vubd's management socket (vubd --rpc-socket) [default: $VUBD_RPC_SOCKET, else
    /// /run/vubd/rpc.sock]
    #[arg(short = 's', long, global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub socket: Option<PathBuf>,
    /// Print the method's JSON result on one line instead of a table.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// Seconds to wait for each answer (a resize, or a forced removal draining in-flight
    /// I/O, may take a few).
    #[arg(long, global = true, value_name = "SECS", default_value = "30",
          value_parser = parse_seconds, help_heading = GLOBAL)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// -s, else $VUBD_RPC_SOCKET, else the default.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add, list, remove or resize devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// I/O statistics per device (and per queue), like iostat(1).
    Iostat(IostatArgs),
    /// Reactor (polling thread) load and settings.
    #[command(after_help = "\
BUSY% is busy time / (busy + idle polling + asleep): over vubd's life, or with --watch over \
each interval (then SLEEPS/s and WAKEUPS/s are rates). MODE is the poll mode, with the idle \
spin time in adaptive mode.")]
    Reactors(WatchArgs),
    /// Set every reactor's poll mode.
    PollMode {
        #[arg(value_parser = ["poll", "adaptive", "interrupt"])]
        mode: String,
        /// Adaptive mode: microseconds a reactor polls without work before it sleeps.
        #[arg(long, value_name = "N")]
        idle_spin_us: Option<u64>,
    },
    /// The running configuration as a TOML file vubd --config accepts.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// vubd's name and version.
    Version,
    /// The management methods vubd offers.
    Methods,
    /// Call any method with raw JSON parameters; prints the raw result.
    Call {
        method: String,
        /// A JSON object, e.g. '{"name":"d1"}'.
        #[arg(value_parser = parse_json)]
        params: Option<serde_json::Value>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create a device and its vhost-user socket.
    Add(Box<AddArgs>),
    /// The devices, their backends and who is attached.
    List,
    /// Remove a device and its socket.
    Remove {
        name: String,
        /// Disconnect an attached frontend (its in-flight I/O completes first).
        #[arg(long)]
        force: bool,
    },
    /// Change a device's size and tell the attached frontend.
    Resize {
        name: String,
        /// New size (bytes, or with K, M, G, T). Without it, vubd re-reads the backend's
        /// size (after growing a file or block device yourself).
        size: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the running configuration (or write it with -o).
    Save {
        /// Write the TOML to this file instead of standard output.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `device add`. Serialized as the `device_add` parameters: the field names, kebab-cased,
/// are both the flag names and the TOML keys. Flags not given serialize as null or false and
/// are dropped before sending, so vubd applies its own defaults.
#[derive(Debug, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(group(ArgGroup::new("backend").required(true)
    .args(["ram", "null", "blk_file", "nbd", "rbd"])))]
pub struct AddArgs {
    /// The device's name (unique).
    #[arg(long)]
    pub name: String,
    /// The vhost-user socket vubd creates for the frontend.
    #[arg(long, value_name = "PATH")]
    pub socket_path: PathBuf,
    /// Backend: a RAM disk of this size (e.g. 1G, 512M).
    #[arg(long, value_name = "SIZE")]
    pub ram: Option<String>,
    /// Backend: a null disk of this size (reads zeroes, drops writes).
    #[arg(long, value_name = "SIZE")]
    pub null: Option<String>,
    /// Backend: a regular file or a block device.
    #[arg(long, value_name = "PATH")]
    pub blk_file: Option<PathBuf>,
    /// Backend: an NBD export, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,
    /// Backend: a Ceph RBD image.
    #[arg(long, value_name = "POOL/IMAGE")]
    pub rbd: Option<String>,
    /// Queues offered to the frontend (at most 256, the default).
    #[arg(long, value_name = "N")]
    pub num_queues: Option<u16>,
    /// Refuse writes; offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub read_only: bool,
    /// File backend: use the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Start with the write cache off.
    #[arg(long)]
    pub writethrough: bool,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "S")]
    pub serial: Option<String>,
    /// Logical block size offered to the guest.
    #[arg(long, value_name = "512|4096")]
    pub logical_block_size: Option<u32>,
    /// Reactors this device's queues may run on (inside vubd's mask), e.g. 0x3 or [0,2].
    #[arg(long, value_name = "MASK")]
    pub cpumask: Option<String>,
    /// Permissions of the socket file (octal), e.g. 0660.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Owner of the socket file: USER[:GROUP], names or numbers.
    #[arg(long, value_name = "U[:G]")]
    pub socket_owner: Option<String>,
    /// Only peers with these uids may connect, e.g. 107,108.
    #[arg(long, value_name = "UID,...", value_delimiter = ',')]
    pub allow_uid: Option<Vec<u32>>,
    /// NBD: seconds in-flight requests wait for a lost server before they fail.
    #[arg(long, value_name = "S")]
    pub nbd_timeout_s: Option<u64>,
    /// RBD: the cluster's config file.
    #[arg(long, value_name = "PATH")]
    pub rbd_conf: Option<PathBuf>,
    /// RBD: the client name without "client.".
    #[arg(long, value_name = "USER")]
    pub rbd_user: Option<String>,
    /// RBD: the keyring file.
    #[arg(long, value_name = "PATH")]
    pub rbd_keyring: Option<PathBuf>,
}

/// Repeating a report: shared by `iostat` and `reactors`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print a report every SECS seconds, with rates over each interval, until interrupted.
    /// With --json: each raw answer on a line of its own, the first at once.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub watch: Option<Duration>,
    /// With --watch: stop after N reports.
    #[arg(long, value_name = "N", requires = "watch",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Without --watch: totals since the last reset (or since the device was added): requests, \
bytes (read, written), errors, requests in flight now and latency. With --watch SECS: \
per-second rates over each interval (MB = 2^20 bytes), errors and latency of the \
interval's requests only.

Latency covers every kind of request. vubd keeps log2 histograms (bucket = requests faster \
than 2^k ns), so p50 and p99 are estimates: the upper bound of the bucket holding that \
percentile (the true value is at most that, and more than half of it). mean is exact.")]
pub struct IostatArgs {
    /// Only this device.
    pub name: Option<String>,
    /// Start counting from zero again after this report (not with --watch).
    #[arg(long, conflicts_with = "watch")]
    pub reset: bool,
    /// A row per queue under each device.
    #[arg(long)]
    pub queues: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// Positive seconds, fractions allowed ("0.5").
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite() && secs < 1e9) {
        return Err(format!("{text:?}: seconds must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checked while parsing the command line: bad JSON is bad usage.
fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("x").is_err());
    }
}
