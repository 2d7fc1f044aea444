//! A vubd device exported as `/dev/ublkbN`: created (ADD_DEV, SET_PARAMS, START_DEV) or
//! taken over from a server that died (user recovery), served by one queue poller per
//! hardware queue on the device's reactors, and destroyed (STOP_DEV, DEL_DEV) when the
//! device is removed. Runs on control threads; every kernel wait is bounded.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::control::{CmdError, Control, DevRef};
use super::queue::{self, QueueStart, UblkQueue};
use super::uapi::{self, DevInfo, ParamBasic, ParamDiscard, Params};
use crate::blk::backend::ResizeError;
use crate::blk::model::MAX_DISCARD_SECTORS;
use crate::blk::queues::RunningQueue;
use crate::blk::stats::IoStats;
use crate::blk::{Device, DeviceModel, Export};
use crate::engine::{Poller, PollerId, ReactorHandle};

/// Tags per queue. Each holds a command on its reactor's io_uring (whose completion queue
/// has 2048 entries, shared with the backend's I/O and the reactor's other queues).
pub const QUEUE_DEPTH: u16 = 64;
/// Largest request, and the size of each tag's buffer.
pub const MAX_IO_BYTES: u32 = 512 << 10;
/// START_DEV and END_USER_RECOVERY wait (in the kernel) for every queue's fetches.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Queues answer their reactor's messages within a pass; generous for slow machines.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// STOP_DEV waits for the requests in flight (the backend's I/O) to complete.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// DEL_DEV waits until nothing holds the device (our /dev/ublkcN, an open /dev/ublkbN).
const DEL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a server died, the kernel quiesces its device once the server's io_uring is gone
/// (or, if every tag was busy, at the block layer's 30 s request timeout).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// udev (or devtmpfs) creating /dev/ublkcN, a dying server releasing it.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// One queue running on a reactor.
struct RunQueue {
    index: u16,
    reactor: ReactorHandle,
    poller: PollerId,
}

pub struct UblkExport {
    device: Arc<Device>,
    ctrl: Mutex<Control>,
    dev: DevRef,
    info: DevInfo,
    /// What GET_FEATURES answered.
    features: u64,
    /// /dev/ublkcN; the queues hold it too.
    char_dev: Option<Arc<File>>,
    queues: Vec<RunQueue>,
    /// Set when the kernel will not give the queues' fetches back (see `QueueStart`).
    abandoned: Arc<AtomicBool>,
    started: bool,
}

/// The parameters that describe `model` to the kernel.
pub fn params(model: &DeviceModel, max_io_bytes: u32) -> Params {
    let lbs_shift = model.logical_block_size().trailing_zeros() as u8;
    let mut attrs = 0;
    if model.read_only() {
        attrs |= uapi::ATTR_READ_ONLY;
    } else if model.writeback() {
        // A volatile cache: the kernel sends flushes, and FUA writes we honour as such.
        attrs |= uapi::ATTR_VOLATILE_CACHE | uapi::ATTR_FUA;
    }
    let mut p = Params {
        len: std::mem::size_of::<Params>() as u32,
        types: uapi::PARAM_TYPE_BASIC,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: lbs_shift,
            io_opt_shift: lbs_shift,
            io_min_shift: lbs_shift,
            max_sectors: max_io_bytes >> crate::blk::SECTOR_SHIFT,
            chunk_sectors: 0,
            dev_sectors: model.capacity_sectors(),
            virt_boundary_mask: 0,
        },
        ..Params::default()
    };
    let caps = model.caps();
    if !model.read_only() && (caps.discard || caps.write_zeroes) {
        p.types |= uapi::PARAM_TYPE_DISCARD;
        p.discard = ParamDiscard {
            discard_alignment: 0,
            discard_granularity: model.logical_block_size(),
            max_discard_sectors: if caps.discard { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if caps.write_zeroes {
                MAX_DISCARD_SECTORS
            } else {
                0
            },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

/// The process that serves a device, if it is alive (a zombie is not).
fn server_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (comm) S ...": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|st| st != 'Z' && st != 'X'),
        Err(_) => false,
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl UblkExport {
    /// Creates `/dev/ublkbN` for `device` (id `id`, or the first free one), or takes over
    /// device `id` if a previous server of it died (user recovery).
    pub fn create(id: Option<u32>, device: Arc<Device>) -> io::Result<UblkExport> {
        let mut ctrl = Control::open()?;
        let features = ctrl.features().map_err(|e| {
            other(format!(
                "{e}: this kernel's ublk driver is too old (vubd needs GET_FEATURES and \
                 ioctl-encoded commands: Linux 6.5 or later)"
            ))
        })?;
        if features & uapi::F_CMD_IOCTL_ENCODE == 0 {
            return Err(other(format!(
                "the ublk driver lacks CMD_IOCTL_ENCODE (features {})",
                uapi::feature_names(features)
            )));
        }
        log::debug!("ublk features: {}", uapi::feature_names(features));
        if let Some(id) = id {
            match ctrl.dev_info(id) {
                Ok(info) if info.state == uapi::S_DEV_DEAD => {
                    // Added but never started (its server died first), or stopped: no block
                    // device exists, nothing can be lost. Start afresh under the same id.
                    log::info!(
                        "device {}: ublk device {id} exists but was never started or was \
                         stopped; deleting it and adding it again",
                        device.name
                    );
                    ctrl.del_dev(&DevRef::new(id, info.flags), DEL_TIMEOUT)?;
                }
                Ok(info) => return Self::recover(ctrl, features, info, device),
                Err(e) if e.errno() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::add(ctrl, features, id, device)
    }

    fn new(ctrl: Control, features: u64, info: DevInfo, device: Arc<Device>) -> UblkExport {
        UblkExport {
            device,
            ctrl: Mutex::new(ctrl),
            dev: DevRef::new(info.dev_id, info.flags),
            info,
            features,
            char_dev: None,
            queues: Vec::new(),
            abandoned: Arc::new(AtomicBool::new(false)),
            started: false,
        }
    }

    fn ctrl(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctrl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new device: ADD_DEV, SET_PARAMS, queues, START_DEV.
    fn add(
        mut ctrl: Control,
        features: u64,
        id: Option<u32>,
        device: Arc<Device>,
    ) -> io::Result<UblkExport> {
        let reactors = u16::try_from(device.reactors.len()).unwrap_or(u16::MAX);
        let want = DevInfo {
            // One queue per reactor of the device (the kernel caps it at the CPU count).
            nr_hw_queues: device.model.num_queues().min(reactors).max(1),
            queue_depth: QUEUE_DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: id.unwrap_or(u32::MAX),
            // Requests in flight when vubd dies wait for the next vubd with this id, which
            // gets them again (REISSUE). UNPRIVILEGED_DEV is dropped by the kernel for a
            // caller with CAP_SYS_ADMIN, and needed by one without.
            flags: uapi::F_USER_RECOVERY
                | uapi::F_USER_RECOVERY_REISSUE
                | uapi::F_UNPRIVILEGED_DEV
                | uapi::F_CMD_IOCTL_ENCODE
                | (features & uapi::F_UPDATE_SIZE),
            ..DevInfo::default()
        };
        let info = ctrl.add_dev(&want).map_err(|e| match e.errno() {
            Some(libc::EEXIST) => other(format!("{e}: ublk id {} is taken", want.dev_id)),
            Some(libc::EPERM) => other(format!(
                "{e}: adding a ublk device needs CAP_SYS_ADMIN, or a kernel that allows \
                 unprivileged ublk devices"
            )),
            _ => e.into(),
        })?;
        let mut ex = UblkExport::new(ctrl, features, info, device);
        let started = (|| -> io::Result<()> {
            // First: for an unprivileged device the kernel checks every later command
            // against our access to /dev/ublkcN, which udev may take a moment to grant.
            ex.open_char_dev()?;
            let p = params(&ex.device.model, ex.info.max_io_buf_bytes);
            ex.ctrl().set_params(&ex.dev, &p)?;
            ex.start_queues()?;
            ex.ctrl().start_dev(&ex.dev, getpid(), START_TIMEOUT)?;
            Ok(())
        })();
        if let Err(e) = started {
            ex.tear_down();
            return Err(e);
        }
        ex.started = true;
        log::info!(
            "device {}: /dev/ublkb{} started: {} queue(s) of depth {}, {} KiB requests, \
             flags {}",
            ex.device.name,
            ex.dev.id,
            ex.info.nr_hw_queues,
            ex.info.queue_depth,
            ex.info.max_io_buf_bytes >> 10,
            uapi::feature_names(ex.info.flags)
        );
        Ok(ex)
    }

    /// Takes over an existing device whose server died: START_USER_RECOVERY, queues,
    /// END_USER_RECOVERY. Requests the dead server had taken are issued again.
    fn recover(
        mut ctrl: Control,
        features: u64,
        info: DevInfo,
        device: Arc<Device>,
    ) -> io::Result<UblkExport> {
        let id = info.dev_id;
        let dev = DevRef::new(id, info.flags);
        let state = uapi::state_name(info.state);
        if info.flags & uapi::F_USER_RECOVERY == 0 {
            return Err(other(format!(
                "ublk device {id} exists ({state}) without user recovery: it cannot be taken \
                 over (delete it, or choose another ublk-id)"
            )));
        }
        if info.state == uapi::S_DEV_LIVE && server_alive(info.ublksrv_pid) {
            return Err(other(format!(
                "ublk device {id} is served by process {} (choose another ublk-id)",
                info.ublksrv_pid
            )));
        }
        // The kernel keeps the parameters it was started with: they must describe this
        // device, or the block layer would address data that is not there.
        let p = ctrl.get_params(&dev)?;
        let model = &device.model;
        let lbs_shift = model.logical_block_size().trailing_zeros() as u8;
        if p.basic.dev_sectors != model.capacity_sectors() || p.basic.logical_bs_shift != lbs_shift
        {
            return Err(other(format!(
                "ublk device {id} exists with {} bytes in {}-byte blocks; this device has {} \
                 bytes in {}-byte blocks (delete it, or choose another ublk-id)",
                p.basic.dev_sectors << crate::blk::SECTOR_SHIFT,
                1u32 << p.basic.logical_bs_shift,
                model.capacity(),
                model.logical_block_size()
            )));
        }
        if p.basic.attrs & uapi::ATTR_VOLATILE_CACHE == 0 && model.writeback() {
            // The kernel sends no flushes to a device without a volatile cache: every write
            // must then be durable when it completes.
            log::info!(
                "device {}: ublk device {id} was started without a volatile write cache: \
                 writing through",
                device.name
            );
            model.set_writeback(false);
        }
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        let mut said = false;
        loop {
            match ctrl.start_recovery(&dev) {
                Ok(()) => break,
                // The previous server's io_uring and /dev/ublkcN are not gone yet, or the
                // kernel has not quiesced the device yet.
                Err(e) if e.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    if !said {
                        log::info!(
                            "device {}: ublk device {id} is {state}; waiting for its previous \
                             server to be gone",
                            device.name
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                // A recovery already started by a server that died before it ended it: the
                // queues were reset then, and wait for fetches.
                Err(e) if e.errno() == Some(libc::EINVAL) && info.state == uapi::S_DEV_QUIESCED => {
                    log::info!(
                        "device {}: ublk device {id}: continuing a recovery that a previous \
                         server started",
                        device.name
                    );
                    break;
                }
                Err(e) if e.errno() == Some(libc::EBUSY) => {
                    return Err(other(format!(
                        "{e}: ublk device {id} is still held by its previous server after {} s",
                        RECOVERY_TIMEOUT.as_secs()
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut ex = UblkExport::new(ctrl, features, info, device);
        let resumed = (|| -> io::Result<()> {
            ex.open_char_dev()?;
            ex.start_queues()?;
            ex.ctrl().end_recovery(&ex.dev, getpid(), START_TIMEOUT)?;
            Ok(())
        })();
        if let Err(e) = resumed {
            log::error!(
                "device {}: taking over ublk device {id} failed ({e}); removing it",
                ex.device.name
            );
            ex.tear_down();
            return Err(e);
        }
        ex.started = true;
        log::info!(
            "device {}: /dev/ublkb{id} taken over from a previous server (user recovery): \
             {} queue(s) of depth {}; requests it had not completed are issued again",
            ex.device.name,
            ex.info.nr_hw_queues,
            ex.info.queue_depth
        );
        Ok(ex)
    }

    /// Opens /dev/ublkcN, waiting for udev to create it or a dying server to close it.
    fn open_char_dev(&mut self) -> io::Result<()> {
        let path = format!("/dev/ublkc{}", self.dev.id);
        let deadline = Instant::now() + NODE_TIMEOUT;
        loop {
            let r = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path);
            match r {
                Ok(f) => {
                    self.char_dev = Some(Arc::new(f));
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::EBUSY) | Some(libc::EACCES)
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
            }
        }
    }

    /// Starts every queue on its reactor and waits until each has queued its fetches.
    fn start_queues(&mut self) -> io::Result<()> {
        let Some(char_dev) = self.char_dev.clone() else {
            return Err(other("/dev/ublkcN is not open".into()));
        };
        let (tx, rx) = crossbeam_channel::unbounded::<(u16, Result<(), String>)>();
        for q in 0..self.info.nr_hw_queues {
            let reactor = self.device.placement(q).clone();
            let poller = PollerId::next();
            self.device.queues.started(RunningQueue {
                index: q,
                reactor: reactor.clone(),
                poller,
                snapshot: queue::snapshot,
            });
            self.queues.push(RunQueue {
                index: q,
                reactor: reactor.clone(),
                poller,
            });
            let start = QueueStart {
                device: Arc::clone(&self.device.name),
                dev_id: self.dev.id,
                index: q,
                depth: self.info.queue_depth,
                buf_size: self.info.max_io_buf_bytes as usize,
                char_dev: Arc::clone(&char_dev),
                model: Arc::clone(&self.device.model),
                backend: Arc::clone(&self.device.backend),
                latency: self.device.latency_histograms,
                abandoned: Arc::clone(&self.abandoned),
            };
            let tx = tx.clone();
            reactor.run(move |r| {
                r.add_poller(poller, move |ctx| match UblkQueue::new(start, ctx) {
                    Ok(queue) => {
                        let _ = tx.send((q, Ok(())));
                        Some(Box::new(queue) as Box<dyn Poller>)
                    }
                    Err(e) => {
                        let _ = tx.send((q, Err(e.to_string())));
                        None
                    }
                })
            });
        }
        drop(tx);
        let deadline = Instant::now() + QUEUE_TIMEOUT;
        let mut failed = Vec::new();
        for _ in 0..self.info.nr_hw_queues {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => {}
                Ok((q, Err(e))) => failed.push(format!("queue {q}: {e}")),
                Err(_) => {
                    failed.push(format!(
                        "a reactor did not start its queue within {} s",
                        QUEUE_TIMEOUT.as_secs()
                    ));
                    break;
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(other(failed.join("; ")))
        }
    }

    /// Stops the queues and waits until each has left its reactor (every fetch given back,
    /// or abandoned); their last counters go to the device's totals.
    fn stop_queues(&mut self) {
        let mut waiting = Vec::new();
        for q in self.queues.drain(..) {
            let (tx, rx) = crossbeam_channel::bounded::<IoStats>(1);
            q.reactor.run(move |r| {
                r.stop_poller(
                    q.poller,
                    Box::new(move |p| {
                        let any: Box<dyn std::any::Any> = p;
                        if let Ok(queue) = any.downcast::<UblkQueue>() {
                            let (stats, _) = queue.stats();
                            // Closes its /dev/ublkcN reference before we are told.
                            drop(queue);
                            let _ = tx.send(stats);
                        }
                    }),
                )
            });
            waiting.push((q.index, q.poller, rx));
        }
        let mut deadline = Instant::now() + QUEUE_TIMEOUT;
        for (index, poller, rx) in waiting {
            let stats = loop {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(s) => break s,
                    // The queue never ran (it failed to start): nothing to wait for.
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        break IoStats::default()
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout)
                        if !self.abandoned.load(Ordering::Acquire) =>
                    {
                        log::error!(
                            "device {}: ublk queue {index} still has commands with the kernel \
                             after {} s; leaving them",
                            self.device.name,
                            QUEUE_TIMEOUT.as_secs()
                        );
                        self.abandoned.store(true, Ordering::Release);
                        deadline = Instant::now() + QUEUE_TIMEOUT;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        log::error!(
                            "device {}: ublk queue {index} did not stop (requests stuck in \
                             the backend?)",
                            self.device.name
                        );
                        break IoStats::default();
                    }
                }
            };
            self.device.queues.stopped(index, poller, &stats);
        }
    }

    /// STOP_DEV (the block device goes once its requests completed; the queues' fetches come
    /// back aborted), the queues leave their reactors, /dev/ublkcN is closed, DEL_DEV.
    fn tear_down(&mut self) {
        let name = Arc::clone(&self.device.name);
        let id = self.dev.id;
        let dev = self.dev.clone();
        if let Err(e) = self.ctrl().stop_dev(&dev, STOP_TIMEOUT) {
            log::error!("device {name}: ublk device {id}: {e}");
            // Without STOP_DEV the kernel keeps the fetches; do not wait for them.
            self.abandoned.store(true, Ordering::Release);
        }
        self.stop_queues();
        self.char_dev = None;
        match self.ctrl().del_dev(&dev, DEL_TIMEOUT) {
            Ok(()) => {}
            Err(CmdError::Timeout { .. }) => log::warn!(
                "device {name}: ublk device {id} is removed, but something still holds it \
                 (a mounted file system?): its id is freed once that lets go"
            ),
            Err(e) => log::error!("device {name}: ublk device {id}: {e}"),
        }
    }
}

/// Our pid, as the kernel records a device's server (`ublksrv_pid`, an int).
fn getpid() -> i32 {
    // Fits: pids are at most 2^22.
    std::process::id() as i32
}

impl Export for UblkExport {
    fn kind(&self) -> &'static str {
        "ublk"
    }

    fn node(&self) -> Option<String> {
        self.started.then(|| format!("/dev/ublkb{}", self.dev.id))
    }

    fn in_use(&self) -> bool {
        self.started
    }

    /// Only kernels with UPDATE_SIZE (Linux 6.16) can be told of a new size.
    fn can_resize(&self) -> Result<(), ResizeError> {
        if self.features & uapi::F_UPDATE_SIZE != 0 {
            Ok(())
        } else {
            log::warn!(
                "device {}: this kernel's ublk driver cannot change a device's size \
                 (UBLK_CMD_UPDATE_SIZE came with Linux 6.16)",
                self.device.name
            );
            Err(ResizeError::FrontEndNotSupported(
                "ublk in this kernel has no UPDATE_SIZE (Linux 6.16)".into(),
            ))
        }
    }

    fn capacity_changed(&self) -> Result<(), ResizeError> {
        if self.features & uapi::F_UPDATE_SIZE == 0 {
            return Err(ResizeError::FrontEndNotSupported(
                "ublk in this kernel has no UPDATE_SIZE (Linux 6.16)".into(),
            ));
        }
        let sectors = self.device.model.capacity_sectors();
        self.ctrl()
            .update_size(&self.dev, sectors)
            .map_err(|e| ResizeError::Io(e.into()))
    }

    fn shut_down(mut self: Box<Self>) {
        self.tear_down();
        log::info!(
            "device {}: /dev/ublkb{} removed",
            self.device.name,
            self.dev.id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::model::Caps;

    fn model(lbs: u32, read_only: bool, writeback: bool, caps: Caps) -> DeviceModel {
        DeviceModel::new(1 << 30, lbs, read_only, writeback, "", caps, 256)
    }

    #[test]
    fn parameters_describe_the_device_model() {
        let p = params(&model(4096, false, true, Caps::ALL), MAX_IO_BYTES);
        assert_eq!(p.len as usize, std::mem::size_of::<Params>());
        assert_eq!(p.types, uapi::PARAM_TYPE_BASIC | uapi::PARAM_TYPE_DISCARD);
        let b = p.basic;
        assert_eq!(b.dev_sectors, (1 << 30) >> 9);
        assert_eq!((b.logical_bs_shift, b.physical_bs_shift), (12, 12));
        assert_eq!((b.io_min_shift, b.io_opt_shift), (12, 12));
        assert_eq!(b.max_sectors, 1024);
        assert_eq!(b.attrs, uapi::ATTR_VOLATILE_CACHE | uapi::ATTR_FUA);
        let d = p.discard;
        assert_eq!(d.discard_granularity, 4096);
        assert_eq!(d.max_discard_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(d.max_write_zeroes_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(d.max_discard_segments, 1);
    }

    #[test]
    fn write_through_read_only_and_missing_caps() {
        let wt = params(&model(512, false, false, Caps::ALL), MAX_IO_BYTES);
        assert_eq!(wt.basic.attrs, 0, "no volatile cache: no flushes needed");
        assert_eq!(wt.basic.logical_bs_shift, 9);
        let ro = params(&model(512, true, true, Caps::ALL), MAX_IO_BYTES);
        assert_eq!(ro.basic.attrs, uapi::ATTR_READ_ONLY);
        assert_eq!(
            ro.types,
            uapi::PARAM_TYPE_BASIC,
            "no discard on a read-only device"
        );
        let no_wz = Caps {
            write_zeroes: false,
            ..Caps::ALL
        };
        let p = params(&model(512, false, true, no_wz), MAX_IO_BYTES);
        assert_eq!(p.discard.max_write_zeroes_sectors, 0);
        assert_eq!(p.discard.max_discard_sectors, MAX_DISCARD_SECTORS);
        let none = Caps {
            flush: true,
            discard: false,
            write_zeroes: false,
        };
        assert_eq!(
            params(&model(512, false, true, none), MAX_IO_BYTES).types,
            uapi::PARAM_TYPE_BASIC
        );
    }

    #[test]
    fn a_dead_or_zombie_server_is_not_alive() {
        assert!(server_alive(getpid()));
        assert!(!server_alive(0));
        assert!(!server_alive(-1));
        // pid_max is at most 2^22.
        assert!(!server_alive(1 << 23));
    }
}
