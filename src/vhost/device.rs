//! One vhost-user connection's view of a block device: negotiation, memory table, vring
//! setup, config space. Implements the vhost crate's request handler; every value a frontend
//! sends is checked here before anything reaches a reactor.

use std::any::Any;
use std::fs::File;
use std::os::unix::io::AsFd;
use std::sync::Arc;
use std::time::Duration;

use crate::guestmem::dirty::{DirtyLog, LogArea};
use crate::guestmem::GuestMemoryMmap;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};

use super::connection::ConnShared;
use super::memory::{MemoryTable, MAX_MEM_SLOTS};
use super::vring::Vring;
use super::watchdog::Watchdog;
use crate::blk::queues::RunningQueue;
use crate::blk::stats::IoStats;
use crate::blk::Device;
use crate::engine::eventfd::is_eventfd;
use crate::engine::{Poller, PollerId};
use crate::virtio_blk::config;
use crate::virtio_blk::features::{bit, device_features};
use crate::virtio_blk::features::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX,
};
use crate::virtio_blk::inflight::{InflightRegion, Layout};
use crate::virtio_blk::notify::{CallFdError, EventFdNotifier, SignalRing};
use crate::virtio_blk::packed::{PackedInflight, PackedRing, PackedRingConfig, VringBase};
use crate::virtio_blk::queue::{QueueStart, Ring, VirtQueue};
use crate::virtio_blk::running;
use crate::virtio_blk::split;

/// Largest virtqueue accepted (QEMU's limit for vhost-user-blk).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// How long a connection waits for a reactor to drain a queue before giving up on it. Only
/// this device's connection waits: other devices have threads of their own.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The queue type vhost-user runs on reactors.
type UserQueue = VirtQueue<EventFdNotifier>;

/// The device logs the guest pages it writes to the log SET_LOG_BASE shared (migration).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// vhost-user protocol features. Never STATUS: the vhost crate has no handler for it.
/// REPLY_ACK is added by the crate itself. INFLIGHT_SHMFD lets a frontend that reconnects to a
/// restarted vubd have its in-flight requests resubmitted. BACKEND_REQ gives us the socket on
/// which a resize is announced (CONFIG_CHANGE_MSG). LOG_SHMFD (the log as shared memory) with
/// VHOST_F_LOG_ALL makes live migration possible, for every backend whose data another
/// process can reach (not a RAM disk: QEMU then refuses to migrate, naming the feature).
pub fn protocol_features(device: &Device) -> VhostUserProtocolFeatures {
    let base = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ;
    if migratable(device) {
        base | VhostUserProtocolFeatures::LOG_SHMFD
    } else {
        base
    }
}

fn migratable(device: &Device) -> bool {
    !device.backend.process_local()
}

/// The virtio features a vhost-user device offers: the device's, packed rings (vubd runs
/// them itself, `virtio_blk::packed`; QEMU asks for them with `packed=on`), protocol
/// features, and dirty logging where migration is possible.
fn features(device: &Device) -> u64 {
    let log = if migratable(device) {
        VHOST_F_LOG_ALL
    } else {
        0
    };
    device_features(&device.model)
        | bit(VIRTIO_F_RING_PACKED)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | log
}

/// A call fd, checked and set up to be signalled without ever blocking a reactor.
fn signal_ring(call: &File) -> Result<SignalRing> {
    SignalRing::new(call).map_err(|e| match e {
        CallFdError::NotEventFd => invalid("SET_VRING_CALL with an fd that is not an eventfd"),
        CallFdError::Ring(e) => {
            log::warn!("cannot set up the call fd: {e}");
            Error::ReqHandlerError(e)
        }
    })
}

fn invalid(msg: &'static str) -> Error {
    log::warn!("frontend error: {msg}");
    Error::InvalidOperation(msg)
}

/// Reads a running vhost-user queue's counters (on its reactor).
fn snapshot(p: &mut dyn Poller) -> Option<(IoStats, u32)> {
    let any: &mut dyn Any = p;
    any.downcast_mut::<UserQueue>()
        .map(|q| (q.stats(), q.in_flight()))
}

pub struct VhostDevice {
    device: Arc<Device>,
    /// What this connection shares with the registry (the backend request channel).
    shared: Arc<ConnShared>,
    /// The connection's id, for the watchdog.
    conn: u64,
    acked_features: u64,
    acked_protocol: u64,
    memory: MemoryTable,
    /// The dirty log of a migration, shared with every region of `memory`.
    log: Arc<DirtyLog>,
    vrings: Vec<Vring>,
    /// INFLIGHT_SHMFD region, kept by the frontend across restarts of vubd.
    inflight: Option<Arc<InflightRegion>>,
    /// Per queue: the inflight region is the one GET_INFLIGHT_FD just made and the queue has
    /// not run on it yet. A packed ring keeps its positions only there (not in guest memory):
    /// a fresh record starts at the frontend's vring base, a used one (SET_INFLIGHT_FD after
    /// a restart) says where the ring stands.
    inflight_fresh: Vec<bool>,
    /// Paused while we wait for reactors, so only the frontend's own stalls count.
    watchdog: Arc<Watchdog>,
}

impl VhostDevice {
    pub fn new(
        device: Arc<Device>,
        shared: Arc<ConnShared>,
        conn: u64,
        watchdog: Arc<Watchdog>,
    ) -> VhostDevice {
        let vrings = (0..device.model.num_queues())
            .map(|_| Vring::default())
            .collect();
        let log = Arc::new(DirtyLog::default());
        VhostDevice {
            device,
            shared,
            conn,
            acked_features: 0,
            acked_protocol: 0,
            memory: MemoryTable::new(conn, Arc::clone(&log)),
            log,
            vrings,
            inflight: None,
            inflight_fresh: Vec::new(),
            watchdog,
        }
    }

    pub fn name(&self) -> &str {
        &self.device.name
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("vring index out of range"))
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// The frontend negotiated packed virtqueues: every ring of the device is packed.
    fn packed(&self) -> bool {
        self.acked_features & bit(VIRTIO_F_RING_PACKED) != 0
    }

    /// The inflight layout the negotiated features call for.
    fn inflight_layout(&self) -> Layout {
        if self.packed() {
            Layout::Packed
        } else {
            Layout::Split
        }
    }

    /// Starts ring `q` on its reactor once everything it needs has arrived. Per the vhost-user
    /// spec a ring starts on SET_VRING_KICK, and runs only while enabled when protocol
    /// features were negotiated.
    fn maybe_start(&mut self, q: u16) -> Result<()> {
        let enabled_needed = self.protocol_features_acked();
        let mem = self.memory.snapshot();
        let v = &self.vrings[usize::from(q)];
        if v.poller.is_some() || v.kick.is_none() || (enabled_needed && !v.enabled) {
            return Ok(());
        }
        if v.size == 0 || !v.addr_set {
            return Err(invalid(
                "ring kicked before its size and addresses were set",
            ));
        }
        let mem = mem.ok_or_else(|| invalid("ring kicked before any memory was shared"))?;
        if self.packed() {
            let start = self.packed_start(q, mem)?;
            return self.launch(q, move |notifier, ctx| UserQueue::new(start, notifier, ctx));
        }
        let mut queue = self.build_queue(q, &mem)?;
        let mut inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(q, queue.size()));
        if self.inflight.is_some() && inflight.is_none() {
            log::warn!(
                "device {}: queue {q} is not covered by the inflight region",
                self.name()
            );
        }
        let mut resubmit = Vec::new();
        if let Some(t) = inflight.as_mut() {
            // The used index in guest memory is the truth; every request taken since then and
            // not yet used is marked in the region. Continue after all of them (as
            // libvhost-user does): the frontend's vring base cannot know about them.
            let used = queue.next_used();
            let avail = split::avail_idx(&queue, &mem)
                .ok_or_else(|| invalid("the avail ring is not in shared memory"))?
                .0;
            match t.recover_outstanding(used, avail) {
                Ok(heads) => {
                    resubmit = heads;
                    // Fits: at most `avail - used` heads.
                    queue.set_next_avail(used.wrapping_add(resubmit.len() as u16));
                    if !resubmit.is_empty() {
                        log::info!(
                            "device {}: queue {q}: resubmitting {} in-flight request(s) from before the restart",
                            self.name(),
                            resubmit.len()
                        );
                    }
                }
                // The queue goes on from the frontend's vring base; only this frontend's own
                // requests are at stake.
                Err(marked) => log::error!(
                    "device {}: queue {q}: the frontend's inflight region marks {marked} request(s) in flight but the driver has {} outstanding: region reset, nothing resubmitted",
                    self.name(),
                    avail.wrapping_sub(used)
                ),
            }
        }
        let start = QueueStart {
            device: Arc::clone(&self.device.name),
            index: q,
            ring: Ring::Split { queue, inflight },
            mem,
            model: Arc::clone(&self.device.model),
            backend: Arc::clone(&self.device.backend),
            kick: self.kick_dup(q)?,
            resubmit,
            latency: self.device.latency_histograms,
        };
        self.launch(q, move |notifier, ctx| UserQueue::new(start, notifier, ctx))
    }

    /// A duplicate of ring `q`'s kick fd, if it has one.
    fn kick_dup(&self, q: u16) -> Result<Option<File>> {
        match self.vrings[usize::from(q)]
            .kick
            .as_ref()
            .and_then(Option::as_ref)
        {
            Some(f) => f.try_clone().map(Some).map_err(Error::ReqHandlerError),
            None => Ok(None),
        }
    }

    /// Adds the poller `build` makes for ring `q` on its reactor.
    fn launch<F>(&mut self, q: u16, build: F) -> Result<()>
    where
        F: FnOnce(EventFdNotifier, &mut crate::engine::Ctx<'_>) -> std::io::Result<UserQueue>
            + Send
            + 'static,
    {
        let v = &mut self.vrings[usize::from(q)];
        let signal = v.call.as_ref().map(signal_ring).transpose()?;
        let id = PollerId::next();
        v.poller = Some(id);
        let reactor = self.device.placement(q).clone();
        self.device.queues.started(RunningQueue {
            index: q,
            reactor: reactor.clone(),
            poller: id,
            snapshot,
        });
        reactor.run(move |r| {
            r.add_poller(id, move |ctx| {
                let notifier = EventFdNotifier::new(signal);
                match build(notifier, ctx) {
                    Ok(q) => Some(Box::new(q) as Box<dyn Poller>),
                    Err(e) => {
                        log::error!("cannot open the backend channel of queue {q}: {e}");
                        None
                    }
                }
            })
        });
        Ok(())
    }

    /// A packed ring (VIRTIO_F_RING_PACKED): SET_VRING_ADDR's descriptor address is the
    /// descriptor ring, its avail address the driver area (the driver's event suppression
    /// structure), its used address the device area (ours). The ring starts at the vring base,
    /// or where the inflight record says it stands after a restart, with the chains a killed
    /// vubd had taken resubmitted first.
    fn packed_start(&mut self, q: u16, mem: Arc<GuestMemoryMmap>) -> Result<QueueStart> {
        let v = &self.vrings[usize::from(q)];
        let size = v.size;
        let desc = self.memory.vva_to_gpa(v.desc, 16 * u64::from(size));
        let driver_event = self.memory.vva_to_gpa(v.avail, 4);
        let device_event = self.memory.vva_to_gpa(v.used, 4);
        let (Some(desc_table), Some(driver_event), Some(device_event)) =
            (desc, driver_event, device_event)
        else {
            return Err(invalid("vring address outside the shared memory"));
        };
        let cfg = PackedRingConfig {
            size,
            desc_table,
            driver_event,
            device_event,
            event_idx: self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
        };
        cfg.check(&mem).map_err(invalid)?;
        let base = match v.base {
            None => VringBase::START,
            Some(b) => VringBase::decode(b, size)
                .ok_or_else(|| invalid("packed vring base beyond the ring size"))?,
        };
        let mut base = base;
        let mut resubmit = Vec::new();
        let mut inflight = self
            .inflight
            .as_ref()
            .and_then(|r| PackedInflight::of(r, q, size));
        if self.inflight.is_some() && inflight.is_none() {
            log::warn!(
                "device {}: queue {q} is not covered by the inflight region",
                self.name()
            );
        }
        if let Some(t) = inflight.as_mut() {
            let fresh = std::mem::take(&mut self.inflight_fresh[usize::from(q)]);
            if fresh {
                t.reset(base);
            } else {
                // The record is the truth: the frontend cannot know which chains a killed
                // vubd had taken nor which it had used.
                match t.recover(&mem, desc_table) {
                    Ok(rec) => {
                        base = rec.base;
                        resubmit = rec.heads;
                    }
                    Err(e) => {
                        log::warn!(
                            "device {}: queue {q}: inflight record unusable ({e}); starting at the vring base",
                            self.name()
                        );
                        t.reset(base);
                    }
                }
            }
            if !resubmit.is_empty() {
                log::info!(
                    "device {}: queue {q}: resubmitting {} in-flight request(s) from before the restart",
                    self.name(),
                    resubmit.len()
                );
            }
        }
        Ok(QueueStart {
            device: Arc::clone(&self.device.name),
            index: q,
            ring: Ring::Packed {
                ring: PackedRing::new(cfg, base),
                inflight,
            },
            mem,
            model: Arc::clone(&self.device.model),
            backend: Arc::clone(&self.device.backend),
            kick: self.kick_dup(q)?,
            resubmit,
            latency: self.device.latency_histograms,
        })
    }

    fn build_queue(&self, q: u16, mem: &GuestMemoryMmap) -> Result<Queue> {
        let v = &self.vrings[usize::from(q)];
        let n = u64::from(v.size);
        // Ring sizes from the virtio spec (split ring, with the event-idx words).
        let desc = self.memory.vva_to_gpa(v.desc, 16 * n);
        let avail = self.memory.vva_to_gpa(v.avail, 6 + 2 * n);
        let used = self.memory.vva_to_gpa(v.used, 6 + 8 * n);
        let (Some(desc), Some(avail), Some(used)) = (desc, avail, used) else {
            return Err(invalid("vring address outside the shared memory"));
        };
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| Error::BackendInternalError)?;
        queue
            .try_set_size(v.size)
            .map_err(|_| invalid("bad vring size"))?;
        queue
            .try_set_desc_table_address(desc)
            .and_then(|_| queue.try_set_avail_ring_address(avail))
            .and_then(|_| queue.try_set_used_ring_address(used))
            .map_err(|_| invalid("misaligned vring address"))?;
        queue.set_event_idx(self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        // Fits: SET_VRING_BASE of a split ring was checked to be 16 bits.
        queue.set_next_avail(v.base.unwrap_or(0) as u16);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(invalid("vring outside the shared memory"));
        }
        // Continue where the used ring stands: after GET_VRING_BASE every popped chain was
        // completed, so this equals the base unless the frontend rewrote the ring.
        let used_idx = queue
            .used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|_| invalid("used ring unreadable"))?;
        queue.set_next_used(used_idx.0);
        Ok(queue)
    }

    /// Stops ring `q` if it runs: the reactor drains its in-flight I/O first, so the base we
    /// keep (and GET_VRING_BASE returns) is exact.
    fn stop(&mut self, q: u16) {
        let Some(id) = self.vrings[usize::from(q)].poller.take() else {
            return;
        };
        let rx = running::stop::<EventFdNotifier>(&self.device, q, id);
        let outcome = self
            .watchdog
            .paused(self.conn, || rx.recv_timeout(STOP_TIMEOUT));
        if let Some(stopped) = running::stopped(&self.device, q, id, outcome, STOP_TIMEOUT) {
            self.vrings[usize::from(q)].base = Some(stopped.base);
        }
    }

    fn stop_all(&mut self) {
        for q in 0..self.vrings.len() as u16 {
            self.stop(q);
        }
    }

    /// Sends the current memory snapshot to every running queue of this connection and waits
    /// until each reactor has applied it: the frontend may use a new region as soon as its
    /// message is acknowledged.
    fn publish_memory(&mut self) {
        let Some(mem) = self.memory.snapshot() else {
            return;
        };
        let waits = running::publish_memory::<EventFdNotifier>(
            &self.device,
            self.vrings
                .iter()
                .enumerate()
                // Fits: at most 256 queues.
                .filter_map(|(q, v)| Some((q as u16, v.poller?))),
            &mem,
        );
        self.watchdog.paused(self.conn, || {
            for rx in waits {
                let _ = rx.recv_timeout(STOP_TIMEOUT);
            }
        });
    }

    /// Waits until every reactor that runs (or ran) a queue of this device has gone through
    /// its loop once: from then on none uses a dirty log pointer it loaded before.
    fn quiesce(&self) {
        let mut seen = Vec::new();
        let mut waits = Vec::new();
        for q in 0..self.device.model.num_queues() {
            let reactor = self.device.placement(q);
            if seen.contains(&reactor.index) {
                continue;
            }
            seen.push(reactor.index);
            let (tx, rx) = crossbeam_channel::bounded(1);
            reactor.run(move |_| {
                let _ = tx.send(());
            });
            waits.push(rx);
        }
        self.watchdog.paused(self.conn, || {
            for rx in waits {
                let _ = rx.recv_timeout(STOP_TIMEOUT);
            }
        });
    }

    /// RESET_DEVICE / RESET_OWNER: stop every ring and return the device to its initial
    /// state. The memory table and the protocol features belong to the connection and stay
    /// (QEMU resets the device on guest driver resets and does not share its memory again).
    fn reset(&mut self) {
        self.stop_all();
        for v in self.vrings.iter_mut() {
            *v = Vring::default();
        }
        self.inflight = None;
        self.inflight_fresh.clear();
        self.acked_features = 0;
        // The rings are stopped: nothing marks any more. The logs stay mapped until the next
        // SET_LOG_BASE prunes them or the connection ends.
        self.log.disable();
        self.device.model.reset();
    }

    /// The frontend went away: reset, and forget its memory too. Guest memory stays mapped
    /// until the last in-flight request releases it.
    pub fn disconnect(&mut self) {
        self.reset();
        self.memory.clear();
        self.acked_protocol = 0;
        self.shared.set_backend(None);
    }
}

impl VhostUserBackendReqHandlerMut for VhostDevice {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(features(&self.device))
    }

    fn set_features(&mut self, features_acked: u64) -> Result<()> {
        if features_acked & !features(&self.device) != 0 {
            return Err(invalid("frontend acked features that were not offered"));
        }
        self.acked_features = features_acked;
        // QEMU turns logging on and off with the rings running: the running reactors must
        // log before we answer (QEMU copies memory from then on).
        let on = features_acked & VHOST_F_LOG_ALL != 0;
        if self.log.set_enabled(on) {
            self.quiesce();
            log::info!(
                "device {}: dirty page logging {}",
                self.name(),
                if on { "on (migration)" } else { "off" }
            );
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.memory.set_table(ctx, files).map_err(|e| {
            log::warn!("device {}: SET_MEM_TABLE refused: {e}", self.name());
            Error::InvalidParam
        })?;
        self.publish_memory();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) {
            return Err(invalid("vring size must be between 1 and 1024"));
        }
        // A packed ring may have any size (virtio 1.1 §2.8.10.1); a split one not.
        if !self.packed() && !num.is_power_of_two() {
            return Err(invalid("split vring size must be a power of two"));
        }
        // Fits: at most 1024 (checked above).
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addr_set = true;
        Ok(())
    }

    /// A split ring's base is its next avail index; a packed ring's carries both positions
    /// (checked against the ring size when the ring starts: SET_VRING_NUM may come later).
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        if !self.packed() && base > u32::from(u16::MAX) {
            return Err(invalid("vring base beyond 16 bits"));
        }
        self.vring(index)?.base = Some(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        // Fits: vring() checked the index against the queue count (<= 256).
        self.stop(index as u16);
        let packed = self.packed();
        let v = &mut self.vrings[index as usize];
        // The ring is stopped until the next SET_VRING_KICK.
        v.kick = None;
        let start = if packed { VringBase::START.encode() } else { 0 };
        Ok(VhostUserVringState::new(index, v.base.unwrap_or(start)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = u16::from(index);
        self.vring(u32::from(index))?;
        // The reactor sleeps on it edge-triggered and never reads it: only an eventfd is
        // sure to behave.
        if fd.as_ref().is_some_and(|f| !is_eventfd(f.as_fd())) {
            return Err(invalid("SET_VRING_KICK with an fd that is not an eventfd"));
        }
        // A new kick fd for a running ring: restart it with the new fd.
        self.stop(q);
        self.vrings[usize::from(q)].kick = Some(fd);
        self.maybe_start(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let running = self.vring(u32::from(index))?.poller;
        let signal = fd.as_ref().map(signal_ring).transpose()?;
        if let Some(id) = running {
            self.device.placement(u16::from(index)).run(move |r| {
                if let Some(p) = r.poller_mut(id) {
                    let any: &mut dyn Any = p;
                    if let Some(q) = any.downcast_mut::<UserQueue>() {
                        q.notifier_mut().set_signal(signal);
                    }
                }
            });
        }
        self.vrings[usize::from(index)].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // vubd never reports ring errors through this fd; broken rings are logged.
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features(&self.device))
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        // The vhost crate adds REPLY_ACK to what we offer.
        let offered = protocol_features(&self.device) | VhostUserProtocolFeatures::REPLY_ACK;
        if features & !offered.bits() != 0 {
            return Err(invalid(
                "frontend acked protocol features that were not offered",
            ));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.device.model.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.vring(index)?.enabled = enable;
        // Fits: vring() checked the index.
        let q = index as u16;
        if enable {
            self.maybe_start(q)
        } else {
            self.stop(q);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let cfg = config::build(&self.device.model);
        config::read(&cfg, offset, size)
            .ok_or_else(|| invalid("GET_CONFIG beyond the config space"))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // Only `writeback` is writable, and only with CONFIG_WCE.
        if self.acked_features & bit(VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            return Err(invalid("SET_CONFIG without VIRTIO_BLK_F_CONFIG_WCE"));
        }
        if offset as usize != config::OFF_WRITEBACK || buf.len() != 1 {
            return Err(invalid("SET_CONFIG of a read-only config field"));
        }
        let on = buf[0] != 0;
        log::info!(
            "device {}: guest set write cache to {}",
            self.name(),
            if on { "writeback" } else { "writethrough" }
        );
        self.device.model.set_writeback(on);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.shared.set_backend(Some(backend));
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("SET_GPU_SOCKET on a block device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if msg.num_queues > self.device.model.num_queues() || msg.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(
                "GET_INFLIGHT_FD for more queues or entries than offered",
            ));
        }
        // The frontend sets the features first (QEMU's vhost_dev_prepare_inflight): the
        // region has the layout of the rings it negotiated.
        let region = InflightRegion::create_layout(
            self.inflight_layout(),
            msg.num_queues,
            msg.queue_size,
            self.conn,
        )
        .map_err(Error::ReqHandlerError)?;
        let file = region.file().try_clone().map_err(Error::ReqHandlerError)?;
        let reply = VhostUserInflight::new(region.mmap_size(), 0, msg.num_queues, msg.queue_size);
        self.inflight = Some(Arc::new(region));
        self.inflight_fresh = vec![true; usize::from(msg.num_queues)];
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        if msg.num_queues > self.device.model.num_queues() || msg.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(
                "SET_INFLIGHT_FD for more queues or entries than offered",
            ));
        }
        let region = InflightRegion::open_layout(
            self.inflight_layout(),
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
            self.conn,
        )
        .map_err(|e| {
            log::warn!("device {}: SET_INFLIGHT_FD refused: {e}", self.name());
            Error::InvalidParam
        })?;
        self.inflight = Some(Arc::new(region));
        self.inflight_fresh = vec![false; usize::from(msg.num_queues)];
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        self.memory.add(region, fd).map_err(|e| {
            log::warn!("device {}: ADD_MEM_REG refused: {e}", self.name());
            Error::InvalidParam
        })?;
        self.publish_memory();
        log::info!(
            "device {}: memory region added: guest {:#x}, {} MiB",
            self.name(),
            { region.guest_phys_addr },
            { region.memory_size } >> 20
        );
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        self.memory
            .remove(region.guest_phys_addr, region.memory_size)
            .map_err(|e| {
                log::warn!("device {}: REM_MEM_REG refused: {e}", self.name());
                Error::InvalidParam
            })?;
        self.publish_memory();
        log::info!(
            "device {}: memory region removed: guest {:#x}, {} MiB",
            self.name(),
            { region.guest_phys_addr },
            { region.memory_size } >> 20
        );
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(invalid("shared memory regions are not supported"))
    }

    /// SET_LOG_BASE (the vhost crate checked LOG_SHMFD and sends the reply). The new log
    /// takes over at once; the old ones are unmapped once no reactor can be marking them.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let area = LogArea::map(&file, log.mmap_offset, log.mmap_size, self.conn).map_err(|e| {
            log::warn!("device {}: SET_LOG_BASE refused: {e}", self.name());
            Error::InvalidParam
        })?;
        let on = self.log.set_area(area);
        self.quiesce();
        self.log.prune();
        log::info!(
            "device {}: dirty log of {} bytes shared (logging {})",
            self.name(),
            log.mmap_size,
            if on {
                "on"
            } else {
                "off until VHOST_F_LOG_ALL"
            }
        );
        Ok(())
    }
}
