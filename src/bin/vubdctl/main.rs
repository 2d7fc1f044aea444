//! vubdctl: the command-line client of vubd's management socket. Each command is one or
//! more JSON-RPC calls on one connection; results are printed as tables, or raw with --json.

mod admin;
mod cli;
mod client;
mod device;
mod iostat;
mod latency;
mod reactors;
mod table;
mod watch;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use serde::de::DeserializeOwned;
use serde_json::Value;

use cli::{Cli, Command, ConfigCommand};
use client::{Client, Error};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) | Err(Error::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vubdctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<(), Error> {
    let mut client = Client::connect(&cli.socket_path(), cli.timeout)?;
    let mut out = Output { json: cli.json };
    let (c, out) = (&mut client, &mut out);
    match &cli.command {
        Command::Device(cmd) => device::run(c, cmd, out),
        Command::Iostat(args) => iostat::run(c, args, out),
        Command::Reactors(args) => reactors::run(c, args, out),
        Command::PollMode { mode, idle_spin_us } => admin::poll_mode(c, mode, *idle_spin_us, out),
        Command::Config(ConfigCommand::Save { output }) => {
            admin::config_save(c, output.as_deref(), out)
        }
        Command::Version => admin::version(c, out),
        Command::Methods => admin::methods(c, out),
        Command::Call { method, params } => admin::call(c, method, params.as_ref(), out),
    }
}

/// Standard output, as a table or as raw JSON.
pub struct Output {
    /// --json: print results as one line of JSON.
    pub json: bool,
}

impl Output {
    /// `result` on one line with --json, else the text `table` makes of it.
    pub fn result(
        &mut self,
        result: &Value,
        table: impl FnOnce() -> Result<String, Error>,
    ) -> Result<(), Error> {
        let text = if self.json {
            format!("{result}\n")
        } else {
            table()?
        };
        self.print(&text)
    }

    /// Written at once and flushed (--watch output must not wait in a buffer); a closed
    /// pipe ends the command quietly instead of panicking as `print!` would.
    pub fn print(&mut self, text: &str) -> Result<(), Error> {
        let mut stdout = io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::OutputClosed),
            Err(e) => Err(Error::Local(format!(
                "cannot write to standard output: {e}"
            ))),
        }
    }
}

/// A method's result as `T`; a mismatch means this vubdctl and that vubd disagree.
pub fn parse<T: DeserializeOwned>(result: &Value, method: &str) -> Result<T, Error> {
    T::deserialize(result).map_err(|e| Error::Protocol(format!("{method}: {e}: {result}")))
}
