//! A virtio-blk request parsed from a descriptor chain, with every MUST of the virtio spec
//! checked here: the header is device-readable, readable descriptors precede writable ones,
//! the status byte is the last byte of a device-writable descriptor inside guest memory,
//! the chain is not truncated and lengths do not overflow.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::config::{MAX_DISCARD_SECTORS, SEG_MAX};
use super::{S_IOERR, S_UNSUPP};
use crate::io::iovec::{GuestRange, MAX_IOVECS};
use crate::io::{Disk, SECTOR_SHIFT, SECTOR_SIZE};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            t => RequestType::Unsupported(t),
        }
    }
}

/// The one range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No usable status byte (truncated chain, no writable descriptor, status outside
    /// memory): the request cannot be completed, the queue must stop.
    Fatal(&'static str),
    /// The status byte is known: complete with this status.
    Status(u8, &'static str),
}

/// A parsed request. Reused across requests so parsing allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Request {
    kind: Option<RequestType>,
    sector: u64,
    data: Vec<GuestRange>,
    data_len: u64,
    status: GuestAddress,
    segment: Segment,
}

/// Scratch lists of the readable and writable parts of a chain.
#[derive(Debug, Default)]
pub struct Parser {
    readable: Vec<GuestRange>,
    writable: Vec<GuestRange>,
    /// Where the status byte is, once known: lets callers complete a request whose parse
    /// failed with `ParseError::Status`.
    status: Option<GuestAddress>,
}

impl Request {
    pub fn kind(&self) -> RequestType {
        self.kind.unwrap_or(RequestType::Unsupported(u32::MAX))
    }
    pub fn sector(&self) -> u64 {
        self.sector
    }
    pub fn data(&self) -> &[GuestRange] {
        &self.data
    }
    pub fn data_len(&self) -> u64 {
        self.data_len
    }
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }
    pub fn segment(&self) -> Segment {
        self.segment
    }
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// Checks the request against the disk: ranges inside the capacity with checked
    /// arithmetic, lengths and offsets aligned to the logical block size, no writes to a
    /// read-only disk. Returns the status to complete with on failure.
    pub fn check(&self, disk: &Disk) -> Result<(), (u8, &'static str)> {
        let lbs = u64::from(disk.logical_block_size);
        let in_range = |sector: u64, bytes: u64| -> Result<(), (u8, &'static str)> {
            let start = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or((S_IOERR, "sector overflows"))?;
            if start % lbs != 0 || bytes % lbs != 0 {
                return Err((S_IOERR, "not aligned to the logical block size"));
            }
            let end = start
                .checked_add(bytes)
                .ok_or((S_IOERR, "range overflows"))?;
            if end > disk.capacity {
                return Err((S_IOERR, "beyond the end of the disk"));
            }
            Ok(())
        };
        match self.kind() {
            RequestType::In => in_range(self.sector, self.data_len),
            RequestType::Out => {
                if disk.read_only {
                    return Err((S_IOERR, "write to a read-only disk"));
                }
                in_range(self.sector, self.data_len)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if disk.read_only {
                    return Err((S_IOERR, "discard or write-zeroes on a read-only disk"));
                }
                let s = self.segment;
                let allowed = if self.kind() == RequestType::Discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if s.flags & !allowed != 0 {
                    return Err((S_UNSUPP, "unsupported segment flags"));
                }
                if s.num_sectors > MAX_DISCARD_SECTORS {
                    return Err((S_IOERR, "segment larger than the advertised limit"));
                }
                in_range(s.sector, u64::from(s.num_sectors) << SECTOR_SHIFT)
            }
            RequestType::Flush | RequestType::GetId => Ok(()),
            RequestType::Unsupported(_) => Err((S_UNSUPP, "unsupported request type")),
        }
    }
}

impl Parser {
    /// Where the status byte of the last chain is, if it was found.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.status
    }

    /// Walks one chain and fills `req`. The walk is bounded by the chain iterator (at most
    /// queue-size descriptors per table, no nested indirect tables, at most 4 GiB in total).
    pub fn parse<I>(
        &mut self,
        descriptors: I,
        mem: &GuestMemoryMmap,
        req: &mut Request,
    ) -> Result<(), ParseError>
    where
        I: Iterator<Item = Descriptor>,
    {
        self.readable.clear();
        self.writable.clear();
        self.status = None;
        req.data.clear();
        req.kind = None;
        req.data_len = 0;

        let mut last: Option<Descriptor> = None;
        let mut writable_seen = false;
        let mut readable_after_writable = false;
        let mut too_many = false;
        for d in descriptors {
            let range = GuestRange {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                writable_seen = true;
                push_bounded(&mut self.writable, range, &mut too_many);
            } else {
                readable_after_writable |= writable_seen;
                push_bounded(&mut self.readable, range, &mut too_many);
            }
            last = Some(d);
        }
        // A chain whose last descriptor still says NEXT was cut short by the walker: a loop,
        // an index beyond the table, a bad indirect table or a length overflow.
        let last = last.ok_or(ParseError::Fatal("empty or unreadable chain"))?;
        if last.has_next() {
            return Err(ParseError::Fatal(
                "malformed chain (loop, bad index or bad indirect table)",
            ));
        }
        if !last.is_write_only() || last.len() == 0 {
            return Err(ParseError::Fatal(
                "last descriptor is not a device-writable status byte",
            ));
        }
        let status = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or(ParseError::Fatal("status address overflows"))?;
        if !mem.check_range(status, 1, Permissions::Write) {
            return Err(ParseError::Fatal("status byte outside guest memory"));
        }
        self.status = Some(status);
        req.status = status;
        // The status byte is not data.
        trim_back(&mut self.writable, 1);

        if readable_after_writable {
            return Err(ParseError::Status(
                S_IOERR,
                "readable descriptor after a writable one",
            ));
        }
        if too_many {
            return Err(ParseError::Status(S_IOERR, "too many descriptors"));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        read_front(mem, &self.readable, &mut header)
            .map_err(|_| ParseError::Status(S_IOERR, "header missing or outside guest memory"))?;
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        req.sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        req.kind = Some(RequestType::from(kind));

        match req.kind() {
            RequestType::In | RequestType::GetId => {
                std::mem::swap(&mut req.data, &mut self.writable);
            }
            RequestType::Out => {
                std::mem::swap(&mut req.data, &mut self.readable);
                trim_front(&mut req.data, HEADER_LEN);
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                trim_front(&mut self.readable, HEADER_LEN);
                let total: u64 = self.readable.iter().map(|r| u64::from(r.len)).sum();
                if total != SEGMENT_LEN {
                    // One segment per request is what the config space offers.
                    return Err(ParseError::Status(S_IOERR, "expected exactly one segment"));
                }
                let mut seg = [0u8; SEGMENT_LEN as usize];
                read_front(mem, &self.readable, &mut seg)
                    .map_err(|_| ParseError::Status(S_IOERR, "segment outside guest memory"))?;
                req.segment = Segment {
                    sector: u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes")),
                    num_sectors: u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes")),
                    flags: u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes")),
                };
            }
            RequestType::Flush | RequestType::Unsupported(_) => {}
        }
        req.data_len = req.data.iter().map(|r| u64::from(r.len)).sum();
        Ok(())
    }
}

fn push_bounded(list: &mut Vec<GuestRange>, r: GuestRange, too_many: &mut bool) {
    if r.len == 0 {
        return;
    }
    // SEG_MAX data segments plus header and status, with room for guests that split them.
    if list.len() >= MAX_IOVECS.min(SEG_MAX as usize * 4) {
        *too_many = true;
        return;
    }
    list.push(r);
}

/// Drops the first `n` bytes of a range list.
fn trim_front(list: &mut Vec<GuestRange>, mut n: u64) {
    let mut drop = 0;
    for r in list.iter_mut() {
        if n == 0 {
            break;
        }
        let take = n.min(u64::from(r.len));
        // take <= r.len, so both fit.
        r.addr = r.addr.unchecked_add(take);
        r.len -= take as u32;
        n -= take;
        if r.len == 0 {
            drop += 1;
        }
    }
    list.drain(..drop);
}

/// Drops the last `n` bytes of a range list.
fn trim_back(list: &mut Vec<GuestRange>, mut n: u64) {
    while n > 0 {
        let Some(r) = list.last_mut() else { return };
        let take = n.min(u64::from(r.len));
        r.len -= take as u32;
        n -= take;
        if r.len == 0 {
            list.pop();
        }
    }
}

/// Copies the first `out.len()` bytes described by `ranges` out of guest memory.
fn read_front(mem: &GuestMemoryMmap, ranges: &[GuestRange], out: &mut [u8]) -> Result<(), ()> {
    let mut done = 0;
    for r in ranges {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(r.len as usize);
        mem.read_slice(&mut out[done..done + n], r.addr)
            .map_err(|_| ())?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}
