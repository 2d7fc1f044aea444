//! A vubd device exported through VDUSE: creating the kernel device (or finding the one a
//! previous vubd left), the control thread that answers its messages, resize, and removal.
//!
//! Removal (`device_remove`, vubd's exit): `vdpa dev del NAME` over netlink (the driver
//! goes: the disk disappears once the requests in flight completed, and the reset reaches
//! the control thread, which stops the queues), then the thread ends, the device fd closes
//! and VDUSE_DESTROY_DEV removes /dev/vduse/NAME.

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{fs, io};

use super::control::{Control, DevFd, DevicePort};
use super::device::{VduseDevice, QUEUE_SIZE};
use super::netlink;
use super::record;
use super::uapi;
use crate::blk::backend::ResizeError;
use crate::blk::{Device, Export};
use crate::engine::eventfd::EventFd;
use crate::guestmem::fault::Owner;
use crate::virtio_blk::config;
use crate::virtio_blk::features::{bit, device_features, VIRTIO_BLK_F_CONFIG_WCE};

/// How long removal retries VDUSE_DESTROY_DEV while the last references to the device fd
/// go (a reactor dropping a queue).
const DESTROY_WAIT: Duration = Duration::from_secs(5);

/// Owners of VDUSE mappings in the SIGBUS table: apart from vhost-user connection ids,
/// which count up from 1.
fn next_owner() -> Owner {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (1 << 62) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The features VDUSE gets: virtio-blk's, with ACCESS_PLATFORM (VDUSE requires it: buffers
/// are IOVAs) and without CONFIG_WCE (VDUSE's config space is read-only, and it refuses a
/// block device that offers it).
pub fn features(device: &Device) -> u64 {
    (device_features(&device.model) & !bit(VIRTIO_BLK_F_CONFIG_WCE))
        | bit(uapi::VIRTIO_F_ACCESS_PLATFORM)
}

fn config_space(device: &Device) -> Vec<u8> {
    let cfg = config::build(&device.model);
    config::read(&cfg, 0, config::CONFIG_SPACE).unwrap_or_default()
}

/// What the registry holds.
pub struct VduseExport {
    name: String,
    device: Arc<Device>,
    control: Control,
    port: Option<Arc<DevFd>>,
    in_use: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    record_at: record::Place,
}

/// Creates the VDUSE device `name` for `device`, or takes over the one a previous vubd left.
pub fn create(name: &str, device: Arc<Device>) -> io::Result<Box<dyn Export>> {
    create_in(name, device, Path::new(record::STATE_DIR))
}

fn create_in(name: &str, device: Arc<Device>, record_dir: &Path) -> io::Result<Box<dyn Export>> {
    let control = Control::open()?;
    let record_at = record::Place::new(record_dir, name);
    let dev = Arc::clone(&device.name);
    let nq = device.model.num_queues();
    let feats = features(&device);
    let cfg = config_space(&device);
    let mut resume = false;
    match control.create_dev(name, feats, u32::from(nq), &cfg) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Left by an earlier vubd. Without a vdpa device on it, nobody uses it: start
            // afresh (the features and queue count may have changed). With one, the driver
            // may have a filesystem on it: take it over.
            match control.destroy_dev(name) {
                Ok(()) => {
                    log::info!("device {dev}: replaced the unused VDUSE device {name} an earlier vubd left");
                    control.create_dev(name, feats, u32::from(nq), &cfg)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => resume = true,
                Err(e) => return Err(io::Error::new(e.kind(), format!("VDUSE_DESTROY_DEV: {e}"))),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "VDUSE_CREATE_DEV refused the device ({e}): features {feats:#x}, {nq} queue(s)"
                ),
            ))
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("VDUSE_CREATE_DEV: {e}"))),
    }
    let made = !resume;
    let opened = (|| {
        let port = Arc::new(DevFd::open(name).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                io::Error::new(
                    e.kind(),
                    format!("{e}: another process serves this VDUSE device"),
                )
            } else {
                e
            }
        })?);
        if resume {
            check_resumable(name, &port, &device, feats)?;
        } else {
            for q in 0..nq {
                port.vq_setup(u32::from(q), QUEUE_SIZE)
                    .map_err(|e| io::Error::new(e.kind(), format!("VDUSE_VQ_SETUP {q}: {e}")))?;
            }
            record_at.remove();
        }
        Ok::<_, io::Error>(port)
    })();
    let port = match opened {
        Ok(p) => p,
        Err(e) => {
            if made {
                let _ = control.destroy_dev(name);
            }
            return Err(e);
        }
    };
    let in_use = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(EventFd::new()?);
    let mut vduse = VduseDevice::new(
        Arc::clone(&device),
        Arc::clone(&port) as Arc<dyn DevicePort>,
        next_owner(),
        Some(record_at.clone()),
        Arc::clone(&in_use),
    );
    let thread_port = Arc::clone(&port);
    let thread_stop = Arc::clone(&stop);
    let thread_dev = Arc::clone(&dev);
    let thread_name = format!("vduse-{name}").chars().take(15).collect::<String>();
    let thread = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            confine();
            if resume {
                vduse.resume();
            }
            serve(&mut vduse, &thread_port, &thread_stop, &thread_dev);
            vduse.shut_down();
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            drop(port);
            if made {
                let _ = control.destroy_dev(name);
            }
            return Err(e);
        }
    };
    if made {
        log::info!(
            "device {dev}: VDUSE device /dev/vduse/{name} created ({nq} queue(s), features {feats:#x}); \
             attach it with: vdpa dev add name {name} mgmtdev vduse"
        );
    }
    Ok(Box::new(VduseExport {
        name: name.to_string(),
        device,
        control,
        port: Some(port),
        in_use,
        stop,
        thread: Some(thread),
        record_at,
    }))
}

/// A device left by an earlier vubd is taken over only if this device looks the same to
/// its driver: as many queues, and every feature the driver negotiated still offered. Its
/// config space (the capacity) is brought up to date.
fn check_resumable(name: &str, port: &DevFd, device: &Device, feats: u64) -> io::Result<()> {
    let nq = device.model.num_queues();
    let incompatible = |why: String| {
        io::Error::other(format!(
            "the VDUSE device {name} left by an earlier vubd does not match this device ({why}); \
             start vubd with the earlier configuration, or remove it first with `vdpa dev del {name}`"
        ))
    };
    match port.vq_info(u32::from(nq) - 1) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err(io::Error::other(format!(
                "the VDUSE device {name} is broken (its server did not answer the kernel in time); \
                 remove it with `vdpa dev del {name}`, then start vubd again"
            )))
        }
        Err(_) => return Err(incompatible("fewer queues".into())),
    }
    if port.vq_info(u32::from(nq)).is_ok() {
        return Err(incompatible("more queues".into()));
    }
    let negotiated = port.driver_features()?;
    if negotiated & !feats != 0 {
        return Err(incompatible(format!(
            "the driver uses features {:#x} this device does not offer",
            negotiated & !feats
        )));
    }
    port.set_config(0, &config_space(device))?;
    // Tells a running driver to read the capacity again; refused (EINVAL) without one.
    let _ = port.inject_config_irq();
    log::info!(
        "device {}: taking over the VDUSE device {name} an earlier vubd left",
        device.name
    );
    Ok(())
}

/// Device threads run under the control filter: inherited when spawned by a confined
/// control thread, installed here at start-up, before the main thread confined itself.
fn confine() {
    // SAFETY: PR_GET_SECCOMP takes no pointers; it returns the calling thread's mode.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode == 0 {
        if let Err(e) = crate::sandbox::confine(crate::sandbox::ThreadKind::Control) {
            log::error!("VDUSE thread: cannot install its seccomp filter: {e}");
            std::process::abort();
        }
    } else {
        crate::sandbox::inherited(crate::sandbox::ThreadKind::Control);
    }
}

fn poll_in(fds: &mut [libc::pollfd]) -> io::Result<()> {
    for p in fds.iter_mut() {
        p.revents = 0;
    }
    // Fits: a few fds (device, stop, kick fds of up to 65535 queues).
    // SAFETY: `fds` is a live array of pollfds of the length given.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// The control thread: answers the kernel's messages until told to stop. Queues that wait
/// for their first kick are polled here too.
fn serve(vduse: &mut VduseDevice, port: &DevFd, stop: &EventFd, dev: &str) {
    let mut broken = false;
    loop {
        let mut fds = vec![pollfd(stop.as_raw_fd())];
        if !broken {
            fds.push(pollfd(port.as_raw_fd()));
            fds.extend(vduse.waiting_kicks().into_iter().map(pollfd));
        }
        if let Err(e) = poll_in(&mut fds) {
            log::error!("device {dev}: VDUSE control thread: poll: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if broken {
            continue;
        }
        if fds[2..].iter().any(|p| p.revents != 0) {
            vduse.kicked();
        }
        if fds[1].revents & libc::POLLERR != 0 {
            // The kernel gave up on a message (msg_timeout): every ioctl fails from now on.
            log::error!(
                "device {dev}: the kernel marked the VDUSE device broken; it must be removed"
            );
            broken = true;
            continue;
        }
        if fds[1].revents & libc::POLLIN == 0 {
            continue;
        }
        loop {
            match port.read_request() {
                Ok(Some(req)) => {
                    let resp = vduse.handle(&req);
                    if let Err(e) = port.write_response(&resp) {
                        log::warn!(
                            "device {dev}: answering VDUSE message {}: {e}",
                            req.request_id
                        );
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("device {dev}: reading a VDUSE message: {e}");
                    break;
                }
            }
        }
    }
}

impl VduseExport {
    /// The vdpa device's virtio block device, `/dev/vdX`, from sysfs.
    fn find_node(&self) -> Option<String> {
        let dev = Path::new("/sys/bus/vdpa/devices").join(&self.name);
        for v in fs::read_dir(dev).ok()?.flatten() {
            if !v.file_name().to_string_lossy().starts_with("virtio") {
                continue;
            }
            if let Some(b) = fs::read_dir(v.path().join("block")).ok()?.flatten().next() {
                return Some(format!("/dev/{}", b.file_name().to_string_lossy()));
            }
        }
        None
    }
}

impl Export for VduseExport {
    fn kind(&self) -> &'static str {
        "vduse"
    }

    fn node(&self) -> Option<String> {
        self.find_node()
    }

    fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Acquire)
    }

    fn can_resize(&self) -> Result<(), ResizeError> {
        Ok(())
    }

    /// VDUSE_DEV_SET_CONFIG of the capacity, then a config interrupt: virtio_blk reads the
    /// capacity again and resizes the disk. A device without a running driver is not
    /// interrupted; its driver reads the new capacity when it starts.
    fn capacity_changed(&self) -> Result<(), ResizeError> {
        let failed = |what: &str, e: io::Error| {
            ResizeError::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
        };
        let port = self
            .port
            .as_ref()
            .ok_or_else(|| ResizeError::Invalid("the VDUSE device is being removed".into()))?;
        let capacity = self.device.model.capacity_sectors().to_le_bytes();
        port.set_config(0, &capacity)
            .map_err(|e| failed("VDUSE_DEV_SET_CONFIG", e))?;
        match port.inject_config_irq() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(failed("VDUSE_DEV_INJECT_CONFIG_IRQ", e)),
        }
    }

    fn shut_down(mut self: Box<Self>) {
        let name = self.name.clone();
        let dev = Arc::clone(&self.device.name);
        match netlink::vdpa_dev_del(&name) {
            Ok(true) => log::info!("device {dev}: vdpa device {name} deleted"),
            Ok(false) => {}
            Err(e) => log::warn!("device {dev}: vdpa dev del {name}: {e}"),
        }
        self.stop.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.port.take());
        let deadline = Instant::now() + DESTROY_WAIT;
        loop {
            match self.control.destroy_dev(&name) {
                Ok(()) => {
                    log::info!("device {dev}: VDUSE device {name} destroyed");
                    self.record_at.remove();
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    log::warn!(
                        "device {dev}: VDUSE_DESTROY_DEV {name}: {e} (the device stays until a vubd removes it)"
                    );
                    return;
                }
            }
        }
    }
}
