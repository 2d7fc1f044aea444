//! User and group names -> ids, for `socket-owner` (the system's passwd and group databases,
//! through libc's reentrant lookups). Numbers are taken as they are.

use std::ffi::CString;

fn lookup<T>(
    name: &str,
    call: impl Fn(*const libc::c_char, *mut T, *mut libc::c_char, usize, *mut *mut T) -> i32,
    id: impl Fn(&T) -> u32,
) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: T is a plain C struct (passwd or group) for which all-zero is a valid value;
    // the lookup fills it.
    let mut entry: T = unsafe { std::mem::zeroed() };
    let mut result: *mut T = std::ptr::null_mut();
    let rc = call(
        cname.as_ptr(),
        &mut entry,
        buf.as_mut_ptr(),
        buf.len(),
        &mut result,
    );
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(id(&entry))
}

/// A user name or uid -> uid.
pub fn lookup_user(name: &str) -> Option<u32> {
    lookup(
        name,
        // SAFETY: getpwnam_r writes at most `len` bytes into `buf` and one passwd into `entry`,
        // and sets `result`; all pointers are valid for the call.
        |n, entry, buf, len, result| unsafe { libc::getpwnam_r(n, entry, buf, len, result) },
        |p: &libc::passwd| p.pw_uid,
    )
}

/// A group name or gid -> gid.
pub fn lookup_group(name: &str) -> Option<u32> {
    lookup(
        name,
        // SAFETY: as for getpwnam_r, with one group.
        |n, entry, buf, len, result| unsafe { libc::getgrnam_r(n, entry, buf, len, result) },
        |g: &libc::group| g.gr_gid,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(lookup_user("root"), Some(0));
        assert_eq!(lookup_user("1234"), Some(1234));
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_user("no-such-user-vubd"), None);
    }
}
