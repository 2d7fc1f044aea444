//! vubd-bench-packed: a closed-loop load generator on virtio-driver (the crate under
//! libblkio), to measure split and packed virtqueues side by side with the same client:
//! libblkio 0.5 never negotiates VIRTIO_F_RING_PACKED, virtio-driver has a packed ring.
//!
//! One queue keeps `--iodepth` requests in flight for `--seconds`; the totals are printed as
//! one human-readable line and one JSON line, like vubd-bench's.
//!
//! ```sh
//! vubd-bench-packed --socket /tmp/vubd.sock --ring packed --iodepth 32 --seconds 5 [--poll]
//! ```

#[path = "../vubd-bench/cpu.rs"]
mod cpu;
mod transport;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use virtio_driver::{VirtioBlkQueue, VirtioBlkTransport, VirtioTransport};

/// A request that takes longer than this means the device is stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Ring {
    Split,
    Packed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
}

#[derive(Parser, Debug)]
#[command(about = "Closed-loop load generator on virtio-driver: split or packed virtqueues")]
struct Args {
    /// vhost-user socket of the device.
    #[arg(long)]
    socket: PathBuf,
    /// Virtqueue layout.
    #[arg(long, value_enum, default_value_t = Ring::Packed)]
    ring: Ring,
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Request size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Virtqueue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Run time in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Busy-poll the used ring instead of sleeping on the call eventfd.
    #[arg(long)]
    poll: bool,
    /// Also report this process's CPU time (the server's) over the run, per I/O.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Only print the JSON line.
    #[arg(long)]
    json: bool,
}

struct Stats {
    ios: u64,
    hist: Histogram<u64>,
}

/// A shared memory region for the data buffers, mapped here and in the server.
struct Buffers {
    base: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

impl Buffers {
    fn new(len: usize, vhost: &mut VirtioBlkTransport) -> std::io::Result<Buffers> {
        // SAFETY: NUL-terminated literal; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"vubd-bench-buffers".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone()?).set_len(len as u64)?;
        // SAFETY: a new shared mapping of our own memfd of `len` bytes; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        vhost.map_mem_region(p as usize, len, fd.as_raw_fd(), 0)?;
        // SAFETY: `len` bytes of fresh writable memory; a non-zero pattern for writes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len) };
        Ok(Buffers {
            base: p.cast(),
            len,
            _fd: fd,
        })
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once, after the queue is gone.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn wait_readable(fd: i32) -> Result<(), String> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, IO_TIMEOUT.as_millis() as i32) };
    match n {
        0 => Err(format!("no completion within {IO_TIMEOUT:?}")),
        n if n < 0 => Err(format!("poll: {}", std::io::Error::last_os_error())),
        _ => Ok(()),
    }
}

fn run(args: &Args) -> Result<(Stats, f64, f64, Option<f64>), String> {
    let path = args.socket.to_string_lossy();
    let packed = args.ring == Ring::Packed;
    let mut conn =
        transport::Connection::connect(&path, packed).map_err(|e| format!("{path}: {e}"))?;
    let cfg = conn
        .vhost
        .get_config()
        .map_err(|e| format!("GET_CONFIG: {e}"))?;
    let capacity = { cfg.capacity };
    let blocks = u64::from(capacity) * 512 / args.bs as u64;
    if blocks == 0 {
        return Err("device too small for --bs".into());
    }
    let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut conn.vhost, 1, args.queue_size)
        .map_err(|e| format!("queue setup: {e}"))?;
    let kick = conn.kick(0).map_err(|e| format!("ring start: {e}"))?;
    let vhost: &mut VirtioBlkTransport = &mut conn.vhost;
    let call = vhost.get_completion_fd(0);
    let bufs = Buffers::new(args.iodepth * args.bs, vhost).map_err(|e| format!("buffers: {e}"))?;
    let q = &mut queues[0];

    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut submitted = vec![Instant::now(); args.iodepth];
    let mut done: Vec<usize> = Vec::with_capacity(args.iodepth);
    let mut stats = Stats {
        ios: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
    };
    let read = args.rw == Rw::Randread;
    let bs = args.bs;
    let mut submit = |q: &mut VirtioBlkQueue<usize>, slot: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let offset = (rng % blocks) * bs as u64;
        // SAFETY: slot < iodepth: the buffer lies in our mapping, used by this request only
        // until it completes.
        let buf = unsafe { bufs.base.add(slot * bs) };
        // SAFETY: as above; the mapping outlives the queue's use of it.
        let r = unsafe {
            if read {
                q.read_raw(offset, buf, bs, slot)
            } else {
                q.write_raw(offset, buf, bs, slot)
            }
        };
        r.map_err(|e| format!("submit: {e}"))
    };

    let client_cpu0 = cpu::self_cpu();
    let server_cpu0 = args.server_pid.and_then(cpu::process_cpu);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    q.set_used_notif_enabled(false);
    for (slot, at) in submitted.iter_mut().enumerate() {
        *at = Instant::now();
        submit(q, slot)?;
    }
    if q.avail_notif_needed() {
        kick.notify().map_err(|e| format!("kick: {e}"))?;
    }
    let mut in_flight = args.iodepth;
    let mut idle_since = Instant::now();
    while in_flight > 0 {
        done.clear();
        for c in q.completions() {
            if c.ret != 0 {
                return Err(format!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
            done.push(c.context);
        }
        if done.is_empty() {
            if args.poll {
                if idle_since.elapsed() > IO_TIMEOUT {
                    return Err(format!("no completion within {IO_TIMEOUT:?}"));
                }
                std::hint::spin_loop();
                continue;
            }
            // Sleep on the call eventfd: ask for used notifications, look once more (the
            // race), wait, and turn them off again (libblkio's do_io).
            q.set_used_notif_enabled(true);
            if !q.completions().has_next() {
                wait_readable(call.as_raw_fd())?;
                let _ = call.read();
            }
            q.set_used_notif_enabled(false);
            continue;
        }
        let now = Instant::now();
        idle_since = now;
        let mut more = false;
        for &slot in &done {
            let lat = now.duration_since(submitted[slot]);
            stats.ios += 1;
            let _ = stats.hist.record((lat.as_nanos() as u64).max(1));
            if now < deadline {
                submitted[slot] = now;
                submit(q, slot)?;
                more = true;
            } else {
                in_flight -= 1;
            }
        }
        if more && q.avail_notif_needed() {
            kick.notify().map_err(|e| format!("kick: {e}"))?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let client_cpu = (cpu::self_cpu() - client_cpu0).as_secs_f64();
    let server_cpu = cpu::process_cpu_since(args.server_pid, server_cpu0);
    drop(queues);
    drop(bufs);
    Ok((stats, elapsed, client_cpu, server_cpu))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.bs == 0 || args.bs % 512 != 0 || args.iodepth == 0 {
        eprintln!("vubd-bench-packed: --bs must be a non-zero multiple of 512, --iodepth non-zero");
        return ExitCode::FAILURE;
    }
    if args.iodepth > usize::from(args.queue_size) / 3 {
        eprintln!(
            "vubd-bench-packed: --iodepth above a third of --queue-size (3 descriptors a request)"
        );
        return ExitCode::FAILURE;
    }
    let (t, elapsed, client_cpu, server_cpu) = match run(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vubd-bench-packed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let iops = t.ios as f64 / elapsed;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (mean, p50, p99) = (
        t.hist.mean() / 1000.0,
        us(t.hist.value_at_quantile(0.5)),
        us(t.hist.value_at_quantile(0.99)),
    );
    let per_io = |cpu: f64| {
        if t.ios > 0 {
            cpu * 1e6 / t.ios as f64
        } else {
            0.0
        }
    };
    let ring = match args.ring {
        Ring::Split => "split",
        Ring::Packed => "packed",
    };
    let rw = match args.rw {
        Rw::Randread => "randread",
        Rw::Randwrite => "randwrite",
    };
    if !args.json {
        let server = server_cpu.map_or(String::new(), |c| {
            format!(", server CPU {:.2} us/io", per_io(c))
        });
        println!(
            "{ring} {rw} bs={} iodepth={}{}: {:.0} IOPS, latency us mean {:.2} p50 {:.2} p99 {:.2}; client CPU {:.2} us/io{}",
            args.bs,
            args.iodepth,
            if args.poll { " poll" } else { "" },
            iops,
            mean,
            p50,
            p99,
            per_io(client_cpu),
            server
        );
    }
    let server_json = server_cpu.map_or("null".to_string(), |c| format!("{:.3}", per_io(c)));
    println!(
        "{{\"ring\":\"{ring}\",\"rw\":\"{rw}\",\"bs\":{},\"iodepth\":{},\"poll\":{},\"seconds\":{:.3},\"ios\":{},\"iops\":{:.1},\"lat_mean_us\":{:.3},\"lat_p50_us\":{:.3},\"lat_p99_us\":{:.3},\"client_cpu_us_per_io\":{:.3},\"server_cpu_us_per_io\":{}}}",
        args.bs,
        args.iodepth,
        args.poll,
        elapsed,
        t.ios,
        iops,
        mean,
        p50,
        p99,
        per_io(client_cpu),
        server_json
    );
    ExitCode::SUCCESS
}
