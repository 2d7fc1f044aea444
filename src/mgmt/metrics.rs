//! Prometheus metrics: the text exposition format on `GET /metrics` over HTTP/1.1 (one
//! request per connection), names after node_exporter's and Ceph's with the `vubd_` prefix
//! and `device` and `queue` labels. Counters are totals since a device was added (stopped
//! queues included): they never go backwards, whatever `iostat`'s reset does.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::blk::stats::{Histogram, BUCKETS, STATUS_NAMES};
use crate::blk::Op;
use crate::engine::stats::ticks_to_duration;
use crate::registry::Registry;

/// Connections served at once.
const MAX_CLIENTS: usize = 8;
/// A client that does not send its request (or read the answer) within this is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_HEAD: usize = 8192;

/// `# HELP`/`# TYPE` lines and samples of one metric family.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let body: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", body.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Upper bound of a histogram bucket, in seconds.
fn le_seconds(i: usize) -> String {
    match Histogram::bound_ns(i) {
        Some(ns) => format!("{:e}", ns as f64 / 1e9),
        None => "+Inf".into(),
    }
}

/// The whole exposition.
pub fn render(registry: &Registry) -> String {
    let devices = registry.io_totals();
    let mut out = String::new();
    // (op index, completed name, bytes name or "")
    let per_op = [
        (
            Op::Read.index(),
            "vubd_reads_completed_total",
            "vubd_read_bytes_total",
            "read",
        ),
        (
            Op::Write { fua: false }.index(),
            "vubd_writes_completed_total",
            "vubd_written_bytes_total",
            "written",
        ),
        (Op::Flush.index(), "vubd_flushes_completed_total", "", ""),
        (
            Op::Discard.index(),
            "vubd_discards_completed_total",
            "vubd_discarded_bytes_total",
            "discarded",
        ),
        (
            Op::WriteZeroes { unmap: false }.index(),
            "vubd_write_zeroes_completed_total",
            "vubd_write_zeroes_bytes_total",
            "zeroed",
        ),
    ];
    for (i, completed, bytes, verb) in per_op {
        let op = Op::NAMES[i];
        let mut f = Family::new(
            &mut out,
            completed,
            "counter",
            &format!("{op} requests completed (successful or not)."),
        );
        for d in &devices {
            for q in &d.queues {
                let qs = q.index.to_string();
                f.sample(
                    completed,
                    &[("device", &d.name), ("queue", &qs)],
                    q.stats.ops[i],
                );
            }
        }
        if !bytes.is_empty() {
            let mut f = Family::new(
                &mut out,
                bytes,
                "counter",
                &format!("Bytes {verb} by successful {op} requests."),
            );
            for d in &devices {
                for q in &d.queues {
                    let qs = q.index.to_string();
                    f.sample(
                        bytes,
                        &[("device", &d.name), ("queue", &qs)],
                        q.stats.bytes[i],
                    );
                }
            }
        }
    }
    let mut f = Family::new(
        &mut out,
        "vubd_errors_total",
        "counter",
        "Requests completed with an error status, by operation and virtio status.",
    );
    for d in &devices {
        for q in &d.queues {
            let qs = q.index.to_string();
            for (i, op) in Op::NAMES.iter().enumerate() {
                for (k, status) in STATUS_NAMES.iter().enumerate() {
                    let labels = [
                        ("device", d.name.as_str()),
                        ("queue", qs.as_str()),
                        ("op", op),
                        ("status", status),
                    ];
                    f.sample("vubd_errors_total", &labels, q.stats.errors[i][k]);
                }
            }
        }
    }
    let name = "vubd_request_duration_seconds";
    let mut f = Family::new(
        &mut out,
        name,
        "histogram",
        "Time from taking a request to completing it, by operation.",
    );
    for d in &devices {
        for q in &d.queues {
            let qs = q.index.to_string();
            for (i, op) in Op::NAMES.iter().enumerate() {
                let h = &q.stats.latency[i];
                let mut cumulative = 0;
                for b in 0..BUCKETS {
                    cumulative += h.buckets[b];
                    let le = le_seconds(b);
                    let labels = [
                        ("device", d.name.as_str()),
                        ("queue", &qs),
                        ("op", op),
                        ("le", &le),
                    ];
                    f.sample(&format!("{name}_bucket"), &labels, cumulative);
                }
                let labels = [
                    ("device", d.name.as_str()),
                    ("queue", qs.as_str()),
                    ("op", op),
                ];
                f.sample(
                    &format!("{name}_sum"),
                    &labels,
                    format!("{:e}", h.sum_ns as f64 / 1e9),
                );
                f.sample(&format!("{name}_count"), &labels, h.count());
            }
        }
    }
    let mut f = Family::new(
        &mut out,
        "vubd_inflight_requests",
        "gauge",
        "Requests taken from the driver and not completed yet.",
    );
    for d in &devices {
        for q in &d.queues {
            let qs = q.index.to_string();
            f.sample(
                "vubd_inflight_requests",
                &[("device", &d.name), ("queue", &qs)],
                q.in_flight,
            );
        }
    }
    let mut f = Family::new(&mut out, "vubd_capacity_bytes", "gauge", "Device capacity.");
    for d in &devices {
        f.sample("vubd_capacity_bytes", &[("device", &d.name)], d.capacity);
    }
    let mut f = Family::new(
        &mut out,
        "vubd_reactor_seconds_total",
        "counter",
        "Reactor time: busy (a pass found work), idle (polling, found none), asleep.",
    );
    for r in registry.reactor_stats() {
        let ri = r.index.to_string();
        for (mode, t) in [
            ("busy", r.stats.busy_ticks),
            ("idle", r.stats.idle_ticks),
            ("asleep", r.stats.sleep_ticks),
        ] {
            f.sample(
                "vubd_reactor_seconds_total",
                &[("reactor", &ri), ("mode", mode)],
                ticks_to_duration(t).as_secs_f64(),
            );
        }
    }
    out
}

/// The metrics endpoint, serving on a thread.
pub fn start(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (registry, clients) = (Arc::clone(&registry), Arc::clone(&clients));
                let spawned = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
                        let _ = serve(stream, &registry);
                        clients.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    log::warn!("metrics: cannot start a client thread");
                }
            }
        })?;
    log::info!("metrics on http://{local}/metrics");
    Ok(local)
}

fn serve(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (status, body, kind) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            render(registry),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("GET", _) => (
            "404 Not Found",
            "not found: try /metrics\n".into(),
            "text/plain",
        ),
        _ => ("405 Method Not Allowed", "only GET\n".into(), "text/plain"),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
