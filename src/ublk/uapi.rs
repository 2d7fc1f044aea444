//! The ublk kernel ABI, written by hand from `include/uapi/linux/ublk_cmd.h` (Linux 6.12,
//! plus `UBLK_U_CMD_UPDATE_SIZE` / `UBLK_F_UPDATE_SIZE` of 6.16): command numbers in their
//! ioctl encoding, feature and attribute bits, and the structures the kernel reads and
//! writes, with their sizes checked against the C layout in the tests below.

/// `_IOC(dir, type, nr, size)` of `include/uapi/asm-generic/ioctl.h`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    // Fits: the structures are 16 and 32 bytes (the size field has 14 bits).
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ior_ctrl(nr: u32) -> u32 {
    ioc(IOC_READ, nr, std::mem::size_of::<CtrlCmd>())
}
const fn iowr_ctrl(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<CtrlCmd>())
}
const fn iowr_io(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<IoCmd>())
}

// Control commands, sent to /dev/ublk-control (UBLK_U_CMD_*).
pub const CMD_GET_DEV_INFO: u32 = ior_ctrl(0x02);
pub const CMD_ADD_DEV: u32 = iowr_ctrl(0x04);
pub const CMD_DEL_DEV: u32 = iowr_ctrl(0x05);
pub const CMD_START_DEV: u32 = iowr_ctrl(0x06);
pub const CMD_STOP_DEV: u32 = iowr_ctrl(0x07);
pub const CMD_SET_PARAMS: u32 = iowr_ctrl(0x08);
pub const CMD_GET_PARAMS: u32 = ior_ctrl(0x09);
pub const CMD_START_USER_RECOVERY: u32 = iowr_ctrl(0x10);
pub const CMD_END_USER_RECOVERY: u32 = iowr_ctrl(0x11);
pub const CMD_GET_DEV_INFO2: u32 = ior_ctrl(0x12);
pub const CMD_GET_FEATURES: u32 = ior_ctrl(0x13);
/// Linux 6.16 and later (feature `F_UPDATE_SIZE`).
pub const CMD_UPDATE_SIZE: u32 = iowr_ctrl(0x15);

// I/O commands, sent to /dev/ublkcN (UBLK_U_IO_*).
pub const IO_FETCH_REQ: u32 = iowr_io(0x20);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr_io(0x21);

/// A fetch completes with this when a request arrived.
pub const IO_RES_OK: i32 = 0;
/// A fetch completes with this when the device stops: no further fetch for that tag.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// The per-queue descriptor arrays sit in /dev/ublkcN at `q * max_cmd_buf_size`, the size
/// of the largest queue's array rounded to pages (`ublk_max_cmd_buf_size`).
pub const fn max_cmd_buf_size(page: usize) -> usize {
    round_up(
        MAX_QUEUE_DEPTH as usize * std::mem::size_of::<IoDesc>(),
        page,
    )
}
/// The size of one queue's descriptor array as the kernel maps it.
pub const fn cmd_buf_size(depth: u16, page: usize) -> usize {
    round_up(depth as usize * std::mem::size_of::<IoDesc>(), page)
}
const fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

// Feature flags (ADD_DEV `flags`, GET_FEATURES).
pub const F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const F_NEED_GET_DATA: u64 = 1 << 2;
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const F_USER_COPY: u64 = 1 << 7;
pub const F_ZONED: u64 = 1 << 8;
/// Linux 6.16 and later.
pub const F_UPDATE_SIZE: u64 = 1 << 10;

/// Names of the feature bits, for logs.
pub const FEATURE_NAMES: [(u64, &str); 10] = [
    (1 << 0, "SUPPORT_ZERO_COPY"),
    (F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (F_NEED_GET_DATA, "NEED_GET_DATA"),
    (F_USER_RECOVERY, "USER_RECOVERY"),
    (F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (F_USER_COPY, "USER_COPY"),
    (F_ZONED, "ZONED"),
    (F_UPDATE_SIZE, "UPDATE_SIZE"),
];

/// `a,b,c` for the bits of `flags` (unknown ones as `bitN`).
pub fn feature_names(flags: u64) -> String {
    (0..64)
        .filter(|b| flags & (1 << b) != 0)
        .map(|b| {
            FEATURE_NAMES
                .iter()
                .find(|(f, _)| *f == 1 << b)
                .map_or_else(|| format!("bit{b}"), |(_, n)| (*n).to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

// Device states (dev_info.state).
pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

pub fn state_name(s: u16) -> &'static str {
    match s {
        S_DEV_DEAD => "dead",
        S_DEV_LIVE => "live",
        S_DEV_QUIESCED => "quiesced",
        _ => "unknown",
    }
}

// Request operations (`IoDesc::op_flags & 0xff`) and flags: the flags are bits of
// `op_flags` as they stand (the kernel ORs them in; libublksrv tests `op_flags & FLAG`).
pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
pub const IO_OP_WRITE_ZEROES: u8 = 5;
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

// ublk_param_basic.attrs
pub const ATTR_READ_ONLY: u32 = 1 << 0;
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;

// ublk_params.types
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the 32 bytes of a control command, in the SQE's command area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX` when the command is not for a queue.
    pub queue_id: u16,
    /// Bytes at `addr`.
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    /// Unprivileged devices: the length of the char device path that starts the buffer at
    /// `addr` (NUL included).
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

impl CtrlCmd {
    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        b
    }
}

/// `struct ublksrv_ctrl_dev_info`: ADD_DEV's argument and answer, GET_DEV_INFO's answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// For the server's own use: the kernel keeps it and never reads it.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, written by the kernel into the queue's shared
/// array at the request's tag before its fetch completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Operation in bits 0-7, flags above.
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        // Fits: the low byte.
        (self.op_flags & 0xff) as u8
    }

    /// Whether `IO_F_*` flag `f` is set.
    pub fn has(&self, f: u32) -> bool {
        self.op_flags & f != 0
    }
}

/// `struct ublksrv_io_cmd`: the 16 bytes of FETCH_REQ / COMMIT_AND_FETCH_REQ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// COMMIT: bytes done, or -errno.
    pub result: i32,
    /// The data buffer of this tag in our address space.
    pub addr: u64,
}

impl IoCmd {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    /// Largest request, in sectors (at most `max_io_buf_bytes >> 9`).
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Must be 1 when discard is offered (one range per request).
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_param_devt`: read-only, filled by GET_PARAMS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned` (unused by vubd: here for the layout of `Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_params`: SET_PARAMS' argument, GET_PARAMS' answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Bytes of this structure the caller knows (the kernel copies at most that).
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
}

/// Plain-data structures the kernel copies to and from our memory.
///
/// # Safety
/// Implementors are `repr(C)` structs of integers (and arrays of them) for which every bit
/// pattern is a valid value.
pub unsafe trait Pod: Copy + Default {}
// SAFETY: repr(C) structs of integers only.
unsafe impl Pod for DevInfo {}
// SAFETY: as above.
unsafe impl Pod for Params {}
// SAFETY: a plain integer.
unsafe impl Pod for u64 {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Sizes and offsets printed by gcc from the 6.12 header (`sizeof`, `offsetof`).
    #[test]
    fn structures_match_the_kernel_layout() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<ParamDevt>(), 16);
        assert_eq!(size_of::<ParamZoned>(), 32);
        assert_eq!(size_of::<Params>(), 112);
        assert_eq!(offset_of!(Params, basic), 8);
        assert_eq!(offset_of!(Params, discard), 40);
        assert_eq!(offset_of!(Params, devt), 60);
        assert_eq!(offset_of!(Params, zoned), 76);
        assert_eq!(offset_of!(DevInfo, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(DevInfo, ublksrv_pid), 16);
        assert_eq!(offset_of!(DevInfo, flags), 24);
        assert_eq!(offset_of!(DevInfo, owner_uid), 40);
        assert_eq!(offset_of!(CtrlCmd, data), 16);
        assert_eq!(offset_of!(CtrlCmd, dev_path_len), 24);
        assert_eq!(offset_of!(IoDesc, start_sector), 8);
        assert_eq!(offset_of!(IoCmd, addr), 8);
    }

    /// The values of the UBLK_U_* macros, printed by gcc from the 6.12 header.
    #[test]
    fn commands_use_the_ioctl_encoding() {
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(CMD_START_DEV, 0xc020_7506);
        assert_eq!(CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        // _IOWR('u', 0x15, struct ublksrv_ctrl_cmd), Linux 6.16.
        assert_eq!(CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn command_bytes_are_the_c_layout() {
        let c = CtrlCmd {
            dev_id: 7,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            dev_path_len: 12,
            pad: 0,
            reserved: 0,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &42u64.to_ne_bytes());
        assert_eq!(&b[24..26], &12u16.to_ne_bytes());
        let io = IoCmd {
            q_id: 1,
            tag: 513,
            result: -5,
            addr: 0x7000_0000,
        }
        .to_bytes();
        assert_eq!(&io[2..4], &513u16.to_ne_bytes());
        assert_eq!(&io[4..8], &(-5i32).to_ne_bytes());
        assert_eq!(&io[8..16], &0x7000_0000u64.to_ne_bytes());
    }

    #[test]
    fn descriptor_areas() {
        // ublk_max_cmd_buf_size(): 4096 descriptors of 24 bytes, in 4 KiB pages.
        assert_eq!(max_cmd_buf_size(4096), 98304);
        assert_eq!(cmd_buf_size(64, 4096), 4096);
        assert_eq!(cmd_buf_size(200, 4096), 8192);
        let d = IoDesc {
            op_flags: u32::from(IO_OP_WRITE) | IO_F_FUA,
            ..IoDesc::default()
        };
        assert_eq!(d.op(), IO_OP_WRITE);
        assert!(d.has(IO_F_FUA) && !d.has(IO_F_NOUNMAP));
    }

    #[test]
    fn feature_bits_have_names() {
        assert_eq!(
            feature_names(0x1fe),
            "URING_CMD_COMP_IN_TASK,NEED_GET_DATA,USER_RECOVERY,USER_RECOVERY_REISSUE,\
             UNPRIVILEGED_DEV,CMD_IOCTL_ENCODE,USER_COPY,ZONED"
        );
        assert_eq!(feature_names(1 << 12), "bit12");
    }
}
