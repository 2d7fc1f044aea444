//! vubd-floor: the cross-core floor under a QD1 round trip. Two threads, pinned to the
//! client's and the server's CPUs, bounce one cache line: the first writes a sequence
//! number, the second waits for it and writes it back. A virtio request at QD1 needs at
//! least this (the driver publishes, the device sees it; the device publishes, the driver
//! sees it), so no server's QD1 latency can go below it on these two CPUs.
//!
//! A line says nothing of what a request moves, though. The ring floor (`ring`) is a QD1
//! 4 KiB read served by an ideal device on the split ring's layout: every cache line a
//! driver and a device must exchange for it, and no other work. A null backend's QD1 p50
//! with a polling client is measured against both.
//!
//! `vubd-floor [--cpus A,B] [--seconds S]` prints the p50 and p99 of one round trip, in
//! microseconds, as `floor_p50_us=... floor_p99_us=... ring_p50_us=... ring_p99_us=...
//! ring_nodata_p50_us=...` (first number: the line's p50; `ring_nodata`: the ring alone,
//! without filling the 4 KiB buffer).

mod ring;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[repr(align(128))]
struct Line(AtomicU64);

fn pin(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

fn main() {
    let mut cpus = (0usize, 1usize);
    let mut seconds = 3.0f64;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--cpus" => {
                let v = args.get(i + 1).expect("--cpus A,B");
                let (a, b) = v.split_once(',').expect("--cpus A,B");
                cpus = (a.parse().expect("cpu"), b.parse().expect("cpu"));
                i += 2;
            }
            "--seconds" => {
                seconds = args
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds S");
                i += 2;
            }
            other => {
                eprintln!("usage: vubd-floor [--cpus A,B] [--seconds S] (unknown {other:?})");
                std::process::exit(2);
            }
        }
    }
    if !pin(cpus.0) {
        eprintln!("vubd-floor: cannot pin to cpu {}", cpus.0);
    }
    // This VM's vCPU placement flips between a fast and a slow mode every few seconds: the
    // three floors are measured in turns of ROUND, so that each sees the same mix.
    let (mut line_s, mut ring_s, mut bare_s) = (Vec::new(), Vec::new(), Vec::new());
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        line_s.extend(line(ROUND, cpus.1));
        for (data, out) in [(true, &mut ring_s), (false, &mut bare_s)] {
            match ring::measure(ROUND, cpus.1, data) {
                Ok(s) => out.extend(s),
                Err(e) => {
                    eprintln!("vubd-floor: the ring floor's device failed: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let (line, ring, bare) = (quantiles(line_s), quantiles(ring_s), quantiles(bare_s));
    println!(
        "{:.3} floor_p50_us={:.3} floor_p99_us={:.3} ring_p50_us={:.3} ring_p99_us={:.3} \
         ring_nodata_p50_us={:.3} round_trips={} cpus={},{}",
        line.0, line.0, line.1, ring.0, ring.1, bare.0, line.2, cpus.0, cpus.1
    );
}

/// One turn of each floor, in seconds.
const ROUND: f64 = 0.02;

/// Round trips are timed in batches: the clock costs more than one bounce.
const BATCH: u64 = 256;

/// p50, p99, and round trips measured.
fn quantiles(mut samples: Vec<f64>) -> (f64, f64, u64) {
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    (q(0.5), q(0.99), samples.len() as u64 * BATCH)
}

/// Runs `f` on a thread pinned to `cpu` (the other side of a round trip).
fn spawn_on(cpu: usize, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if !pin(cpu) {
            eprintln!("vubd-floor: cannot pin to cpu {cpu}");
        }
        f()
    })
}

/// Runs `round_trip` over and over for `seconds`: µs per round trip, one sample per batch
/// of BATCH.
fn timed(seconds: f64, mut round_trip: impl FnMut()) -> Vec<f64> {
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t0 = Instant::now();
        for _ in 0..BATCH {
            round_trip();
        }
        samples.push(t0.elapsed().as_nanos() as f64 / BATCH as f64 / 1000.0);
    }
    samples
}

/// One cache line bounced between this thread and one on `echo_cpu`: round-trip times in
/// µs, one sample per batch.
fn line(seconds: f64, echo_cpu: usize) -> Vec<f64> {
    let ping = Arc::new(Line(AtomicU64::new(0)));
    let pong = Arc::new(Line(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ping, pong, stop) = (ping.clone(), pong.clone(), stop.clone());
        spawn_on(echo_cpu, move || {
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let v = ping.0.load(Ordering::Acquire);
                if v != seen {
                    seen = v;
                    pong.0.store(v, Ordering::Release);
                }
                std::hint::spin_loop();
            }
        })
    };
    let mut seq = 0u64;
    let samples = timed(seconds, || {
        seq += 1;
        ping.0.store(seq, Ordering::Release);
        while pong.0.load(Ordering::Acquire) != seq {
            std::hint::spin_loop();
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    samples
}
