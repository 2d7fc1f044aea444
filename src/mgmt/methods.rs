//! The management methods: parameters are JSON objects (device tables with the TOML keys),
//! results JSON values. Errors carry JSON-RPC's standard codes and vubd's own:
//! -32001 no such device, -32002 device exists, -32003 busy (frontend attached),
//! -32004 not supported by this backend or front end.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::backend::BackendError;
use crate::blk::backend::ResizeError;
use crate::blk::queues::QueueSnapshot;
use crate::blk::stats::{Histogram, IoStats, STATUS_NAMES};
use crate::blk::Op;
use crate::config::{ConfigError, DeviceConfig, DeviceTable, SizeValue};
use crate::engine::stats::ticks_to_duration;
use crate::engine::{PollMode, Settings};
use crate::registry::stats::DeviceIo;
use crate::registry::{AddError, DeviceError, Origin, Registry};

pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const NO_SUCH_DEVICE: i64 = -32001;
pub const DEVICE_EXISTS: i64 = -32002;
pub const BUSY: i64 = -32003;
pub const NOT_SUPPORTED: i64 = -32004;

pub const METHODS: [&str; 11] = [
    "device_add",
    "device_remove",
    "device_list",
    "device_resize",
    "iostat",
    "reactor_stats",
    "engine_set_poll_mode",
    "config_save",
    "rpc_get_methods",
    "version",
    "metrics",
];

#[derive(Debug)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

fn err(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
    }
}

impl From<DeviceError> for RpcError {
    fn from(e: DeviceError) -> RpcError {
        let code = match &e {
            DeviceError::NoSuchDevice(_) => NO_SUCH_DEVICE,
            DeviceError::Busy(_) => BUSY,
            DeviceError::Resize {
                err: ResizeError::NotSupported | ResizeError::FrontEndNotSupported(_),
                ..
            } => NOT_SUPPORTED,
            DeviceError::Resize {
                err: ResizeError::Invalid(_),
                ..
            } => INVALID_PARAMS,
            DeviceError::Resize { .. } => INTERNAL_ERROR,
        };
        err(code, e.to_string())
    }
}

/// Parameters as `T`, or an invalid-params error naming what is wrong.
fn params<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, RpcError> {
    let p = if p.is_null() {
        Value::Object(Map::new())
    } else {
        p
    };
    serde_json::from_value(p).map_err(|e| err(INVALID_PARAMS, format!("invalid params: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Remove {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    size: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Iostat {
    name: Option<String>,
    #[serde(default)]
    reset: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PollModeParams {
    mode: String,
    idle_spin_us: Option<u64>,
}

/// A request, decoded and validated: nothing has happened yet.
#[derive(Debug)]
pub enum Command {
    DeviceAdd(Box<DeviceConfig>),
    DeviceRemove {
        name: String,
        force: bool,
    },
    DeviceList,
    DeviceResize {
        name: String,
        size: Option<u64>,
    },
    Iostat {
        name: Option<String>,
        reset: bool,
    },
    ReactorStats,
    SetPollMode {
        mode: PollMode,
        idle_spin_us: Option<u64>,
    },
    ConfigSave,
    RpcGetMethods,
    Version,
    Metrics,
}

/// Decodes one method's parameters (the part a fuzzer exercises: nothing is executed).
pub fn parse(method: &str, p: Value) -> Result<Command, RpcError> {
    Ok(match method {
        "device_add" => Command::DeviceAdd(Box::new(device_config(params(p)?)?)),
        "device_remove" => {
            let r: Remove = params(p)?;
            Command::DeviceRemove {
                name: r.name,
                force: r.force,
            }
        }
        "device_list" => {
            params::<Empty>(p)?;
            Command::DeviceList
        }
        "device_resize" => {
            let r: Resize = params(p)?;
            let size = r
                .size
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()
                .map_err(|e| err(INVALID_PARAMS, e.to_string()))?;
            Command::DeviceResize { name: r.name, size }
        }
        "iostat" => {
            let r: Iostat = params(p)?;
            Command::Iostat {
                name: r.name,
                reset: r.reset,
            }
        }
        "reactor_stats" => {
            params::<Empty>(p)?;
            Command::ReactorStats
        }
        "engine_set_poll_mode" => {
            let r: PollModeParams = params(p)?;
            let mode: PollMode = r.mode.parse().map_err(|e: String| err(INVALID_PARAMS, e))?;
            Command::SetPollMode {
                mode,
                idle_spin_us: r.idle_spin_us,
            }
        }
        "config_save" | "rpc_get_methods" | "version" | "metrics" => {
            params::<Empty>(p)?;
            match method {
                "config_save" => Command::ConfigSave,
                "rpc_get_methods" => Command::RpcGetMethods,
                "version" => Command::Version,
                _ => Command::Metrics,
            }
        }
        other => {
            return Err(err(
                METHOD_NOT_FOUND,
                format!("no method {other:?} (rpc_get_methods lists them)"),
            ))
        }
    })
}

pub fn execute(registry: &Registry, cmd: Command) -> Result<Value, RpcError> {
    match cmd {
        Command::DeviceAdd(cfg) => device_add(registry, *cfg),
        Command::DeviceRemove { name, force } => {
            registry.remove(&name, force)?;
            Ok(json!({ "name": name }))
        }
        Command::DeviceList => Ok(device_list(registry)),
        Command::DeviceResize { name, size } => {
            let capacity = registry.resize(&name, size)?;
            Ok(json!({ "name": name, "capacity": capacity }))
        }
        Command::Iostat { name, reset } => {
            let devices = registry.iostat(name.as_deref(), reset)?;
            Ok(iostat_json(&devices))
        }
        Command::ReactorStats => Ok(reactor_stats(registry)),
        Command::SetPollMode { mode, idle_spin_us } => {
            let idle_spin =
                idle_spin_us.map_or(registry.settings().idle_spin, Duration::from_micros);
            registry.set_settings(Settings { mode, idle_spin });
            Ok(json!({ "mode": mode.as_str(), "idle-spin-us": idle_spin.as_micros() as u64 }))
        }
        Command::ConfigSave => Ok(json!({ "toml": registry.config_toml() })),
        Command::RpcGetMethods => Ok(json!(METHODS)),
        Command::Version => Ok(json!({ "name": "vubd", "version": env!("CARGO_PKG_VERSION") })),
        Command::Metrics => Ok(json!({ "text": super::metrics::render(registry) })),
    }
}

/// A device table as `device_add` takes it: validated into a device configuration.
fn device_config(t: DeviceTable) -> Result<DeviceConfig, RpcError> {
    let name = t
        .name
        .clone()
        .ok_or_else(|| err(INVALID_PARAMS, "a device needs a name"))?;
    if t.fd.is_some() {
        return Err(err(
            INVALID_PARAMS,
            "fd is for sockets inherited at start; give a socket-path",
        ));
    }
    t.to_config(&name)
        .map_err(|e| err(INVALID_PARAMS, e.to_string()))
}

fn device_add(registry: &Registry, cfg: DeviceConfig) -> Result<Value, RpcError> {
    let name = cfg.name.clone();
    match registry.add(cfg, Origin::Runtime) {
        Ok(()) => Ok(json!({ "name": name })),
        Err(e @ AddError::Config(ConfigError::Exists(_))) => Err(err(DEVICE_EXISTS, e.to_string())),
        Err(AddError::Config(e)) => Err(err(INVALID_PARAMS, e.to_string())),
        Err(
            e @ AddError::Backend {
                err: BackendError::Unsupported(_),
                ..
            },
        ) => Err(err(NOT_SUPPORTED, e.to_string())),
        Err(e) => Err(err(INTERNAL_ERROR, e.to_string())),
    }
}

fn device_list(registry: &Registry) -> Value {
    let list: Vec<Value> = registry
        .list()
        .into_iter()
        .map(|d| {
            json!({
                "name": d.name,
                "socket-path": d.socket_path,
                "fd": d.fd,
                "front-end": d.front_end,
                "kernel-device": d.kernel_device,
                "backend": d.backend,
                "capacity": d.capacity,
                "logical-block-size": d.logical_block_size,
                "read-only": d.read_only,
                "num-queues": d.num_queues,
                "connected": d.connected,
                "frontend": d.frontend.map(|p| json!({"pid": p.pid, "uid": p.uid})),
                "queues": d.queues.iter().map(|(q, r, c)| json!({"queue": q, "reactor": r, "cpu": c})).collect::<Vec<_>>(),
                "config": d.config,
            })
        })
        .collect();
    Value::Array(list)
}

fn histogram_json(h: &Histogram) -> Value {
    let buckets: Vec<Value> = h
        .buckets
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, &n)| json!({ "le-ns": Histogram::bound_ns(i), "count": n }))
        .collect();
    json!({ "sum-ns": h.sum_ns, "buckets": buckets })
}

/// Per-op counters of one queue (or of a whole device).
pub fn stats_json(s: &IoStats) -> Value {
    let mut ops = Map::new();
    for (i, name) in Op::NAMES.iter().enumerate() {
        let mut errors = Map::new();
        for (k, status) in STATUS_NAMES.iter().enumerate() {
            errors.insert((*status).into(), json!(s.errors[i][k]));
        }
        ops.insert(
            (*name).into(),
            json!({
                "ops": s.ops[i],
                "bytes": s.bytes[i],
                "errors": errors,
                "latency": histogram_json(&s.latency[i]),
            }),
        );
    }
    json!({ "ops": ops, "other-errors": s.other_errors, "notifications": s.notifications })
}

fn queue_json(q: &QueueSnapshot) -> Value {
    let mut v = stats_json(&q.stats);
    let o = v.as_object_mut().expect("object");
    o.insert("queue".into(), json!(q.index));
    o.insert("in-flight".into(), json!(q.in_flight));
    o.insert("reactor".into(), json!(q.reactor.map(|r| r.0)));
    o.insert("cpu".into(), json!(q.reactor.map(|r| r.1)));
    v
}

pub fn iostat_json(devices: &[DeviceIo]) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let list: Vec<Value> = devices
        .iter()
        .map(|d| {
            let mut total = IoStats::default();
            let mut in_flight = 0;
            for q in &d.queues {
                total.add(&q.stats);
                in_flight += q.in_flight;
            }
            let mut t = stats_json(&total);
            t.as_object_mut()
                .expect("object")
                .insert("in-flight".into(), json!(in_flight));
            json!({
                "name": d.name,
                "capacity": d.capacity,
                "total": t,
                "queues": d.queues.iter().map(queue_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "timestamp": now, "devices": list })
}

fn reactor_stats(registry: &Registry) -> Value {
    let list: Vec<Value> = registry
        .reactor_stats()
        .into_iter()
        .map(|r| {
            let secs = |t| ticks_to_duration(t).as_secs_f64();
            json!({
                "reactor": r.index,
                "cpu": r.cpu,
                "busy-s": secs(r.stats.busy_ticks),
                "idle-s": secs(r.stats.idle_ticks),
                "asleep-s": secs(r.stats.sleep_ticks),
                "sleeps": r.stats.sleeps,
                "wakeups": r.stats.wakeups,
                "pollers": r.pollers,
                "parked": r.parked,
                "parks": r.stats.parks,
                "poll-mode": r.settings.mode.as_str(),
                "idle-spin-us": r.settings.idle_spin.as_micros() as u64,
            })
        })
        .collect();
    Value::Array(list)
}
