//! `struct virtio_blk_config`, serialized little-endian at the offsets of the virtio spec.

use crate::blk::model::MAX_DISCARD_SECTORS;
use crate::blk::{DeviceModel, SECTOR_SHIFT};

/// Bytes of the config fields vubd fills (through `write_zeroes_may_unmap` and padding);
/// later fields (secure erase, zoned) read as zero.
pub const CONFIG_LEN: usize = 60;

/// Largest data segment (bytes) and segment count per request offered to the guest.
pub const SIZE_MAX: u32 = 1 << 20;
pub const SEG_MAX: u32 = 254;
/// One range per DISCARD / WRITE_ZEROES request, as QEMU offers.
pub const MAX_DISCARD_SEG: u32 = 1;

pub const OFF_WRITEBACK: usize = 32;

pub fn build(model: &DeviceModel) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    let lbs = model.logical_block_size();
    let lbs_sectors = lbs >> SECTOR_SHIFT;
    put(0, &model.capacity_sectors().to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // geometry (16..20) stays zero: no CHS for a virtio disk.
    put(20, &lbs.to_le_bytes());
    // topology: physical block = logical block (exponent 0), no alignment offset,
    // min_io_size and opt_io_size in logical blocks.
    put(24, &[0u8, 0u8]);
    put(26, &1u16.to_le_bytes());
    put(28, &0u32.to_le_bytes());
    put(OFF_WRITEBACK, &[u8::from(model.writeback())]);
    put(34, &model.num_queues().to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &lbs_sectors.to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEG.to_le_bytes());
    put(56, &[1u8]);
    c
}

/// Size of the whole `struct virtio_blk_config` (virtio 1.2, with the secure-erase and zoned
/// fields vubd leaves at zero). Frontends read at most this much.
pub const CONFIG_SPACE: u32 = 96;

/// The bytes `[offset, offset + size)` of the config space; zero past what vubd fills.
/// `None` when the range leaves the config space.
pub fn read(config: &[u8; CONFIG_LEN], offset: u32, size: u32) -> Option<Vec<u8>> {
    let end = offset.checked_add(size)?;
    if end > CONFIG_SPACE {
        return None;
    }
    let mut out = vec![0u8; size as usize];
    for (i, b) in out.iter_mut().enumerate() {
        if let Some(v) = config.get(offset as usize + i) {
            *b = *v;
        }
    }
    Some(out)
}
