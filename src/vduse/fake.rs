//! A fake kernel for the unit tests: IOTLB regions backed by one memfd (as VDUSE's
//! domain file backs them all), queue infos, and counters of what the device did.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::io::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::control::DevicePort;
use super::uapi::{self, IotlbEntry, VqInfo};

#[derive(Default)]
pub struct FakeKernel {
    pub file: Option<File>,
    pub regions: Mutex<Vec<IotlbEntry>>,
    pub vqs: Mutex<Vec<VqInfo>>,
    pub features: AtomicU64,
    /// Kick fds the device set, by queue (dups, so the test can kick).
    pub kicks: Mutex<BTreeMap<u32, File>>,
    pub irqs: Mutex<BTreeMap<u32, u64>>,
    pub config: Mutex<Vec<(u32, Vec<u8>)>>,
    pub config_irqs: AtomicU64,
}

impl FakeKernel {
    /// A kernel whose IOTLB regions all live in one memfd of `size` bytes, at file
    /// offset = IOVA.
    pub fn new(size: u64) -> FakeKernel {
        // SAFETY: the name is a NUL-terminated literal; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"fake-vduse".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh memfd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        FakeKernel {
            file: Some(file),
            ..FakeKernel::default()
        }
    }

    pub fn add_region(&self, start: u64, len: u64) {
        self.regions.lock().unwrap().push(IotlbEntry {
            offset: start,
            start,
            last: start + len - 1,
            perm: uapi::ACCESS_RW,
        });
    }

    pub fn irqs(&self, q: u32) -> u64 {
        self.irqs.lock().unwrap().get(&q).copied().unwrap_or(0)
    }

    /// The driver kicks queue `q`.
    pub fn kick(&self, q: u32) {
        let kicks = self.kicks.lock().unwrap();
        let f = kicks.get(&q).expect("kick fd set");
        io::Write::write(&mut &*f, &1u64.to_ne_bytes()).unwrap();
    }
}

impl DevicePort for FakeKernel {
    fn driver_features(&self) -> io::Result<u64> {
        Ok(self.features.load(Ordering::Relaxed))
    }

    fn vq_info(&self, index: u32) -> io::Result<VqInfo> {
        self.vqs
            .lock()
            .unwrap()
            .get(index as usize)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn set_kickfd(&self, index: u32, fd: RawFd) -> io::Result<()> {
        let mut kicks = self.kicks.lock().unwrap();
        if fd < 0 {
            kicks.remove(&index);
        } else {
            // SAFETY: dup of an fd the caller keeps open for the duration of the call.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            assert!(dup >= 0);
            // SAFETY: a fresh fd we own.
            kicks.insert(index, unsafe { File::from_raw_fd(dup) });
        }
        Ok(())
    }

    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<(File, IotlbEntry)> {
        let regions = self.regions.lock().unwrap();
        let e = regions
            .iter()
            .filter(|e| e.start <= last && start <= e.last)
            .min_by_key(|e| e.start)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "none"))?;
        Ok((self.file.as_ref().unwrap().try_clone()?, e))
    }

    fn inject_vq_irq(&self, index: u32) -> io::Result<()> {
        *self.irqs.lock().unwrap().entry(index).or_default() += 1;
        Ok(())
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        self.config.lock().unwrap().push((offset, data.to_vec()));
        Ok(())
    }

    fn inject_config_irq(&self) -> io::Result<()> {
        self.config_irqs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
