//! The validated configuration: what the engine and each device run with. Built from the
//! command line (`cli.rs`) or from a TOML file with one `[[device]]` table per device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    #[error("device {0}: exactly one backend is required (--blk-file, --ram or --null)")]
    Backend(String),
    #[error("device {0}: a socket path or --fd is required")]
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
    #[error("config file {0} has no [[device]] table")]
    NoDevice(PathBuf),
    #[error("{0}")]
    Other(String),
}

/// The largest queue count a device offers, and the default: vhost-user's SET_VRING_KICK and
/// SET_VRING_CALL carry an 8-bit ring index. QEMU asks for one queue per vCPU unless told
/// otherwise and refuses a backend that offers fewer; queues cost nothing until a frontend
/// starts them.
pub const MAX_QUEUES: u16 = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Null { size: u64 },
    Ram { size: u64 },
    File { path: PathBuf, buffered: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSpec {
    Path(PathBuf),
    /// An already listening socket inherited from the parent (QEMU's `--fd`).
    Fd(i32),
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
    pub socket: SocketSpec,
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
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub cpumask: CpuSet,
    pub poll_mode: PollMode,
    pub idle_spin: Duration,
    pub seccomp: SeccompMode,
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
    pub fn new(name: &str, socket: SocketSpec, backend: BackendSpec) -> DeviceConfig {
        DeviceConfig {
            name: name.to_string(),
            socket,
            access: SocketAccess::default(),
            backend,
            read_only: false,
            num_queues: MAX_QUEUES,
            serial: String::new(),
            logical_block_size: 512,
            writethrough: false,
            cpumask: None,
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
        if matches!(self.socket, SocketSpec::Fd(_))
            && (self.access.mode.is_some() || self.access.owner.is_some())
        {
            return Err(ConfigError::Other(format!(
                "device {}: socket-mode and socket-owner apply to a socket vubd creates, not to --fd",
                self.name
            )));
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
            BackendSpec::File { .. } => {}
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
            return Err(ConfigError::Other(format!(
                "two devices are named {:?}",
                new.name
            )));
        }
        if d.socket == new.socket {
            return Err(ConfigError::Other(format!(
                "devices {} and {} share one socket",
                d.name, new.name
            )));
        }
    }
    Ok(())
}

/// One `[[device]]` table of the config file: the same names as the command line flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DeviceTable {
    name: Option<String>,
    socket_path: Option<PathBuf>,
    fd: Option<i32>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    allow_uid: Option<Vec<u32>>,
    blk_file: Option<PathBuf>,
    ram: Option<SizeValue>,
    null: Option<SizeValue>,
    #[serde(default)]
    buffered: bool,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    writethrough: bool,
    num_queues: Option<u16>,
    serial: Option<String>,
    logical_block_size: Option<u32>,
    cpumask: Option<String>,
}

/// Sizes may be written as `"64M"` or as a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTables {
    #[serde(default)]
    device: Vec<DeviceTable>,
}

/// Reads the devices of a config file.
pub fn load_devices(path: &Path) -> Result<Vec<DeviceConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::ReadFile {
        path: path.to_path_buf(),
        err,
    })?;
    let tables: FileTables = toml::from_str(&text).map_err(|err| ConfigError::Toml {
        path: path.to_path_buf(),
        err,
    })?;
    if tables.device.is_empty() {
        return Err(ConfigError::NoDevice(path.to_path_buf()));
    }
    tables
        .device
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t.name.clone().unwrap_or_else(|| format!("dev{i}"));
            let backend = backend_from(
                &name,
                t.blk_file,
                t.ram.as_ref().map(SizeValue::bytes).transpose()?,
                t.null.as_ref().map(SizeValue::bytes).transpose()?,
                t.buffered,
            )?;
            let socket = socket_from(&name, t.socket_path, t.fd)?;
            let access = access_from(
                t.socket_mode.as_deref(),
                t.socket_owner.as_deref(),
                t.allow_uid,
            )?;
            let dev = DeviceConfig {
                name,
                socket,
                access,
                backend,
                read_only: t.read_only,
                num_queues: t.num_queues.unwrap_or(MAX_QUEUES),
                serial: t.serial.unwrap_or_default(),
                logical_block_size: t.logical_block_size.unwrap_or(512),
                writethrough: t.writethrough,
                cpumask: t.cpumask.as_deref().map(CpuSet::parse).transpose()?,
            };
            dev.validate()?;
            Ok(dev)
        })
        .collect()
}

/// Exactly one backend, as QEMU's vhost-user backends require exactly one image.
pub fn backend_from(
    name: &str,
    file: Option<PathBuf>,
    ram: Option<u64>,
    null: Option<u64>,
    buffered: bool,
) -> Result<BackendSpec, ConfigError> {
    match (file, ram, null) {
        (Some(path), None, None) => Ok(BackendSpec::File { path, buffered }),
        (None, Some(size), None) => Ok(BackendSpec::Ram { size }),
        (None, None, Some(size)) => Ok(BackendSpec::Null { size }),
        _ => Err(ConfigError::Backend(name.to_string())),
    }
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

pub fn socket_from(
    name: &str,
    path: Option<PathBuf>,
    fd: Option<i32>,
) -> Result<SocketSpec, ConfigError> {
    match (path, fd) {
        (Some(p), None) => Ok(SocketSpec::Path(p)),
        (None, Some(fd)) => Ok(SocketSpec::Fd(fd)),
        _ => Err(ConfigError::Socket(name.to_string())),
    }
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
