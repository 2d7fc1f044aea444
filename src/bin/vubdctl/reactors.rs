//! `reactors`: each reactor's share of busy time, its sleeps and its settings.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::WatchArgs;
use crate::client::{Client, Error};
use crate::table::{self, Align, Table};
use crate::{watch, Output};

/// One entry of `reactor_stats`.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Reactor {
    reactor: u32,
    cpu: u32,
    busy_s: f64,
    idle_s: f64,
    asleep_s: f64,
    sleeps: u64,
    wakeups: u64,
    pollers: u64,
    #[serde(default)]
    parked: u64,
    poll_mode: String,
    idle_spin_us: u64,
}

pub fn run(client: &mut Client, args: &WatchArgs, out: &mut Output) -> Result<(), Error> {
    if args.watch.is_none() {
        let r = client.call("reactor_stats", json!({}))?;
        return out.result(&r, || Ok(render(&parse(&r)?, None)));
    }
    watch::run(
        client,
        args,
        out,
        "reactor_stats",
        &json!({}),
        |prev, cur, secs| Ok(render(&parse(cur)?, Some((&parse(prev)?, secs)))),
    )
}

fn parse(v: &Value) -> Result<Vec<Reactor>, Error> {
    crate::parse(v, "reactor_stats")
}

/// Over the process's life, or since `prev` taken `secs` earlier (then sleeps and wakeups
/// are per second).
fn render(cur: &[Reactor], prev: Option<(&[Reactor], f64)>) -> String {
    let (sleeps, wakeups) = match prev {
        Some(_) => ("SLEEPS/s", "WAKEUPS/s"),
        None => ("SLEEPS", "WAKEUPS"),
    };
    let mut t = Table::new(&[
        ("REACTOR", Align::Right),
        ("CPU", Align::Right),
        ("BUSY%", Align::Right),
        (sleeps, Align::Right),
        (wakeups, Align::Right),
        ("POLLERS", Align::Right),
        ("PARKED", Align::Right),
        ("MODE", Align::Left),
    ]);
    for r in cur {
        let old =
            prev.and_then(|(p, secs)| Some((p.iter().find(|o| o.reactor == r.reactor)?, secs)));
        t.row(row(r, old));
    }
    t.render()
}

fn row(r: &Reactor, old: Option<(&Reactor, f64)>) -> Vec<String> {
    let d = match old {
        Some((o, _)) => difference(r, o),
        None => r.clone(),
    };
    let counts = |n: u64| match old {
        Some((_, secs)) => table::rate(n as f64 / secs.max(1e-9)),
        None => n.to_string(),
    };
    vec![
        r.reactor.to_string(),
        r.cpu.to_string(),
        busy_percent(&d),
        counts(d.sleeps),
        counts(d.wakeups),
        r.pollers.to_string(),
        r.parked.to_string(),
        mode(r),
    ]
}

/// The time and counters of `r` accrued since `o`.
fn difference(r: &Reactor, o: &Reactor) -> Reactor {
    Reactor {
        busy_s: (r.busy_s - o.busy_s).max(0.0),
        idle_s: (r.idle_s - o.idle_s).max(0.0),
        asleep_s: (r.asleep_s - o.asleep_s).max(0.0),
        sleeps: r.sleeps.saturating_sub(o.sleeps),
        wakeups: r.wakeups.saturating_sub(o.wakeups),
        ..r.clone()
    }
}

/// Busy time over all the time the reactor accounted for (busy, idle polling, asleep).
fn busy_percent(r: &Reactor) -> String {
    let all = r.busy_s + r.idle_s + r.asleep_s;
    if all <= 0.0 {
        return "-".into();
    }
    format!("{:.1}", 100.0 * r.busy_s / all)
}

/// The spin time only matters (and is only shown) in adaptive mode.
fn mode(r: &Reactor) -> String {
    match r.poll_mode.as_str() {
        "adaptive" => format!("adaptive/{}us", r.idle_spin_us),
        m => m.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reactor(busy_s: f64, idle_s: f64, sleeps: u64) -> Reactor {
        Reactor {
            reactor: 0,
            cpu: 1,
            busy_s,
            idle_s,
            asleep_s: 0.0,
            sleeps,
            wakeups: sleeps,
            pollers: 2,
            parked: 0,
            poll_mode: "adaptive".into(),
            idle_spin_us: 50,
        }
    }

    #[test]
    fn life_and_interval() {
        let a = reactor(1.0, 3.0, 10);
        let b = reactor(2.0, 4.0, 30);
        let life = render(std::slice::from_ref(&b), None);
        let cols: Vec<&str> = life.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            cols,
            ["0", "1", "33.3", "30", "30", "2", "0", "adaptive/50us"]
        );
        let interval = render(&[b], Some((&[a], 2.0)));
        let cols: Vec<&str> = interval
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(cols[2..5], ["50.0", "10.0", "10.0"]);
    }
}
