//! The queues of one device that run on reactors, as the control plane and management see
//! them: where each runs, how to ask it for its counters without stopping it, and the
//! counters of queues that already stopped (so totals never go backwards).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::stats::IoStats;
use crate::engine::{Poller, PollerId, ReactorHandle};

/// Reads a running queue's counters and requests in flight, on its reactor.
pub type SnapshotFn = fn(&mut dyn Poller) -> Option<(IoStats, u32)>;

#[derive(Clone)]
pub struct RunningQueue {
    pub index: u16,
    pub reactor: ReactorHandle,
    pub poller: PollerId,
    pub snapshot: SnapshotFn,
}

/// One queue's counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct QueueSnapshot {
    pub index: u16,
    /// Reactor index and CPU, if the queue runs now.
    pub reactor: Option<(usize, usize)>,
    pub stats: IoStats,
    pub in_flight: u32,
}

#[derive(Default)]
struct Retired {
    /// Totals of queue runs that ended, by queue index.
    totals: BTreeMap<u16, IoStats>,
    /// The latest runs that ended: a live snapshot taken just before one of them ended is
    /// already in `totals` and must not be counted twice.
    recent: std::collections::VecDeque<PollerId>,
}

#[derive(Default)]
pub struct Queues {
    running: Mutex<Vec<RunningQueue>>,
    retired: Mutex<Retired>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Queues {
    pub fn started(&self, q: RunningQueue) {
        let mut running = lock(&self.running);
        running.retain(|r| r.index != q.index);
        running.push(q);
    }

    /// Queue `index` stopped with these final counters.
    pub fn stopped(&self, index: u16, poller: PollerId, stats: &IoStats) {
        lock(&self.running).retain(|r| r.poller != poller);
        let mut retired = lock(&self.retired);
        retired.totals.entry(index).or_default().add(stats);
        if retired.recent.len() == 256 {
            retired.recent.pop_front();
        }
        retired.recent.push_back(poller);
    }

    pub fn running(&self) -> Vec<RunningQueue> {
        lock(&self.running).clone()
    }

    /// Every queue's counters: retired totals plus a live snapshot of running queues, each
    /// asked of its reactor by message (the reactor answers between passes, without
    /// stopping the queue). Live snapshots are taken first: a run that ends meanwhile is
    /// then found in the retired totals, and counted once.
    pub fn snapshot(&self, timeout: Duration) -> Vec<QueueSnapshot> {
        let mut live = Vec::new();
        for q in self.running() {
            let (id, f) = (q.poller, q.snapshot);
            let got = q
                .reactor
                .call(timeout, move |r| r.poller_mut(id).and_then(f))
                .flatten();
            live.push((q, got));
        }
        let retired = lock(&self.retired);
        let mut out: BTreeMap<u16, QueueSnapshot> = retired
            .totals
            .iter()
            .map(|(&index, stats)| {
                let stats = stats.clone();
                (
                    index,
                    QueueSnapshot {
                        index,
                        stats,
                        ..QueueSnapshot::default()
                    },
                )
            })
            .collect();
        for (q, got) in live {
            let e = out.entry(q.index).or_insert_with(|| QueueSnapshot {
                index: q.index,
                ..QueueSnapshot::default()
            });
            if retired.recent.contains(&q.poller) {
                continue;
            }
            e.reactor = Some((q.reactor.index, q.reactor.cpu));
            if let Some((stats, in_flight)) = got {
                e.stats.add(&stats);
                e.in_flight = in_flight;
            }
        }
        out.into_values().collect()
    }
}
