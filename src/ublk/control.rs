//! `/dev/ublk-control`: the control commands (add, parameters, start, stop, delete, user
//! recovery, features), each an io_uring `URING_CMD` with a 128-byte SQE on a small ring of
//! the calling control thread. Every command has a deadline: the kernel runs some of them
//! (START_DEV, END_USER_RECOVERY, DEL_DEV) on an io_uring worker that waits for our queues,
//! and a command past its deadline is cancelled (which interrupts that wait) and reported.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::uapi::{self, CtrlCmd, DevInfo, Params, Pod};

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Commands that only read or write kernel state answer at once; this is generous.
pub const QUICK: Duration = Duration::from_secs(5);
/// How long a cancelled command may take to report that it ended.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// Bytes of the buffer a command's data goes through: a device path and the largest
/// argument (`Params`).
const SCRATCH: usize = 4096 + 128;

/// Why a control command failed.
#[derive(Debug)]
pub enum CmdError {
    /// The kernel answered `-errno`.
    Errno { cmd: &'static str, errno: i32 },
    /// No answer before the deadline; the command was cancelled.
    Timeout { cmd: &'static str, after: Duration },
    /// The ring itself failed.
    Ring { cmd: &'static str, err: io::Error },
}

impl CmdError {
    /// The errno the kernel answered, if it answered.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CmdError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::Errno { cmd, errno } => {
                write!(f, "{cmd}: {}", io::Error::from_raw_os_error(*errno))
            }
            CmdError::Timeout { cmd, after } => {
                write!(f, "{cmd}: no answer within {} s", after.as_secs_f32())
            }
            CmdError::Ring { cmd, err } => write!(f, "{cmd}: io_uring: {err}"),
        }
    }
}

impl std::error::Error for CmdError {}

impl From<CmdError> for io::Error {
    fn from(e: CmdError) -> io::Error {
        let kind = match &e {
            CmdError::Errno { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            CmdError::Timeout { .. } => io::ErrorKind::TimedOut,
            CmdError::Ring { err, .. } => err.kind(),
        };
        io::Error::new(kind, e.to_string())
    }
}

/// One open `/dev/ublk-control` and the ring its commands go through. Used by one thread at
/// a time (the export owns it; the registry calls it from control threads).
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Where command data goes in and out. Owned here, not borrowed from callers, so that a
    /// command the kernel never finished cannot write into memory we reused: it is leaked
    /// instead (see `finish`).
    scratch: Box<[u8; SCRATCH]>,
    /// User data of the next command.
    next: u64,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Control(fd {})", self.file.as_raw_fd())
    }
}

/// What a command sends besides its header.
enum Data<'a> {
    None,
    /// Bytes the kernel reads.
    In(&'a [u8]),
    /// Room for this many bytes the kernel writes.
    Out(usize),
}

impl Control {
    /// Opens the control device and a ring with 128-byte SQEs, restricted to URING_CMD and
    /// cancellation.
    pub fn open() -> io::Result<Control> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)
            .map_err(|e| {
                let hint = match e.kind() {
                    io::ErrorKind::NotFound => {
                        " (is the ublk_drv module loaded? `modprobe ublk_drv`; Linux 6.0 or later)"
                    }
                    io::ErrorKind::PermissionDenied => {
                        " (root, or a udev rule that gives this user the device: see docs/ublk.md)"
                    }
                    _ => "",
                };
                io::Error::new(e.kind(), format!("{CONTROL_PATH}: {e}{hint}"))
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_r_disabled()
            .build(4)?;
        crate::sandbox::uring::restrict_ublk_control_ring(&ring)?;
        Ok(Control {
            file,
            ring,
            scratch: Box::new([0; SCRATCH]),
            next: 1,
        })
    }

    /// The feature bits this kernel's driver offers.
    pub fn features(&mut self) -> Result<u64, CmdError> {
        let hdr = CtrlCmd {
            dev_id: u32::MAX,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        let mut f = 0u64;
        self.run_pod(
            "GET_FEATURES",
            uapi::CMD_GET_FEATURES,
            hdr,
            None,
            &mut f,
            false,
        )?;
        Ok(f)
    }

    /// ADD_DEV: creates `/dev/ublkcN` (id `info.dev_id`, or the first free one with
    /// `u32::MAX`); returns the kernel's view (the id, the flags it kept, the queues).
    pub fn add_dev(&mut self, info: &DevInfo) -> Result<DevInfo, CmdError> {
        let hdr = CtrlCmd {
            dev_id: info.dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        let mut out = *info;
        self.run_pod("ADD_DEV", uapi::CMD_ADD_DEV, hdr, None, &mut out, true)?;
        Ok(out)
    }

    /// GET_DEV_INFO2 (with the char device path, which unprivileged devices require), or
    /// GET_DEV_INFO where that path does not exist.
    pub fn dev_info(&mut self, id: u32) -> Result<DevInfo, CmdError> {
        let path = char_path(id);
        let mut info = DevInfo::default();
        match self.run_pod(
            "GET_DEV_INFO2",
            uapi::CMD_GET_DEV_INFO2,
            header(id),
            Some(&path),
            &mut info,
            false,
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {
                self.run_pod(
                    "GET_DEV_INFO",
                    uapi::CMD_GET_DEV_INFO,
                    header(id),
                    None,
                    &mut info,
                    false,
                )?;
            }
            r => r?,
        }
        Ok(info)
    }

    pub fn set_params(&mut self, dev: &DevRef, p: &Params) -> Result<(), CmdError> {
        let mut p = *p;
        self.run_pod(
            "SET_PARAMS",
            uapi::CMD_SET_PARAMS,
            header(dev.id),
            dev.path(),
            &mut p,
            true,
        )
    }

    pub fn get_params(&mut self, dev: &DevRef) -> Result<Params, CmdError> {
        let mut p = Params {
            len: std::mem::size_of::<Params>() as u32,
            ..Params::default()
        };
        // The kernel reads `len` first: the buffer goes both ways.
        self.run_pod(
            "GET_PARAMS",
            uapi::CMD_GET_PARAMS,
            header(dev.id),
            dev.path(),
            &mut p,
            true,
        )?;
        Ok(p)
    }

    /// START_DEV: creates `/dev/ublkbN` once every queue has fetched; waits at most
    /// `timeout` for that.
    pub fn start_dev(&mut self, dev: &DevRef, pid: i32, timeout: Duration) -> Result<(), CmdError> {
        let mut hdr = header(dev.id);
        hdr.data[0] = pid as u64;
        self.run(
            "START_DEV",
            uapi::CMD_START_DEV,
            hdr,
            dev.path(),
            Data::None,
            timeout,
        )
        .map(drop)
    }

    /// STOP_DEV: removes `/dev/ublkbN` (after the requests in flight completed) and aborts
    /// every queue's fetches.
    pub fn stop_dev(&mut self, dev: &DevRef, timeout: Duration) -> Result<(), CmdError> {
        self.run(
            "STOP_DEV",
            uapi::CMD_STOP_DEV,
            header(dev.id),
            dev.path(),
            Data::None,
            timeout,
        )
        .map(drop)
    }

    /// DEL_DEV: removes the device; the kernel waits until `/dev/ublkcN` is closed.
    pub fn del_dev(&mut self, dev: &DevRef, timeout: Duration) -> Result<(), CmdError> {
        self.run(
            "DEL_DEV",
            uapi::CMD_DEL_DEV,
            header(dev.id),
            dev.path(),
            Data::None,
            timeout,
        )
        .map(drop)
    }

    /// START_USER_RECOVERY: a quiesced device whose server exited gets ready for a new one.
    pub fn start_recovery(&mut self, dev: &DevRef) -> Result<(), CmdError> {
        self.run(
            "START_USER_RECOVERY",
            uapi::CMD_START_USER_RECOVERY,
            header(dev.id),
            dev.path(),
            Data::None,
            QUICK,
        )
        .map(drop)
    }

    /// END_USER_RECOVERY: once every queue has fetched again, requests flow to us.
    pub fn end_recovery(
        &mut self,
        dev: &DevRef,
        pid: i32,
        timeout: Duration,
    ) -> Result<(), CmdError> {
        let mut hdr = header(dev.id);
        hdr.data[0] = pid as u64;
        self.run(
            "END_USER_RECOVERY",
            uapi::CMD_END_USER_RECOVERY,
            hdr,
            dev.path(),
            Data::None,
            timeout,
        )
        .map(drop)
    }

    /// UPDATE_SIZE (Linux 6.16): the block device's new capacity, in sectors.
    pub fn update_size(&mut self, dev: &DevRef, sectors: u64) -> Result<(), CmdError> {
        let mut hdr = header(dev.id);
        hdr.data[0] = sectors;
        self.run(
            "UPDATE_SIZE",
            uapi::CMD_UPDATE_SIZE,
            hdr,
            dev.path(),
            Data::None,
            QUICK,
        )
        .map(drop)
    }

    /// A command whose data is one `T`, read (`into_kernel`) and/or written by the kernel.
    fn run_pod<T: Pod>(
        &mut self,
        name: &'static str,
        op: u32,
        hdr: CtrlCmd,
        path: Option<&CString>,
        value: &mut T,
        into_kernel: bool,
    ) -> Result<(), CmdError> {
        let size = std::mem::size_of::<T>();
        // SAFETY: T is Pod (plain integers, no padding the kernel could not write): its
        // bytes may be read and replaced freely.
        let bytes = unsafe { std::slice::from_raw_parts_mut((value as *mut T).cast::<u8>(), size) };
        let data = if into_kernel {
            Data::In(bytes)
        } else {
            Data::Out(size)
        };
        let off = self.run(name, op, hdr, path, data, QUICK)?;
        bytes.copy_from_slice(&self.scratch[off..off + size]);
        Ok(())
    }

    /// Sends one command and waits for its answer until `timeout`. Returns where its data
    /// starts in `scratch`.
    fn run(
        &mut self,
        name: &'static str,
        op: u32,
        mut hdr: CtrlCmd,
        path: Option<&CString>,
        data: Data<'_>,
        timeout: Duration,
    ) -> Result<usize, CmdError> {
        // Unprivileged devices: the buffer starts with the char device path (NUL included),
        // which the kernel checks and skips.
        let path = path.map(|p| p.as_bytes_with_nul()).unwrap_or(&[]);
        let n = match data {
            Data::None => 0,
            Data::In(b) => b.len(),
            Data::Out(n) => n,
        };
        let total = path.len() + n;
        if total > SCRATCH {
            return Err(CmdError::Errno {
                cmd: name,
                errno: libc::ENAMETOOLONG,
            });
        }
        self.scratch[..path.len()].copy_from_slice(path);
        if let Data::In(b) = data {
            self.scratch[path.len()..total].copy_from_slice(b);
        } else {
            self.scratch[path.len()..total].fill(0);
        }
        if total > 0 {
            hdr.addr = self.scratch.as_ptr() as u64;
            // Fits: at most SCRATCH bytes.
            hdr.len = total as u16;
        }
        // Fits: a path shorter than SCRATCH.
        hdr.dev_path_len = path.len() as u16;
        let mut cmd = [0u8; 80];
        cmd[..32].copy_from_slice(&hdr.to_bytes());
        let ud = self.next;
        self.next += 1;
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd)
            .build()
            .user_data(ud);
        // SAFETY: the command points to `self.scratch`, which lives until its completion is
        // reaped below, or is leaked if it never is.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| CmdError::Ring {
            cmd: name,
            err: io::Error::other("submission queue full"),
        })?;
        let res = self.wait(name, ud, timeout)?;
        if res < 0 {
            return Err(CmdError::Errno {
                cmd: name,
                errno: -res,
            });
        }
        Ok(path.len())
    }

    /// Waits for the completion of `ud`; past `timeout`, cancels it.
    fn wait(&mut self, name: &'static str, ud: u64, timeout: Duration) -> Result<i32, CmdError> {
        let deadline = Instant::now() + timeout;
        if let Some(res) = self.wait_until(name, ud, deadline)? {
            return Ok(res);
        }
        // Cancelling interrupts a command that waits on an io_uring worker (START_DEV waits
        // for the queues' fetches, DEL_DEV for /dev/ublkcN to be closed).
        let cancel = opcode::AsyncCancel::new(ud).build().user_data(0);
        // SAFETY: a cancel carries no buffer.
        let pushed =
            unsafe { self.ring.submission().push(&squeue::Entry128::from(cancel)) }.is_ok();
        let ended = pushed
            && self
                .wait_until(name, ud, Instant::now() + CANCEL_GRACE)?
                .is_some();
        if !ended {
            // The kernel may still write the command's answer: never reuse that memory.
            log::error!("ublk {name}: the kernel did not end the command after a cancel");
            let _ = Box::leak(std::mem::replace(&mut self.scratch, Box::new([0; SCRATCH])));
        }
        Err(CmdError::Timeout {
            cmd: name,
            after: timeout,
        })
    }

    /// The result of `ud` once it completes, or `None` at `deadline`. Other completions
    /// (a cancel's own) are dropped.
    fn wait_until(
        &mut self,
        name: &'static str,
        ud: u64,
        deadline: Instant,
    ) -> Result<Option<i32>, CmdError> {
        loop {
            for cqe in self.ring.completion() {
                if cqe.user_data() == ud {
                    return Ok(Some(cqe.result()));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(err) => return Err(CmdError::Ring { cmd: name, err }),
            }
        }
    }
}

/// The header of a command for device `id`, not for a queue.
fn header(id: u32) -> CtrlCmd {
    CtrlCmd {
        dev_id: id,
        queue_id: u16::MAX,
        ..CtrlCmd::default()
    }
}

/// `/dev/ublkcN`.
pub fn char_path(id: u32) -> CString {
    CString::new(format!("/dev/ublkc{id}")).expect("no NUL in a number")
}

/// A device as commands name it: its id, and for an unprivileged device the path of its
/// char device, which the kernel checks our access to.
#[derive(Clone, Debug)]
pub struct DevRef {
    pub id: u32,
    path: Option<CString>,
}

impl DevRef {
    /// `flags` as ADD_DEV or GET_DEV_INFO answered them.
    pub fn new(id: u32, flags: u64) -> DevRef {
        DevRef {
            id,
            path: (flags & uapi::F_UNPRIVILEGED_DEV != 0).then(|| char_path(id)),
        }
    }

    fn path(&self) -> Option<&CString> {
        self.path.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprivileged_devices_name_their_char_device() {
        assert_eq!(DevRef::new(3, 0).path(), None);
        let d = DevRef::new(3, uapi::F_UNPRIVILEGED_DEV);
        assert_eq!(d.path().unwrap().as_bytes(), b"/dev/ublkc3");
    }

    #[test]
    fn errors_keep_the_errno() {
        let e = CmdError::Errno {
            cmd: "ADD_DEV",
            errno: libc::EEXIST,
        };
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert!(e.to_string().starts_with("ADD_DEV: "));
        let io: io::Error = CmdError::Timeout {
            cmd: "START_DEV",
            after: Duration::from_secs(3),
        }
        .into();
        assert_eq!(io.kind(), io::ErrorKind::TimedOut);
        assert_eq!(io.to_string(), "START_DEV: no answer within 3 s");
    }
}
