//! The JSON-RPC 2.0 server on a Unix socket: one request object per line, one response per
//! line (batches as arrays, notifications without an answer), so
//! `echo '{"jsonrpc":"2.0","id":1,"method":"device_list"}' | socat - UNIX-CONNECT:PATH` works.
//! Each client has a thread; a line longer than `MAX_LINE` or invalid JSON gets an error
//! answer, never a crash or a disconnect of anything else.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use super::methods::{self, Command, RpcError};
use crate::registry::Registry;

/// Longest request line accepted (a device table is well under a kilobyte).
pub const MAX_LINE: usize = 1 << 20;
/// Clients served at once; more are answered with an error and closed.
const MAX_CLIENTS: usize = 32;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;

/// The management socket, listening.
pub struct RpcServer {
    path: PathBuf,
}

impl RpcServer {
    /// Creates the socket (mode 0600: only vubd's own user may manage it) and serves it on a
    /// thread. A stale socket file is replaced, a live one refused.
    pub fn start(path: &Path, registry: Arc<Registry>) -> std::io::Result<RpcServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        // Created under a restrictive umask, so there is no moment with looser permissions.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let clients = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || accept_loop(listener, registry, clients))?;
        log::info!("management socket on {}", path.display());
        Ok(RpcServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, registry: Arc<Registry>, clients: Arc<AtomicUsize>) {
    crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let _ = writeln!(
                stream,
                "{}",
                error_response(Value::Null, -32603, "too many management clients")
            );
            continue;
        }
        let (registry, clients) = (Arc::clone(&registry), Arc::clone(&clients));
        let spawned = std::thread::Builder::new()
            .name("rpc-client".into())
            .spawn(move || {
                crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
                serve_client(stream, &registry);
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            log::warn!("management socket: cannot start a client thread");
        }
    }
}

fn serve_client(stream: UnixStream, registry: &Registry) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // At most MAX_LINE + 1 bytes per line: a longer one is refused, not buffered.
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n > MAX_LINE {
            let e = error_response(Value::Null, INVALID_REQUEST, "request line too long");
            let _ = writeln!(out, "{e}");
            return;
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        if let Some(answer) = handle_line(text.trim(), registry) {
            if writeln!(out, "{answer}").is_err() {
                return;
            }
        }
    }
}

/// One request of a line, decoded: either already answered (an error), or a command to run
/// (and answer when it has an id).
#[derive(Debug)]
pub enum Decoded {
    Answer(Value),
    Run { id: Option<Value>, cmd: Command },
}

/// A request line decoded, nothing executed yet: the requests, and whether they came as a
/// batch (then answered as an array).
pub fn decode_line(text: &str) -> (Vec<Decoded>, bool) {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let a = error_response(Value::Null, PARSE_ERROR, &format!("parse error: {e}"));
            return (vec![Decoded::Answer(a)], false);
        }
    };
    match v {
        Value::Array(items) if items.is_empty() => {
            let a = error_response(Value::Null, INVALID_REQUEST, "empty batch");
            (vec![Decoded::Answer(a)], false)
        }
        Value::Array(items) => (items.into_iter().map(decode_request).collect(), true),
        v => (vec![decode_request(v)], false),
    }
}

fn decode_request(v: Value) -> Decoded {
    let Value::Object(obj) = v else {
        return Decoded::Answer(error_response(
            Value::Null,
            INVALID_REQUEST,
            "a request is a JSON object",
        ));
    };
    let id = obj.get("id").cloned();
    let bad_id = matches!(
        id,
        Some(Value::Object(_) | Value::Array(_) | Value::Bool(_))
    );
    if obj.get("jsonrpc") != Some(&json!("2.0")) || bad_id {
        return Decoded::Answer(error_response(
            id.unwrap_or(Value::Null),
            INVALID_REQUEST,
            "not a JSON-RPC 2.0 request (\"jsonrpc\": \"2.0\", a method, an id)",
        ));
    }
    let Some(Value::String(method)) = obj.get("method") else {
        return Decoded::Answer(error_response(
            id.unwrap_or(Value::Null),
            INVALID_REQUEST,
            "the method must be a string",
        ));
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    match methods::parse(method, params) {
        Ok(cmd) => Decoded::Run { id, cmd },
        // A notification (no id) gets no answer, whatever happened.
        Err(e) => match id {
            Some(id) => Decoded::Answer(error_response(id, e.code, &e.message)),
            None => Decoded::Answer(Value::Null),
        },
    }
}

/// One request line -> the response line (None for notifications only).
pub fn handle_line(text: &str, registry: &Registry) -> Option<Value> {
    let (decoded, batch) = decode_line(text);
    let answers: Vec<Value> = decoded
        .into_iter()
        .filter_map(|d| match d {
            Decoded::Answer(Value::Null) => None,
            Decoded::Answer(a) => Some(a),
            Decoded::Run { id, cmd } => {
                let result = methods::execute(registry, cmd);
                let id = id?;
                Some(match result {
                    Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
                    Err(RpcError { code, message }) => error_response(id, code, &message),
                })
            }
        })
        .collect();
    if batch {
        (!answers.is_empty()).then_some(Value::Array(answers))
    } else {
        answers.into_iter().next()
    }
}

pub fn error_response(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}
