//! A virtio-blk request parsed from a descriptor chain, with every MUST of the virtio spec
//! checked here: the header is device-readable, readable descriptors precede writable ones,
//! the status byte is the last byte of a device-writable descriptor inside guest memory,
//! the chain is not truncated and lengths do not overflow.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, GuestAddress};

use crate::guestmem::{access, GuestMemoryMmap};

use super::config::SEG_MAX;
use super::iovec::{GuestRange, MAX_IOVECS};
use crate::blk::{BlockError, DeviceModel, Op, SECTOR_SHIFT};

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
    /// The status byte is known: complete with VIRTIO_BLK_S_IOERR.
    Invalid(&'static str),
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
    #[cfg(any(test, feature = "test-utils"))]
    pub fn sector(&self) -> u64 {
        self.sector
    }
    pub fn data(&self) -> &[GuestRange] {
        &self.data
    }
    #[cfg(any(test, feature = "test-utils"))]
    pub fn data_len(&self) -> u64 {
        self.data_len
    }
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }
    #[cfg(any(test, feature = "test-utils"))]
    pub fn segment(&self) -> Segment {
        self.segment
    }
    #[cfg(any(test, feature = "test-utils"))]
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// What the block core is asked to do: the op, byte offset and byte length. Checks
    /// what only virtio-blk defines (segment flags, sector arithmetic); the device model
    /// checks the rest.
    pub fn block_op(&self, model: &DeviceModel) -> Result<(Op, u64, u64), BlockError> {
        let bytes = |sector: u64| {
            sector
                .checked_mul(1 << SECTOR_SHIFT)
                .ok_or(BlockError::Overflow)
        };
        match self.kind() {
            RequestType::In => Ok((Op::Read, bytes(self.sector)?, self.data_len)),
            RequestType::Out => Ok((model.write_op(), bytes(self.sector)?, self.data_len)),
            RequestType::Flush => Ok((Op::Flush, 0, 0)),
            RequestType::Discard | RequestType::WriteZeroes => {
                let s = self.segment;
                let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                let op = match self.kind() {
                    RequestType::Discard if s.flags == 0 => Op::Discard,
                    RequestType::WriteZeroes
                        if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 0 =>
                    {
                        Op::WriteZeroes { unmap }
                    }
                    _ => return Err(BlockError::Unsupported),
                };
                let len = u64::from(s.num_sectors) << SECTOR_SHIFT;
                Ok((op, bytes(s.sector)?, len))
            }
            RequestType::GetId | RequestType::Unsupported(_) => Err(BlockError::Unsupported),
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
        // One byte lies in a region or in none: the region lookup alone decides (vm-memory's
        // `check_range` walks a slice iterator to say the same).
        if access::host_range(mem, status, 1).is_none() {
            return Err(ParseError::Fatal("status byte outside guest memory"));
        }
        self.status = Some(status);
        req.status = status;
        // The status byte is not data.
        trim_back(&mut self.writable, 1);

        if readable_after_writable {
            return Err(ParseError::Invalid(
                "readable descriptor after a writable one",
            ));
        }
        if too_many {
            return Err(ParseError::Invalid("too many descriptors"));
        }
        let header: [u8; HEADER_LEN as usize] = read_front(mem, &self.readable).ok_or(
            ParseError::Invalid("header missing or outside guest memory"),
        )?;
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
                    return Err(ParseError::Invalid("expected exactly one segment"));
                }
                let seg: [u8; SEGMENT_LEN as usize] = read_front(mem, &self.readable)
                    .ok_or(ParseError::Invalid("segment outside guest memory"))?;
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

/// The first `N` bytes described by `ranges`, out of guest memory. Drivers put a header
/// in one buffer of its own, or at the start of the first: then it is one read.
fn read_front<const N: usize>(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Option<[u8; N]>
where
    [u8; N]: ByteValued,
{
    if let Some(r) = ranges.first().filter(|r| r.len as usize >= N) {
        return access::read_obj::<[u8; N]>(mem, r.addr);
    }
    let mut out = [0u8; N];
    let mut done = 0;
    for r in ranges {
        if done == N {
            break;
        }
        let n = (N - done).min(r.len as usize);
        if !access::read_bytes(mem, r.addr, &mut out[done..done + n]) {
            return None;
        }
        done += n;
    }
    (done == N).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::model::Caps;
    use crate::blk::BlockRequest;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (Result<(), ParseError>, Request) {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut req = Request::default();
        let r = Parser::default().parse(chain, mem, &mut req);
        (r, req)
    }

    fn disk(read_only: bool, lbs: u32) -> DeviceModel {
        DeviceModel::new(1 << 20, lbs, read_only, true, "", Caps::ALL, 1)
    }

    /// What the front end checks before a backend sees the request.
    fn check(req: &Request, model: &DeviceModel) -> Result<(), BlockError> {
        let (op, offset, len) = req.block_op(model)?;
        model.check(&BlockRequest {
            op,
            offset,
            len,
            ..BlockRequest::default()
        })
    }

    #[test]
    fn read_with_two_data_segments() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let (r, req) = parse(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 4096, 1024, W),
                desc(STATUS, 1, W),
            ],
        );
        r.unwrap();
        assert_eq!(req.kind(), RequestType::In);
        assert_eq!(req.sector(), 8);
        assert_eq!(req.data_len(), 1536);
        assert_eq!(req.data().len(), 2);
        assert_eq!(req.status_addr(), GuestAddress(STATUS));
        assert!(check(&req, &disk(false, 512)).is_ok());
    }

    #[test]
    fn header_split_over_three_descriptors_is_read_whole() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0x1234_5678);
        // 4 + 5 + 7 bytes: the slow path of `read_front`, each piece from its own place.
        let (r, req) = parse(
            &m,
            &[
                desc(HDR, 4, 0),
                desc(HDR + 4, 5, 0),
                desc(HDR + 9, 7, 0),
                desc(DATA, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        r.unwrap();
        assert_eq!(req.kind(), RequestType::In);
        assert_eq!(req.sector(), 0x1234_5678);
        assert_eq!(req.data_len(), 512);
        let (r, _) = parse(
            &m,
            &[desc(HDR, 4, 0), desc(HDR + 4, 5, 0), desc(STATUS, 1, W)],
        );
        assert!(
            matches!(r, Err(ParseError::Invalid(_))),
            "9 header bytes in all: {r:?}"
        );
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor_and_status_in_data() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        // Header and data share one readable buffer; status is the last byte of a writable one.
        let (r, req) = parse(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 4, W)]);
        r.unwrap();
        assert_eq!(req.kind(), RequestType::Out);
        assert_eq!(
            req.data(),
            &[GuestRange {
                addr: GuestAddress(HDR + 16),
                len: 512
            }]
        );
        assert_eq!(req.status_addr(), GuestAddress(STATUS + 3));
    }

    #[test]
    fn discard_segment_is_read() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        m.write_obj(16u64, GuestAddress(DATA)).unwrap();
        m.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
        m.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
        let (r, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
        );
        r.unwrap();
        assert_eq!(
            req.segment(),
            Segment {
                sector: 16,
                num_sectors: 8,
                flags: 0
            }
        );
        assert!(check(&req, &disk(false, 512)).is_ok());
        assert_eq!(check(&req, &disk(true, 512)), Err(BlockError::ReadOnly));
    }

    #[test]
    fn read_only_status_descriptor_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (r, _) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)],
        );
        assert!(matches!(r, Err(ParseError::Fatal(_))));
        let (r, _) = parse(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, 0)]);
        assert!(matches!(r, Err(ParseError::Fatal(_))));
    }

    #[test]
    fn zero_length_status_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (r, _) = parse(&m, &[desc(HDR, 16, 0), desc(STATUS, 0, W)]);
        assert!(matches!(r, Err(ParseError::Fatal(_))));
    }

    #[test]
    fn write_only_header_fails_with_ioerr() {
        let m = mem();
        let (r, _) = parse(&m, &[desc(HDR, 16, W), desc(STATUS, 1, W)]);
        assert_eq!(
            r,
            Err(ParseError::Invalid(
                "header missing or outside guest memory"
            ))
        );
    }

    #[test]
    fn readable_after_writable_fails_with_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (r, _) = parse(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, 0),
                desc(STATUS, 1, W),
            ],
        );
        assert!(matches!(r, Err(ParseError::Invalid(_))), "{r:?}");
    }

    #[test]
    fn header_outside_memory_fails_with_ioerr() {
        let m = mem();
        let (r, _) = parse(&m, &[desc(0x1000_0000, 16, 0), desc(STATUS, 1, W)]);
        assert!(matches!(r, Err(ParseError::Invalid(_))));
    }

    #[test]
    fn status_outside_memory_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (r, _) = parse(&m, &[desc(HDR, 16, 0), desc(0x1000_0000, 1, W)]);
        assert_eq!(
            r,
            Err(ParseError::Fatal("status byte outside guest memory"))
        );
        let (r, _) = parse(&m, &[desc(HDR, 16, 0), desc(u64::MAX, 2, W)]);
        assert!(matches!(r, Err(ParseError::Fatal(_))));
    }

    #[test]
    fn descriptor_loop_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...: the walker stops after queue-size descriptors.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, N, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, N | W, 0)),
        ];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let r = Parser::default().parse(chain, &m, &mut Request::default());
        assert!(matches!(r, Err(ParseError::Fatal(_))), "{r:?}");
    }

    #[test]
    fn next_index_beyond_table_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, N, 200))];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let r = Parser::default().parse(chain, &m, &mut Request::default());
        assert!(matches!(r, Err(ParseError::Fatal(_))));
    }

    #[test]
    fn nested_indirect_table_is_fatal() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let table = GuestAddress(0x38_0000);
        let inner = RawDescriptor::from(SplitDescriptor::new(
            0x39_0000,
            32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        m.write_obj(inner, table).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            table.0,
            16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let r = Parser::default().parse(chain, &m, &mut Request::default());
        assert!(matches!(r, Err(ParseError::Fatal(_))), "{r:?}");
    }

    #[test]
    fn indirect_table_is_followed() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 2);
        let table = GuestAddress(0x38_0000);
        let entries = [
            SplitDescriptor::new(HDR, 16, N, 1),
            SplitDescriptor::new(DATA, 4096, N | W, 2),
            SplitDescriptor::new(STATUS, 1, W, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*e), table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            table.0,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))];
        let chain = vq.build_multiple_desc_chains(&descs).unwrap();
        let mut req = Request::default();
        Parser::default().parse(chain, &m, &mut req).unwrap();
        assert_eq!(
            (req.kind(), req.sector(), req.data_len()),
            (RequestType::In, 2, 4096)
        );
    }

    #[test]
    fn range_and_alignment_checks() {
        let m = mem();
        let d = disk(false, 512);
        let cap = d.capacity_sectors();
        header(&m, VIRTIO_BLK_T_IN, cap - 1);
        let (r, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)],
        );
        r.unwrap();
        assert_eq!(check(&req, &d), Err(BlockError::OutOfRange));
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 2);
        let (_, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert_eq!(check(&req, &d), Err(BlockError::Overflow));
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (_, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
        );
        assert_eq!(check(&req, &d), Err(BlockError::Unaligned));
        let (_, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert_eq!(
            check(&req, &disk(false, 4096)),
            Err(BlockError::Unaligned),
            "512 B on a 4K disk"
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (_, req) = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(check(&req, &disk(true, 512)), Err(BlockError::ReadOnly));
        header(&m, 77, 0);
        let (_, req) = parse(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
        assert_eq!(req.kind(), RequestType::Unsupported(77));
        assert_eq!(
            check(&req, &d).unwrap_err().status(),
            crate::blk::error::status::UNSUPP
        );
    }
}
