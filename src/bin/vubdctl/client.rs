//! A JSON-RPC 2.0 client for vubd's management socket: one request line, one answer line,
//! on one connection kept for the whole command (so `--watch` does not reconnect).

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// Why a command failed; decides the exit status.
#[derive(Debug)]
pub enum Error {
    /// Nothing accepts connections on the socket (exit 2: like bad usage, which clap
    /// reports itself, nothing was done).
    Connect { socket: PathBuf, err: io::Error },
    /// vubd answered with an error.
    Rpc { code: i64, message: String },
    /// The connection failed or timed out after the request may have been sent.
    Io { socket: PathBuf, err: io::Error },
    /// The answer is not what the protocol promises.
    Protocol(String),
    /// Anything else local, e.g. a file that cannot be written.
    Local(String),
    /// Standard output was closed (`vubdctl iostat --watch 1 | head`): stop quietly.
    OutputClosed,
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Connect { .. } => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { socket, err } => write!(
                f,
                "cannot connect to vubd at {0}: {err}; is vubd running with --rpc-socket {0}?",
                socket.display()
            ),
            Error::Rpc { code, message } => write!(f, "{message} (code {code})"),
            Error::Io { socket, err } if is_timeout(err) => {
                write!(
                    f,
                    "no answer from vubd on {} in time (see --timeout)",
                    socket.display()
                )
            }
            Error::Io { socket, err } => write!(f, "{}: {err}", socket.display()),
            Error::Protocol(m) => write!(f, "unexpected answer from vubd: {m}"),
            Error::Local(m) => f.write_str(m),
            Error::OutputClosed => f.write_str("standard output closed"),
        }
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects; every later read and write gives up after `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client, Error> {
        let connect_err = |err| Error::Connect {
            socket: socket.to_path_buf(),
            err,
        };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok(Client {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Calls `method`; `Value::Null` params are left out of the request.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            request["params"] = params;
        }
        let line = format!("{request}\n");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|err| self.io_error(err))?;
        let answer = self.read_answer()?;
        result_of(answer, id)
    }

    fn read_answer(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|err| self.io_error(err))?;
        if n == 0 {
            return Err(self.io_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "vubd closed the connection without answering",
            )));
        }
        serde_json::from_str(&line).map_err(|e| Error::Protocol(format!("{e}: {}", line.trim())))
    }

    fn io_error(&self, err: io::Error) -> Error {
        Error::Io {
            socket: self.socket.clone(),
            err,
        }
    }
}

/// The result of an answer to request `id`, or its error. An error answer with a null id
/// is accepted too: that is how vubd refuses a client before reading its request (too many
/// clients, a line too long).
fn result_of(mut answer: Value, id: u64) -> Result<Value, Error> {
    if let Some(e) = answer.get("error") {
        let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        return Err(Error::Rpc { code, message });
    }
    if answer.get("id") != Some(&json!(id)) {
        return Err(Error::Protocol(format!(
            "an answer to another request: {answer}"
        )));
    }
    match answer.get_mut("result") {
        Some(r) => Ok(r.take()),
        None => Err(Error::Protocol(format!(
            "neither result nor error: {answer}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = json!({"jsonrpc": "2.0", "id": 3, "result": {"name": "d1"}});
        assert_eq!(result_of(ok, 3).unwrap(), json!({"name": "d1"}));
        let e = json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "x"}});
        let err = result_of(e, 3).unwrap_err();
        assert_eq!(err.to_string(), "x (code -32600)");
        assert_eq!(err.exit_code(), 1);
        let other = json!({"jsonrpc": "2.0", "id": 2, "result": 1});
        assert!(matches!(result_of(other, 3), Err(Error::Protocol(_))));
    }
}
