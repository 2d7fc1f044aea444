//! A device's listening socket: bound (replacing a stale socket file, never a live one) or
//! inherited from the parent, and who is on the other end of an accepted connection.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::config::{SocketAccess, SocketSpec};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}: another server is listening on this socket")]
    InUse(String),
    #[error("{path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("--fd {0} is not a listening Unix socket")]
    NotSocket(i32),
}

pub struct Listener {
    pub listener: UnixListener,
    /// Removed when the device goes, if we created it.
    pub path: Option<PathBuf>,
}

/// The credentials of a connected peer (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    pub fn of(sock: &UnixStream) -> io::Result<Peer> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED writes one ucred into `cred`, whose size `len` describes.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Peer {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }
}

fn fd_is_socket(fd: RawFd) -> bool {
    // SAFETY: struct stat is plain data for which all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat into `st`; a bad fd gives an error.
    (unsafe { libc::fstat(fd, &mut st) }) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Creates, binds and (after `access`'s mode and owner are set on the file) starts listening
/// on a Unix socket at `path`: until listen(2), connections are refused, so there is no window
/// in which the default permissions let anyone in.
fn bind_with_access(path: &std::path::Path, access: &SocketAccess) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long (at most 107 bytes)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the fd is checked, then owned by the listener (or closed below).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket owned by nobody else; the listener closes it on error.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cleanup = |e: io::Error| {
        let _ = std::fs::remove_file(path);
        e
    };
    if let Some(mode) = access.mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(cleanup)?;
    }
    if let Some(o) = &access.owner {
        std::os::unix::fs::chown(path, o.uid, o.gid).map_err(|e| {
            cleanup(io::Error::new(
                e.kind(),
                format!("cannot give the socket to {}: {e}", o.spec),
            ))
        })?;
    }
    // SAFETY: fd is our bound socket.
    if unsafe { libc::listen(fd, libc::SOMAXCONN) } != 0 {
        return Err(cleanup(io::Error::last_os_error()));
    }
    Ok(listener)
}

/// Binds the device socket. A stale socket file with no listener behind it is replaced; a
/// live one is an error, as two servers on one socket would steal each other's frontends.
pub fn listen(spec: &SocketSpec, access: &SocketAccess) -> Result<Listener, SocketError> {
    match spec {
        SocketSpec::Path(path) => {
            let name = path.display().to_string();
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(SocketError::Io {
                        path: name,
                        err: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "exists and is not a socket",
                        ),
                    });
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse(name));
                }
                std::fs::remove_file(path).map_err(|err| SocketError::Io {
                    path: name.clone(),
                    err,
                })?;
            }
            let listener = bind_with_access(path, access)
                .map_err(|err| SocketError::Io { path: name, err })?;
            Ok(Listener {
                listener,
                path: Some(path.clone()),
            })
        }
        SocketSpec::Fd(fd) => {
            if !fd_is_socket(*fd) {
                return Err(SocketError::NotSocket(*fd));
            }
            // SAFETY: the fd was handed to us by our parent for exactly this use, is a socket
            // (checked above), and nothing else in this process owns it.
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            Ok(Listener {
                listener,
                path: None,
            })
        }
    }
}
