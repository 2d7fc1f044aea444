//! The two kinds of VDUSE file: `/dev/vduse/control`, which creates and destroys devices,
//! and `/dev/vduse/NAME`, one device's message channel and ioctls. Every ioctl vubd makes
//! goes through here; the rest of the front end sees the device through `DevicePort`, which
//! the unit tests implement with a fake kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use super::uapi::{self, DevRequest, DevResponse, IotlbEntry, VqInfo};

pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// How long a new device's node may take to appear (udev on hosts without devtmpfs).
const NODE_WAIT: Duration = Duration::from_secs(5);

/// What the device's control thread and its queues ask of the kernel.
pub trait DevicePort: Send + Sync {
    /// VDUSE_DEV_GET_FEATURES: what the driver negotiated (valid after FEATURES_OK).
    fn driver_features(&self) -> io::Result<u64>;
    /// VDUSE_VQ_GET_INFO.
    fn vq_info(&self, index: u32) -> io::Result<VqInfo>;
    /// VDUSE_VQ_SETUP_KICKFD (`fd` -1 de-assigns).
    fn set_kickfd(&self, index: u32, fd: RawFd) -> io::Result<()>;
    /// VDUSE_IOTLB_GET_FD: the first IOTLB region overlapping `[start, last]` and an fd to
    /// map it from. `ErrorKind::NotFound` when there is none.
    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<(File, IotlbEntry)>;
    /// VDUSE_VQ_INJECT_IRQ: the driver looks at queue `index`'s used ring.
    fn inject_vq_irq(&self, index: u32) -> io::Result<()>;
    /// VDUSE_DEV_SET_CONFIG.
    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()>;
    /// VDUSE_DEV_INJECT_CONFIG_IRQ.
    fn inject_config_irq(&self) -> io::Result<()>;
}

/// `ioctl(fd, req, arg)`, retried on EINTR.
///
/// # Safety
/// `arg` must be what the kernel expects for `req`: a pointer to a live value of the
/// request's type (read or written for the size encoded in `req`), or an integer.
unsafe fn ioctl(fd: RawFd, req: u64, arg: usize) -> io::Result<i32> {
    loop {
        // SAFETY: the caller guarantees `arg` matches `req`.
        let rc = unsafe { libc::ioctl(fd, req as _, arg) };
        if rc >= 0 {
            return Ok(rc);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn name_bytes(name: &str) -> io::Result<[u8; uapi::NAME_MAX]> {
    let mut b = [0u8; uapi::NAME_MAX];
    if name.is_empty() || name.len() >= uapi::NAME_MAX || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad VDUSE device name",
        ));
    }
    b[..name.len()].copy_from_slice(name.as_bytes());
    Ok(b)
}

/// `/dev/vduse/control`, at API version 0.
#[derive(Debug)]
pub struct Control(File);

impl Control {
    pub fn open() -> io::Result<Control> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{CONTROL_PATH}: {e} (is the vduse module loaded? vubd must run as root)"
                    ),
                )
            })?;
        let version = uapi::API_VERSION;
        // SAFETY: SET_API_VERSION reads a u64 from the pointer, which points to a live local.
        unsafe {
            ioctl(
                f.as_raw_fd(),
                uapi::VDUSE_SET_API_VERSION,
                &version as *const u64 as usize,
            )
        }?;
        Ok(Control(f))
    }

    /// VDUSE_CREATE_DEV: a virtio-blk device with these features, queues and config space.
    pub fn create_dev(
        &self,
        name: &str,
        features: u64,
        vq_num: u32,
        config: &[u8],
    ) -> io::Result<()> {
        if config.len() > uapi::MAX_CONFIG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "config space too large",
            ));
        }
        let mut arg = uapi::CreateDev {
            dev: uapi::DevConfig {
                name: name_bytes(name)?,
                vendor_id: 0,
                device_id: uapi::VIRTIO_ID_BLOCK,
                features,
                vq_num,
                // The rings' alignment the driver allocates with: a page, as QEMU asks.
                vq_align: 4096,
                reserved: [0; 13],
                // Fits: at most MAX_CONFIG (checked above).
                config_size: config.len() as u32,
            },
            config: [0; uapi::MAX_CONFIG],
        };
        arg.config[..config.len()].copy_from_slice(config);
        // SAFETY: CREATE_DEV reads `struct vduse_dev_config` and then `config_size` bytes
        // after it: `arg` holds both, contiguously (repr(C)), and lives across the call.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_CREATE_DEV,
                &arg as *const uapi::CreateDev as usize,
            )
        }
        .map(|_| ())
    }

    /// VDUSE_DESTROY_DEV: EBUSY while a vdpa device exists on it or its fd is open.
    pub fn destroy_dev(&self, name: &str) -> io::Result<()> {
        let n = name_bytes(name)?;
        // SAFETY: DESTROY_DEV reads NAME_MAX bytes from the pointer: `n` is that array.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_DESTROY_DEV,
                n.as_ptr() as usize,
            )
        }
        .map(|_| ())
    }
}

/// `/dev/vduse/NAME`, non-blocking: the control thread polls it.
#[derive(Debug)]
pub struct DevFd(File);

impl DevFd {
    /// Opens the device's node; waits a little for it to appear. EBUSY: another process
    /// serves the device.
    pub fn open(name: &str) -> io::Result<DevFd> {
        let path = format!("/dev/vduse/{name}");
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
            {
                Ok(f) => return Ok(DevFd(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
            }
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// VDUSE_VQ_SETUP: queue `index` may have up to `max_size` entries. Every queue needs
    /// it before `vdpa dev add`.
    pub fn vq_setup(&self, index: u32, max_size: u16) -> io::Result<()> {
        let cfg = uapi::VqConfig {
            index,
            max_size,
            reserved: [0; 13],
        };
        // SAFETY: VQ_SETUP reads a `struct vduse_vq_config` from the pointer: a live local.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_VQ_SETUP,
                &cfg as *const uapi::VqConfig as usize,
            )
        }
        .map(|_| ())
    }

    /// The next control message, or None if none is waiting.
    pub fn read_request(&self) -> io::Result<Option<DevRequest>> {
        let mut buf = [0u8; uapi::REQUEST_SIZE];
        match io::Read::read(&mut &self.0, &mut buf) {
            Ok(n) if n == buf.len() => Ok(Some(DevRequest::from_bytes(&buf))),
            Ok(n) => Err(io::Error::other(format!("short VDUSE message: {n} bytes"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write_response(&self, r: &DevResponse) -> io::Result<()> {
        let b = r.to_bytes();
        let n = io::Write::write(&mut &self.0, &b)?;
        if n != b.len() {
            return Err(io::Error::other("short VDUSE response"));
        }
        Ok(())
    }
}

impl DevicePort for DevFd {
    fn driver_features(&self) -> io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: GET_FEATURES writes a u64 through the pointer: a live local.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_DEV_GET_FEATURES,
                &mut f as *mut u64 as usize,
            )
        }?;
        Ok(f)
    }

    fn vq_info(&self, index: u32) -> io::Result<VqInfo> {
        let mut info = VqInfo {
            index,
            ..VqInfo::default()
        };
        // SAFETY: VQ_GET_INFO reads and writes a `struct vduse_vq_info` through the
        // pointer: a live local of that layout.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_VQ_GET_INFO,
                &mut info as *mut VqInfo as usize,
            )
        }?;
        Ok(info)
    }

    fn set_kickfd(&self, index: u32, fd: RawFd) -> io::Result<()> {
        let e = uapi::VqEventFd { index, fd };
        // SAFETY: SETUP_KICKFD reads a `struct vduse_vq_eventfd`: a live local; the kernel
        // takes its own reference to the eventfd.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_VQ_SETUP_KICKFD,
                &e as *const uapi::VqEventFd as usize,
            )
        }
        .map(|_| ())
    }

    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<(File, IotlbEntry)> {
        let mut e = IotlbEntry {
            offset: 0,
            start,
            last,
            perm: 0,
        };
        // SAFETY: IOTLB_GET_FD reads and writes a `struct vduse_iotlb_entry` through the
        // pointer (a live local); it returns a new fd, which we own from here on.
        let fd = unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_IOTLB_GET_FD,
                &mut e as *mut IotlbEntry as usize,
            )
        }
        .map_err(|err| {
            // EINVAL: no region there.
            if err.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(io::ErrorKind::NotFound, "no IOTLB region")
            } else {
                err
            }
        })?;
        // SAFETY: the kernel installed `fd` for us (receive_fd) and nobody else owns it.
        Ok((unsafe { File::from_raw_fd(fd) }, e))
    }

    fn inject_vq_irq(&self, index: u32) -> io::Result<()> {
        // SAFETY: INJECT_IRQ reads a u32 through the pointer: a live local.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_VQ_INJECT_IRQ,
                &index as *const u32 as usize,
            )
        }
        .map(|_| ())
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        if data.is_empty() || data.len() > uapi::MAX_CONFIG {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "config length"));
        }
        let mut arg = uapi::ConfigData {
            offset,
            // Fits: at most MAX_CONFIG (checked above).
            length: data.len() as u32,
            buffer: [0; uapi::MAX_CONFIG],
        };
        arg.buffer[..data.len()].copy_from_slice(data);
        // SAFETY: SET_CONFIG reads the 8-byte header and then `length` bytes after it:
        // `arg` holds both contiguously and lives across the call.
        unsafe {
            ioctl(
                self.0.as_raw_fd(),
                uapi::VDUSE_DEV_SET_CONFIG,
                &arg as *const uapi::ConfigData as usize,
            )
        }
        .map(|_| ())
    }

    fn inject_config_irq(&self) -> io::Result<()> {
        // SAFETY: INJECT_CONFIG_IRQ takes no argument.
        unsafe { ioctl(self.0.as_raw_fd(), uapi::VDUSE_DEV_INJECT_CONFIG_IRQ, 0) }.map(|_| ())
    }
}
