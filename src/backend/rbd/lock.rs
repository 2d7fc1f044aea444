//! The exclusive lock a killed vubd leaves behind.
//!
//! librbd's exclusive lock is cooperative: a new client asks the owner to release it, and
//! only when the owner's watch on the image header has expired (the OSD's
//! `osd_client_watch_timeout`, 30 s) does librbd consider it dead and break the lock. A vubd
//! that was SIGKILLed and restarted would therefore stall its guest for ~30 s on the first
//! write. Breaking the lock at once is safe only when the owner is provably dead: breaking a
//! live client's lock blocklists it, and every write it makes fails from then on (a live
//! migration's source, a second vubd, an `rbd` command would all be hurt).
//!
//! So each vubd records, per image, the client identity it runs under in a state file on
//! this host: its cluster address (what `rbd_lock_get_owners` names the owner by), its pid,
//! the pid's start time and the host's boot id. At the next open, the lock is broken only if
//! its owner is exactly that recorded address and the recorded process is gone on this very
//! boot of this host (no such pid, a zombie, or the pid now names a younger process). A
//! client that lived in a dead process is dead: the kernel closed its sockets. Anything
//! else (another host, a live process, an unknown owner) is left to librbd.
//!
//! `rbd_lock_break` blocklists the old address before removing the lock, and waits for the
//! OSDs to know it, so no write the dead client had in the network can land afterwards.
//!
//! The state file lives in a directory only this user can write (`/run/vubd/rbd` for root,
//! `$XDG_RUNTIME_DIR/vubd/rbd`, or `$TMPDIR/vubd-UID/rbd`): whoever can write it can make
//! vubd break a lock, so a directory someone else owns or may write is not used.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Who held, or holds, an image through a vubd on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The librados client address, `IP:PORT/NONCE`.
    pub addr: String,
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot): tells a reused pid apart.
    pub start: u64,
    /// /proc/sys/kernel/random/boot_id: the same host, the same boot.
    pub boot: String,
}

impl Identity {
    /// This process, as the client at `addr`.
    pub fn ours(addr: &str) -> io::Result<Identity> {
        let pid = std::process::id();
        let start = start_time(pid)?.ok_or_else(|| io::Error::other("no /proc/self/stat"))?;
        Ok(Identity {
            addr: addr.to_string(),
            pid,
            start,
            boot: boot_id()?,
        })
    }

    fn to_text(&self) -> String {
        format!(
            "addr={}\npid={}\nstart={}\nboot={}\n",
            self.addr, self.pid, self.start, self.boot
        )
    }

    fn parse(text: &str) -> Option<Identity> {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Some(Identity {
            addr: field("addr")?.to_string(),
            pid: field("pid")?.parse().ok()?,
            start: field("start")?.parse().ok()?,
            boot: field("boot")?.to_string(),
        })
    }
}

fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// What /proc says of `pid`: `None` if there is no such process, else its state letter and
/// start time.
fn proc_stat(pid: u32) -> io::Result<Option<(char, u64)>> {
    let text = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // "PID (COMM) S ...": COMM may hold spaces and parentheses; the last ')' ends it.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::other("bad /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After COMM: field 3 (state) is fields[0], field 22 (starttime) is fields[19].
    let state = fields.first().and_then(|s| s.chars().next());
    let start = fields.get(19).and_then(|s| s.parse().ok());
    match (state, start) {
        (Some(s), Some(t)) => Ok(Some((s, t))),
        _ => Err(io::Error::other("bad /proc/PID/stat")),
    }
}

fn start_time(pid: u32) -> io::Result<Option<u64>> {
    Ok(proc_stat(pid)?.map(|(_, t)| t))
}

/// Why `prev` is certainly dead, or `None` when that cannot be shown.
pub fn dead(prev: &Identity) -> Option<String> {
    let Ok(boot) = boot_id() else {
        return None;
    };
    if prev.boot != boot {
        // Another host, or this one before a reboot: nothing here can prove it.
        return None;
    }
    match proc_stat(prev.pid) {
        Ok(None) => Some(format!("pid {} has exited", prev.pid)),
        Ok(Some(('Z', t))) if t == prev.start => {
            Some(format!("pid {} has exited (not yet reaped)", prev.pid))
        }
        Ok(Some((_, t))) if t != prev.start => Some(format!(
            "pid {} has exited (the pid now names another process)",
            prev.pid
        )),
        _ => None,
    }
}

/// What to do about the lock owner found at open.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No owner: nothing to do.
    Free,
    /// The owner is this image's previous vubd on this host, and it is dead: break.
    Break { why: String },
    /// Someone else, or alive: leave it to librbd's cooperative hand-over.
    Leave { why: String },
}

pub fn judge(owner: Option<&str>, prev: Option<&Identity>) -> Verdict {
    let Some(owner) = owner else {
        return Verdict::Free;
    };
    let Some(prev) = prev else {
        return Verdict::Leave {
            why: "no vubd on this host recorded serving this image".into(),
        };
    };
    if prev.addr != owner {
        return Verdict::Leave {
            why: format!(
                "the last vubd on this host to serve it was {} (pid {})",
                prev.addr, prev.pid
            ),
        };
    }
    match dead(prev) {
        Some(why) => Verdict::Break {
            why: format!("it is this image's previous vubd on this host, and {why}"),
        },
        None => Verdict::Leave {
            why: format!(
                "it is vubd pid {} on {}, which may still be alive",
                prev.pid,
                if boot_id().ok().as_deref() == Some(&prev.boot) {
                    "this host"
                } else {
                    "another host or boot"
                }
            ),
        },
    }
}

/// A directory only we can write, created if missing.
fn private_dir(dir: &Path) -> io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not private to uid {uid} (owner {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(dir.to_path_buf())
}

fn state_dir() -> io::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let base = if uid == 0 {
        PathBuf::from("/run/vubd")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("vubd")
    } else {
        std::env::temp_dir().join(format!("vubd-{uid}"))
    };
    private_dir(&base)?;
    private_dir(&base.join("rbd"))
}

/// Keeps a file name to `[A-Za-z0-9._-]`, escaping the rest as `%XX`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where the identity of the vubd serving `pool/image` of cluster `fsid` is recorded.
pub fn state_path(fsid: &str, pool: &str, image: &str) -> io::Result<PathBuf> {
    Ok(state_dir()?.join(format!(
        "{}_{}_{}",
        escape(fsid),
        escape(pool),
        escape(image)
    )))
}

pub fn read(path: &Path) -> Option<Identity> {
    Identity::parse(&fs::read_to_string(path).ok()?)
}

/// Writes atomically (a temporary file renamed over the old one).
pub fn write(path: &Path, id: &Identity) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(id.to_text().as_bytes())?;
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Removes the record if it is still `id`'s (a clean close released the lock).
pub fn forget(path: &Path, id: &Identity) {
    if read(path).as_ref() == Some(id) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_rejects_garbage() {
        let id = Identity {
            addr: "127.0.0.1:0/3192550497".into(),
            pid: 42,
            start: 12345,
            boot: "b".into(),
        };
        assert_eq!(Identity::parse(&id.to_text()), Some(id));
        assert_eq!(Identity::parse("addr=x\npid=notanumber\n"), None);
        assert_eq!(Identity::parse(""), None);
    }

    #[test]
    fn only_a_dead_recorded_predecessor_loses_its_lock() {
        let me = Identity::ours("10.0.0.1:0/1").unwrap();
        assert_eq!(judge(None, Some(&me)), Verdict::Free);
        // No record: never break.
        assert!(matches!(judge(Some("a:0/1"), None), Verdict::Leave { .. }));
        // Another owner than the recorded one: never break.
        assert!(matches!(
            judge(Some("10.0.0.2:0/9"), Some(&me)),
            Verdict::Leave { .. }
        ));
        // The recorded owner, alive (this very process): never break.
        assert!(matches!(
            judge(Some("10.0.0.1:0/1"), Some(&me)),
            Verdict::Leave { .. }
        ));
        // The recorded owner on another host or boot: cannot be proven dead.
        let other_boot = Identity {
            boot: "not-this-boot".into(),
            pid: u32::MAX - 1,
            ..me.clone()
        };
        assert!(matches!(
            judge(Some("10.0.0.1:0/1"), Some(&other_boot)),
            Verdict::Leave { .. }
        ));
        // The recorded owner, a pid that no longer exists on this boot: break.
        let gone = Identity {
            pid: u32::MAX - 1,
            ..me.clone()
        };
        assert!(matches!(
            judge(Some("10.0.0.1:0/1"), Some(&gone)),
            Verdict::Break { .. }
        ));
        // The pid exists but started at another time: reused, so the recorded one is gone.
        let reused = Identity {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(matches!(
            judge(Some("10.0.0.1:0/1"), Some(&reused)),
            Verdict::Break { .. }
        ));
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(escape("rbd/im g"), "rbd%2Fim%20g");
        assert_eq!(escape("a-b_c.d"), "a-b_c.d");
    }

    #[test]
    fn write_read_forget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let id = Identity::ours("1.2.3.4:0/5").unwrap();
        write(&path, &id).unwrap();
        assert_eq!(read(&path), Some(id.clone()));
        let other = Identity {
            pid: 1,
            ..id.clone()
        };
        forget(&path, &other);
        assert!(path.exists(), "someone else's record stays");
        forget(&path, &id);
        assert!(!path.exists());
    }
}
