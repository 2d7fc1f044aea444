//! NBD URIs, as the NBD URI standard (NetworkBlockDevice/nbd doc/uri.md) writes them:
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`. The export name is
//! the path without its leading `/`, percent-decoded. TLS (`nbds`) and vsock are refused
//! rather than silently served in plain text.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A host name or address and a port; resolved at every connection attempt, so a
    /// server that moves to another address is found again.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    pub export: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// Longest export name the protocol allows (a string of at most 4096 bytes).
const MAX_EXPORT: usize = 4096;

pub fn parse(uri: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("NBD URI {uri:?}: {why}");
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
        return Err(bad("fragments are not allowed"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export"))?;
    if export.len() > MAX_EXPORT {
        return Err(bad("export name longer than 4096 bytes"));
    }
    let mut socket = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| bad("bad percent-encoding in the query"))?;
        match k {
            "socket" => socket = Some(v),
            // TLS parameters would ask for a protection vubd cannot give.
            k if k.starts_with("tls") => {
                return Err(bad("TLS is not supported by vubd's NBD client"))
            }
            k => return Err(bad(&format!("unknown query parameter {k:?}"))),
        }
    }
    let address = match scheme {
        "nbd" => {
            if socket.is_some() {
                return Err(bad("socket= belongs to nbd+unix://"));
            }
            // A user name is allowed by the standard and means nothing without TLS.
            let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad HOST[:PORT]"))?;
            if host.is_empty() {
                return Err(bad("a host is required"));
            }
            Address::Tcp { host, port }
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad(
                    "nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let path = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            Address::Unix(PathBuf::from(path))
        }
        "nbds" | "nbds+unix" => return Err(bad("TLS is not supported by vubd's NBD client")),
        s => return Err(bad(&format!("unsupported scheme {s:?}"))),
    };
    Ok(Target { address, export })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
    };
    Some((host.to_string(), port))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Export names are UTF-8 without NUL (the protocol's strings).
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris() {
        let t = parse("nbd://example.com/disk").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "example.com".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(t.export, "disk");
        let t = parse("nbd://127.0.0.1:10900").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(t.export, "");
        let t = parse("nbd://[::1]:1234/a%20b/c").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(t.export, "a b/c");
        assert_eq!(t.to_string(), "nbd://[::1]:1234/a b/c");
        assert!(parse("nbd://user@host/x").is_ok());
    }

    #[test]
    fn unix_uris() {
        let t = parse("nbd+unix:///exp?socket=/run/nbd.sock").unwrap();
        assert_eq!(t.address, Address::Unix("/run/nbd.sock".into()));
        assert_eq!(t.export, "exp");
        let t = parse("nbd+unix://?socket=/tmp/a%2Cb").unwrap();
        assert_eq!(t.address, Address::Unix("/tmp/a,b".into()));
        assert_eq!(t.export, "");
    }

    #[test]
    fn bad_uris() {
        for u in [
            "nbd:/x",
            "nbd://",
            "nbd://host:0/x",
            "nbd://host:99999/x",
            "nbd://host:x/y",
            "nbds://host/x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://host/x?socket=/s",
            "nbd://host/x?tls-certificates=/etc",
            "nbd://host/x?foo=1",
            "nbd://host/%zz",
            "nbd://host/%00",
            "http://host/x",
            "nbd://[::1/x",
        ] {
            assert!(parse(u).is_err(), "{u} should be refused");
        }
    }
}
