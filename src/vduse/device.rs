//! One VDUSE device as its control thread sees it: the kernel's control messages
//! (SET_STATUS, GET_VQ_STATE, UPDATE_IOTLB), the IOTLB mapped as memory, and the queues it
//! runs on the reactors, each a `VirtQueue` whose notifier injects the queue's interrupt.
//!
//! The life of the rings:
//! - DRIVER_OK: read the negotiated features and each ready queue's ring (VQ_GET_INFO), give
//!   each a kick eventfd, map the IOTLB. VDUSE adds its streaming (bounce) region at the
//!   driver's first DMA mapping, which comes after DRIVER_OK: until the IOTLB has it, the
//!   queues wait for their first kick (the driver maps a request before it kicks), and the
//!   IOTLB is read again then. Then every ready queue starts on its reactor, as vhost-user
//!   starts one (`vhost::device::maybe_start`).
//! - Status 0 (reset): every queue stops and drains, the mappings go.
//! - A restart (vubd found the device alive, `resume`): the rings are running; each queue
//!   continues after the requests the in-flight record (`record`) says the previous vubd
//!   took, and runs those first.

use std::any::Any;
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::control::DevicePort;
use super::iotlb::Iotlb;
use super::notify::IrqNotifier;
use super::record;
use super::uapi::{self, DevRequest, DevResponse, Request, VqInfo};
use crate::blk::queues::RunningQueue;
use crate::blk::stats::IoStats;
use crate::blk::Device;
use crate::engine::{Poller, PollerId};
use crate::guestmem::fault::Owner;
use crate::guestmem::GuestMemoryMmap;
use crate::virtio_blk::features::{bit, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio_blk::inflight::InflightRegion;
use crate::virtio_blk::queue::{QueueStart, Ring, VirtQueue};
use crate::virtio_blk::running;
use crate::virtio_blk::split;

/// The largest ring vubd offers per queue (VQ_SETUP): virtio_vdpa allocates rings of this
/// size, virtio_blk's queue depth follows.
pub const QUEUE_SIZE: u16 = 256;
/// How long the control thread waits for a reactor to drain a queue. The kernel gives up
/// on a message after its msg_timeout (30 s by default) and marks the device broken.
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

pub type VduseQueue = VirtQueue<IrqNotifier>;

/// Reads a running VDUSE queue's counters (on its reactor).
fn snapshot(p: &mut dyn Poller) -> Option<(IoStats, u32)> {
    let any: &mut dyn Any = p;
    any.downcast_mut::<VduseQueue>()
        .map(|q| (q.stats(), q.in_flight()))
}

#[derive(Default)]
struct Vq {
    /// The ring as the driver set it up, while the device is DRIVER_OK and it is ready.
    info: Option<VqInfo>,
    kick: Option<File>,
    poller: Option<PollerId>,
    /// Where the ring stood when the queue last stopped (GET_VQ_STATE).
    base: u16,
}

pub struct VduseDevice {
    device: Arc<Device>,
    port: Arc<dyn DevicePort>,
    owner: Owner,
    /// Where the in-flight record lives (None: no record, no recovery after a crash).
    record_at: Option<record::Place>,
    status: u8,
    features: u64,
    iotlb: Iotlb,
    vqs: Vec<Vq>,
    /// DRIVER_OK was set and the queues wait for their first kick to start.
    waiting: bool,
    /// The rings were running under a previous vubd: recover from its record.
    resuming: bool,
    record: Option<Arc<InflightRegion>>,
    /// The driver runs the device (DRIVER_OK, queues started): `Export::in_use`.
    in_use: Arc<AtomicBool>,
}

fn eventfd() -> std::io::Result<File> {
    // SAFETY: plain syscall; the fd is checked and then owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh eventfd nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl VduseDevice {
    pub fn new(
        device: Arc<Device>,
        port: Arc<dyn DevicePort>,
        owner: Owner,
        record_at: Option<record::Place>,
        in_use: Arc<AtomicBool>,
    ) -> VduseDevice {
        let vqs = (0..device.model.num_queues())
            .map(|_| Vq::default())
            .collect();
        VduseDevice {
            device,
            port,
            owner,
            record_at,
            status: 0,
            features: 0,
            iotlb: Iotlb::new(owner),
            vqs,
            waiting: false,
            resuming: false,
            record: None,
            in_use,
        }
    }

    fn name(&self) -> &str {
        &self.device.name
    }

    /// Answers one control message.
    pub fn handle(&mut self, req: &DevRequest) -> DevResponse {
        let id = req.request_id;
        match req.decode() {
            Request::SetStatus { status } => {
                self.set_status(status);
                DevResponse::new(id, true)
            }
            Request::GetVqState { index } => match self.vq_state(index) {
                Some(avail) => DevResponse::vq_state(id, index, avail),
                None => DevResponse::new(id, false),
            },
            Request::UpdateIotlb { start, last } => {
                let ok = self.update_iotlb(start, last);
                DevResponse::new(id, ok)
            }
            Request::Unknown(kind) => {
                log::warn!("device {}: unknown VDUSE message type {kind}", self.name());
                DevResponse::new(id, false)
            }
        }
    }

    fn set_status(&mut self, status: u8) {
        let was = self.status;
        self.status = status;
        if status == 0 {
            if was != 0 {
                log::info!("device {}: reset by the driver", self.name());
            }
            self.reset();
            return;
        }
        let on = status & uapi::STATUS_DRIVER_OK != 0;
        let was_on = was & uapi::STATUS_DRIVER_OK != 0;
        if on && !was_on {
            self.driver_ok();
        } else if !on && was_on {
            self.stop_all();
        }
        if status & uapi::STATUS_FAILED != 0 && was & uapi::STATUS_FAILED == 0 {
            log::warn!("device {}: the driver gave up on the device", self.name());
        }
    }

    /// The device was found alive at start-up: a previous vubd served it. If its driver
    /// runs it (features negotiated, queues ready), continue its rings.
    pub fn resume(&mut self) {
        let features = self.port.driver_features().unwrap_or(0);
        let ready = (0..self.vqs.len())
            .filter_map(|q| self.port.vq_info(q as u32).ok())
            .any(|i| i.ready != 0 && i.num != 0);
        if features == 0 || !ready {
            log::info!(
                "device {}: found from an earlier run, not in use by a driver",
                self.name()
            );
            return;
        }
        log::info!(
            "device {}: found from an earlier run with its driver running: continuing its rings",
            self.name()
        );
        self.status = uapi::STATUS_DRIVER_OK | uapi::STATUS_FEATURES_OK;
        self.resuming = true;
        self.driver_ok();
    }

    fn driver_ok(&mut self) {
        if let Err(e) = self.set_up() {
            log::error!("device {}: cannot start its queues: {e}", self.name());
            self.stop_all();
        }
    }

    /// DRIVER_OK: reads the rings, gives each ready queue a kick fd, maps the IOTLB, and
    /// starts the queues if the streaming region is there already.
    fn set_up(&mut self) -> Result<(), String> {
        self.features = self
            .port
            .driver_features()
            .map_err(|e| format!("VDUSE_DEV_GET_FEATURES: {e}"))?;
        let mut ready = 0;
        for q in 0..self.vqs.len() {
            // Fits: at most 65535 queues (the model's u16).
            let info = self
                .port
                .vq_info(q as u32)
                .map_err(|e| format!("VDUSE_VQ_GET_INFO {q}: {e}"))?;
            let v = &mut self.vqs[q];
            v.info = None;
            v.kick = None;
            if info.ready == 0 || info.num == 0 {
                continue;
            }
            let kick = eventfd().map_err(|e| format!("eventfd: {e}"))?;
            self.port
                .set_kickfd(q as u32, kick.as_raw_fd())
                .map_err(|e| format!("VDUSE_VQ_SETUP_KICKFD {q}: {e}"))?;
            v.info = Some(info);
            v.kick = Some(kick);
            ready += 1;
        }
        log::info!(
            "device {}: driver ready: {ready} of {} queue(s), features {:#x}",
            self.name(),
            self.vqs.len(),
            self.features
        );
        if ready == 0 {
            return Ok(());
        }
        self.waiting = true;
        self.iotlb
            .refresh(&*self.port, 0, u64::MAX)
            .map_err(|e| e.to_string())?;
        if self.iotlb.has_streaming_region() {
            self.start_queues()?;
        }
        Ok(())
    }

    /// Kick fds of queues that wait for their first kick (polled by the control thread).
    pub fn waiting_kicks(&self) -> Vec<RawFd> {
        if !self.waiting {
            return Vec::new();
        }
        self.vqs
            .iter()
            .filter_map(|v| v.kick.as_ref().map(|k| k.as_raw_fd()))
            .collect()
    }

    /// A queue was kicked before the queues started: the driver has mapped a request, so
    /// the IOTLB is complete now.
    pub fn kicked(&mut self) {
        if !self.waiting {
            return;
        }
        let r = self
            .iotlb
            .refresh(&*self.port, 0, u64::MAX)
            .map_err(|e| e.to_string())
            .and_then(|()| self.start_queues());
        if let Err(e) = r {
            log::error!("device {}: cannot start its queues: {e}", self.name());
            self.stop_all();
        }
    }

    fn open_record(&mut self) {
        self.record = None;
        let Some(place) = self.record_at.clone() else {
            return;
        };
        // One record for the device: its queues share one ring size (virtio_vdpa's).
        let Some(size) = self.vqs.iter().find_map(|v| v.info.map(|i| i.num)) else {
            return;
        };
        let Ok(size) = u16::try_from(size) else {
            return;
        };
        let n = self.device.model.num_queues();
        let r = if self.resuming {
            place.open(n, size, self.owner)
        } else {
            place.create(n, size, self.owner).map(Some)
        };
        match r {
            Ok(r) => self.record = r,
            Err(e) => log::warn!(
                "device {}: no in-flight record ({e}): requests in flight if vubd dies will not be recovered",
                self.name()
            ),
        }
    }

    fn start_queues(&mut self) -> Result<(), String> {
        let mem = self.iotlb.snapshot().ok_or("the IOTLB maps nothing")?;
        self.waiting = false;
        self.open_record();
        for q in 0..self.vqs.len() {
            if self.vqs[q].info.is_some() && self.vqs[q].poller.is_none() {
                // Fits: at most 65535 queues.
                self.start(q as u16, &mem)?;
            }
        }
        self.resuming = false;
        self.in_use.store(true, Ordering::Release);
        Ok(())
    }

    fn build_queue(&self, info: &VqInfo, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        let size = u16::try_from(info.num).map_err(|_| "ring size beyond 16 bits")?;
        let mut queue = Queue::new(QUEUE_SIZE).map_err(|e| e.to_string())?;
        queue
            .try_set_size(size)
            .map_err(|_| format!("bad ring size {size}"))?;
        queue
            .try_set_desc_table_address(GuestAddress(info.desc_addr))
            .and_then(|_| queue.try_set_avail_ring_address(GuestAddress(info.driver_addr)))
            .and_then(|_| queue.try_set_used_ring_address(GuestAddress(info.device_addr)))
            .map_err(|_| "misaligned ring address")?;
        queue.set_event_idx(self.features & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(format!(
                "ring outside the IOTLB (desc {:#x}, avail {:#x}, used {:#x})",
                info.desc_addr, info.driver_addr, info.device_addr
            ));
        }
        Ok(queue)
    }

    fn start(&mut self, q: u16, mem: &Arc<GuestMemoryMmap>) -> Result<(), String> {
        let v = &self.vqs[usize::from(q)];
        let Some(info) = v.info else { return Ok(()) };
        let mut queue = self.build_queue(&info, mem)?;
        let ring_err = |e| format!("queue {q}: ring unreadable: {e}");
        let used = queue
            .used_idx(&**mem, Ordering::Acquire)
            .map_err(ring_err)?
            .0;
        queue.set_next_used(used);
        let mut inflight = self.record.as_ref().and_then(|r| r.queue(q, queue.size()));
        let mut resubmit = Vec::new();
        let next_avail = if !self.resuming {
            // Fresh rings: where the driver says they start (0 for virtio_vdpa).
            info.state[0]
        } else {
            let avail = split::avail_idx(&queue, mem)
                .ok_or_else(|| format!("queue {q}: avail ring unreadable"))?
                .0;
            let offered = avail.wrapping_sub(used);
            let recovered = match inflight
                .as_mut()
                .map(|t| t.recover_outstanding(used, avail))
            {
                Some(Ok(heads)) => Some(heads),
                // The file was written by someone else. It records from here on.
                Some(Err(marked)) => {
                    log::error!(
                        "device {}: queue {q}: the in-flight record marks {marked} request(s) but the driver has {offered} outstanding: record reset",
                        self.name(),
                    );
                    None
                }
                None => None,
            };
            if let Some(heads) = recovered {
                // Every request the previous vubd took and did not complete is marked:
                // continue after all of them, and run them first.
                resubmit = heads;
                if !resubmit.is_empty() {
                    log::info!(
                        "device {}: queue {q}: running again {} request(s) in flight when the previous vubd stopped",
                        self.name(),
                        resubmit.len()
                    );
                }
                // Fits: at most `offered` heads.
                used.wrapping_add(resubmit.len() as u16)
            } else {
                // No usable record: which requests it had taken is unknowable. Continue after
                // what the driver has offered; requests it had taken and not completed never
                // complete.
                if offered != 0 {
                    log::warn!(
                        "device {}: queue {q}: no usable in-flight record from the previous vubd: up to {offered} request(s) may never complete",
                        self.name(),
                    );
                }
                avail
            }
        };
        queue.set_next_avail(next_avail);
        let kick = match v.kick.as_ref() {
            Some(k) => Some(k.try_clone().map_err(|e| format!("dup kick fd: {e}"))?),
            None => None,
        };
        let start = QueueStart {
            device: Arc::clone(&self.device.name),
            index: q,
            ring: Ring::Split { queue, inflight },
            mem: Arc::clone(mem),
            model: Arc::clone(&self.device.model),
            backend: Arc::clone(&self.device.backend),
            kick,
            resubmit,
            latency: self.device.latency_histograms,
        };
        let notifier = IrqNotifier::new(Arc::clone(&self.port), q);
        let id = PollerId::next();
        self.vqs[usize::from(q)].poller = Some(id);
        let reactor = self.device.placement(q).clone();
        self.device.queues.started(RunningQueue {
            index: q,
            reactor: reactor.clone(),
            poller: id,
            snapshot,
        });
        reactor.run(move |r| {
            r.add_poller(id, move |ctx| match VduseQueue::new(start, notifier, ctx) {
                Ok(q) => Some(Box::new(q) as Box<dyn Poller>),
                Err(e) => {
                    log::error!("cannot open the backend channel of queue {q}: {e}");
                    None
                }
            })
        });
        Ok(())
    }

    /// Stops queue `q` if it runs; its reactor drains its requests first. The poller (and
    /// its reference to the device fd) is dropped before the answer comes back.
    fn stop(&mut self, q: u16) {
        let Some(id) = self.vqs[usize::from(q)].poller.take() else {
            return;
        };
        let rx = running::stop::<IrqNotifier>(&self.device, q, id);
        let outcome = rx.recv_timeout(STOP_TIMEOUT);
        if let Some(stopped) = running::stopped(&self.device, q, id, outcome, STOP_TIMEOUT) {
            self.vqs[usize::from(q)].base = stopped.next_avail;
        }
    }

    fn stop_all(&mut self) {
        for q in 0..self.vqs.len() {
            // Fits: at most 65535 queues.
            self.stop(q as u16);
        }
        self.waiting = false;
        self.in_use.store(false, Ordering::Release);
    }

    /// Status 0: the queues drain and stop, the rings and mappings are forgotten (the
    /// kernel drops the kick fds itself).
    fn reset(&mut self) {
        self.stop_all();
        for v in self.vqs.iter_mut() {
            v.info = None;
            v.kick = None;
            v.base = 0;
        }
        self.iotlb.clear();
        self.features = 0;
        self.resuming = false;
        self.record = None;
        self.device.model.reset();
    }

    /// Device removal or vubd's exit: the queues drain and stop.
    pub fn shut_down(&mut self) {
        self.stop_all();
        self.iotlb.clear();
    }

    /// GET_VQ_STATE: the next avail index the device would process.
    fn vq_state(&mut self, index: u32) -> Option<u16> {
        let v = self.vqs.get(index as usize)?;
        let Some(id) = v.poller else {
            return Some(v.base);
        };
        // Fits: index < number of queues (checked by get above).
        self.device
            .placement(index as u16)
            .call(STOP_TIMEOUT, move |r| {
                let p = r.poller_mut(id)?;
                let any: &mut dyn Any = p;
                any.downcast_mut::<VduseQueue>()
                    .map(|q| q.stopped().next_avail)
            })
            .flatten()
    }

    /// UPDATE_IOTLB: the mappings of `[start, last]` changed. Running queues get the new
    /// memory before the answer goes back (the old pages stay mapped for requests in
    /// flight until they complete).
    fn update_iotlb(&mut self, start: u64, last: u64) -> bool {
        if self.status & uapi::STATUS_DRIVER_OK == 0 && self.iotlb.len() == 0 {
            // Nothing mapped yet: DRIVER_OK reads the whole IOTLB anyway.
            return true;
        }
        if let Err(e) = self.iotlb.refresh(&*self.port, start, last) {
            log::error!("device {}: UPDATE_IOTLB: {e}", self.name());
            return false;
        }
        let Some(mem) = self.iotlb.snapshot() else {
            return true;
        };
        let waits = running::publish_memory::<IrqNotifier>(
            &self.device,
            self.vqs
                .iter()
                .enumerate()
                // Fits: at most 65535 queues.
                .filter_map(|(q, v)| Some((q as u16, v.poller?))),
            &mem,
        );
        for rx in waits {
            let _ = rx.recv_timeout(STOP_TIMEOUT);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeKernel;
    use super::super::uapi::{REQUEST_SIZE, REQ_GET_VQ_STATE, REQ_SET_STATUS, REQ_UPDATE_IOTLB};
    use super::*;
    use crate::backend;
    use crate::blk::queues::Queues;
    use crate::blk::DeviceModel;
    use crate::config::BackendSpec;
    use crate::engine::{Engine, PollMode, Settings};
    use crate::virtio_blk::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use std::time::Instant;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    /// IOVA layout of the fake kernel's memfd: bounce region [0, 1 MiB), rings at 1 MiB.
    const BOUNCE: u64 = 1 << 20;
    const RINGS: u64 = 1 << 20;
    const RINGS_LEN: u64 = 64 << 10;
    const USED: u64 = RINGS + 0x8000;
    const SIZE: u16 = 16;

    fn msg(kind: u32, id: u32, payload: &[u32]) -> DevRequest {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        for (i, w) in payload.iter().enumerate() {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&w.to_ne_bytes());
        }
        DevRequest::from_bytes(&b)
    }

    fn status(s: u8) -> DevRequest {
        msg(REQ_SET_STATUS, 1, &[u32::from(s)])
    }

    struct Rig {
        kernel: Arc<FakeKernel>,
        /// The "driver's" view of the fake kernel's memory (same memfd, same IOVAs).
        mem: GuestMemoryMmap,
        engine: Option<Engine>,
        device: Arc<Device>,
        in_use: Arc<AtomicBool>,
        dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Rig {
            let kernel = Arc::new(FakeKernel::new(RINGS + RINGS_LEN));
            let file = kernel.file.as_ref().unwrap().try_clone().unwrap();
            let mem = GuestMemoryMmap::from_ranges_with_files([
                (
                    GuestAddress(0),
                    BOUNCE as usize,
                    Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
                ),
                (
                    GuestAddress(RINGS),
                    RINGS_LEN as usize,
                    Some(vm_memory::FileOffset::new(file, RINGS)),
                ),
            ])
            .unwrap();
            // SAFETY: sched_getaffinity fills the set we pass; CPU_ISSET reads it.
            let cpu = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
                (0..libc::CPU_SETSIZE as usize)
                    .find(|&c| libc::CPU_ISSET(c, &set))
                    .unwrap()
            };
            let engine = Engine::start(
                &[cpu],
                Settings {
                    mode: PollMode::Interrupt,
                    idle_spin: Duration::from_micros(50),
                },
            )
            .unwrap();
            let backend = backend::open(&BackendSpec::Ram { size: 1 << 20 }, false).unwrap();
            let model = DeviceModel::new(
                1 << 20,
                512,
                false,
                true,
                "vduse-test",
                backend.info().caps,
                1,
            );
            let device = Arc::new(Device {
                name: Arc::from("vt"),
                model: Arc::new(model),
                backend,
                reactors: engine.reactors().to_vec(),
                queues: Queues::default(),
                latency_histograms: false,
            });
            Rig {
                kernel,
                mem,
                engine: Some(engine),
                device,
                in_use: Arc::default(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn vduse(&self) -> VduseDevice {
            VduseDevice::new(
                Arc::clone(&self.device),
                Arc::clone(&self.kernel) as Arc<dyn DevicePort>,
                (1 << 62) | 7,
                Some(record::Place::new(&self.dir.path().join("state"), "vt")),
                Arc::clone(&self.in_use),
            )
        }

        /// The driver's side: a ring of SIZE entries, desc table and avail ring from the
        /// mock, used ring at USED; queue 0 ready.
        fn ring(&self) -> MockSplitQueue<'_, GuestMemoryMmap> {
            let vq = MockSplitQueue::create(&self.mem, GuestAddress(RINGS), SIZE);
            self.kernel.vqs.lock().unwrap().push(VqInfo {
                index: 0,
                num: u32::from(SIZE),
                desc_addr: vq.desc_table_addr().0,
                driver_addr: vq.avail_addr().0,
                device_addr: USED,
                state: [0; 4],
                ready: 1,
            });
            vq
        }

        /// A request at descriptor `first`: header, one 512-byte buffer at `buf`, status.
        fn request(
            &self,
            vq: &MockSplitQueue<'_, GuestMemoryMmap>,
            first: u16,
            kind: u32,
            sector: u64,
            buf: u64,
        ) {
            let hdr = 0x1000 + u64::from(first) * 0x100;
            self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
            self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(hdr + 0x80))
                .unwrap();
            let w = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
            let data = if kind == VIRTIO_BLK_T_IN { w } else { 0 };
            let d = [
                RawDescriptor::from(SplitDescriptor::new(hdr, 16, 1, first + 1)),
                RawDescriptor::from(SplitDescriptor::new(buf, 512, data | 1, first + 2)),
                RawDescriptor::from(SplitDescriptor::new(hdr + 0x80, 1, w, 0)),
            ];
            vq.add_desc_chains(&d, first).unwrap();
        }

        fn status_of(&self, first: u16) -> u8 {
            self.mem
                .read_obj(GuestAddress(0x1000 + u64::from(first) * 0x100 + 0x80))
                .unwrap()
        }

        /// Bounce region and rings mapped, VERSION_1 negotiated: the ring of `ring`.
        fn mapped_ring(&self) -> MockSplitQueue<'_, GuestMemoryMmap> {
            self.kernel.add_region(0, BOUNCE);
            self.kernel.add_region(RINGS, RINGS_LEN);
            self.kernel.features.store(bit(32), Ordering::Relaxed);
            self.ring()
        }

        /// A vubd that served head 0 (used index 1) and went away, leaving its record.
        fn previous_vubd_served_one(&self, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
            let mut d = self.vduse();
            d.handle(&status(1 | 2 | 8 | 4));
            assert!(
                self.in_use.load(Ordering::Acquire),
                "streaming region mapped: started at once"
            );
            self.request(vq, 0, VIRTIO_BLK_T_IN, 0, 0x8000);
            self.kernel.kick(0);
            self.wait_used(1);
            d.shut_down();
        }

        /// The record the devices of this rig keep.
        fn record(&self) -> Arc<crate::virtio_blk::inflight::InflightRegion> {
            record::Place::new(&self.dir.path().join("state"), "vt")
                .open(1, SIZE, 1)
                .unwrap()
                .unwrap()
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn wait_used(&self, n: u16) {
            let t = Instant::now();
            while self.used_idx() != n {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "used index {} != {n}",
                    self.used_idx()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            if let Some(e) = self.engine.take() {
                e.shutdown();
            }
        }
    }

    #[test]
    fn driver_ok_waits_for_the_streaming_region_then_serves_and_resets() {
        let rig = Rig::new();
        rig.kernel.add_region(RINGS, RINGS_LEN);
        rig.kernel
            .features
            .store(bit(VIRTIO_RING_F_EVENT_IDX) | bit(32), Ordering::Relaxed);
        let vq = rig.ring();
        let mut d = rig.vduse();
        assert_eq!(d.handle(&status(1 | 2 | 8)).result, uapi::RESULT_OK);
        assert!(d.waiting_kicks().is_empty());
        d.handle(&status(1 | 2 | 8 | 4));
        // Rings mapped, no bounce region yet: the queue waits for its first kick.
        assert_eq!(d.waiting_kicks().len(), 1);
        assert!(!rig.in_use.load(Ordering::Acquire));
        // The driver maps a buffer (the bounce region appears) and kicks.
        rig.kernel.add_region(0, BOUNCE);
        rig.mem
            .write_slice(&[0x5a; 512], GuestAddress(0x8000))
            .unwrap();
        rig.request(&vq, 0, VIRTIO_BLK_T_OUT, 2, 0x8000);
        rig.kernel.kick(0);
        d.kicked();
        assert!(d.waiting_kicks().is_empty());
        assert!(rig.in_use.load(Ordering::Acquire));
        rig.wait_used(1);
        assert_eq!(rig.status_of(0), 0);
        // Read it back through the running queue.
        rig.request(&vq, 3, VIRTIO_BLK_T_IN, 2, 0x9000);
        rig.kernel.kick(0);
        rig.wait_used(2);
        assert_eq!(rig.status_of(3), 0);
        let mut back = [0u8; 512];
        rig.mem.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
        assert_eq!(back, [0x5a; 512]);
        assert!(rig.kernel.irqs(0) >= 1, "completions injected an interrupt");
        // GET_VQ_STATE answers where the running ring stands.
        let r = d.handle(&msg(REQ_GET_VQ_STATE, 9, &[0]));
        assert_eq!(
            (r.request_id, r.result, r.payload[1] & 0xffff),
            (9, uapi::RESULT_OK, 2)
        );
        assert_eq!(
            d.handle(&msg(REQ_GET_VQ_STATE, 10, &[5])).result,
            uapi::RESULT_FAILED
        );
        // An IOTLB update of the whole space keeps the queue running on fresh mappings.
        let r = d.handle(&msg(REQ_UPDATE_IOTLB, 11, &[0, 0, u32::MAX, u32::MAX]));
        assert_eq!(r.result, uapi::RESULT_OK);
        rig.request(&vq, 6, VIRTIO_BLK_T_IN, 2, 0xa000);
        rig.kernel.kick(0);
        rig.wait_used(3);
        // Reset: the queue stops, statistics are kept.
        d.handle(&status(0));
        assert!(!rig.in_use.load(Ordering::Acquire));
        assert!(rig.device.queues.running().is_empty());
        assert_eq!(
            d.handle(&msg(REQ_GET_VQ_STATE, 12, &[0])).payload[1] & 0xffff,
            0
        );
        let snap = rig.device.queues.snapshot(Duration::from_secs(1));
        assert_eq!(snap.iter().map(|s| s.stats.requests()).sum::<u64>(), 3);
        d.shut_down();
    }

    #[test]
    fn a_restart_runs_again_what_the_previous_server_had_taken() {
        let rig = Rig::new();
        let vq = rig.mapped_ring();
        // The previous vubd: completed head 0, had taken head 3 (a write) when it died.
        rig.previous_vubd_served_one(&vq);
        let region = rig.record();
        rig.mem
            .write_slice(&[0x77; 512], GuestAddress(0x8000))
            .unwrap();
        rig.request(&vq, 3, VIRTIO_BLK_T_OUT, 4, 0x8000);
        region.queue(0, SIZE).unwrap().begin(3);
        drop(region);
        // The restarted vubd finds the rings running and runs head 3 without a kick.
        let mut d = rig.vduse();
        d.resume();
        rig.wait_used(2);
        assert_eq!(rig.status_of(3), 0);
        // And the data is there: read it back.
        rig.request(&vq, 6, VIRTIO_BLK_T_IN, 4, 0x9000);
        rig.kernel.kick(0);
        rig.wait_used(3);
        let mut back = [0u8; 512];
        rig.mem.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
        assert_eq!(back, [0x77; 512]);
        d.shut_down();
    }

    #[test]
    fn a_record_marking_more_than_the_driver_has_out_is_reset() {
        let rig = Rig::new();
        let vq = rig.mapped_ring();
        rig.previous_vubd_served_one(&vq);
        // One request outstanding, but the record (written by another server) marks two.
        rig.request(&vq, 3, VIRTIO_BLK_T_IN, 4, 0x8000);
        let region = rig.record();
        let mut t = region.queue(0, SIZE).unwrap();
        t.begin(3);
        t.begin(5);
        drop(t);
        drop(region);
        let mut d = rig.vduse();
        d.resume();
        // Trusting the record would have put the ring past the avail index (a broken
        // queue); ignoring it, the queue serves the driver's next request.
        rig.request(&vq, 6, VIRTIO_BLK_T_IN, 4, 0x9000);
        rig.kernel.kick(0);
        rig.wait_used(2);
        assert_eq!(rig.status_of(6), 0);
        d.shut_down();
        // The record was reset and kept: it holds nothing in flight now.
        assert!(rig.record().queue(0, SIZE).unwrap().recover(2).is_empty());
    }

    #[test]
    fn rings_outside_the_iotlb_do_not_start() {
        let rig = Rig::new();
        rig.kernel.add_region(0, BOUNCE);
        let _vq = rig.ring();
        let mut d = rig.vduse();
        d.handle(&status(1 | 2 | 8 | 4));
        assert!(!rig.in_use.load(Ordering::Acquire));
        assert!(rig.device.queues.running().is_empty());
        assert_eq!(d.handle(&msg(99, 3, &[])).result, uapi::RESULT_FAILED);
    }
}
