//! `iostat`: totals since the last reset, or, with --watch, rates over each interval
//! computed here from successive answers and their timestamps (never by resetting: other
//! clients may be watching too).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::IostatArgs;
use crate::client::{Client, Error};
use crate::latency::{self, Latency, WireHistogram};
use crate::table::{self, Align, Table};
use crate::{watch, Output};

/// One `iostat` answer.
#[derive(Deserialize)]
pub struct Sample {
    /// Unix seconds when vubd took it.
    timestamp: f64,
    devices: Vec<DeviceIo>,
}

#[derive(Deserialize)]
struct DeviceIo {
    name: String,
    total: Stats,
    queues: Vec<QueueIo>,
}

#[derive(Deserialize)]
struct QueueIo {
    queue: u32,
    cpu: Option<u32>,
    #[serde(flatten)]
    stats: Stats,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Stats {
    /// By op name: read, write, flush, discard, write_zeroes.
    ops: BTreeMap<String, OpStats>,
    #[serde(default)]
    other_errors: u64,
    #[serde(default)]
    in_flight: u64,
}

#[derive(Deserialize)]
struct OpStats {
    ops: u64,
    bytes: u64,
    errors: BTreeMap<String, u64>,
    latency: WireHistogram,
}

/// What one row shows, before dividing by time.
#[derive(Clone, Default, PartialEq)]
struct Counts {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    flushes: u64,
    discards: u64,
    write_zeroes: u64,
    errors: u64,
    latency: Latency,
    /// A gauge, not a counter: never differenced.
    in_flight: u64,
}

impl Counts {
    fn of(s: &Stats) -> Counts {
        let op = |name: &str| s.ops.get(name);
        let ops = |name| op(name).map_or(0, |o| o.ops);
        let bytes = |name| op(name).map_or(0, |o| o.bytes);
        let mut latency = Latency::default();
        for o in s.ops.values() {
            latency.add(&o.latency);
        }
        let op_errors: u64 = s.ops.values().flat_map(|o| o.errors.values()).sum();
        Counts {
            reads: ops("read"),
            writes: ops("write"),
            read_bytes: bytes("read"),
            write_bytes: bytes("write"),
            flushes: ops("flush"),
            discards: ops("discard"),
            write_zeroes: ops("write_zeroes"),
            errors: op_errors + s.other_errors,
            latency,
            in_flight: s.in_flight,
        }
    }

    fn counters(&self) -> [u64; 8] {
        [
            self.reads,
            self.writes,
            self.read_bytes,
            self.write_bytes,
            self.flushes,
            self.discards,
            self.write_zeroes,
            self.errors,
        ]
    }

    /// What happened after `base`. A counter that went down means someone reset the
    /// statistics in between: everything counted now happened within the interval.
    fn since(&self, base: &Counts) -> Counts {
        let now = self.counters();
        if now.iter().zip(base.counters()).any(|(n, b)| *n < b) {
            return self.clone();
        }
        let d: Vec<u64> = now
            .iter()
            .zip(base.counters())
            .map(|(n, b)| n - b)
            .collect();
        Counts {
            reads: d[0],
            writes: d[1],
            read_bytes: d[2],
            write_bytes: d[3],
            flushes: d[4],
            discards: d[5],
            write_zeroes: d[6],
            errors: d[7],
            latency: self.latency.since(&base.latency),
            in_flight: self.in_flight,
        }
    }
}

struct Row {
    label: String,
    cpu: String,
    counts: Counts,
}

pub fn run(client: &mut Client, args: &IostatArgs, out: &mut Output) -> Result<(), Error> {
    let mut params = json!({});
    if let Some(n) = &args.name {
        params["name"] = json!(n);
    }
    match args.watch.watch {
        None => {
            if args.reset {
                params["reset"] = json!(true);
            }
            let r = client.call("iostat", params)?;
            out.result(&r, || Ok(render(&parse(&r)?, None, args.queues)))
        }
        // Rates use vubd's timestamps, not when the answers arrived here.
        Some(_) => watch::run(
            client,
            &args.watch,
            out,
            "iostat",
            &params,
            |prev, cur, _| Ok(render(&parse(cur)?, Some(&parse(prev)?), args.queues)),
        ),
    }
}

fn parse(v: &Value) -> Result<Sample, Error> {
    crate::parse(v, "iostat")
}

/// Totals (no `prev`), or rates since `prev`.
fn render(cur: &Sample, prev: Option<&Sample>, queues: bool) -> String {
    let rows = rows(cur, prev, queues);
    let mut t = Table::new(&columns(prev.is_some(), queues));
    let secs = prev.map(|p| (cur.timestamp - p.timestamp).max(1e-9));
    for r in &rows {
        t.row(cells(r, secs, queues));
    }
    t.render()
}

fn rows(cur: &Sample, prev: Option<&Sample>, queues: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    for d in &cur.devices {
        let old = prev.and_then(|p| p.devices.iter().find(|o| o.name == d.name));
        let base = |s: Option<&Stats>| s.map(Counts::of).unwrap_or_default();
        rows.push(Row {
            label: d.name.clone(),
            cpu: "-".into(),
            counts: Counts::of(&d.total).since(&base(old.map(|o| &o.total))),
        });
        if !queues {
            continue;
        }
        for q in &d.queues {
            let old_q = old.and_then(|o| o.queues.iter().find(|x| x.queue == q.queue));
            rows.push(Row {
                label: format!("{}/q{}", d.name, q.queue),
                cpu: q.cpu.map_or("-".into(), |c| c.to_string()),
                counts: Counts::of(&q.stats).since(&base(old_q.map(|o| &o.stats))),
            });
        }
    }
    rows
}

fn columns(rates: bool, queues: bool) -> Vec<(&'static str, Align)> {
    let names: [&str; 8] = if rates {
        [
            "r/s",
            "w/s",
            "rMB/s",
            "wMB/s",
            "flush/s",
            "discard/s",
            "wzero/s",
            "err",
        ]
    } else {
        [
            "reads", "writes", "read", "written", "flushes", "discards", "wzeroes", "err",
        ]
    };
    let mut cols = vec![("DEVICE", Align::Left)];
    if queues {
        cols.push(("cpu", Align::Right));
    }
    cols.extend(names.iter().map(|&n| (n, Align::Right)));
    for n in ["in-flight", "mean", "p50", "p99"] {
        cols.push((n, Align::Right));
    }
    cols
}

fn cells(r: &Row, secs: Option<f64>, queues: bool) -> Vec<String> {
    let c = &r.counts;
    let mut out = vec![r.label.clone()];
    if queues {
        out.push(r.cpu.clone());
    }
    out.extend(match secs {
        Some(s) => rate_cells(c, s),
        None => total_cells(c),
    });
    out.push(c.errors.to_string());
    out.push(c.in_flight.to_string());
    out.push(latency::mean_cell(&c.latency));
    out.push(latency::percentile_cell(&c.latency, 0.50));
    out.push(latency::percentile_cell(&c.latency, 0.99));
    out
}

fn total_cells(c: &Counts) -> Vec<String> {
    vec![
        c.reads.to_string(),
        c.writes.to_string(),
        table::size(c.read_bytes),
        table::size(c.write_bytes),
        c.flushes.to_string(),
        c.discards.to_string(),
        c.write_zeroes.to_string(),
    ]
}

/// MB is 2^20 bytes, as in iostat(1).
fn rate_cells(c: &Counts, secs: f64) -> Vec<String> {
    let per_s = |n: u64| table::rate(n as f64 / secs);
    let mb_per_s = |n: u64| format!("{:.2}", n as f64 / secs / (1u64 << 20) as f64);
    vec![
        per_s(c.reads),
        per_s(c.writes),
        mb_per_s(c.read_bytes),
        mb_per_s(c.write_bytes),
        per_s(c.flushes),
        per_s(c.discards),
        per_s(c.write_zeroes),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts: f64, reads: u64, read_bytes: u64, lat: Value) -> Sample {
        let op = |ops: u64, bytes: u64, latency: &Value| {
            json!({"ops": ops, "bytes": bytes, "errors": {"ioerr": 0, "unsupp": 0},
                   "latency": latency})
        };
        let none = json!({"sum-ns": 0, "buckets": []});
        let stats = json!({
            "ops": {"read": op(reads, read_bytes, &lat), "write": op(0, 0, &none),
                    "flush": op(0, 0, &none), "discard": op(0, 0, &none),
                    "write_zeroes": op(0, 0, &none)},
            "other-errors": 0, "notifications": 0, "in-flight": 1,
        });
        let mut q = stats.clone();
        q["queue"] = json!(0);
        q["reactor"] = json!(0);
        q["cpu"] = json!(1);
        let v = json!({"timestamp": ts, "devices": [
            {"name": "d1", "capacity": 1024, "total": stats, "queues": [q]}]});
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn totals_table() {
        let s = sample(
            10.0,
            4,
            16384,
            json!({"sum-ns": 8000, "buckets": [
            {"le-ns": 2048, "count": 3}, {"le-ns": 4096, "count": 1}]}),
        );
        let text = render(&s, None, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("DEVICE"), "{text}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols[..4], ["d1", "-", "4", "0"], "{text}");
        assert_eq!(cols[4], "16.0K");
        // mean 2us, p50 <= 2048 ns, p99 <= 4096 ns
        assert_eq!(
            cols[cols.len() - 3..],
            ["2.0us", "2.0us", "4.1us"],
            "{text}"
        );
        assert!(lines[2].starts_with("d1/q0"), "{text}");
    }

    #[test]
    fn rates_over_the_interval() {
        let a = sample(
            10.0,
            4,
            4 << 20,
            json!({"sum-ns": 4000, "buckets": [
            {"le-ns": 1024, "count": 4}]}),
        );
        let b = sample(
            12.0,
            24,
            24 << 20,
            json!({"sum-ns": 4000 + 20 * 3000, "buckets": [
            {"le-ns": 1024, "count": 4}, {"le-ns": 4096, "count": 20}]}),
        );
        let text = render(&b, Some(&a), false);
        let cols: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(cols[..4], ["d1", "10.0", "0.0", "10.00"], "{text}");
        assert_eq!(
            cols[cols.len() - 3..],
            ["3.0us", "4.1us", "4.1us"],
            "{text}"
        );
    }

    #[test]
    fn a_reset_between_samples_starts_from_zero() {
        let a = sample(10.0, 100, 1000, json!({"sum-ns": 0, "buckets": []}));
        let b = sample(11.0, 5, 50, json!({"sum-ns": 0, "buckets": []}));
        let d = Counts::of(&b.devices[0].total).since(&Counts::of(&a.devices[0].total));
        assert_eq!((d.reads, d.read_bytes), (5, 50));
    }
}
