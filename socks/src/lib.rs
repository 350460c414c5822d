//! SOCKS5 server side (RFC 1928) with optional username/password
//! authentication (RFC 1929), sans-IO.
//!
//! Why our own parser and not `fast-socks5`: we need only the server half of
//! CONNECT, our own reply codes chosen from relay refusals, and no I/O or
//! runtime coupling; the whole protocol is four small messages. A sans-IO
//! parser (bytes in, `Parsed::{Incomplete, Done}` out) is easy to test
//! exhaustively and to fuzz, and keeps the crate dependency-free. Everything
//! here is MIT/Apache; no GPL code.
//!
//! Flow, as the daemon drives it:
//! 1. [`parse_greeting`] → choose a method with [`choose_method`] → write
//!    [`method_reply`].
//! 2. If [`METHOD_USER_PASS`]: [`parse_user_pass`] → write [`auth_reply`].
//! 3. [`parse_request`] → act → write [`reply`] with a [`Reply`] code.
//! 4. On success, the connection carries the proxied bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// SOCKS protocol version 5.
pub const VERSION: u8 = 5;
/// "No authentication required".
pub const METHOD_NONE: u8 = 0x00;
/// Username/password (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// "No acceptable methods".
pub const METHOD_NOT_ACCEPTABLE: u8 = 0xff;

/// Result of feeding bytes to a parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// More bytes are needed; nothing was consumed.
    Incomplete,
    /// A complete message and how many bytes it used.
    Done(T, usize),
}

/// Protocol violations. The connection should be closed after one (after
/// writing [`Reply::GeneralFailure`] if the request stage was reached).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not SOCKS version 5 (e.g. SOCKS4 or a plain HTTP request).
    #[error("not a SOCKS5 client (version byte {0:#04x}); use a SOCKS5 client, e.g. curl --socks5-hostname")]
    Version(u8),
    /// The greeting lists no methods.
    #[error("the client offered no authentication methods")]
    NoMethods,
    /// Bad sub-negotiation version in RFC 1929 auth.
    #[error("bad username/password sub-negotiation version {0:#04x}")]
    AuthVersion(u8),
    /// The reserved byte of a request is not zero.
    #[error("reserved byte of the request is {0:#04x}, not 0")]
    Reserved(u8),
    /// Unknown address type.
    #[error("unknown address type {0:#04x}")]
    AddressType(u8),
    /// An empty domain name.
    #[error("empty domain name")]
    EmptyDomain,
}

/// The client's greeting: the methods it supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered authentication methods.
    pub methods: Vec<u8>,
}

/// `VER NMETHODS METHODS...`
pub fn parse_greeting(buf: &[u8]) -> Result<Parsed<Greeting>, Error> {
    let Some(&ver) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if ver != VERSION {
        return Err(Error::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    if n == 0 {
        return Err(Error::NoMethods);
    }
    let end = 2 + n as usize;
    if buf.len() < end {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Done(
        Greeting {
            methods: buf[2..end].to_vec(),
        },
        end,
    ))
}

/// Picks the method to use: username/password when we require it, else
/// "none"; [`METHOD_NOT_ACCEPTABLE`] if the client does not offer it.
pub fn choose_method(g: &Greeting, require_auth: bool) -> u8 {
    let want = if require_auth {
        METHOD_USER_PASS
    } else {
        METHOD_NONE
    };
    if g.methods.contains(&want) {
        want
    } else {
        METHOD_NOT_ACCEPTABLE
    }
}

/// `VER METHOD`
pub fn method_reply(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// RFC 1929 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    /// Username bytes.
    pub user: Vec<u8>,
    /// Password bytes.
    pub pass: Vec<u8>,
}

impl std::fmt::Debug for UserPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("user", &String::from_utf8_lossy(&self.user))
            .field("pass", &"<redacted>")
            .finish()
    }
}

/// `VER(1) ULEN UNAME PLEN PASSWD`
pub fn parse_user_pass(buf: &[u8]) -> Result<Parsed<UserPass>, Error> {
    let Some(&ver) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if ver != 1 {
        return Err(Error::AuthVersion(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    let u_end = 2 + ulen as usize;
    let Some(&plen) = buf.get(u_end) else {
        return Ok(Parsed::Incomplete);
    };
    let p_end = u_end + 1 + plen as usize;
    if buf.len() < p_end {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Done(
        UserPass {
            user: buf[2..u_end].to_vec(),
            pass: buf[u_end + 1..p_end].to_vec(),
        },
        p_end,
    ))
}

/// `VER(1) STATUS`: 0 is success.
pub fn auth_reply(ok: bool) -> [u8; 2] {
    [1, if ok { 0 } else { 1 }]
}

/// Compares credentials in constant time (for equal lengths).
pub fn credentials_match(got: &UserPass, user: &[u8], pass: &[u8]) -> bool {
    fn ct(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
    // Evaluate both, so timing does not tell which one was wrong.
    let u = ct(&got.user, user);
    let p = ct(&got.pass, pass);
    u & p
}

/// What the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (1).
    Connect,
    /// BIND (2).
    Bind,
    /// UDP ASSOCIATE (3).
    UdpAssociate,
    /// Anything else.
    Other(u8),
}

/// Destination address of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// An IPv4 or IPv6 address.
    Ip(SocketAddr),
    /// A domain name (bytes as sent; usually ASCII) and port.
    Domain(Vec<u8>, u16),
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Where to.
    pub dest: Addr,
}

/// `VER CMD RSV ATYP DST.ADDR DST.PORT`
pub fn parse_request(buf: &[u8]) -> Result<Parsed<Request>, Error> {
    if buf.len() < 4 {
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(Error::Version(v));
            }
        }
        return Ok(Parsed::Incomplete);
    }
    if buf[0] != VERSION {
        return Err(Error::Version(buf[0]));
    }
    let command = match buf[1] {
        1 => Command::Connect,
        2 => Command::Bind,
        3 => Command::UdpAssociate,
        c => Command::Other(c),
    };
    if buf[2] != 0 {
        return Err(Error::Reserved(buf[2]));
    }
    let (dest, end) = match buf[3] {
        1 => {
            let end = 4 + 4 + 2;
            if buf.len() < end {
                return Ok(Parsed::Incomplete);
            }
            let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
            let port = u16::from_be_bytes([buf[8], buf[9]]);
            (Addr::Ip(SocketAddr::new(ip.into(), port)), end)
        }
        3 => {
            let Some(&len) = buf.get(4) else {
                return Ok(Parsed::Incomplete);
            };
            if len == 0 {
                return Err(Error::EmptyDomain);
            }
            let end = 5 + len as usize + 2;
            if buf.len() < end {
                return Ok(Parsed::Incomplete);
            }
            let name = buf[5..5 + len as usize].to_vec();
            let port = u16::from_be_bytes([buf[end - 2], buf[end - 1]]);
            (Addr::Domain(name, port), end)
        }
        4 => {
            let end = 4 + 16 + 2;
            if buf.len() < end {
                return Ok(Parsed::Incomplete);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[4..20]);
            let port = u16::from_be_bytes([buf[20], buf[21]]);
            (
                Addr::Ip(SocketAddr::new(Ipv6Addr::from(o).into(), port)),
                end,
            )
        }
        t => return Err(Error::AddressType(t)),
    };
    Ok(Parsed::Done(Request { command, dest }, end))
}

/// Reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// Succeeded.
    Succeeded = 0,
    /// General SOCKS server failure.
    GeneralFailure = 1,
    /// Connection not allowed by ruleset.
    NotAllowed = 2,
    /// Network unreachable.
    NetworkUnreachable = 3,
    /// Host unreachable.
    HostUnreachable = 4,
    /// Connection refused.
    ConnectionRefused = 5,
    /// TTL expired.
    TtlExpired = 6,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressTypeNotSupported = 8,
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT` with an IPv4 bound address.
pub fn reply(code: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![VERSION, code as u8, 0];
    match bound {
        Some(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        None => {
            out.push(1);
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_and_method_choice() {
        assert_eq!(parse_greeting(&[5]), Ok(Parsed::Incomplete));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(Parsed::Incomplete));
        let Ok(Parsed::Done(g, n)) = parse_greeting(&[5, 2, 0, 2, 99]) else {
            panic!()
        };
        assert_eq!((g.methods.as_slice(), n), (&[0u8, 2][..], 4));
        assert_eq!(choose_method(&g, false), METHOD_NONE);
        assert_eq!(choose_method(&g, true), METHOD_USER_PASS);
        let only_none = Greeting { methods: vec![0] };
        assert_eq!(choose_method(&only_none, true), METHOD_NOT_ACCEPTABLE);
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Error::Version(4)));
        assert_eq!(parse_greeting(b"GET / HTTP/1.1"), Err(Error::Version(b'G')));
        assert_eq!(parse_greeting(&[5, 0]), Err(Error::NoMethods));
    }

    #[test]
    fn user_pass() {
        let msg = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        for i in 0..msg.len() {
            assert_eq!(
                parse_user_pass(&msg[..i]),
                Ok(Parsed::Incomplete),
                "prefix {i}"
            );
        }
        let Ok(Parsed::Done(up, n)) = parse_user_pass(&msg) else {
            panic!()
        };
        assert_eq!(n, msg.len());
        assert!(credentials_match(&up, b"bob", b"pw"));
        assert!(!credentials_match(&up, b"bob", b"pX"));
        assert!(!credentials_match(&up, b"bo", b"pw"));
        assert!(!format!("{up:?}").contains("pw"));
        assert_eq!(parse_user_pass(&[5]), Err(Error::AuthVersion(5)));
    }

    #[test]
    fn requests_of_every_address_type() {
        let mut d = vec![5, 1, 0, 3, 18];
        d.extend_from_slice(b"london.switchboard");
        d.extend_from_slice(&22u16.to_be_bytes());
        for i in 0..d.len() {
            assert_eq!(parse_request(&d[..i]), Ok(Parsed::Incomplete), "prefix {i}");
        }
        assert_eq!(
            parse_request(&d),
            Ok(Parsed::Done(
                Request {
                    command: Command::Connect,
                    dest: Addr::Domain(b"london.switchboard".to_vec(), 22)
                },
                d.len()
            ))
        );
        let v4 = [5, 2, 0, 1, 127, 0, 0, 1, 0, 80];
        assert_eq!(
            parse_request(&v4),
            Ok(Parsed::Done(
                Request {
                    command: Command::Bind,
                    dest: Addr::Ip("127.0.0.1:80".parse().unwrap())
                },
                10
            ))
        );
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&[0; 15]);
        v6.push(1);
        v6.extend_from_slice(&[0, 53]);
        assert!(matches!(
            parse_request(&v6),
            Ok(Parsed::Done(Request { command: Command::UdpAssociate, dest: Addr::Ip(a) }, 22)) if a.to_string() == "[::1]:53"
        ));
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(Error::Reserved(1)));
        assert_eq!(parse_request(&[5, 1, 0, 9]), Err(Error::AddressType(9)));
        assert_eq!(parse_request(&[5, 1, 0, 3, 0]), Err(Error::EmptyDomain));
        assert_eq!(parse_request(&[4]), Err(Error::Version(4)));
    }

    #[test]
    fn replies() {
        assert_eq!(
            reply(Reply::HostUnreachable, None),
            vec![5, 4, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            reply(Reply::Succeeded, Some("10.0.0.1:1080".parse().unwrap())),
            vec![5, 0, 0, 1, 10, 0, 0, 1, 0x04, 0x38]
        );
        assert_eq!(
            reply(Reply::Succeeded, Some("[::1]:1".parse().unwrap())).len(),
            22
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_never_overrun(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Done(_, n)) = parse_greeting(&data) { prop_assert!(n <= data.len()); }
            if let Ok(Parsed::Done(_, n)) = parse_user_pass(&data) { prop_assert!(n <= data.len()); }
            if let Ok(Parsed::Done(_, n)) = parse_request(&data) { prop_assert!(n <= data.len()); }
        }
    }
}
