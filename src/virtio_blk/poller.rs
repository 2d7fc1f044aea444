//! The queue poller: takes chains off one virtqueue, executes them on the device's backend,
//! completes them, and notifies the frontend at most once per pass.

use std::fs::File;
use std::io::Write;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, types};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::Chain;
use super::inflight::InflightQueue;
use super::request::{
    ParseError, Parser, Request, RequestType, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use super::{ID_BYTES, S_IOERR, S_OK};
use crate::io::iovec::{self, IovecError};
use crate::io::{Backend, Disk, FileDisk, SECTOR_SHIFT};
use crate::reactor::message::{QueueKey, QueueStart, QueueStopped};
use crate::reactor::ratelimit::RateLimit;
use crate::reactor::uring::Uring;

/// One request whose SQE is in the kernel. Indexed by its head descriptor index, which the
/// driver may not reuse until the request is completed.
#[derive(Default)]
struct InFlight {
    busy: bool,
    iovecs: Vec<libc::iovec>,
    status: GuestAddress,
    /// Bytes the kernel must report for success (0 for flush/fallocate).
    expect: u64,
    /// Bytes written into device-writable buffers on success, status byte included.
    used_len: u32,
    /// A discard: only a hint, so a backend that cannot deallocate still succeeds.
    hint: bool,
    /// Keeps the guest memory the iovecs point into mapped until the CQE arrives, even if the
    /// frontend swaps its memory table meanwhile.
    mem: Option<Arc<GuestMemoryMmap>>,
}

/// Counters kept per queue without atomics; the reactor snapshots them.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueStats {
    pub requests: u64,
    pub errors: u64,
    pub notifications: u64,
}

pub struct QueuePoller {
    key: QueueKey,
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<Disk>,
    serial: [u8; ID_BYTES],
    kick: Option<File>,
    call: Option<File>,
    slots: Vec<InFlight>,
    in_flight: u32,
    parser: Parser,
    req: Request,
    scratch: Vec<libc::iovec>,
    needs_signal: bool,
    broken: bool,
    stopping: Option<crossbeam_channel::Sender<QueueStopped>>,
    pub stats: QueueStats,
    log_limit: RateLimit,
    inflight: Option<InflightQueue>,
    /// Heads to resubmit after a restart, last one first.
    resubmit: Vec<u16>,
}

/// io_uring user data: the reactor's slot of the queue and the head index.
pub fn user_data(slot: usize, head: u16) -> u64 {
    ((slot as u64) << 16) | u64::from(head)
}

pub fn split_user_data(ud: u64) -> (usize, u16) {
    ((ud >> 16) as usize, ud as u16)
}

impl QueuePoller {
    pub fn new(start: QueueStart) -> QueuePoller {
        let size = start.queue.size() as usize;
        QueuePoller {
            key: start.key,
            queue: start.queue,
            mem: start.mem,
            disk: start.disk,
            serial: start.serial,
            kick: start.kick,
            call: start.call,
            slots: (0..size).map(|_| InFlight::default()).collect(),
            in_flight: 0,
            parser: Parser::default(),
            req: Request::default(),
            scratch: Vec::with_capacity(iovec::MAX_IOVECS),
            needs_signal: false,
            broken: false,
            stopping: None,
            stats: QueueStats::default(),
            log_limit: RateLimit::new(),
            inflight: start.inflight,
            resubmit: start.resubmit.into_iter().rev().collect(),
        }
    }

    pub fn key(&self) -> QueueKey {
        self.key
    }

    pub fn kick(&self) -> Option<&File> {
        self.kick.as_ref()
    }

    pub fn set_call(&mut self, call: Option<File>) {
        self.call = call;
    }

    pub fn set_memory(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.mem = mem;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Stops taking new chains; the reactor replies once in-flight requests are done.
    pub fn stop(&mut self, reply: crossbeam_channel::Sender<QueueStopped>) {
        self.stopping = Some(reply);
    }

    /// True once stopping and drained: the reply has been sent and the poller can go.
    pub fn finish_stop(&mut self) -> bool {
        if self.in_flight > 0 {
            return false;
        }
        match self.stopping.take() {
            Some(reply) => {
                let _ = reply.send(QueueStopped {
                    next_avail: self.queue.next_avail(),
                });
                true
            }
            None => false,
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    fn active(&self) -> bool {
        !self.broken && self.stopping.is_none()
    }

    fn mark_broken(&mut self, why: &str) {
        self.broken = true;
        self.stats.errors += 1;
        log::error!(
            "device {} queue {}: {why}; queue stopped until the frontend resets it",
            self.key.device,
            self.key.queue
        );
    }

    fn log_bad_request(&mut self, why: &str) {
        self.stats.errors += 1;
        if self.log_limit.allow() {
            log::warn!(
                "device {} queue {}: request failed: {why}{}",
                self.key.device,
                self.key.queue,
                self.log_limit.suppressed_note()
            );
        }
    }

    /// One pass over the avail ring: at most `queue size` chains, and no more than the
    /// io_uring can take. Returns how many chains were taken.
    pub fn poll(&mut self, slot: usize, ring: &mut Uring) -> u32 {
        if !self.active() {
            return 0;
        }
        let avail = match self.queue.avail_idx(&*self.mem, Ordering::Acquire) {
            Ok(a) => a,
            Err(_) => {
                self.mark_broken("avail ring unreadable");
                return 0;
            }
        };
        let pending = (avail - Wrapping(self.queue.next_avail())).0;
        if pending > self.queue.size() {
            self.mark_broken("avail index moved by more than the queue size");
            return 0;
        }
        let needs_ring = matches!(self.disk.backend, Backend::File(_));
        let mut taken = 0;
        // Requests a previous vubd took but never completed go first, in their old order.
        while let Some(&head) = self.resubmit.last() {
            if needs_ring && ring.room() == 0 {
                return taken;
            }
            self.resubmit.pop();
            taken += 1;
            if !self.take(slot, head, ring) {
                return taken;
            }
        }
        for _ in 0..pending {
            if needs_ring && ring.room() == 0 {
                break;
            }
            let Some(chain) = self.queue.pop_descriptor_chain(&*self.mem) else {
                break;
            };
            let head = chain.head_index();
            taken += 1;
            if !self.take(slot, head, ring) {
                break;
            }
        }
        taken
    }

    /// Parses and executes the chain at `head`. False if the queue broke.
    fn take(&mut self, slot: usize, head: u16, ring: &mut Uring) -> bool {
        if usize::from(head) >= self.slots.len() {
            self.mark_broken("head index beyond the queue size");
            return false;
        }
        if self.slots[usize::from(head)].busy {
            self.mark_broken("head index reused while in flight");
            return false;
        }
        if let Some(t) = self.inflight.as_mut() {
            t.begin(head);
        }
        let mem = &*self.mem;
        let chain = Chain::new(
            mem,
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
        );
        match self.parser.parse(chain, mem, &mut self.req) {
            Ok(()) => self.execute(slot, head, ring),
            Err(ParseError::Status(status, why)) => {
                self.log_bad_request(why);
                let addr = self.parser.status_addr().expect("status known");
                self.complete_inline(head, addr, status, 1);
            }
            Err(ParseError::Fatal(why)) => {
                self.mark_broken(why);
                return false;
            }
        }
        true
    }

    fn execute(&mut self, slot: usize, head: u16, ring: &mut Uring) {
        self.stats.requests += 1;
        let status_addr = self.req.status_addr();
        if let Err((status, why)) = self.req.check(&self.disk) {
            self.log_bad_request(why);
            return self.complete_inline(head, status_addr, status, 1);
        }
        let disk = Arc::clone(&self.disk);
        match (&disk.backend, self.req.kind()) {
            (_, RequestType::GetId) => {
                let n = self.write_serial();
                self.complete_inline(head, status_addr, S_OK, n + 1);
            }
            (Backend::File(f), _) => self.submit_file(f, slot, head, ring),
            (_, RequestType::In | RequestType::Out) => self.execute_memory(&disk, head),
            (Backend::Ram(ram), RequestType::Discard | RequestType::WriteZeroes) => {
                let s = self.req.segment();
                ram.zero(
                    s.sector << SECTOR_SHIFT,
                    u64::from(s.num_sectors) << SECTOR_SHIFT,
                );
                self.complete_inline(head, status_addr, S_OK, 1);
            }
            // Null discards and zeroes trivially; RAM and null flush trivially (nothing is
            // more durable than it already is).
            _ => self.complete_inline(head, status_addr, S_OK, 1),
        }
    }

    /// Null and RAM reads/writes: done inline, no syscall.
    fn execute_memory(&mut self, disk: &Disk, head: u16) {
        let status_addr = self.req.status_addr();
        let write = self.req.kind() == RequestType::In; // the device writes guest memory
        self.scratch.clear();
        if let Err(e) = iovec::build(&self.mem, self.req.data(), write, &mut self.scratch) {
            self.log_bad_request(iovec_error(e));
            return self.complete_inline(head, status_addr, S_IOERR, 1);
        }
        match (&disk.backend, write) {
            (Backend::Ram(ram), true) => ram.read(self.req.offset(), &self.scratch),
            (Backend::Ram(ram), false) => ram.write(self.req.offset(), &self.scratch),
            (_, true) => {
                for v in &self.scratch {
                    // SAFETY: the iovec points into mapped guest memory (iovec::build), kept
                    // alive by self.mem for the duration of this call.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                }
            }
            (_, false) => {}
        }
        let used = if write {
            self.req.data_len() as u32 + 1
        } else {
            1
        };
        self.complete_inline(head, status_addr, S_OK, used);
    }

    fn submit_file(&mut self, f: &FileDisk, slot: usize, head: u16, ring: &mut Uring) {
        let status_addr = self.req.status_addr();
        let fd = types::Fd(f.fd());
        let kind = self.req.kind();
        let entry = &mut self.slots[usize::from(head)];
        entry.iovecs.clear();
        entry.expect = 0;
        entry.used_len = 1;
        entry.hint = kind == RequestType::Discard;
        let sqe = match kind {
            RequestType::In | RequestType::Out => {
                let write_guest = kind == RequestType::In;
                if let Err(e) =
                    iovec::build(&self.mem, self.req.data(), write_guest, &mut entry.iovecs)
                {
                    self.log_bad_request(iovec_error(e));
                    return self.complete_inline(head, status_addr, S_IOERR, 1);
                }
                entry.expect = self.req.data_len();
                let (ptr, n) = (entry.iovecs.as_ptr(), entry.iovecs.len() as u32);
                if write_guest {
                    entry.used_len = self.req.data_len() as u32 + 1;
                    opcode::Readv::new(fd, ptr, n)
                        .offset(self.req.offset())
                        .build()
                } else {
                    // Write-through (guest cleared CONFIG_WCE): every completed write durable.
                    let flags = if self.disk.writeback() {
                        0
                    } else {
                        libc::RWF_DSYNC
                    };
                    opcode::Writev::new(fd, ptr, n)
                        .offset(self.req.offset())
                        .rw_flags(flags)
                        .build()
                }
            }
            RequestType::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            RequestType::Discard | RequestType::WriteZeroes => {
                let s = self.req.segment();
                let unmap = kind == RequestType::Discard
                    || s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                // Punching a hole reads back as zeroes on files and block devices alike, so
                // write-zeroes with UNMAP may deallocate; without it the range stays allocated.
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if unmap {
                        libc::FALLOC_FL_PUNCH_HOLE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE
                    };
                opcode::Fallocate::new(fd, u64::from(s.num_sectors) << SECTOR_SHIFT)
                    .offset(s.sector << SECTOR_SHIFT)
                    .mode(mode)
                    .build()
            }
            RequestType::GetId | RequestType::Unsupported(_) => unreachable!("handled by execute"),
        };
        let sqe = sqe.user_data(user_data(slot, head));
        // SAFETY: the iovec array lives in `self.slots[head]`, which is neither cleared nor
        // reused until this head's CQE is reaped (busy flag); the buffers it points to are in
        // the guest memory snapshot stored next to it.
        match unsafe { ring.push(&sqe) } {
            Ok(()) => {
                let entry = &mut self.slots[usize::from(head)];
                entry.busy = true;
                entry.status = status_addr;
                entry.mem = Some(Arc::clone(&self.mem));
                self.in_flight += 1;
            }
            Err(e) => {
                self.log_bad_request("io_uring submission failed");
                log::debug!("io_uring push: {e}");
                self.complete_inline(head, status_addr, S_IOERR, 1);
            }
        }
    }

    fn write_serial(&mut self) -> u32 {
        let mut n = 0usize;
        for r in self.req.data() {
            if n == ID_BYTES {
                break;
            }
            let take = (ID_BYTES - n).min(r.len as usize);
            if self
                .mem
                .write_slice(&self.serial[n..n + take], r.addr)
                .is_err()
            {
                break;
            }
            n += take;
        }
        n as u32
    }

    fn complete_inline(&mut self, head: u16, status_addr: GuestAddress, status: u8, used: u32) {
        if status != S_OK {
            self.stats.errors += 1;
        }
        // Both writes target ranges validated at parse time against this same memory.
        let _ = self.mem.write_obj(status, status_addr);
        self.add_used(head, used);
    }

    fn add_used(&mut self, head: u16, used: u32) {
        if let Some(t) = self.inflight.as_mut() {
            t.pre_complete(head);
        }
        if self.queue.add_used(&*self.mem, head, used).is_err() {
            self.mark_broken("used ring unwritable");
        }
        if let Some(t) = self.inflight.as_mut() {
            t.end(head, self.queue.next_used());
        }
        self.needs_signal = true;
    }

    /// A CQE for `head` arrived with the kernel's result.
    pub fn complete(&mut self, head: u16, result: i32) {
        let Some(entry) = self.slots.get_mut(usize::from(head)) else {
            return;
        };
        if !entry.busy {
            return;
        }
        entry.busy = false;
        self.in_flight -= 1;
        let mem = entry
            .mem
            .take()
            .expect("in-flight request holds its memory");
        let ok = (result >= 0 && result as u64 == entry.expect)
            || (entry.hint && result == -libc::EOPNOTSUPP);
        let (status, used) = if ok {
            (S_OK, entry.used_len)
        } else {
            (S_IOERR, 1)
        };
        let _ = mem.write_obj(status, entry.status);
        if !ok {
            self.stats.errors += 1;
            if self.log_limit.allow() {
                let err = if result < 0 {
                    std::io::Error::from_raw_os_error(-result).to_string()
                } else {
                    format!("short transfer ({result} bytes)")
                };
                log::warn!(
                    "device {} queue {}: I/O error: {err}{}",
                    self.key.device,
                    self.key.queue,
                    self.log_limit.suppressed_note()
                );
            }
        }
        self.add_used(head, used);
    }

    /// Signals the call eventfd once if the pass produced used entries and the driver
    /// wants to hear about them (EVENT_IDX aware).
    pub fn notify(&mut self) {
        if !self.needs_signal {
            return;
        }
        self.needs_signal = false;
        if let Some(call) = self.call.as_mut() {
            if self.queue.needs_notification(&*self.mem).unwrap_or(true) {
                self.stats.notifications += 1;
                let _ = call.write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Before sleeping: ask the driver to kick again. True if work raced in.
    pub fn arm(&mut self) -> bool {
        if !self.active() {
            return false;
        }
        self.queue.enable_notification(&*self.mem).unwrap_or(true)
    }

    /// After waking: polling again, kicks are not needed.
    pub fn disarm(&mut self) {
        if self.active() {
            let _ = self.queue.disable_notification(&*self.mem);
        }
    }

    /// Signals the call eventfd unconditionally. A backend killed between publishing used
    /// entries and signalling them leaves the driver waiting for completions that are
    /// already in the used ring; a queue that starts signals once so the driver looks.
    /// A spurious notification is harmless: the driver re-checks the used ring.
    pub fn notify_driver(&mut self) {
        if let Some(call) = self.call.as_mut() {
            let _ = call.write(&1u64.to_ne_bytes());
        }
    }

    /// A queue with no kick eventfd cannot wake a sleeping reactor.
    pub fn can_sleep(&self) -> bool {
        self.kick.is_some() || !self.active()
    }
}

fn iovec_error(e: IovecError) -> &'static str {
    match e {
        IovecError::OutsideMemory => "data buffer outside guest memory",
        IovecError::TooMany => "too many data segments",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendSpec, DeviceConfig, SocketSpec};
    use crate::virtio_blk::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn disk(backend: BackendSpec) -> Arc<Disk> {
        Arc::new(
            Disk::open(&DeviceConfig {
                serial: "serial-1".into(),
                ..DeviceConfig::new("t", SocketSpec::Fd(-1), backend)
            })
            .unwrap(),
        )
    }

    fn poller(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        mem: &Arc<GuestMemoryMmap>,
        disk: Arc<Disk>,
    ) -> QueuePoller {
        QueuePoller::new(QueueStart {
            serial: *b"serial-1\0\0\0\0\0\0\0\0\0\0\0\0",
            ..crate::virtio_blk::mock::queue_start(vq, 16, mem, disk)
        })
    }

    /// A 3-descriptor request at table index `first` with its header at `hdr`.
    fn chain(
        mem: &GuestMemoryMmap,
        first: u16,
        kind: u32,
        sector: u64,
        buf: u64,
    ) -> [RawDescriptor; 3] {
        let hdr = 0x10_0000 + u64::from(first) * 0x100;
        mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
        [
            RawDescriptor::from(SplitDescriptor::new(hdr, 16, 1, first + 1)),
            RawDescriptor::from(SplitDescriptor::new(buf, 512, data_flags | 1, first + 2)),
            RawDescriptor::from(SplitDescriptor::new(hdr + 0x80, 1, W, 0)),
        ]
    }

    fn status(mem: &GuestMemoryMmap, first: u16) -> u8 {
        mem.read_obj(GuestAddress(0x10_0000 + u64::from(first) * 0x100 + 0x80))
            .unwrap()
    }

    #[test]
    fn ram_pass_writes_then_reads_back_and_fills_used_ring() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut p = poller(&vq, &mem, disk(BackendSpec::Ram { size: 1 << 20 }));
        let mut ring = Uring::new().unwrap();
        mem.write_slice(&[0xab; 512], GuestAddress(0x20_0000))
            .unwrap();
        let mut descs = chain(&mem, 0, VIRTIO_BLK_T_OUT, 4, 0x20_0000).to_vec();
        descs.extend(chain(&mem, 3, VIRTIO_BLK_T_IN, 4, 0x21_0000));
        vq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(p.poll(0, &mut ring), 2);
        assert_eq!((status(&mem, 0), status(&mem, 3)), (S_OK, S_OK));
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x21_0000)).unwrap();
        assert_eq!(back, [0xab; 512]);
        let used = crate::virtio_blk::mock::USED_RING;
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
        // used ring element 1: (id u32, len u32) after flags and idx.
        let id: u32 = mem.read_obj(GuestAddress(used + 4 + 8)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(used + 4 + 12)).unwrap();
        assert_eq!((id, len), (3, 513));
        assert_eq!(p.stats.requests, 2);
    }

    #[test]
    fn avail_index_jump_breaks_only_this_queue() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut p = poller(&vq, &mem, disk(BackendSpec::Null { size: 1 << 20 }));
        let mut ring = Uring::new().unwrap();
        vq.avail().idx().store(17);
        assert_eq!(p.poll(0, &mut ring), 0);
        assert!(p.broken);
        vq.avail().idx().store(1);
        assert_eq!(p.poll(0, &mut ring), 0, "a broken queue stays stopped");
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(crate::virtio_blk::mock::USED_RING + 2))
                .unwrap(),
            0
        );
    }

    #[test]
    fn head_reused_while_in_flight_breaks_the_queue() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let vq = MockSplitQueue::new(&*mem, 16);
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let backend = BackendSpec::File {
            path: file.path().into(),
            buffered: true,
        };
        let mut p = poller(&vq, &mem, disk(backend));
        let mut ring = Uring::new().unwrap();
        vq.add_desc_chains(&chain(&mem, 0, VIRTIO_BLK_T_IN, 0, 0x20_0000), 0)
            .unwrap();
        assert_eq!(p.poll(0, &mut ring), 1);
        assert_eq!(p.in_flight(), 1);
        // The driver offers head 0 again before the device has used it.
        vq.add_desc_chains(&chain(&mem, 0, VIRTIO_BLK_T_IN, 0, 0x20_0000), 0)
            .unwrap();
        p.poll(0, &mut ring);
        assert!(p.broken);
        // The first request still completes normally.
        ring.submit().unwrap();
        let mut done = 0;
        for _ in 0..1000 {
            done += ring.reap(|ud, res| p.complete(split_user_data(ud).1, res));
            if done == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(done, 1);
        assert_eq!(status(&mem, 0), S_OK);
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut p = poller(&vq, &mem, disk(BackendSpec::Null { size: 1 << 20 }));
        let mut ring = Uring::new().unwrap();
        let mut d = chain(
            &mem,
            0,
            crate::virtio_blk::request::VIRTIO_BLK_T_GET_ID,
            0,
            0x20_0000,
        );
        d[1] = RawDescriptor::from(SplitDescriptor::new(0x20_0000, 20, W | 1, 2));
        vq.add_desc_chains(&d, 0).unwrap();
        assert_eq!(p.poll(0, &mut ring), 1);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&id[..8], b"serial-1");
        assert_eq!(status(&mem, 0), S_OK);
    }
}
