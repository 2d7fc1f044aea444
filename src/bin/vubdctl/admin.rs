//! The small commands: poll mode, saving the configuration, version, methods, raw calls.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{Client, Error};
use crate::Output;

pub fn poll_mode(
    client: &mut Client,
    mode: &str,
    idle_spin_us: Option<u64>,
    out: &mut Output,
) -> Result<(), Error> {
    let mut p = json!({ "mode": mode });
    if let Some(us) = idle_spin_us {
        p["idle-spin-us"] = json!(us);
    }
    let r = client.call("engine_set_poll_mode", p)?;
    out.result(&r, || {
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Set {
            mode: String,
            idle_spin_us: u64,
        }
        let s: Set = crate::parse(&r, "engine_set_poll_mode")?;
        Ok(format!(
            "poll mode {}, idle spin {}us\n",
            s.mode, s.idle_spin_us
        ))
    })
}

/// Prints the TOML, or writes it to `output` (then prints nothing: it is in the file).
pub fn config_save(
    client: &mut Client,
    output: Option<&Path>,
    out: &mut Output,
) -> Result<(), Error> {
    let r = client.call("config_save", json!({}))?;
    let toml = r
        .get("toml")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Protocol(format!("config_save: no toml in {r}")))?;
    match output {
        Some(path) => std::fs::write(path, toml)
            .map_err(|e| Error::Local(format!("cannot write {}: {e}", path.display()))),
        None => out.result(&r, || Ok(toml.to_string())),
    }
}

pub fn version(client: &mut Client, out: &mut Output) -> Result<(), Error> {
    let r = client.call("version", json!({}))?;
    out.result(&r, || {
        let field = |k| r.get(k).and_then(Value::as_str).unwrap_or("?");
        Ok(format!(
            "{} {} (vubdctl {})\n",
            field("name"),
            field("version"),
            env!("CARGO_PKG_VERSION")
        ))
    })
}

pub fn methods(client: &mut Client, out: &mut Output) -> Result<(), Error> {
    let r = client.call("rpc_get_methods", json!({}))?;
    out.result(&r, || {
        let names: Vec<String> = crate::parse(&r, "rpc_get_methods")?;
        Ok(names.iter().map(|n| format!("{n}\n")).collect())
    })
}

/// Any method: the result pretty-printed (one line with --json).
pub fn call(
    client: &mut Client,
    method: &str,
    params: Option<&Value>,
    out: &mut Output,
) -> Result<(), Error> {
    let r = client.call(method, params.cloned().unwrap_or(Value::Null))?;
    out.result(&r, || {
        let pretty = serde_json::to_string_pretty(&r).map_err(|e| Error::Local(e.to_string()))?;
        Ok(format!("{pretty}\n"))
    })
}
