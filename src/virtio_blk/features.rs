//! Virtio and vhost-user feature bits offered by a block device.

use crate::blk::DeviceModel;

pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Packed virtqueues (virtio 1.1 §2.8). Offered by the vhost-user front end only, not part of
/// `device_features`: a transport offers it when it runs packed rings.
pub const VIRTIO_F_RING_PACKED: u32 = 34;

pub const fn bit(n: u32) -> u64 {
    1 << n
}

/// The virtio-blk features a device offers, whatever the transport: what every device does,
/// plus what its backend can (flush and the write cache, discard, write-zeroes) and RO for
/// read-only devices.
pub fn device_features(model: &DeviceModel) -> u64 {
    let caps = model.caps();
    let mut f = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0, |acc, &b| acc | bit(b));
    let optional = [
        (caps.flush, VIRTIO_BLK_F_FLUSH),
        (caps.flush, VIRTIO_BLK_F_CONFIG_WCE),
        (caps.discard, VIRTIO_BLK_F_DISCARD),
        (caps.write_zeroes, VIRTIO_BLK_F_WRITE_ZEROES),
        (model.read_only(), VIRTIO_BLK_F_RO),
    ];
    for (on, b) in optional {
        if on {
            f |= bit(b);
        }
    }
    f
}
