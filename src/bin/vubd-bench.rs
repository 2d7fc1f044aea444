//! vubd-bench: a closed-loop load generator for vhost-user-blk devices, built on libblkio.
//!
//! One thread per queue keeps `--iodepth` requests in flight for `--seconds`, then the
//! totals are printed as one human-readable line and one JSON line on stdout.

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
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
struct Args {
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
}

/// A request that takes longer than this means the device is stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Stats {
    ios: u64,
    bytes: u64,
    latency: Duration,
}

/// One queue's closed loop.
struct Worker<'a> {
    q: Blkioq,
    args: &'a Args,
    /// Address of this worker's part of the mapped buffer region: `iodepth` slots of `bs`.
    buf: usize,
    /// Blocks (of `bs`) this worker may address: [first_block, first_block + blocks).
    first_block: u64,
    blocks: u64,
    next_seq: u64,
    rng: u64,
    submitted_at: Vec<Instant>,
}

impl Worker<'_> {
    fn rand(&mut self) -> u64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn submit(&mut self, slot: usize) {
        let (random, read) = match self.args.rw {
            Rw::Randread => (true, true),
            Rw::Randwrite => (true, false),
            Rw::Read => (false, true),
            Rw::Write => (false, false),
            Rw::Randrw => (true, self.rand() & 1 == 0),
        };
        let block = if random {
            self.rand() % self.blocks
        } else {
            let b = self.next_seq;
            self.next_seq = (self.next_seq + 1) % self.blocks;
            b
        };
        let bs = self.args.bs;
        let start = (self.first_block + block) * bs as u64;
        let buf = (self.buf + slot * bs) as *mut u8;
        self.submitted_at[slot] = Instant::now();
        if read {
            self.q.read(start, buf, bs, slot, ReqFlags::empty());
        } else {
            self.q.write(start, buf, bs, slot, ReqFlags::empty());
        }
    }

    fn run(mut self, deadline: Instant) -> Result<Stats, String> {
        let depth = self.args.iodepth;
        let mut stats = Stats::default();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        for slot in 0..depth {
            self.submit(slot);
        }
        let mut in_flight = depth;
        while in_flight > 0 {
            let mut timeout = IO_TIMEOUT;
            let n = self
                .q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(|e| format!("waiting for completions: {e}"))?;
            let now = Instant::now();
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` elements.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    return Err(format!(
                        "request failed: {}",
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                }
                let slot = c.user_data;
                stats.ios += 1;
                stats.bytes += self.args.bs as u64;
                stats.latency += now - self.submitted_at[slot];
                in_flight -= 1;
                if now < deadline {
                    self.submit(slot);
                    in_flight += 1;
                }
            }
        }
        Ok(stats)
    }
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

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let results: Vec<Result<Stats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let worker = Worker {
                    q,
                    args: &args,
                    buf: buf + i * args.iodepth * args.bs,
                    // Sequential patterns get a disjoint stripe per queue; random ones too.
                    first_block: i as u64 * blocks_per_queue,
                    blocks: blocks_per_queue,
                    next_seq: 0,
                    rng: 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                    submitted_at: vec![started; args.iodepth],
                };
                s.spawn(move || worker.run(deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();

    let mut total = Stats::default();
    for r in results {
        match r {
            Ok(s) => {
                total.ios += s.ios;
                total.bytes += s.bytes;
                total.latency += s.latency;
            }
            Err(e) => {
                eprintln!("vubd-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let iops = total.ios as f64 / elapsed;
    let mib_s = total.bytes as f64 / elapsed / (1024.0 * 1024.0);
    let lat_us = if total.ios > 0 {
        total.latency.as_secs_f64() * 1e6 / total.ios as f64
    } else {
        0.0
    };
    println!(
        "{} bs={} iodepth={} queues={}{}: {:.0} IOPS, {:.1} MiB/s, mean latency {:.1} us ({} ios in {:.2} s)",
        args.rw.name(),
        args.bs,
        args.iodepth,
        args.queues,
        if args.poll { " poll" } else { "" },
        iops,
        mib_s,
        lat_us,
        total.ios,
        elapsed
    );
    println!(
        "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"queues\":{},\"poll\":{},\"seconds\":{:.3},\"ios\":{},\"iops\":{:.1},\"mib_s\":{:.2},\"lat_mean_us\":{:.2}}}",
        args.rw.name(),
        args.bs,
        args.iodepth,
        args.queues,
        args.poll,
        elapsed,
        total.ios,
        iops,
        mib_s,
        lat_us
    );
    ExitCode::SUCCESS
}
