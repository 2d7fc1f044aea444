//! The VDUSE kernel ABI, written by hand from `include/uapi/linux/vduse.h` (API version 0,
//! the only one Linux 6.12 has): the structs the ioctls and messages carry, with their C
//! layout, and the ioctl numbers. Sizes and offsets are checked against the header's in the
//! tests below. Also the few virtio constants the front end needs beyond virtio-blk's.

/// `VDUSE_API_VERSION` of the header: what vubd speaks.
pub const API_VERSION: u64 = 0;
pub const NAME_MAX: usize = 256;

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The device sits behind an IOMMU (here: VDUSE's IOTLB); VDUSE refuses devices without it.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_FAILED: u8 = 0x80;

/// `VDUSE_ACCESS_*`: the permission of an IOTLB region (the device's view).
#[cfg(test)]
pub const ACCESS_RO: u8 = 1;
pub const ACCESS_RW: u8 = 3;

/// `enum vduse_req_type`.
pub const REQ_GET_VQ_STATE: u32 = 0;
pub const REQ_SET_STATUS: u32 = 1;
pub const REQ_UPDATE_IOTLB: u32 = 2;

pub const RESULT_OK: u32 = 0;
pub const RESULT_FAILED: u32 = 1;

/// `struct vduse_dev_config` without its flexible `config[]`, which follows it in the same
/// buffer (`CreateDev`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    pub name: [u8; NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// The largest config space VDUSE_CREATE_DEV gets from vubd: `struct virtio_blk_config`.
pub const MAX_CONFIG: usize = 96;

/// VDUSE_CREATE_DEV's argument: the header struct and the config space right after it.
#[repr(C)]
pub struct CreateDev {
    pub dev: DevConfig,
    pub config: [u8; MAX_CONFIG],
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbEntry {
    /// The mmap offset in the fd VDUSE_IOTLB_GET_FD returns.
    pub offset: u64,
    pub start: u64,
    /// Inclusive.
    pub last: u64,
    pub perm: u8,
}

/// `struct vduse_config_data` with room for the capacity field VDUSE_DEV_SET_CONFIG writes
/// (the kernel reads `length` bytes after the header).
#[repr(C)]
pub struct ConfigData {
    pub offset: u32,
    pub length: u32,
    pub buffer: [u8; MAX_CONFIG],
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info`; the union of split and packed state is the packed one's four
/// u16 (the split state is its first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// `split.avail_index` (what the driver set with set_vq_state), then packed fields.
    pub state: [u16; 4],
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VqEventFd {
    pub index: u32,
    pub fd: i32,
}

/// `struct vduse_dev_request` (read from /dev/vduse/NAME): the union is 32 u32s; its
/// members are decoded by `Request::decode`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevRequest {
    pub kind: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    pub payload: [u32; 32],
}

/// `struct vduse_dev_response` (written back). For GET_VQ_STATE the payload starts with
/// `struct vduse_vq_state`: u32 index, then u16 avail_index.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevResponse {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    pub payload: [u32; 32],
}

pub const REQUEST_SIZE: usize = std::mem::size_of::<DevRequest>();
pub const RESPONSE_SIZE: usize = std::mem::size_of::<DevResponse>();

/// A control message, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    GetVqState { index: u32 },
    SetStatus { status: u8 },
    UpdateIotlb { start: u64, last: u64 },
    Unknown(u32),
}

impl DevRequest {
    pub fn from_bytes(b: &[u8; REQUEST_SIZE]) -> DevRequest {
        let word =
            |i: usize| u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let mut payload = [0u32; 32];
        for (i, w) in payload.iter_mut().enumerate() {
            *w = word(6 + i);
        }
        DevRequest {
            kind: word(0),
            request_id: word(1),
            reserved: [word(2), word(3), word(4), word(5)],
            payload,
        }
    }

    pub fn decode(&self) -> Request {
        let p = &self.payload;
        let u64_at = |i: usize| u64::from(p[i]) | (u64::from(p[i + 1]) << 32);
        match self.kind {
            REQ_GET_VQ_STATE => Request::GetVqState { index: p[0] },
            // `struct vduse_dev_status { __u8 status; }`: the first byte of the union.
            REQ_SET_STATUS => Request::SetStatus {
                status: p[0].to_ne_bytes()[0],
            },
            REQ_UPDATE_IOTLB => Request::UpdateIotlb {
                start: u64_at(0),
                last: u64_at(2),
            },
            other => Request::Unknown(other),
        }
    }
}

impl DevResponse {
    pub fn new(request_id: u32, ok: bool) -> DevResponse {
        DevResponse {
            request_id,
            result: if ok { RESULT_OK } else { RESULT_FAILED },
            reserved: [0; 4],
            payload: [0; 32],
        }
    }

    /// The answer to GET_VQ_STATE: `struct vduse_vq_state { u32 index; u16 avail_index }`.
    pub fn vq_state(request_id: u32, index: u32, avail_index: u16) -> DevResponse {
        let mut r = DevResponse::new(request_id, true);
        r.payload[0] = index;
        let mut w = [0u8; 4];
        w[..2].copy_from_slice(&avail_index.to_ne_bytes());
        r.payload[1] = u32::from_ne_bytes(w);
        r
    }

    pub fn to_bytes(self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        let words = [self.request_id, self.result]
            .into_iter()
            .chain(self.reserved)
            .chain(self.payload);
        for (i, w) in words.enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }
}

// ioctl numbers: `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h (x86, arm64, riscv).
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const VDUSE_BASE: u64 = 0x81;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (VDUSE_BASE << 8) | nr
}

pub const VDUSE_SET_API_VERSION: u64 = ioc(IOC_WRITE, 0x01, 8);
pub const VDUSE_CREATE_DEV: u64 = ioc(IOC_WRITE, 0x02, std::mem::size_of::<DevConfig>());
pub const VDUSE_DESTROY_DEV: u64 = ioc(IOC_WRITE, 0x03, NAME_MAX);
pub const VDUSE_IOTLB_GET_FD: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x10,
    std::mem::size_of::<IotlbEntry>(),
);
pub const VDUSE_DEV_GET_FEATURES: u64 = ioc(IOC_READ, 0x11, 8);
pub const VDUSE_DEV_SET_CONFIG: u64 = ioc(IOC_WRITE, 0x12, 8);
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: u64 = ioc(IOC_NONE, 0x13, 0);
pub const VDUSE_VQ_SETUP: u64 = ioc(IOC_WRITE, 0x14, std::mem::size_of::<VqConfig>());
pub const VDUSE_VQ_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x15, std::mem::size_of::<VqInfo>());
pub const VDUSE_VQ_SETUP_KICKFD: u64 = ioc(IOC_WRITE, 0x16, std::mem::size_of::<VqEventFd>());
pub const VDUSE_VQ_INJECT_IRQ: u64 = ioc(IOC_WRITE, 0x17, 4);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Sizes and offsets of the C structs (x86_64 and every 64-bit Linux ABI).
    #[test]
    fn layouts_match_the_kernel_header() {
        assert_eq!(size_of::<DevConfig>(), 336);
        assert_eq!(offset_of!(DevConfig, vendor_id), 256);
        assert_eq!(offset_of!(DevConfig, features), 264);
        assert_eq!(offset_of!(DevConfig, vq_num), 272);
        assert_eq!(offset_of!(DevConfig, config_size), 332);
        assert_eq!(
            offset_of!(CreateDev, config),
            336,
            "config[] right after the header"
        );
        assert_eq!(size_of::<IotlbEntry>(), 32);
        assert_eq!(offset_of!(IotlbEntry, perm), 24);
        assert_eq!(offset_of!(ConfigData, buffer), 8);
        assert_eq!(size_of::<VqConfig>(), 32);
        assert_eq!(size_of::<VqInfo>(), 48);
        assert_eq!(offset_of!(VqInfo, state), 32);
        assert_eq!(offset_of!(VqInfo, ready), 40);
        assert_eq!(size_of::<VqEventFd>(), 8);
        assert_eq!(REQUEST_SIZE, 152);
        assert_eq!(RESPONSE_SIZE, 152);
        assert_eq!(offset_of!(DevRequest, payload), 24);
        assert_eq!(offset_of!(DevResponse, payload), 24);
    }

    /// The values `_IOR`/`_IOW`/`_IOWR` give for the header's definitions.
    #[test]
    fn ioctl_numbers() {
        assert_eq!(VDUSE_SET_API_VERSION, 0x4008_8101);
        assert_eq!(VDUSE_CREATE_DEV, 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x4100_8103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(VDUSE_DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(VDUSE_DEV_SET_CONFIG, 0x4008_8112);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, 0x0000_8113);
        assert_eq!(VDUSE_VQ_SETUP, 0x4020_8114);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x4004_8117);
        // The reactors' seccomp filter allows this one ioctl by number.
        assert_eq!(
            VDUSE_VQ_INJECT_IRQ,
            crate::sandbox::seccomp::VDUSE_VQ_INJECT_IRQ
        );
    }

    fn request(kind: u32, id: u32, payload: &[u32]) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        for (i, w) in payload.iter().enumerate() {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    #[test]
    fn requests_decode() {
        let r = DevRequest::from_bytes(&request(REQ_SET_STATUS, 7, &[0xf]));
        assert_eq!(
            (r.request_id, r.decode()),
            (7, Request::SetStatus { status: 0xf })
        );
        let r = DevRequest::from_bytes(&request(REQ_GET_VQ_STATE, 8, &[3]));
        assert_eq!(r.decode(), Request::GetVqState { index: 3 });
        let r = DevRequest::from_bytes(&request(
            REQ_UPDATE_IOTLB,
            9,
            &[0x1000, 0x1, u32::MAX, u32::MAX],
        ));
        assert_eq!(
            r.decode(),
            Request::UpdateIotlb {
                start: 0x1_0000_1000,
                last: u64::MAX
            }
        );
        let r = DevRequest::from_bytes(&request(42, 10, &[]));
        assert_eq!(r.decode(), Request::Unknown(42));
    }

    #[test]
    fn responses_encode() {
        let b = DevResponse::vq_state(5, 1, 0x1234).to_bytes();
        assert_eq!(&b[0..8], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..30], &[1, 0, 0, 0, 0x34, 0x12]);
        let b = DevResponse::new(6, false).to_bytes();
        assert_eq!(&b[4..8], &RESULT_FAILED.to_ne_bytes());
        assert!(b[8..].iter().all(|&x| x == 0), "reserved must be zero");
    }
}
