//! `device add|list|remove|resize`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::cli::{AddArgs, DeviceCommand};
use crate::client::{Client, Error};
use crate::table::{self, Align, Table};
use crate::Output;

pub fn run(client: &mut Client, cmd: &DeviceCommand, out: &mut Output) -> Result<(), Error> {
    match cmd {
        DeviceCommand::Add(args) => {
            let r = client.call("device_add", add_params(args)?)?;
            out.result(&r, || Ok(format!("added {}\n", args.name)))
        }
        DeviceCommand::List => {
            let r = client.call("device_list", json!({}))?;
            out.result(&r, || list_table(&r))
        }
        DeviceCommand::Remove { name, force } => {
            let r = client.call("device_remove", json!({"name": name, "force": force}))?;
            out.result(&r, || Ok(format!("removed {name}\n")))
        }
        DeviceCommand::Resize { name, size } => {
            let mut p = json!({ "name": name });
            if let Some(s) = size {
                p["size"] = json!(s);
            }
            let r = client.call("device_resize", p)?;
            out.result(&r, || resized(&r))
        }
    }
}

/// The flags given, as `device_add` parameters: unset options (null) and unset switches
/// (false) are left out, so vubd's defaults apply and its "applies to another backend"
/// checks see only what the user asked for.
fn add_params(args: &AddArgs) -> Result<Value, Error> {
    let v = serde_json::to_value(args).map_err(|e| Error::Local(e.to_string()))?;
    let Value::Object(map) = v else {
        unreachable!("a struct serializes as an object")
    };
    let given: Map<String, Value> = map
        .into_iter()
        .filter(|(_, v)| !v.is_null() && *v != Value::Bool(false))
        .collect();
    Ok(Value::Object(given))
}

/// One entry of `device_list`'s answer (only what the table shows).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Device {
    name: String,
    socket_path: Option<String>,
    fd: Option<i64>,
    backend: String,
    capacity: u64,
    read_only: bool,
    connected: bool,
    frontend: Option<Frontend>,
    queues: Vec<QueuePlace>,
}

#[derive(Deserialize)]
struct Frontend {
    pid: i64,
    uid: u32,
}

#[derive(Deserialize)]
struct QueuePlace {
    cpu: Option<u32>,
}

fn list_table(result: &Value) -> Result<String, Error> {
    let devices: Vec<Device> = crate::parse(result, "device_list")?;
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("BACKEND", Align::Left),
        ("SIZE", Align::Right),
        ("RO", Align::Left),
        ("CONNECTED", Align::Left),
        ("FRONTEND", Align::Left),
        ("QUEUES", Align::Left),
        ("SOCKET", Align::Left),
    ]);
    for d in &devices {
        t.row(vec![
            d.name.clone(),
            d.backend.clone(),
            table::size(d.capacity),
            table::yes_no(d.read_only),
            table::yes_no(d.connected),
            d.frontend
                .as_ref()
                .map_or("-".into(), |f| format!("{}/{}", f.pid, f.uid)),
            queues_cell(&d.queues),
            socket_cell(d),
        ]);
    }
    Ok(t.render())
}

/// "2 on cpu1", "4 on cpu0,1": the started queues and the CPUs their reactors run on.
fn queues_cell(queues: &[QueuePlace]) -> String {
    if queues.is_empty() {
        return "-".into();
    }
    let mut cpus: Vec<u32> = queues.iter().filter_map(|q| q.cpu).collect();
    cpus.sort_unstable();
    cpus.dedup();
    let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
    format!("{} on cpu{}", queues.len(), list.join(","))
}

fn socket_cell(d: &Device) -> String {
    match (&d.socket_path, d.fd) {
        (Some(p), _) => p.clone(),
        (None, Some(fd)) => format!("fd {fd}"),
        (None, None) => "-".into(),
    }
}

fn resized(result: &Value) -> Result<String, Error> {
    #[derive(Deserialize)]
    struct Resized {
        name: String,
        capacity: u64,
    }
    let r: Resized = crate::parse(result, "device_resize")?;
    Ok(format!(
        "{}: {} ({} bytes)\n",
        r.name,
        table::size(r.capacity),
        r.capacity
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    /// `device add` parameters of a command line (words split at blanks).
    fn add(line: &str) -> Value {
        let cli = Cli::try_parse_from(line.split_whitespace()).unwrap();
        let crate::cli::Command::Device(DeviceCommand::Add(a)) = cli.command else {
            panic!("not device add")
        };
        add_params(&a).unwrap()
    }

    #[test]
    fn only_given_flags_are_sent() {
        let p = add("vubdctl device add --name d1 --ram 1G --socket-path /tmp/d1.sock");
        let want = json!({"name": "d1", "ram": "1G", "socket-path": "/tmp/d1.sock"});
        assert_eq!(p, want);
    }

    /// Every flag is sent under its TOML key (vubd refuses unknown keys; the integration
    /// tests send them to a real vubd).
    #[test]
    fn flags_are_device_table_keys() {
        let p = add(
            "vubdctl device add --name d --socket-path /s --rbd p/i --num-queues 2 \
             --read-only --buffered --writethrough --serial s --logical-block-size 4096 \
             --cpumask 0x1 --socket-mode 0660 --socket-owner 0:0 --allow-uid 1,2 \
             --nbd-timeout-s 3 --rbd-conf /c --rbd-user u --rbd-keyring /k",
        );
        assert_eq!(p["allow-uid"], json!([1, 2]));
        assert_eq!(p["num-queues"], json!(2));
        assert_eq!(p["read-only"], json!(true));
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let want = "allow-uid buffered cpumask logical-block-size name nbd-timeout-s num-queues \
                    rbd rbd-conf rbd-keyring rbd-user read-only serial socket-mode socket-owner \
                    socket-path writethrough";
        assert_eq!(keys, want.split_whitespace().collect::<Vec<_>>());
    }

    #[test]
    fn one_backend() {
        let base = "vubdctl device add --name d --socket-path /s";
        assert!(Cli::try_parse_from(base.split_whitespace()).is_err());
        let two = format!("{base} --ram 1G --null 1G");
        assert!(Cli::try_parse_from(two.split_whitespace()).is_err());
    }

    #[test]
    fn queue_cells() {
        let q = |cpu| QueuePlace { cpu: Some(cpu) };
        assert_eq!(queues_cell(&[]), "-");
        assert_eq!(queues_cell(&[q(1), q(1)]), "2 on cpu1");
        assert_eq!(queues_cell(&[q(1), q(0), q(1)]), "3 on cpu0,1");
    }
}
