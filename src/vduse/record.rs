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

/// The record of one VDUSE device. Named after the VDUSE device, which the kernel keeps
/// unique on the host, never after vubd's device name: two vubd processes may both call
/// their device `dev0`, and one record written by two servers is no record.
#[derive(Clone, Debug)]
pub struct Place {
    dir: PathBuf,
    vduse_name: String,
}

impl Place {
    pub fn new(dir: &Path, vduse_name: &str) -> Place {
        Place {
            dir: dir.to_path_buf(),
            vduse_name: vduse_name.to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("vduse-{}.inflight", self.vduse_name))
    }

    /// Fresh rings (the driver set DRIVER_OK on a reset device): an all-zero record.
    pub fn create(
        &self,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
    ) -> io::Result<Arc<InflightRegion>> {
        state_dir(&self.dir)?;
        let f = open_file(&self.path(), true)?;
        let len = region_len(num_queues, queue_size);
        f.set_len(0)?;
        f.set_len(len)?;
        let region = InflightRegion::open(f, 0, len, num_queues, queue_size, owner)?;
        Ok(Arc::new(region))
    }

    /// The record a previous vubd left for rings that are still running, if there is one
    /// that fits them.
    pub fn open(
        &self,
        num_queues: u16,
        queue_size: u16,
        owner: Owner,
    ) -> io::Result<Option<Arc<InflightRegion>>> {
        let f = match open_file(&self.path(), false) {
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
    pub fn remove(&self) {
        let _ = std::fs::remove_file(self.path());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let d0 = Place::new(&state, "d0");
        let r = d0.create(2, 8, 1).unwrap();
        let mut q = r.queue(1, 8).unwrap();
        q.begin(3);
        q.begin(5);
        q.pre_complete(3);
        q.end(3, 1);
        drop(q);
        drop(r);
        // Another size: not this record.
        assert!(d0.open(2, 16, 1).unwrap().is_none());
        assert!(Place::new(&state, "other").open(2, 8, 1).unwrap().is_none());
        let again = d0.open(2, 8, 1).unwrap().unwrap();
        assert_eq!(again.queue(1, 8).unwrap().recover(1), vec![5]);
        assert!(again.queue(0, 8).unwrap().recover(0).is_empty());
        // Fresh rings start from a clean record.
        let fresh = d0.create(2, 8, 1).unwrap();
        assert!(fresh.queue(1, 8).unwrap().recover(0).is_empty());
        d0.remove();
        assert!(d0.open(2, 8, 1).unwrap().is_none());
    }

    #[test]
    fn links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let d1 = Place::new(dir.path(), "d1");
        std::os::unix::fs::symlink(&target, d1.path()).unwrap();
        assert!(d1.create(1, 8, 1).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }
}
