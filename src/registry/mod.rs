//! The device registry: every device by its unique name, with stable ids, and the functions
//! that add and remove them (the start-up path uses them too). It owns the transport side
//! of each device (its listening socket and connected frontend) and shares the block side
//! (`blk::Device`) with the reactors.
//!
//! Owns: device lifecycle and placement. Imports the front ends, backends and engine; nothing
//! below imports it.

pub mod control;
pub mod reload;
pub mod stats;

use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

use crate::backend::{self, BackendError};
use crate::blk::backend::ResizeError;
use crate::blk::queues::Queues;
use crate::blk::stats::IoStats;
use crate::blk::{Device, DeviceModel, Export};
use crate::config::{check_new_device, ConfigError, DeviceConfig, EngineTable, FrontEndSpec};
use crate::cpuset::CpuSet;
use crate::engine::epoll::Epoll;
use crate::engine::eventfd::EventFd;
use crate::engine::{ReactorHandle, Settings};
use crate::guestmem::fault;
use crate::vhost::connection::{Connection, MESSAGE_TIMEOUT};
use crate::vhost::listener::{listen, Listener, Peer, SocketError};
use crate::vhost::watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("device {name}: {err}")]
    Backend { name: String, err: BackendError },
    #[error("device {name}: {err}")]
    Socket { name: String, err: SocketError },
    #[error("device {name}: {kind}: {err}")]
    Export {
        name: String,
        kind: &'static str,
        err: std::io::Error,
    },
    #[error("device {name}: the backend is smaller than one logical block ({lbs} bytes)")]
    TooSmall { name: String, lbs: u32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no device named {0:?}")]
    NoSuchDevice(String),
    #[error("device {0} has a frontend attached (use force to disconnect it)")]
    Busy(String),
    #[error("device {name}: {err}")]
    Resize { name: String, err: ResizeError },
}

/// Where a device came from: the config file (SIGHUP re-reads those) or at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    File,
    Runtime,
}

/// What the control loop's epoll reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Signal,
    /// A connection ended; its device id is in the channel.
    Ended,
    /// A frontend's memory faulted (SIGBUS contained): disconnect its owner.
    Poisoned,
    /// A device's listening socket has a frontend waiting.
    Listener(u64),
}

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Signal => 0,
            Token::Ended => 1,
            Token::Poisoned => 2,
            Token::Listener(id) => id + 3,
        }
    }

    fn from_u64(v: u64) -> Token {
        match v {
            0 => Token::Signal,
            1 => Token::Ended,
            2 => Token::Poisoned,
            id => Token::Listener(id - 3),
        }
    }
}

/// How a device meets its user.
enum Front {
    /// A vhost-user socket; frontends connect to it.
    Socket(Listener),
    /// A kernel block device (VDUSE, ublk).
    Kernel(Box<dyn Export>),
}

struct Entry {
    id: u64,
    cfg: DeviceConfig,
    origin: Origin,
    device: Arc<Device>,
    front: Front,
    /// The connected vhost-user frontend and its connection id (which owns its memory
    /// mappings).
    conn: Option<(u64, Connection)>,
    /// What `iostat` reported as zero at its last reset, by queue.
    iostat_base: BTreeMap<u16, IoStats>,
}

#[derive(Default)]
struct Inner {
    devices: BTreeMap<String, Entry>,
    /// Devices being added (their backends open outside the lock): their names and sockets
    /// are taken.
    pending: Vec<DeviceConfig>,
    next_id: u64,
    /// Connection ids are never reused: a mapping of an old connection that faults must not
    /// be blamed on a new one.
    next_conn: u64,
}

/// The engine as the registry knows it: the settings that can change at run time, and the
/// keys that saving the configuration writes.
struct EngineState {
    settings: Settings,
    table: EngineTable,
}

pub struct Registry {
    inner: Mutex<Inner>,
    reactors: Vec<ReactorHandle>,
    engine_mask: CpuSet,
    watchdog: Arc<Watchdog>,
    epoll: Epoll,
    ended_tx: Sender<u64>,
    ended_rx: Receiver<u64>,
    ended: Arc<EventFd>,
    /// Written by the SIGBUS handler when it contained a fault.
    poisoned: &'static EventFd,
    engine: Mutex<EngineState>,
    /// The config file devices may come from (SIGHUP).
    file: Option<std::path::PathBuf>,
    latency_histograms: bool,
}

impl Entry {
    fn listener(&self) -> Option<&Listener> {
        match &self.front {
            Front::Socket(l) => Some(l),
            Front::Kernel(_) => None,
        }
    }

    fn export(&self) -> Option<&dyn Export> {
        match &self.front {
            Front::Kernel(x) => Some(&**x),
            Front::Socket(_) => None,
        }
    }
}

impl Registry {
    /// Also installs the SIGBUS handler: from now on a frontend's memory that faults costs
    /// that frontend its connection, nothing more.
    pub fn new(
        reactors: &[ReactorHandle],
        engine_mask: CpuSet,
        settings: Settings,
        table: EngineTable,
        file: Option<std::path::PathBuf>,
    ) -> std::io::Result<Registry> {
        let (ended_tx, ended_rx) = crossbeam_channel::unbounded();
        // Lives as long as the process: the handler may write it at any time.
        let poisoned: &'static EventFd = Box::leak(Box::new(EventFd::new()?));
        fault::install(poisoned)?;
        let r = Registry {
            inner: Mutex::default(),
            reactors: reactors.to_vec(),
            engine_mask,
            watchdog: Watchdog::start(MESSAGE_TIMEOUT)?,
            epoll: Epoll::new()?,
            ended_tx,
            ended_rx,
            ended: Arc::new(EventFd::new()?),
            poisoned,
            latency_histograms: table.latency_histograms.unwrap_or(true),
            engine: Mutex::new(EngineState { settings, table }),
            file,
        };
        r.epoll.add(r.ended.as_raw_fd(), Token::Ended.to_u64())?;
        r.epoll
            .add(r.poisoned.as_raw_fd(), Token::Poisoned.to_u64())?;
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `cfg` against the devices already here, opens its backend, builds its
    /// model and starts listening on its socket. The backend is opened without holding the
    /// registry (a network backend may take seconds): the name and socket are reserved
    /// meanwhile.
    pub fn add(&self, cfg: DeviceConfig, origin: Origin) -> Result<(), AddError> {
        {
            let mut inner = self.lock();
            let taken = inner.devices.values().map(|e| &e.cfg).chain(&inner.pending);
            check_new_device(taken, &cfg, &self.engine_mask)?;
            inner.pending.push(cfg.clone());
        }
        let built = self.build(&cfg);
        let mut inner = self.lock();
        inner.pending.retain(|p| p.name != cfg.name);
        let (device, front) = built?;
        let id = inner.next_id;
        inner.next_id += 1;
        if let Front::Socket(l) = &front {
            self.epoll
                .add(l.listener.as_raw_fd(), Token::Listener(id).to_u64())?;
        }
        inner.devices.insert(
            cfg.name.clone(),
            Entry {
                id,
                cfg,
                origin,
                device,
                front,
                conn: None,
                iostat_base: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Opens `cfg`'s backend and its socket or kernel device: the device, not yet
    /// registered.
    fn build(&self, cfg: &DeviceConfig) -> Result<(Arc<Device>, Front), AddError> {
        let name = cfg.name.clone();
        let backend =
            backend::open(&cfg.backend, cfg.read_only).map_err(|err| AddError::Backend {
                name: name.clone(),
                err,
            })?;
        let info = backend.info();
        let lbs = cfg.logical_block_size;
        // A backend whose size is not a multiple of the block size exposes its whole blocks
        // only, as QEMU does.
        let capacity = info.size - info.size % u64::from(lbs);
        if capacity == 0 {
            return Err(AddError::TooSmall { name, lbs });
        }
        let model = DeviceModel::new(
            capacity,
            lbs,
            cfg.read_only || info.read_only,
            !cfg.writethrough,
            &cfg.serial,
            info.caps,
            cfg.num_queues,
        );
        let mask = cfg.cpumask.as_ref().unwrap_or(&self.engine_mask);
        let mut reactors: Vec<ReactorHandle> = self
            .reactors
            .iter()
            .filter(|r| mask.contains(r.cpu))
            .cloned()
            .collect();
        if info.single_reactor {
            reactors.truncate(1);
        }
        let listener = match &cfg.front {
            FrontEndSpec::VhostUser(socket) => {
                Some(listen(socket, &cfg.access).map_err(|err| AddError::Socket {
                    name: name.clone(),
                    err,
                })?)
            }
            FrontEndSpec::Vduse(_) | FrontEndSpec::Ublk(_) => None,
        };
        // Round-robin: the first lap says it all.
        let lap = usize::from(cfg.num_queues).min(reactors.len());
        let mut placement: Vec<String> = (0..lap)
            .map(|q| format!("q{q}->cpu{}", reactors[q].cpu))
            .collect();
        if lap < usize::from(cfg.num_queues) {
            placement.push("...".into());
        }
        let kind = backend.kind();
        let device = Arc::new(Device {
            name: Arc::from(name.as_str()),
            model: Arc::new(model),
            backend,
            reactors,
            queues: Queues::default(),
            latency_histograms: self.latency_histograms,
        });
        let (front, where_) = match listener {
            Some(l) => {
                let at = match &l.path {
                    Some(p) => format!("listening on {}", p.display()),
                    None => format!("listening on {:?}", cfg.front),
                };
                (Front::Socket(l), at)
            }
            None => {
                let export = export(&cfg.front, &device).map_err(|err| AddError::Export {
                    name: name.clone(),
                    kind: cfg.front.kind(),
                    err,
                })?;
                let at = format!(
                    "exported through {} as {}",
                    export.kind(),
                    export.node().unwrap_or_else(|| "(not yet)".into())
                );
                (Front::Kernel(export), at)
            }
        };
        log::info!(
            "device {name}: {kind} backend, {capacity} bytes, up to {} queue(s) [{}], {where_}",
            cfg.num_queues,
            placement.join(" "),
        );
        Ok((device, front))
    }

    /// Removes a device: refused while a frontend is attached unless `force`, which stops
    /// its rings (in-flight I/O drains: nothing completed is lost) and disconnects it. The
    /// socket file goes. The drain happens outside the registry lock.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), DeviceError> {
        let entry = {
            let mut inner = self.lock();
            let e = inner
                .devices
                .get(name)
                .ok_or_else(|| DeviceError::NoSuchDevice(name.into()))?;
            if e.conn.is_some() && !force {
                return Err(DeviceError::Busy(name.into()));
            }
            let e = inner.devices.remove(name).expect("present");
            if let Some(l) = e.listener() {
                let _ = self.epoll.delete(l.listener.as_raw_fd());
            }
            e
        };
        Self::retire(entry);
        log::info!("device {name}: removed");
        Ok(())
    }

    /// Disconnects an entry's frontend (its rings drain) and removes its socket file, or
    /// tears its kernel device down.
    fn retire(mut e: Entry) {
        if let Some((_, c)) = e.conn.take() {
            c.shut_down();
            c.join();
        }
        match e.front {
            Front::Socket(l) => {
                if let Some(p) = &l.path {
                    let _ = std::fs::remove_file(p);
                }
            }
            Front::Kernel(x) => x.shut_down(),
        }
    }

    /// Changes a device's size (`None`: read it again from the backend) and tells the
    /// frontend. Requests are checked against the new capacity from the moment it is set.
    pub fn resize(&self, name: &str, size: Option<u64>) -> Result<u64, DeviceError> {
        let err = |err| DeviceError::Resize {
            name: name.into(),
            err,
        };
        let (device, conn) = {
            let inner = self.lock();
            let e = inner
                .devices
                .get(name)
                .ok_or_else(|| DeviceError::NoSuchDevice(name.into()))?;
            if let Some(x) = e.export() {
                x.can_resize().map_err(err)?;
            }
            let conn = e.conn.as_ref().map(|(_, c)| Arc::clone(&c.shared));
            (Arc::clone(&e.device), conn)
        };
        let model = &device.model;
        let lbs = u64::from(model.logical_block_size());
        let old = model.capacity();
        if let Some(n) = size {
            if n == 0 || n % lbs != 0 {
                return Err(err(ResizeError::Invalid(format!(
                    "size must be a positive multiple of the {lbs}-byte block size"
                ))));
            }
            // Shrinking: refuse requests beyond the new end before the backend drops it.
            if n < old {
                model.set_capacity(n);
            }
        }
        let got = device.backend.resize(size).map_err(|e| {
            model.set_capacity(old);
            err(e)
        })?;
        let capacity = got - got % lbs;
        if capacity == 0 {
            return Err(err(ResizeError::Invalid(
                "the backend is now smaller than one block".into(),
            )));
        }
        model.set_capacity(capacity);
        // What saving the configuration writes must start the device at its new size.
        let mut kernel = None;
        if let Some(e) = self.lock().devices.get_mut(name) {
            let t = &mut e.cfg.table;
            if t.ram.is_some() {
                t.ram = Some(crate::config::SizeValue::Bytes(capacity));
            } else if t.null.is_some() {
                t.null = Some(crate::config::SizeValue::Bytes(capacity));
            }
            kernel = e.export().map(|x| x.capacity_changed());
        }
        if let Some(told) = kernel {
            return match told {
                Ok(()) => {
                    log::info!("device {name}: resized to {capacity} bytes (the kernel was told)");
                    Ok(capacity)
                }
                Err(e) => {
                    log::warn!("device {name}: resized to {capacity} bytes, but the kernel was not told: {e}");
                    Err(err(e))
                }
            };
        }
        let told = match conn.map(|c| c.config_changed()) {
            Some(Ok(true)) => "the frontend was told",
            Some(Ok(false)) => "the frontend learns it when it connects again",
            Some(Err(e)) => {
                log::warn!("device {name}: cannot announce the new size: {e}");
                "announcing it failed"
            }
            None => "no frontend attached",
        };
        log::info!("device {name}: resized to {capacity} bytes ({told})");
        Ok(capacity)
    }

    /// The engine's settings now.
    pub fn settings(&self) -> Settings {
        self.engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settings
    }

    /// Changes every reactor's poll mode and idle spin, at once, and remembers it for
    /// saving the configuration.
    pub fn set_settings(&self, s: Settings) {
        {
            let mut e = self.engine.lock().unwrap_or_else(|p| p.into_inner());
            e.settings = s;
            e.table.poll_mode = Some(s.mode.as_str().into());
            e.table.idle_spin_us = Some(s.idle_spin.as_micros() as u64);
        }
        for r in &self.reactors {
            r.run(move |r| r.set_mode(s));
        }
        log::info!(
            "poll mode {}, idle spin {} us",
            s.mode.as_str(),
            s.idle_spin.as_micros()
        );
    }

    /// The TOML text that starts the same engine settings and the same devices.
    pub fn config_toml(&self) -> String {
        let table = self
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .clone();
        let devices: Vec<_> = self
            .lock()
            .devices
            .values()
            .map(|e| e.cfg.table.clone())
            .collect();
        crate::config::to_toml(&table, &devices)
    }

    fn entry_by_id(inner: &mut Inner, id: u64) -> Option<&mut Entry> {
        inner.devices.values_mut().find(|e| e.id == id)
    }

    /// A frontend is waiting on device `id`'s socket: serve it on a thread of its own. One
    /// frontend per device, as vhost-user is 1:1: the next one waits in the listen backlog
    /// until this one disconnects.
    fn accept(&self, id: u64) {
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn_id = inner.next_conn;
        let Some(e) = Self::entry_by_id(&mut inner, id) else {
            return;
        };
        let Some(listener) = e.listener() else {
            return;
        };
        let stream = match listener.listener.accept() {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::warn!("device {}: accept failed: {err}", e.device.name);
                return;
            }
        };
        if let Some(allowed) = &e.cfg.access.allow_uids {
            // Checked before a single message is read: anyone who can open the socket could
            // otherwise read and write the disk.
            match Peer::of(&stream) {
                Ok(p) if allowed.contains(&p.uid) => {}
                Ok(p) => {
                    log::warn!(
                        "device {}: refused a frontend with uid {} (pid {}): not in allow-uid",
                        e.device.name,
                        p.uid,
                        p.pid
                    );
                    return;
                }
                Err(err) => {
                    log::warn!(
                        "device {}: refused a frontend whose credentials are unknown: {err}",
                        e.device.name
                    );
                    return;
                }
            }
        }
        let listen_fd = listener.listener.as_raw_fd();
        let _ = self.epoll.delete(listen_fd);
        let (tx, wake) = (self.ended_tx.clone(), Arc::clone(&self.ended));
        let conn = Connection::spawn(
            stream,
            Arc::clone(&e.device),
            conn_id,
            Arc::clone(&self.watchdog),
            move || {
                let _ = tx.send(id);
                wake.notify();
            },
        );
        match conn {
            Ok(c) => e.conn = Some((conn_id, c)),
            Err(err) => {
                log::warn!("device {}: cannot serve the frontend: {err}", e.device.name);
                let _ = self.epoll.add(listen_fd, Token::Listener(id).to_u64());
            }
        }
    }

    /// Connections whose thread ended: join them and listen for the next frontend.
    fn reap_connections(&self) {
        self.ended.drain();
        while let Ok(id) = self.ended_rx.try_recv() {
            let conn = {
                let mut inner = self.lock();
                let Some(e) = Self::entry_by_id(&mut inner, id) else {
                    continue;
                };
                if let Some(l) = e.listener() {
                    if let Err(err) = self
                        .epoll
                        .add(l.listener.as_raw_fd(), Token::Listener(id).to_u64())
                    {
                        log::error!("device {}: cannot listen again: {err}", e.device.name);
                    }
                }
                e.conn.take()
            };
            if let Some((_, c)) = conn {
                c.join();
            }
        }
    }

    /// Frontends whose memory faulted: each loses its connection (its thread stops its
    /// rings); nothing else is touched.
    fn disconnect_poisoned(&self) {
        self.poisoned.drain();
        let owners = fault::take_poisoned();
        let inner = self.lock();
        for e in inner.devices.values() {
            if let Some((conn_id, c)) = &e.conn {
                if owners.contains(conn_id) {
                    log::warn!(
                        "device {}: the frontend's shared memory faulted (its file shrank?); \
                         disconnecting it",
                        e.device.name
                    );
                    c.shut_down();
                }
            }
        }
    }

    /// Disconnects every frontend (their rings drain), then removes the socket files.
    pub fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut self.lock().devices)
            .into_values()
            .collect();
        // All at once: each drain runs on its own connection thread.
        for e in &entries {
            if let Some((_, c)) = &e.conn {
                c.shut_down();
            }
        }
        for e in entries {
            Self::retire(e);
        }
    }
}

/// Creates the kernel device of a VDUSE or ublk front end for `device`.
fn export(front: &FrontEndSpec, device: &Arc<Device>) -> std::io::Result<Box<dyn Export>> {
    match front {
        FrontEndSpec::Vduse(name) => crate::vduse::create(name, Arc::clone(device)),
        FrontEndSpec::Ublk(id) => crate::ublk::create(*id, Arc::clone(device)),
        FrontEndSpec::VhostUser(_) => Err(std::io::Error::other("not a kernel front end")),
    }
}
