//! A throw-away one-node Ceph cluster (1 mon + 1 OSD, auth none, pool `rbd`) for the RBD
//! backend tests, run by `tests/ceph/cluster.sh` under a fresh directory in /var/tmp.
//!
//! Include it with `#[path = "common/ceph.rs"] mod ceph;` (a plain `mod ceph;` in
//! `tests/x.rs` would look for `tests/ceph/mod.rs`, and `tests/ceph/` holds the scripts).
//! It uses only std, libc and tempfile.
//!
//! ```ignore
//! let cluster = match ceph::Cluster::start() {
//!     Ok(c) => c,
//!     Err(e) => { eprintln!("SKIPPED: {e}"); return; } // or panic, see below
//! };
//! cluster.create_image("t1", 64, "layering,exclusive-lock");
//! // ... point vubd at pool rbd, image t1, conf cluster.conf ...
//! cluster.export("t1", &dir.join("t1.raw"));
//! // dropping `cluster` stops the daemons and removes the directory
//! ```
//!
//! The packages come from `tests/ceph/install.sh` (through tests/install-deps.sh, which
//! `common::have_tool` runs when the tests run as root); without them
//! [`Cluster::start`] returns `Err("ceph-mon not installed: ...")` so the caller can skip
//! loudly. The mon listens on fixed ports (127.0.0.1:3300 and :6789), so one cluster runs
//! at a time on the machine: `start` waits for an exclusive `flock` on
//! `/var/tmp/vubd-ceph.lock`, which serializes tests within one test binary (threads) and
//! across processes. Starting takes about 4 s, stopping about 0.2 s.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The pool `cluster.sh` creates and initializes for RBD.
pub const POOL: &str = "rbd";
/// Held (flock) by the running cluster's owner: one cluster at a time per machine.
const LOCK_FILE: &str = "/var/tmp/vubd-ceph.lock";
/// Cluster directories are `/var/tmp/vubd-ceph-XXXXXX`.
const DIR_PREFIX: &str = "vubd-ceph-";

/// A running one-node cluster. Clients use `-c <conf>` (or `rados_conf_read_file(conf)`);
/// daemon and client logs (`client.admin.log`, which librbd in vubd also writes when it
/// reads this conf) are in `<dir>/log`.
pub struct Cluster {
    /// The cluster's state directory (data, pid files, admin sockets, logs).
    pub dir: PathBuf,
    /// `<dir>/ceph.conf`.
    pub conf: PathBuf,
    /// The flock that makes this the only cluster; released when dropped, after the stop.
    lock: File,
}

fn cluster_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh")
}

fn in_path(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .any(|d| d.join(bin).is_file())
}

/// Runs `cluster.sh CMD DIR`, returning its combined output; Err on a non-zero status.
fn run_cluster_sh(cmd: &str, dir: &Path) -> Result<String, (Option<i32>, String)> {
    let out = Command::new("bash")
        .arg(cluster_sh())
        .arg(cmd)
        .arg(dir)
        .output()
        .map_err(|e| (None, format!("cannot run {}: {e}", cluster_sh().display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err((out.status.code(), text))
    }
}

fn lock_exclusive() -> Result<File, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| format!("open {LOCK_FILE}: {e}"))?;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("flock {LOCK_FILE}: {err}"));
        }
    }
}

/// With the lock held, no other test owns a cluster: daemons still running from a
/// `/var/tmp/vubd-ceph-*` directory belong to a test process that died without dropping
/// its `Cluster` (SIGKILL, abort). Stop them so they do not hold the mon port; their
/// directory stays (logs), minus the OSD's data file.
fn stop_stale_clusters() {
    let Ok(entries) = fs::read_dir("/var/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) && has_pid_files(&dir) {
            eprintln!("ceph: stopping a stale test cluster in {}", dir.display());
            if let Err((_, text)) = run_cluster_sh("stop", &dir) {
                eprintln!("{text}");
            }
            // Keep its logs for a post-mortem, not the OSD's data.
            let _ = fs::remove_file(dir.join("osd-0/block"));
        }
    }
}

/// True when `cluster.sh stop` has not run on DIR since its start (it removes them).
fn has_pid_files(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir.join("run")) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".pid"))
}

impl Cluster {
    /// Creates a fresh cluster under `/var/tmp/vubd-ceph-XXXXXX` and waits until pool
    /// `rbd` takes writes. Blocks while another `Cluster` (any process) is alive.
    ///
    /// Err when Ceph is not installed (`"ceph-mon not installed: run
    /// tests/ceph/install.sh"`) or the cluster does not come up (the message has
    /// `cluster.sh`'s output, with the tail of the daemons' logs).
    pub fn start() -> Result<Cluster, String> {
        for bin in ["ceph-mon", "ceph-osd", "rbd", "rados"] {
            if !in_path(bin) && !crate::common::have_tool(bin) {
                return Err(format!("{bin} not installed: run tests/ceph/install.sh"));
            }
        }
        let lock = lock_exclusive()?;
        stop_stale_clusters();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in("/var/tmp")
            .map_err(|e| format!("create a directory in /var/tmp: {e}"))?
            .keep();
        match run_cluster_sh("start", &dir) {
            Ok(text) => {
                eprint!("{text}");
                let conf = dir.join("ceph.conf");
                Ok(Cluster { dir, conf, lock })
            }
            Err((code, text)) => {
                // cluster.sh stops what it started when it fails; make sure, then keep
                // the directory (logs) for a post-mortem, minus the OSD's data file.
                let _ = run_cluster_sh("stop", &dir);
                let _ = fs::remove_file(dir.join("osd-0/block"));
                if code == Some(77) {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(format!(
                        "ceph-mon not installed: run tests/ceph/install.sh\n{text}"
                    ));
                }
                Err(format!(
                    "tests/ceph/cluster.sh start {} failed ({code:?}); logs kept there:\n{text}",
                    dir.display()
                ))
            }
        }
    }

    /// Runs `rbd -c <conf> ARGS...`. The caller checks the status.
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.tool("rbd", args)
    }

    /// Runs `rados -c <conf> ARGS...`. The caller checks the status.
    pub fn rados(&self, args: &[&str]) -> Output {
        self.tool("rados", args)
    }

    /// Runs `ceph -c <conf> ARGS...` (mon commands). The caller checks the status.
    pub fn ceph(&self, args: &[&str]) -> Output {
        self.tool("ceph", args)
    }

    fn tool(&self, bin: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
    }

    fn rbd_ok(&self, args: &[&str]) {
        let out = self.rbd(args);
        assert!(
            out.status.success(),
            "rbd {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `rbd create --size SIZE_MB --image-feature FEATURES rbd/NAME` (features like
    /// "layering" or "layering,exclusive-lock"; "" for librbd's defaults: layering,
    /// exclusive-lock, object-map, fast-diff, deep-flatten). Panics on failure.
    pub fn create_image(&self, name: &str, size_mb: u64, features: &str) {
        let spec = format!("{POOL}/{name}");
        let size = size_mb.to_string();
        let mut args = vec!["create", "--size", &size];
        if !features.is_empty() {
            args.extend(["--image-feature", features]);
        }
        args.push(&spec);
        self.rbd_ok(&args);
    }

    /// `rbd export rbd/IMAGE PATH` (the whole image as a raw file; an existing file at
    /// PATH is replaced). Panics on failure.
    pub fn export(&self, image: &str, path: &Path) {
        let _ = fs::remove_file(path);
        let spec = format!("{POOL}/{image}");
        let path = path.to_str().expect("export path is not UTF-8");
        self.rbd_ok(&["export", "--no-progress", &spec, path]);
    }

    /// Pids of the running mon and OSD (from their pid files).
    pub fn daemon_pids(&self) -> Vec<u32> {
        ["mon.a", "osd.0"]
            .iter()
            .filter_map(|d| fs::read_to_string(self.dir.join("run").join(format!("{d}.pid"))).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cluster {
    /// Stops the daemons (waits until they exited), then removes the directory; while
    /// panicking, keeps it (logs) minus the OSD's data file and says where.
    fn drop(&mut self) {
        if let Err((code, text)) = run_cluster_sh("stop", &self.dir) {
            eprintln!(
                "ceph: cluster.sh stop {} failed ({code:?}):\n{text}",
                self.dir.display()
            );
        }
        if std::thread::panicking() {
            let _ = fs::remove_file(self.dir.join("osd-0/block"));
            eprintln!(
                "ceph: test failed, cluster logs kept in {}/log",
                self.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("ceph: cannot remove {}: {e}", self.dir.display());
        }
        // self.lock is closed after this, releasing the flock for the next cluster.
        let _ = &self.lock;
    }
}
