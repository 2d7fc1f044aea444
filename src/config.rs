//! The validated configuration: what the engine and each device run with. A device is
//! described the same way everywhere, with the same keys: a `[[device]]` table of the TOML
//! file, the parameters of the management socket's `device_add`, and the command line's
//! flags (`DeviceTable`); one function turns a table into a validated `DeviceConfig`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cpuset::{CpuSet, CpuSetError};
pub use crate::engine::PollMode;
use crate::engine::Settings;
pub use crate::sandbox::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    CpuSet(#[from] CpuSetError),
    #[error("invalid size {0:?}: expected a positive number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("{what} must be a multiple of {align} bytes, got {size}")]
    Unaligned {
        what: &'static str,
        size: u64,
        align: u64,
    },
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error(
        "device {0}: exactly one backend is required (--blk-file, --ram, --null, --nbd or --rbd)"
    )]
    Backend(String),
    #[error(
        "device {0}: exactly one front end is required (--socket-path, --fd, --vduse or --ublk)"
    )]
    Socket(String),
    #[error("--logical-block-size must be 512 or 4096, got {0}")]
    BlockSize(u32),
    #[error("--num-queues must be between 1 and {max}, got {got}")]
    NumQueues { got: u16, max: u16 },
    #[error("--serial is at most 20 bytes, got {0}")]
    Serial(usize),
    #[error("cannot read config file {path}: {err}")]
    ReadFile { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Toml { path: PathBuf, err: toml::de::Error },
    #[error("a device named {0:?} exists already")]
    Exists(String),
    #[error("{0}")]
    Other(String),
}

/// The largest queue count a device offers, and the default: vhost-user's SET_VRING_KICK and
/// SET_VRING_CALL carry an 8-bit ring index. QEMU asks for one queue per vCPU unless told
/// otherwise and refuses a backend that offers fewer; queues cost nothing until a frontend
/// starts them.
pub const MAX_QUEUES: u16 = 256;

/// Default time an NBD backend keeps in-flight requests across a lost connection before
/// failing them (`nbd-timeout-s`).
pub const DEFAULT_NBD_TIMEOUT_S: u64 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Null {
        size: u64,
    },
    Ram {
        size: u64,
    },
    File {
        path: PathBuf,
        buffered: bool,
    },
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    Nbd {
        uri: String,
        timeout: Duration,
    },
    /// A Ceph RBD image, `pool/image`.
    Rbd {
        pool: String,
        image: String,
        conf: PathBuf,
        user: String,
        keyring: Option<PathBuf>,
    },
}

impl BackendSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Null { .. } => "null",
            BackendSpec::Ram { .. } => "ram",
            BackendSpec::File { .. } => "file",
            BackendSpec::Nbd { .. } => "nbd",
            BackendSpec::Rbd { .. } => "rbd",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSpec {
    Path(PathBuf),
    /// An already listening socket inherited from the parent (QEMU's `--fd`).
    Fd(i32),
}

/// How a device is exported: to a vhost-user frontend on a socket, or to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontEndSpec {
    VhostUser(SocketSpec),
    /// A VDUSE device of this name (`/dev/vduse/NAME`, then `vdpa dev add`).
    Vduse(String),
    /// A ublk device (`/dev/ublkbN`), with this id or the first free one.
    Ublk(Option<u32>),
}

impl FrontEndSpec {
    /// The vhost-user socket, if the device has one.
    pub fn socket(&self) -> Option<&SocketSpec> {
        match self {
            FrontEndSpec::VhostUser(s) => Some(s),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            FrontEndSpec::VhostUser(_) => "vhost-user",
            FrontEndSpec::Vduse(_) => "vduse",
            FrontEndSpec::Ublk(_) => "ublk",
        }
    }
}

/// Who may use a device's socket: its file mode and owner (set between bind and listen, so
/// there is no window with the default permissions) and the uids a connecting peer may have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// `socket-mode`, e.g. 0o660.
    pub mode: Option<u32>,
    /// `socket-owner`, resolved.
    pub owner: Option<SocketOwner>,
    /// `allow-uid`: when given, peers with any other uid are disconnected at once.
    pub allow_uids: Option<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    /// As written (`qemu:kvm`), for logs and for saving the configuration.
    pub spec: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub name: String,
    pub front: FrontEndSpec,
    pub access: SocketAccess,
    pub backend: BackendSpec,
    pub read_only: bool,
    pub num_queues: u16,
    pub serial: String,
    pub logical_block_size: u32,
    /// Write cache off at start (and after each reset): writes complete only when durable.
    pub writethrough: bool,
    /// Reactors this device's queues may run on; `None` means the engine's mask.
    pub cpumask: Option<CpuSet>,
    /// The table it was made from: what saving the configuration writes back.
    pub table: DeviceTable,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub cpumask: CpuSet,
    pub poll_mode: PollMode,
    pub idle_spin: Duration,
    pub seccomp: SeccompMode,
    /// Per-request latency histograms (two TSC reads per request).
    pub latency_histograms: bool,
}

impl EngineConfig {
    pub fn settings(&self) -> Settings {
        Settings {
            mode: self.poll_mode,
            idle_spin: self.idle_spin,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub engine: EngineConfig,
    pub devices: Vec<DeviceConfig>,
    /// The management socket (JSON-RPC).
    pub rpc_socket: Option<PathBuf>,
    /// Where Prometheus metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    /// The TOML file, when there is one (SIGHUP re-reads its devices).
    pub file: Option<PathBuf>,
}

pub const DEFAULT_IDLE_SPIN_US: u64 = 50;

/// Parses `512`, `64K`, `512M`, `1G`, `2T` (binary units, optional `iB`/`B`).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(text.to_string());
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

impl DeviceConfig {
    /// A device with the command line's defaults: up to 256 queues, 512-byte blocks,
    /// read-write, write-back, no serial, the engine's core mask.
    pub fn new(name: &str, front: FrontEndSpec, backend: BackendSpec) -> DeviceConfig {
        DeviceConfig {
            name: name.to_string(),
            front,
            access: SocketAccess::default(),
            backend,
            read_only: false,
            num_queues: MAX_QUEUES,
            serial: String::new(),
            logical_block_size: 512,
            writethrough: false,
            cpumask: None,
            table: DeviceTable::default(),
        }
    }

    /// Checks what can be checked without touching the system; opening files and sockets
    /// happens when the device is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.logical_block_size != 512 && self.logical_block_size != 4096 {
            return Err(ConfigError::BlockSize(self.logical_block_size));
        }
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues {
                got: self.num_queues,
                max: MAX_QUEUES,
            });
        }
        if self.serial.len() > 20 {
            return Err(ConfigError::Serial(self.serial.len()));
        }
        match &self.front {
            FrontEndSpec::VhostUser(SocketSpec::Fd(_))
                if self.access.mode.is_some() || self.access.owner.is_some() =>
            {
                return Err(ConfigError::Other(format!(
                    "device {}: socket-mode and socket-owner apply to a socket vubd creates, not to --fd",
                    self.name
                )));
            }
            FrontEndSpec::Vduse(_) | FrontEndSpec::Ublk(_)
                if self.access != SocketAccess::default() =>
            {
                return Err(ConfigError::Other(format!(
                    "device {}: socket-mode, socket-owner and allow-uid apply to vhost-user sockets, not to a {} device",
                    self.name,
                    self.front.kind()
                )));
            }
            FrontEndSpec::Vduse(n) if !valid_vduse_name(n) => {
                return Err(ConfigError::Other(format!(
                    "device {}: a VDUSE name is 1 to 63 characters of letters, digits, '-', '_' and '.', got {n:?}",
                    self.name
                )));
            }
            _ => {}
        }
        match self.backend {
            BackendSpec::Null { size } | BackendSpec::Ram { size } => {
                if size == 0 {
                    return Err(ConfigError::Zero("disk size"));
                }
                let align = u64::from(self.logical_block_size);
                if size % align != 0 {
                    return Err(ConfigError::Unaligned {
                        what: "disk size",
                        size,
                        align,
                    });
                }
            }
            BackendSpec::File { .. } | BackendSpec::Nbd { .. } | BackendSpec::Rbd { .. } => {}
        }
        Ok(())
    }
}

/// Checks `new` against the devices that already exist (at start-up: the ones before it in
/// the file; at run time: the registry's) and the engine: unique names and sockets, a core
/// mask inside the engine's.
pub fn check_new_device<'a>(
    existing: impl IntoIterator<Item = &'a DeviceConfig>,
    new: &DeviceConfig,
    engine_mask: &CpuSet,
) -> Result<(), ConfigError> {
    if let Some(mask) = &new.cpumask {
        if !mask.is_subset_of(engine_mask) {
            return Err(ConfigError::Other(format!(
                "device {}: core mask {mask} is not inside the engine's mask {engine_mask}",
                new.name
            )));
        }
    }
    for d in existing {
        if d.name == new.name {
            return Err(ConfigError::Exists(new.name.clone()));
        }
        let clash = match (&d.front, &new.front) {
            (FrontEndSpec::Ublk(None), FrontEndSpec::Ublk(_))
            | (FrontEndSpec::Ublk(_), FrontEndSpec::Ublk(None)) => false,
            (a, b) => a == b,
        };
        if clash {
            return Err(ConfigError::Other(format!(
                "devices {} and {} share one front end ({})",
                d.name,
                new.name,
                new.front.kind()
            )));
        }
    }
    Ok(())
}

/// One device: a `[[device]]` table of the config file, the parameters of `device_add`, or
/// the command line's flags, with the same names everywhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vduse: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ublk: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_uid: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blk_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<SizeValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null: Option<SizeValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rbd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rbd_conf: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rbd_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rbd_keyring: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub buffered: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub writethrough: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logical_block_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Sizes may be written as `"64M"` or as a plain number of bytes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

impl DeviceTable {
    /// The device this table describes, validated as far as that is possible without
    /// touching the system; `default_name` when the table has none.
    pub fn to_config(&self, default_name: &str) -> Result<DeviceConfig, ConfigError> {
        let t = self.clone();
        let name = t.name.clone().unwrap_or_else(|| default_name.to_string());
        let backend = backend_from(&name, &t)?;
        let front = front_from(&name, &t)?;
        let access = access_from(
            t.socket_mode.as_deref(),
            t.socket_owner.as_deref(),
            t.allow_uid.clone(),
        )?;
        let dev = DeviceConfig {
            front,
            access,
            backend,
            read_only: t.read_only,
            num_queues: t.num_queues.unwrap_or(MAX_QUEUES),
            serial: t.serial.clone().unwrap_or_default(),
            logical_block_size: t.logical_block_size.unwrap_or(512),
            writethrough: t.writethrough,
            cpumask: t.cpumask.as_deref().map(CpuSet::parse).transpose()?,
            table: DeviceTable {
                name: Some(name.clone()),
                ..t
            },
            name,
        };
        dev.validate()?;
        Ok(dev)
    }
}

/// The engine's keys at the top of the config file (the flags' names); a flag given on the
/// command line wins over the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EngineTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_spin_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_histograms: Option<bool>,
}

/// A whole config file: engine keys, then `[[device]]` tables.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    #[serde(flatten)]
    pub engine: EngineTable,
    #[serde(default)]
    pub device: Vec<DeviceTable>,
}

/// Reads a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::ReadFile {
        path: path.to_path_buf(),
        err,
    })?;
    toml::from_str(&text).map_err(|err| ConfigError::Toml {
        path: path.to_path_buf(),
        err,
    })
}

/// The devices of a config file, validated (`devN` names where a table has none).
pub fn file_devices(file: &FileConfig) -> Result<Vec<DeviceConfig>, ConfigError> {
    file.device
        .iter()
        .enumerate()
        .map(|(i, t)| t.to_config(&format!("dev{i}")))
        .collect()
}

/// Reads the devices of a config file.
#[cfg(test)]
pub fn load_devices(path: &Path) -> Result<Vec<DeviceConfig>, ConfigError> {
    file_devices(&load_file(path)?)
}

/// The TOML text of an engine and its devices: what starts the same engine and devices.
pub fn to_toml(engine: &EngineTable, devices: &[DeviceTable]) -> String {
    let file = FileConfig {
        engine: engine.clone(),
        device: devices.to_vec(),
    };
    toml::to_string(&file).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

/// Exactly one backend, as QEMU's vhost-user backends require exactly one image.
fn backend_from(name: &str, t: &DeviceTable) -> Result<BackendSpec, ConfigError> {
    let size = |v: &Option<SizeValue>| v.as_ref().map(SizeValue::bytes).transpose();
    let ram = size(&t.ram)?;
    let null = size(&t.null)?;
    let given = [
        t.blk_file.is_some(),
        ram.is_some(),
        null.is_some(),
        t.nbd.is_some(),
        t.rbd.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(ConfigError::Backend(name.to_string()));
    }
    let only = |what: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Other(format!(
                "device {name}: {what} applies to another backend"
            )))
        }
    };
    only("buffered", !t.buffered || t.blk_file.is_some())?;
    only(
        "nbd-timeout-s",
        t.nbd_timeout_s.is_none() || t.nbd.is_some(),
    )?;
    only(
        "rbd-conf, rbd-user and rbd-keyring",
        (t.rbd_conf.is_none() && t.rbd_user.is_none() && t.rbd_keyring.is_none())
            || t.rbd.is_some(),
    )?;
    if let Some(path) = &t.blk_file {
        return Ok(BackendSpec::File {
            path: path.clone(),
            buffered: t.buffered,
        });
    }
    if let Some(size) = ram {
        return Ok(BackendSpec::Ram { size });
    }
    if let Some(size) = null {
        return Ok(BackendSpec::Null { size });
    }
    if let Some(uri) = &t.nbd {
        return Ok(BackendSpec::Nbd {
            uri: uri.clone(),
            timeout: Duration::from_secs(t.nbd_timeout_s.unwrap_or(DEFAULT_NBD_TIMEOUT_S)),
        });
    }
    let spec = t.rbd.as_deref().unwrap_or_default();
    let Some((pool, image)) = spec
        .split_once('/')
        .filter(|(p, i)| !p.is_empty() && !i.is_empty())
    else {
        return Err(ConfigError::Other(format!(
            "device {name}: rbd must be POOL/IMAGE, got {spec:?}"
        )));
    };
    Ok(BackendSpec::Rbd {
        pool: pool.to_string(),
        image: image.to_string(),
        conf: t
            .rbd_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf")),
        user: t.rbd_user.clone().unwrap_or_else(|| "admin".into()),
        keyring: t.rbd_keyring.clone(),
    })
}

/// `socket-mode`: octal permission bits, `0660` or `660`.
pub fn parse_mode(text: &str) -> Result<u32, ConfigError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(ConfigError::Other(format!(
            "socket-mode {text:?} is not an octal mode like 0660"
        ))),
    }
}

/// `socket-owner`: `USER`, `USER:GROUP` or `:GROUP`, names or numbers.
pub fn parse_owner(text: &str) -> Result<SocketOwner, ConfigError> {
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let bad = |what: &str| ConfigError::Other(format!("socket-owner {text:?}: {what}"));
    let uid = match user {
        "" => None,
        u => Some(crate::users::lookup_user(u).ok_or_else(|| bad(&format!("no user {u:?}")))?),
    };
    let gid = match group {
        None | Some("") => None,
        Some(g) => {
            Some(crate::users::lookup_group(g).ok_or_else(|| bad(&format!("no group {g:?}")))?)
        }
    };
    if uid.is_none() && gid.is_none() {
        return Err(bad("neither a user nor a group"));
    }
    Ok(SocketOwner {
        spec: text.to_string(),
        uid,
        gid,
    })
}

/// `allow-uid` on the command line: `107,108`.
pub fn parse_uids(text: &str) -> Result<Vec<u32>, ConfigError> {
    text.split(',')
        .map(|u| {
            u.trim()
                .parse()
                .map_err(|_| ConfigError::Other(format!("allow-uid {text:?}: {u:?} is not a uid")))
        })
        .collect()
}

pub fn access_from(
    mode: Option<&str>,
    owner: Option<&str>,
    allow_uids: Option<Vec<u32>>,
) -> Result<SocketAccess, ConfigError> {
    Ok(SocketAccess {
        mode: mode.map(parse_mode).transpose()?,
        owner: owner.map(parse_owner).transpose()?,
        allow_uids,
    })
}

/// Exactly one front end: a socket path, an inherited fd, a VDUSE name or ublk.
fn front_from(name: &str, t: &DeviceTable) -> Result<FrontEndSpec, ConfigError> {
    if t.ublk_id.is_some() && !t.ublk {
        return Err(ConfigError::Other(format!(
            "device {name}: ublk-id applies to a ublk device (--ublk)"
        )));
    }
    match (&t.socket_path, t.fd, &t.vduse, t.ublk) {
        (Some(p), None, None, false) => Ok(FrontEndSpec::VhostUser(SocketSpec::Path(p.clone()))),
        (None, Some(fd), None, false) => Ok(FrontEndSpec::VhostUser(SocketSpec::Fd(fd))),
        (None, None, Some(v), false) => Ok(FrontEndSpec::Vduse(v.clone())),
        (None, None, None, true) => Ok(FrontEndSpec::Ublk(t.ublk_id)),
        _ => Err(ConfigError::Socket(name.to_string())),
    }
}

/// The kernel's limit (VDUSE_NAME_MAX, with its NUL) and a character set that is safe in
/// a device node's name and in `vdpa dev add name NAME`.
fn valid_vduse_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && n != "."
        && n != ".."
        && n != "control"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn config_file_devices() {
        let dir = std::env::temp_dir().join(format!("vubd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            r#"
            [[device]]
            socket-path = "/tmp/a.sock"
            ram = "64M"
            num-queues = 2
            cpumask = "0x1"
            [[device]]
            name = "zero"
            socket-path = "/tmp/b.sock"
            null = 1048576
            read-only = true
            socket-mode = "0660"
            socket-owner = "root:root"
            allow-uid = [0, 107]
            "#,
        )
        .unwrap();
        let devs = load_devices(&path).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].backend, BackendSpec::Ram { size: 64 << 20 });
        assert_eq!(devs[0].num_queues, 2);
        assert_eq!(devs[0].cpumask.as_ref().unwrap().cpus(), &[0]);
        assert_eq!(devs[1].name, "zero");
        assert!(devs[1].read_only);
        let a = &devs[1].access;
        assert_eq!(a.mode, Some(0o660));
        assert_eq!(
            a.owner.as_ref().map(|o| (o.uid, o.gid)),
            Some((Some(0), Some(0)))
        );
        assert_eq!(a.allow_uids, Some(vec![0, 107]));
        assert_eq!(devs[0].access, SocketAccess::default());
        assert!(parse_mode("0999").is_err() && parse_mode("").is_err());
        assert!(parse_owner("no-such-user-vubd").is_err());
        assert!(parse_uids("1,x").is_err());

        std::fs::write(
            &path,
            "[[device]]\nsocket-path = \"/x\"\nram = \"1M\"\nnull = \"1M\"\n",
        )
        .unwrap();
        assert!(matches!(load_devices(&path), Err(ConfigError::Backend(_))));
        std::fs::write(
            &path,
            "[[device]]\nsocket-path = \"/x\"\nram = \"1M\"\nbogus = 1\n",
        )
        .unwrap();
        assert!(matches!(load_devices(&path), Err(ConfigError::Toml { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
