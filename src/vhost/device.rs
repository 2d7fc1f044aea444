//! One vhost-user-blk device as the control thread sees it: negotiation, memory table,
//! vring setup, config space. Implements the vhost crate's request handler; every value a
//! frontend sends is checked here before anything reaches a reactor.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::memory::{MemoryTable, MAX_MEM_SLOTS};
use super::vring::Vring;
use super::watchdog::Watchdog;
use crate::config::DeviceConfig;
use crate::io::Disk;
use crate::reactor::message::{Message, QueueKey, QueueStart};
use crate::reactor::ReactorHandle;
use crate::virtio_blk::features::{bit, device_features, protocol_features};
use crate::virtio_blk::features::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio_blk::inflight::InflightRegion;
use crate::virtio_blk::{config, ID_BYTES};

/// Largest virtqueue accepted (QEMU's limit for vhost-user-blk).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// How long the control thread waits for a reactor to drain a queue before giving up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn invalid(msg: &'static str) -> Error {
    log::warn!("frontend error: {msg}");
    Error::InvalidOperation(msg)
}

pub struct Device {
    id: u32,
    cfg: DeviceConfig,
    disk: Arc<Disk>,
    /// The reactors of this device's core mask; queue i runs on reactors[i % len].
    reactors: Vec<ReactorHandle>,
    serial: [u8; ID_BYTES],
    acked_features: u64,
    acked_protocol: u64,
    memory: MemoryTable,
    vrings: Vec<Vring>,
    /// INFLIGHT_SHMFD region, kept by the frontend across restarts of vubd.
    inflight: Option<Arc<InflightRegion>>,
    /// Paused while we wait for reactors, so only the frontend's own stalls count.
    watchdog: Arc<Watchdog>,
}

impl Device {
    pub fn new(
        id: u32,
        cfg: DeviceConfig,
        disk: Disk,
        reactors: Vec<ReactorHandle>,
        watchdog: Arc<Watchdog>,
    ) -> Device {
        let mut serial = [0u8; ID_BYTES];
        let n = cfg.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);
        let vrings = (0..cfg.num_queues).map(|_| Vring::default()).collect();
        Device {
            id,
            cfg,
            disk: Arc::new(disk),
            reactors,
            serial,
            acked_features: 0,
            acked_protocol: 0,
            memory: MemoryTable::default(),
            vrings,
            inflight: None,
            watchdog,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Which reactor serves queue `q`: round-robin over the device's core mask.
    pub fn placement(&self, q: u16) -> &ReactorHandle {
        &self.reactors[usize::from(q) % self.reactors.len()]
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("vring index out of range"))
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Starts ring `q` on its reactor once everything it needs has arrived. Per the vhost-user
    /// spec a ring starts on SET_VRING_KICK, and runs only while enabled when protocol
    /// features were negotiated.
    fn maybe_start(&mut self, q: u16) -> Result<()> {
        let enabled_needed = self.protocol_features_acked();
        let mem = self.memory.snapshot();
        let v = &self.vrings[usize::from(q)];
        if v.started || v.kick.is_none() || (enabled_needed && !v.enabled) {
            return Ok(());
        }
        if v.size == 0 || !v.addr_set {
            return Err(invalid(
                "ring kicked before its size and addresses were set",
            ));
        }
        let mem = mem.ok_or_else(|| invalid("ring kicked before any memory was shared"))?;
        let mut queue = self.build_queue(q, &mem)?;
        let mut inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(q, queue.size()));
        if self.inflight.is_some() && inflight.is_none() {
            log::warn!(
                "device {}: queue {q} is not covered by the inflight region",
                self.cfg.name
            );
        }
        let mut resubmit = Vec::new();
        if let Some(t) = inflight.as_mut() {
            // The used index in guest memory is the truth; every request taken since then and
            // not yet used is marked in the region. Continue after all of them (as
            // libvhost-user does): the frontend's vring base cannot know about them.
            let used = queue.next_used();
            resubmit = t.recover(used);
            queue.set_next_avail(used.wrapping_add(resubmit.len() as u16));
            if !resubmit.is_empty() {
                log::info!(
                    "device {}: queue {q}: resubmitting {} in-flight request(s) from before the restart",
                    self.cfg.name,
                    resubmit.len()
                );
            }
        }
        let v = &mut self.vrings[usize::from(q)];
        let dup = |f: &File| f.try_clone().map_err(Error::ReqHandlerError);
        let kick = match v.kick.as_ref().and_then(Option::as_ref) {
            Some(f) => Some(dup(f)?),
            None => None,
        };
        let call = v.call.as_ref().map(dup).transpose()?;
        v.started = true;
        let start = QueueStart {
            key: QueueKey {
                device: self.id,
                queue: q,
            },
            queue,
            mem,
            disk: Arc::clone(&self.disk),
            serial: self.serial,
            kick,
            call,
            inflight,
            resubmit,
        };
        self.placement(q).send(Message::AddQueue(Box::new(start)));
        Ok(())
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
        queue.set_next_avail(v.base);
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
        if !self.vrings[usize::from(q)].started {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let key = QueueKey {
            device: self.id,
            queue: q,
        };
        self.placement(q)
            .send(Message::StopQueue { key, reply: tx });
        let v = &mut self.vrings[usize::from(q)];
        v.started = false;
        match self.watchdog.paused(|| rx.recv_timeout(STOP_TIMEOUT)) {
            Ok(stopped) => v.base = stopped.next_avail,
            Err(_) => log::error!(
                "device {}: queue {q} did not drain within {STOP_TIMEOUT:?}",
                self.cfg.name
            ),
        }
    }

    fn stop_all(&mut self) {
        for q in 0..self.vrings.len() as u16 {
            self.stop(q);
        }
    }

    /// Sends the current memory snapshot to every reactor with a running queue of this
    /// device and waits until each has applied it.
    fn publish_memory(&mut self) {
        let Some(mem) = self.memory.snapshot() else {
            return;
        };
        let mut waits = Vec::new();
        let mut seen = Vec::new();
        for q in 0..self.vrings.len() as u16 {
            if !self.vrings[usize::from(q)].started {
                continue;
            }
            let r = self.placement(q);
            if seen.contains(&r.index) {
                continue;
            }
            seen.push(r.index);
            let (tx, rx) = crossbeam_channel::bounded(1);
            r.send(Message::UpdateMemory {
                device: self.id,
                mem: Arc::clone(&mem),
                reply: tx,
            });
            waits.push(rx);
        }
        self.watchdog.paused(|| {
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
        self.acked_features = 0;
        self.disk.set_writeback(!self.cfg.writethrough);
    }

    /// The frontend went away: reset, and forget its memory too. Guest memory stays mapped
    /// until the last in-flight request releases it.
    pub fn disconnect(&mut self) {
        self.reset();
        self.memory.clear();
        self.acked_protocol = 0;
    }
}

impl VhostUserBackendReqHandlerMut for Device {
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
        Ok(device_features(self.cfg.read_only))
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !device_features(self.cfg.read_only) != 0 {
            return Err(invalid("frontend acked features that were not offered"));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.memory.set_table(ctx, files).map_err(|e| {
            log::warn!("device {}: SET_MEM_TABLE refused: {e}", self.cfg.name);
            Error::InvalidParam
        })?;
        self.publish_memory();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(invalid("vring size must be a power of two up to 1024"));
        }
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

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let base = u16::try_from(base).map_err(|_| invalid("vring base beyond 16 bits"))?;
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        self.stop(index as u16);
        let v = &mut self.vrings[index as usize];
        // The ring is stopped until the next SET_VRING_KICK.
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = u16::from(index);
        self.vring(u32::from(index))?;
        // A new kick fd for a running ring: restart it with the new fd.
        self.stop(q);
        self.vrings[usize::from(q)].kick = Some(fd);
        self.maybe_start(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let id = self.id;
        let started = self.vring(u32::from(index))?.started;
        if started {
            let dup = fd
                .as_ref()
                .map(File::try_clone)
                .transpose()
                .map_err(Error::ReqHandlerError)?;
            let key = QueueKey {
                device: id,
                queue: u16::from(index),
            };
            self.placement(u16::from(index))
                .send(Message::SetCall { key, call: dup });
        }
        self.vrings[usize::from(index)].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // vubd never reports ring errors through this fd; broken rings are logged.
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        // The vhost crate adds REPLY_ACK to what we offer.
        let offered = protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        if features & !offered.bits() != 0 {
            return Err(invalid(
                "frontend acked protocol features that were not offered",
            ));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.cfg.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.vring(index)?.enabled = enable;
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
        let cfg = config::build(&self.disk, self.cfg.num_queues);
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
            self.cfg.name,
            if on { "writeback" } else { "writethrough" }
        );
        self.disk.set_writeback(on);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("SET_GPU_SOCKET on a block device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if msg.num_queues > self.cfg.num_queues || msg.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(
                "GET_INFLIGHT_FD for more queues or entries than offered",
            ));
        }
        let region = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(Error::ReqHandlerError)?;
        let file = region.file().try_clone().map_err(Error::ReqHandlerError)?;
        let reply = VhostUserInflight::new(region.mmap_size(), 0, msg.num_queues, msg.queue_size);
        self.inflight = Some(Arc::new(region));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        if msg.num_queues > self.cfg.num_queues || msg.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(
                "SET_INFLIGHT_FD for more queues or entries than offered",
            ));
        }
        let region = InflightRegion::open(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(|e| {
            log::warn!("device {}: SET_INFLIGHT_FD refused: {e}", self.cfg.name);
            Error::InvalidParam
        })?;
        self.inflight = Some(Arc::new(region));
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
            log::warn!("device {}: ADD_MEM_REG refused: {e}", self.cfg.name);
            Error::InvalidParam
        })?;
        self.publish_memory();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        self.memory
            .remove(region.guest_phys_addr, region.memory_size)
            .map_err(|e| {
                log::warn!("device {}: REM_MEM_REG refused: {e}", self.cfg.name);
                Error::InvalidParam
            })?;
        self.publish_memory();
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

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(invalid("dirty logging is not supported"))
    }
}
