//! vubd-bench: a closed-loop load generator for vhost-user-blk devices, built on libblkio.
//!
//! One thread per queue keeps `--iodepth` requests in flight for `--seconds`, then the
//! totals are printed as one human-readable line and one JSON line on stdout.

mod cpu;
mod pattern;
mod worker;

use blkio::{Blkio, Blkioq};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use worker::{Stats, Worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randrw => "randrw",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Closed-loop load generator for vhost-user-blk devices (libblkio)")]
pub struct Args {
    /// vhost-user socket of the device.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern (randrw is 50 % reads).
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Request size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Run time in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Use libblkio poll queues (busy-poll completions) instead of sleeping on the
    /// completion fd.
    #[arg(long)]
    poll: bool,
    /// Also report this process's CPU time (the server's) over the run, per I/O.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Verify data: writes carry a pattern unique to (block, generation); reads of blocks
    /// written in this run must return the latest one. Fails on the first mismatch.
    #[arg(long)]
    verify: bool,
    /// Only print the JSON line.
    #[arg(long)]
    json: bool,
    /// Connect and start the queues, then stay idle for --seconds without any I/O: an
    /// attached but idle frontend, to measure an idle server.
    #[arg(long)]
    hold: bool,
}

fn setup(args: &Args) -> blkio::Result<(Blkio, Vec<Blkioq>, usize, u64)> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", &args.socket.to_string_lossy())?;
    blkio.connect()?;
    let queues = args.queues as i32;
    if args.poll {
        blkio.set_i32("num-queues", 0)?;
        blkio.set_i32("num-poll-queues", queues)?;
    } else {
        blkio.set_i32("num-queues", queues)?;
    }
    let outcome = blkio.start()?;
    let queues = if args.poll {
        outcome.poll_queues
    } else {
        outcome.queues
    };
    let capacity = blkio.get_u64("capacity")?;

    let align = blkio.get_u64("mem-region-alignment")?.max(4096) as usize;
    let len = (args.queues * args.iodepth * args.bs).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(len)?;
    blkio.map_mem_region(&region)?;
    // SAFETY: the region is `len` bytes of fresh, writable, mapped memory; nothing uses it
    // yet. Written data is a non-zero byte pattern.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, len) };
    Ok((blkio, queues, region.addr, capacity))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.bs == 0 || args.bs % 512 != 0 || args.iodepth == 0 || args.queues == 0 {
        eprintln!(
            "vubd-bench: --bs must be a non-zero multiple of 512, --iodepth and --queues non-zero"
        );
        return ExitCode::FAILURE;
    }
    let (_blkio, queues, buf, capacity) = match setup(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vubd-bench: {}: {e}", args.socket.display());
            return ExitCode::FAILURE;
        }
    };
    let blocks_per_queue = capacity / args.bs as u64 / args.queues as u64;
    if blocks_per_queue == 0 {
        eprintln!("vubd-bench: device of {capacity} bytes is too small for --bs/--queues");
        return ExitCode::FAILURE;
    }

    if args.hold {
        let server_cpu0 = args.server_pid.and_then(cpu::process_cpu);
        std::thread::sleep(Duration::from_secs_f64(args.seconds));
        let used = cpu::process_cpu_since(args.server_pid, server_cpu0)
            .map_or("null".into(), |c| format!("{c:.4}"));
        println!(
            "{{\"hold_seconds\":{:.3},\"server_cpu_s\":{used}}}",
            args.seconds
        );
        return ExitCode::SUCCESS;
    }
    let client_cpu0 = cpu::self_cpu();
    let server_cpu0 = args.server_pid.and_then(cpu::process_cpu);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let results: Vec<Result<Stats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                // Each queue owns a disjoint stripe of the disk (needed for --verify).
                let w = Worker::new(
                    q,
                    &args,
                    buf + i * args.iodepth * args.bs,
                    i as u64 * blocks_per_queue,
                    blocks_per_queue,
                    0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                );
                s.spawn(move || w.run(deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let client_cpu = (cpu::self_cpu() - client_cpu0).as_secs_f64();
    let server_cpu = cpu::process_cpu_since(args.server_pid, server_cpu0);

    let mut total = Stats::new();
    for r in results {
        match r {
            Ok(s) => total.add(&s),
            Err(e) => {
                eprintln!("vubd-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    report(&args, &total, elapsed, client_cpu, server_cpu);
    ExitCode::SUCCESS
}

fn report(args: &Args, t: &Stats, elapsed: f64, client_cpu: f64, server_cpu: Option<f64>) {
    let iops = t.ios as f64 / elapsed;
    let mib_s = t.bytes as f64 / elapsed / (1024.0 * 1024.0);
    let us = |ns: u64| ns as f64 / 1000.0;
    let (mean, p50, p99, p999) = (
        t.hist.mean() / 1000.0,
        us(t.hist.value_at_quantile(0.5)),
        us(t.hist.value_at_quantile(0.99)),
        us(t.hist.value_at_quantile(0.999)),
    );
    let per_io = |cpu: f64| {
        if t.ios > 0 {
            cpu * 1e6 / t.ios as f64
        } else {
            0.0
        }
    };
    if !args.json {
        let server = server_cpu.map_or(String::new(), |c| {
            format!(
                ", server CPU {:.0}% ({:.2} us/io)",
                100.0 * c / elapsed,
                per_io(c)
            )
        });
        println!(
            "{} bs={} iodepth={} queues={}{}: {:.0} IOPS, {:.1} MiB/s, latency us mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1}; \
             client CPU {:.0}% ({:.2} us/io){}{}",
            args.rw.name(),
            args.bs,
            args.iodepth,
            args.queues,
            if args.poll { " poll" } else { "" },
            iops,
            mib_s,
            mean,
            p50,
            p99,
            p999,
            100.0 * client_cpu / elapsed,
            per_io(client_cpu),
            server,
            if args.verify { format!("; {} reads verified", t.verified) } else { String::new() },
        );
    }
    let server_json = server_cpu.map_or("null".to_string(), |c| format!("{c:.4}"));
    let server_per_io = server_cpu.map_or("null".to_string(), |c| format!("{:.3}", per_io(c)));
    println!(
        "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"queues\":{},\"poll\":{},\"seconds\":{:.3},\"ios\":{},\"iops\":{:.1},\"mib_s\":{:.2},\"lat_mean_us\":{:.2},\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"lat_p999_us\":{:.2},\"client_cpu_s\":{:.4},\"client_cpu_us_per_io\":{:.3},\"server_cpu_s\":{},\"server_cpu_us_per_io\":{},\"verified\":{}}}",
        args.rw.name(),
        args.bs,
        args.iodepth,
        args.queues,
        args.poll,
        elapsed,
        t.ios,
        iops,
        mib_s,
        mean,
        p50,
        p99,
        p999,
        client_cpu,
        per_io(client_cpu),
        server_json,
        server_per_io,
        t.verified
    );
}
