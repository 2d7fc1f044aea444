//! Inflight I/O tracking (vhost-user INFLIGHT_SHMFD, split rings): a shared memory region the
//! frontend keeps across backend restarts, in which the backend marks every request it took
//! from the avail ring until its used entry is published. A restarted vubd resubmits the
//! marked requests in the order it first saw them, so no I/O is lost when it is killed.
//!
//! Layout per queue (vhost-user spec, "Inflight I/O tracking"):
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//! each queue's area rounded up to 64 bytes. Everything in it comes from the frontend and is
//! treated as untrusted: head indices are bounded by the queue size and resubmitted chains
//! are parsed and validated like any other.
//!
//! Packed rings use the spec's packed layout instead (`QueueRegionPacked`), kept by
//! `packed::inflight` in the areas this region maps (`Layout::Packed`).

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};

use crate::guestmem::fault::Owner;
use crate::guestmem::mapping::Mapping;
use std::sync::Arc;

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;

/// Bytes of one queue's area for a queue of `queue_size` entries.
pub fn queue_area_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Which ring layout the region records: the frontend negotiated features (VIRTIO_F_RING_PACKED
/// or not) before GET_INFLIGHT_FD, so the region is made for one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Split,
    Packed,
}

impl Layout {
    /// Bytes of one queue's area.
    pub fn area_size(self, queue_size: u16) -> usize {
        match self {
            Layout::Split => queue_area_size(queue_size),
            Layout::Packed => crate::virtio_blk::packed::inflight::area_size(queue_size),
        }
    }
}

/// The whole shared region, mapped once; queues hold an `Arc` to it. The mapping is a
/// frontend mapping like guest memory (the frontend holds the fd): registered for SIGBUS
/// containment under the connection's id.
#[derive(Debug)]
pub struct InflightRegion {
    /// Held for `base`: unmapped (and out of the SIGBUS table) when the region goes.
    _mapping: Mapping,
    base: *mut u8,
    len: usize,
    file: File,
    pub num_queues: u16,
    pub queue_size: u16,
    layout: Layout,
}

// SAFETY: the mapping lives as long as the region; each queue's area is written only by the one reactor
// that owns the queue (areas do not overlap), and the control thread touches an area only
// while its queue is stopped.
unsafe impl Send for InflightRegion {}
// SAFETY: see Send.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh zeroed region in a memfd, each queue's header initialized.
    /// The memfd is sealed against shrinking: the frontend gets the fd, but cannot make our
    /// mapping of it fault.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn create(num_queues: u16, queue_size: u16, owner: Owner) -> io::Result<InflightRegion> {
        Self::create_layout(Layout::Split, num_queues, queue_size, owner)
    }

    /// `create` for the split or the packed layout.
    pub fn create_layout(
        layout: Layout,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
    ) -> io::Result<InflightRegion> {
        let len = layout.area_size(queue_size) * usize::from(num_queues);
        // SAFETY: the name is a NUL-terminated literal; the fd is checked below.
        let fd = unsafe {
            libc::memfd_create(
                c"vubd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh memfd owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: plain fcntl on our own memfd.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let region = Self::map(file, 0, len, num_queues, queue_size, owner, layout)?;
        for q in 0..num_queues {
            let area = region.area(q);
            match layout {
                Layout::Split => {
                    area.write_u16(OFF_VERSION, 1);
                    area.write_u16(OFF_DESC_NUM, queue_size);
                }
                Layout::Packed => crate::virtio_blk::packed::inflight::init(&area, queue_size),
            }
        }
        Ok(region)
    }

    /// SET_INFLIGHT_FD: the region a frontend kept from an earlier backend. Its size is
    /// checked against the file so that no access can fault.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
    ) -> io::Result<InflightRegion> {
        Self::open_layout(
            Layout::Split,
            file,
            offset,
            size,
            num_queues,
            queue_size,
            owner,
        )
    }

    /// `open` for the split or the packed layout.
    pub fn open_layout(
        layout: Layout,
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
    ) -> io::Result<InflightRegion> {
        let need = layout.area_size(queue_size) as u64 * u64::from(num_queues);
        let file_len = file.metadata()?.len();
        let end = offset
            .checked_add(size)
            .ok_or_else(|| io::Error::other("region overflows"))?;
        if num_queues == 0
            || queue_size == 0
            || size < need
            || end > file_len
            || !offset.is_multiple_of(4096)
        {
            return Err(io::Error::other(
                "inflight region does not fit its file or its queues",
            ));
        }
        Self::map(
            file,
            offset,
            need as usize,
            num_queues,
            queue_size,
            owner,
            layout,
        )
    }

    fn map(
        file: File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
        layout: Layout,
    ) -> io::Result<InflightRegion> {
        let mapping = Mapping::map(&file, offset, len, owner)?;
        Ok(InflightRegion {
            base: mapping.as_ptr(),
            _mapping: mapping,
            len,
            file,
            num_queues,
            queue_size,
            layout,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn mmap_size(&self) -> u64 {
        self.len as u64
    }

    pub(crate) fn area(&self, q: u16) -> Area {
        let size = self.layout.area_size(self.queue_size);
        // Checked in release builds too: the offset below relies on it.
        assert!(q < self.num_queues, "inflight queue {q} out of range");
        // SAFETY: q < num_queues (asserted), so the area lies inside the mapping.
        let base = unsafe { self.base.add(size * usize::from(q)) };
        Area { base, len: size }
    }

    /// The tracker of queue `q`, if the region covers it with the same queue size.
    pub fn queue(self: &Arc<Self>, q: u16, queue_size: u16) -> Option<InflightQueue> {
        if q >= self.num_queues || queue_size != self.queue_size || self.layout != Layout::Split {
            return None;
        }
        Some(InflightQueue {
            area: self.area(q),
            size: queue_size,
            counter: 1,
            _region: Arc::clone(self),
        })
    }
}

/// One queue's area. Accesses are volatile: the memory is shared with the frontend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Area {
    base: *mut u8,
    len: usize,
}

impl Area {
    pub(crate) fn write_u16(&self, off: usize, v: u16) {
        assert!(off + 2 <= self.len);
        // SAFETY: in bounds (asserted); unaligned write of plain bytes into our mapping.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<[u8; 2]>(), v.to_le_bytes()) }
    }
    pub(crate) fn read_u16(&self, off: usize) -> u16 {
        assert!(off + 2 <= self.len);
        // SAFETY: as in write_u16.
        u16::from_le_bytes(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<[u8; 2]>()) })
    }
    pub(crate) fn write_u8(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: as in write_u16.
        unsafe { std::ptr::write_volatile(self.base.add(off), v) }
    }
    pub(crate) fn read_u8(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: as in write_u16.
        unsafe { std::ptr::read_volatile(self.base.add(off)) }
    }
    pub(crate) fn write_u64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as in write_u16.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<[u8; 8]>(), v.to_le_bytes()) }
    }
    pub(crate) fn write_u32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len);
        // SAFETY: as in write_u16.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<[u8; 4]>(), v.to_le_bytes()) }
    }
    pub(crate) fn read_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: as in write_u16.
        u32::from_le_bytes(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<[u8; 4]>()) })
    }
    pub(crate) fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: as in write_u16.
        u64::from_le_bytes(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<[u8; 8]>()) })
    }
}

fn desc_off(head: u16) -> usize {
    HEADER + DESC * usize::from(head)
}

/// The tracker one queue poller owns.
pub struct InflightQueue {
    area: Area,
    size: u16,
    /// Order in which heads were taken; resubmission follows it.
    counter: u64,
    _region: Arc<InflightRegion>,
}

// SAFETY: the area belongs to exactly one queue, and the queue to exactly one reactor.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    /// A head was taken from the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.area.write_u64(desc_off(head) + 8, self.counter);
        self.counter += 1;
        self.area.write_u8(desc_off(head), 1);
    }

    /// About to publish the used entry of `head`: after a crash between this and
    /// `end`, recovery knows which entry the used index may already include.
    pub fn pre_complete(&mut self, head: u16) {
        self.area.write_u16(OFF_LAST_BATCH_HEAD, head);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// The used entry of `head` is published and the used index is now `used_idx`.
    pub fn end(&mut self, head: u16, used_idx: u16) {
        if head < self.size {
            self.area.write_u8(desc_off(head), 0);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.area.write_u16(OFF_USED_IDX, used_idx);
    }

    /// Forgets every mark: for a record that cannot describe these rings. Tracking starts
    /// afresh at `ring_used_idx`.
    pub fn reset(&mut self, ring_used_idx: u16) {
        for h in 0..self.size {
            self.area.write_u8(desc_off(h), 0);
        }
        self.area.write_u16(OFF_USED_IDX, ring_used_idx);
        self.counter = 1;
    }

    /// `recover`, for rings whose driver has `avail_idx - ring_used_idx` requests
    /// outstanding. A record that marks more than that cannot describe these rings (another
    /// process wrote it, or a frontend made it up), and trusting it would put the ring past
    /// what the driver offered. It is then reset, so it records from here on, and
    /// `Err(marked)` says how many requests it had marked.
    pub fn recover_outstanding(
        &mut self,
        ring_used_idx: u16,
        avail_idx: u16,
    ) -> Result<Vec<u16>, usize> {
        let heads = self.recover(ring_used_idx);
        if heads.len() > usize::from(avail_idx.wrapping_sub(ring_used_idx)) {
            self.reset(ring_used_idx);
            return Err(heads.len());
        }
        Ok(heads)
    }

    /// After a restart, before the queue runs: repairs the last batch if the backend died
    /// between publishing a used entry and clearing its mark, and returns the heads still in
    /// flight in the order they were first taken. `ring_used_idx` is the used index in guest
    /// memory.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        if self.area.read_u16(OFF_USED_IDX) != ring_used_idx {
            let last = self.area.read_u16(OFF_LAST_BATCH_HEAD);
            if last < self.size {
                self.area.write_u8(desc_off(last), 0);
            }
            self.area.write_u16(OFF_USED_IDX, ring_used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.area.read_u8(desc_off(h)) == 1)
            .map(|h| (self.area.read_u64(desc_off(h) + 8), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(1, |(c, _)| c.saturating_add(1));
        heads.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_and_recovers_in_submission_order() {
        let region = Arc::new(InflightRegion::create(2, 8, 1).unwrap());
        assert_eq!(region.mmap_size(), 2 * 192);
        let mut q = region.queue(1, 8).unwrap();
        assert!(region.queue(2, 8).is_none() && region.queue(0, 16).is_none());
        for h in [5, 2, 7] {
            q.begin(h);
        }
        q.pre_complete(2);
        q.end(2, 1);
        // Crash after publishing 5's used entry (used idx 2) but before clearing its mark.
        q.pre_complete(5);
        // A restarted backend maps the same file.
        let file = region.file().try_clone().unwrap();
        let again = Arc::new(InflightRegion::open(file, 0, region.mmap_size(), 2, 8, 1).unwrap());
        let mut q2 = again.queue(1, 8).unwrap();
        assert_eq!(q2.recover(2), vec![7]);
        q2.begin(3);
        assert_eq!(
            q2.recover(2),
            vec![7, 3],
            "counter continues after the recovered ones"
        );
    }

    #[test]
    fn regions_too_small_for_their_queues_are_refused() {
        let region = InflightRegion::create(1, 8, 1).unwrap();
        let f = region.file().try_clone().unwrap();
        assert!(InflightRegion::open(f, 0, region.mmap_size(), 4, 8, 1).is_err());
        let f = region.file().try_clone().unwrap();
        assert!(InflightRegion::open(f, 0, u64::MAX, 1, 8, 1).is_err());
    }
}
