//! One queue's closed loop: keeps `iodepth` requests in flight until the deadline.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;

use crate::pattern;
use crate::{Args, Rw};

/// A request that takes longer than this means the device is stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Stats {
    pub ios: u64,
    pub bytes: u64,
    pub verified: u64,
    /// Latency in nanoseconds.
    pub hist: Histogram<u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ios: 0,
            bytes: 0,
            verified: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
        }
    }

    pub fn add(&mut self, other: &Stats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.verified += other.verified;
        self.hist.add(&other.hist).expect("same histogram bounds");
    }
}

#[derive(Clone, Copy)]
struct Slot {
    submitted: Instant,
    block: u64,
    read: bool,
}

pub struct Worker<'a> {
    pub q: Blkioq,
    pub args: &'a Args,
    /// This worker's part of the mapped buffer region: `iodepth` slots of `bs` bytes.
    pub buf: usize,
    /// Blocks (of `bs`) this worker owns: [first_block, first_block + blocks).
    pub first_block: u64,
    pub blocks: u64,
    pub rng: u64,
    next_seq: u64,
    slots: Vec<Slot>,
    /// --verify: write generation per owned block (0: not written in this run), and which
    /// blocks have a request in flight (never two at once on one block).
    gens: Vec<u32>,
    busy: Vec<bool>,
    scratch: Vec<u8>,
}

impl<'a> Worker<'a> {
    pub fn new(
        q: Blkioq,
        args: &'a Args,
        buf: usize,
        first_block: u64,
        blocks: u64,
        seed: u64,
    ) -> Self {
        let now = Instant::now();
        let tracked = if args.verify { blocks as usize } else { 0 };
        Worker {
            q,
            args,
            buf,
            first_block,
            blocks,
            rng: seed | 1,
            next_seq: 0,
            slots: vec![
                Slot {
                    submitted: now,
                    block: 0,
                    read: true
                };
                args.iodepth
            ],
            gens: vec![0; tracked],
            busy: vec![false; tracked],
            scratch: Vec::new(),
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn slot_buf(&mut self, slot: usize) -> &mut [u8] {
        let bs = self.args.bs;
        // SAFETY: slot < iodepth, so the range is inside this worker's part of the mapped
        // region, which lives as long as the Blkio instance (longer than the worker); only
        // this slot's request uses it, and only between its completion and next submission.
        unsafe { std::slice::from_raw_parts_mut((self.buf + slot * bs) as *mut u8, bs) }
    }

    fn pick_block(&mut self, random: bool) -> u64 {
        loop {
            let b = if random {
                self.rand() % self.blocks
            } else {
                let b = self.next_seq;
                self.next_seq = (self.next_seq + 1) % self.blocks;
                b
            };
            if !self.args.verify || !self.busy[b as usize] {
                return b;
            }
        }
    }

    fn submit(&mut self, slot: usize) {
        let (random, read) = match self.args.rw {
            Rw::Randread => (true, true),
            Rw::Randwrite => (true, false),
            Rw::Read => (false, true),
            Rw::Write => (false, false),
            Rw::Randrw => (true, self.rand() & 1 == 0),
        };
        let block = self.pick_block(random);
        let bs = self.args.bs;
        let start = (self.first_block + block) * bs as u64;
        if self.args.verify {
            self.busy[block as usize] = true;
            if !read {
                self.gens[block as usize] += 1;
                let gen = self.gens[block as usize];
                let first = self.first_block;
                pattern::fill(self.slot_buf(slot), first + block, gen);
            }
        }
        let buf = self.slot_buf(slot).as_mut_ptr();
        self.slots[slot] = Slot {
            submitted: Instant::now(),
            block,
            read,
        };
        if read {
            self.q.read(start, buf, bs, slot, ReqFlags::empty());
        } else {
            self.q.write(start, buf, bs, slot, ReqFlags::empty());
        }
    }

    fn check(&mut self, slot: usize, stats: &mut Stats) -> Result<(), String> {
        let s = self.slots[slot];
        self.busy[s.block as usize] = false;
        let gen = self.gens[s.block as usize];
        if !s.read || gen == 0 {
            return Ok(());
        }
        let block = self.first_block + s.block;
        let mut scratch = std::mem::take(&mut self.scratch);
        let bad = pattern::mismatch(self.slot_buf(slot), block, gen, &mut scratch);
        self.scratch = scratch;
        if let Some(at) = bad {
            return Err(format!(
                "data mismatch: block {block} (offset {}), generation {gen}, first bad byte at {at}",
                block * self.args.bs as u64
            ));
        }
        stats.verified += 1;
        Ok(())
    }

    pub fn run(mut self, deadline: Instant) -> Result<Stats, String> {
        let depth = self.args.iodepth;
        let mut stats = Stats::new();
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
            if n == 0 {
                return Err(format!("no completion within {IO_TIMEOUT:?}"));
            }
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
                let lat = now.duration_since(self.slots[slot].submitted);
                stats.ios += 1;
                stats.bytes += self.args.bs as u64;
                let _ = stats.hist.record((lat.as_nanos() as u64).max(1));
                if self.args.verify {
                    self.check(slot, &mut stats)?;
                }
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
