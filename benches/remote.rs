//! Criterion suites for the backends that reach a storage server: the whole queue pass of
//! `request`'s suites on the NBD client (against `nbdkit memory` on a Unix socket) and on
//! Ceph RBD (librbd against a one-node cluster, `tests/ceph/cluster.sh`). Each iteration is
//! a pass of 1 or 32 4 KiB reads, then passes until every reply is in: the figure is the
//! server's round trip plus vubd's cost, per request.
//!
//! A server that cannot be had is skipped with a `SKIPPED:` line naming what is missing
//! (`tests/install-deps.sh` installs nbdkit and Ceph); the other suite still runs.

#[path = "../tests/common/ceph.rs"]
mod ceph;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vubd::testing::open_backend;
use vubd::BackendSpec;

/// The export's and the image's size (the reads cover their first 128 KiB).
const IMAGE_MB: u64 = 64;

/// `nbdkit memory` for as long as the bench runs.
struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit(sock: &Path) -> Result<Nbdkit, String> {
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(["memory", &format!("size={IMAGE_MB}M")])
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run nbdkit: {e}"))?;
    let mut d = Nbdkit(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(status)) = d.0.try_wait() {
            return Err(format!("nbdkit exited at start: {status}"));
        }
        if Instant::now() > deadline {
            return Err("nbdkit made no socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

fn queue_pass_nbd(c: &mut Criterion) {
    let _ = env_logger::try_init();
    if !common::have_tool("nbdkit") {
        eprintln!("SKIPPED: queue_pass_nbd: nbdkit is not installed (tests/install-deps.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let _server = match nbdkit(&sock) {
        Ok(s) => s,
        Err(e) => panic!("queue_pass_nbd: {e}"),
    };
    let spec = BackendSpec::Nbd {
        uri: format!("nbd+unix:///?socket={}", sock.display()),
        timeout: Duration::from_secs(30),
    };
    let backend = open_backend(&spec, false).unwrap();
    common::queue_pass_backend(c, "queue_pass_nbd", &backend, &[1, 32], true);
}

fn queue_pass_rbd(c: &mut Criterion) {
    let _ = env_logger::try_init();
    let cluster = match ceph::Cluster::start() {
        Ok(c) => c,
        Err(e) if e.contains("not installed") => {
            let why = e.lines().next().unwrap_or_default();
            eprintln!("SKIPPED: queue_pass_rbd: {why}");
            return;
        }
        Err(e) => panic!("queue_pass_rbd: {e}"),
    };
    // Written blocks, imported: reads of objects that do not exist are answered without
    // reading anything.
    let dir = tempfile::tempdir().unwrap();
    let raw: PathBuf = dir.path().join("bench.raw");
    let mut data = vec![0xa5u8; 1 << 20];
    data.resize((IMAGE_MB << 20) as usize, 0);
    std::fs::write(&raw, &data).unwrap();
    let spec = format!("{}/bench", ceph::POOL);
    let out = cluster.rbd(&["import", "--no-progress", raw.to_str().unwrap(), &spec]);
    assert!(
        out.status.success(),
        "rbd import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = BackendSpec::Rbd {
        pool: ceph::POOL.into(),
        image: "bench".into(),
        conf: cluster.conf.clone(),
        user: "admin".into(),
        keyring: None,
    };
    let backend = open_backend(&spec, false).unwrap();
    common::queue_pass_backend(c, "queue_pass_rbd", &backend, &[1, 32], true);
    // The image closes before the cluster stops.
    drop(backend);
}

criterion_group!(benches, queue_pass_nbd, queue_pass_rbd);
criterion_main!(benches);
