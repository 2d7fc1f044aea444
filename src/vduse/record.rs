//! The in-flight record of a VDUSE device: vhost-user's inflight region layout
//! (`virtio_blk::inflight`), kept in a file under `/run/vubd` instead of a frontend's memfd,
//! so that it outlives vubd. Every request a queue takes is marked there until its used
//! entry is published. The kernel keeps no such state for a VDUSE device (it outlives its
//! server, but forgets how far the server got): a vubd restarted after a crash reads the
//! record, continues each ring after the requests it finds, and runs those again first, so
//! the requests the dead vubd had taken complete instead of waiting forever.
//!
//! The file is vubd's own (root's, mode 0600, in a root-only directory); it is checked
//! anyway before it is mapped: a regular file, not a link, ours, sized for the queues.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::guestmem::fault::Owner;
use crate::virtio_blk::inflight::{queue_area_size, InflightRegion};

/// Where records live: `/run/vubd/vduse-NAME.inflight`.
pub const STATE_DIR: &str = "/run/vubd";

pub fn path_for(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("vduse-{name}.inflight"))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no failure mode and no memory effects.
    unsafe { libc::geteuid() }
}

/// The state directory, made if missing (mode 0700); refused if it is not a directory of
/// ours.
fn state_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != euid() || m.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory only vubd's user may write",
            dir.display()
        )));
    }
    Ok(())
}

fn open_file(path: &Path, create: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() || m.uid() != euid() || m.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{}: not a plain file of vubd's",
            path.display()
        )));
    }
    Ok(f)
}

fn region_len(num_queues: u16, queue_size: u16) -> u64 {
    queue_area_size(queue_size) as u64 * u64::from(num_queues)
}

/// Fresh rings (the driver set DRIVER_OK on a reset device): an all-zero record.
pub fn create(
    dir: &Path,
    name: &str,
    num_queues: u16,
    queue_size: u16,
    owner: Owner,
) -> io::Result<Arc<InflightRegion>> {
    state_dir(dir)?;
    let path = path_for(dir, name);
    let f = open_file(&path, true)?;
    let len = region_len(num_queues, queue_size);
    f.set_len(0)?;
    f.set_len(len)?;
    let region = InflightRegion::open(f, 0, len, num_queues, queue_size, owner)?;
    Ok(Arc::new(region))
}

/// The record a previous vubd left for rings that are still running, if there is one
/// that fits them.
pub fn open(
    dir: &Path,
    name: &str,
    num_queues: u16,
    queue_size: u16,
    owner: Owner,
) -> io::Result<Option<Arc<InflightRegion>>> {
    let path = path_for(dir, name);
    let f = match open_file(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = region_len(num_queues, queue_size);
    if f.metadata()?.len() != len {
        return Ok(None);
    }
    Ok(Some(Arc::new(InflightRegion::open(
        f, 0, len, num_queues, queue_size, owner,
    )?)))
}

/// The device is gone: so is its record.
pub fn remove(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(path_for(dir, name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let r = create(&state, "d0", 2, 8, 1).unwrap();
        let mut q = r.queue(1, 8).unwrap();
        q.begin(3);
        q.begin(5);
        q.pre_complete(3);
        q.end(3, 1);
        drop(q);
        drop(r);
        // Another size: not this record.
        assert!(open(&state, "d0", 2, 16, 1).unwrap().is_none());
        assert!(open(&state, "other", 2, 8, 1).unwrap().is_none());
        let again = open(&state, "d0", 2, 8, 1).unwrap().unwrap();
        assert_eq!(again.queue(1, 8).unwrap().recover(1), vec![5]);
        assert!(again.queue(0, 8).unwrap().recover(0).is_empty());
        // Fresh rings start from a clean record.
        let fresh = create(&state, "d0", 2, 8, 1).unwrap();
        assert!(fresh.queue(1, 8).unwrap().recover(0).is_empty());
        remove(&state, "d0");
        assert!(open(&state, "d0", 2, 8, 1).unwrap().is_none());
    }

    #[test]
    fn links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, path_for(dir.path(), "d1")).unwrap();
        assert!(create(dir.path(), "d1", 1, 8, 1).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }
}
