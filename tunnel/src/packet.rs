//! A read-only view of one IP packet (v4 or v6) as it comes out of the
//! TUN device or off the wire: addresses, transport protocol and ports,
//! checked against the buffer before anything is read. Anything malformed
//! is a [`PacketError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers used here.
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// IPv6 extension headers walked to find the transport header, at most
/// this many (a chain longer than that is refused, not followed).
const MAX_EXTENSION_HEADERS: usize = 8;

/// Why bytes are not an IP packet this tunnel can carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its headers say.
    #[error("truncated IP packet ({0} bytes)")]
    Truncated(usize),
    /// Neither IPv4 nor IPv6.
    #[error("not an IP packet (version {0})")]
    Version(u8),
    /// An IPv4 header length below 20 bytes or past the packet.
    #[error("bad IPv4 header length {0}")]
    HeaderLength(usize),
    /// More IPv6 extension headers than [`MAX_EXTENSION_HEADERS`].
    #[error("too many IPv6 extension headers")]
    TooManyExtensions,
}

/// The transport header's fields the tunnel looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
        /// Flags ([`tcp_flags`]).
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgement number.
        ack: u32,
    },
    /// UDP.
    Udp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// ICMP or ICMPv6.
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Identifier (echo request and reply; else the next two bytes).
        ident: u16,
    },
    /// Another protocol, or a fragment after the first (no header).
    Other,
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// One parsed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The packet, cut to the length its header gives.
    pub bytes: &'a [u8],
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Where the transport header starts (`None`: a non-first fragment).
    pub l4: Option<usize>,
    /// IPv4 "don't fragment" (always true for IPv6: routers never
    /// fragment it).
    pub dont_fragment: bool,
    /// The transport fields.
    pub transport: Transport,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
        *b.get(i + 2)?,
        *b.get(i + 3)?,
    ]))
}

impl<'a> Packet<'a> {
    /// Parses `bytes` (trailing bytes past the IP length are ignored).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PacketError> {
        let first = *bytes.first().ok_or(PacketError::Truncated(0))?;
        match first >> 4 {
            4 => Self::parse_v4(bytes),
            6 => Self::parse_v6(bytes),
            v => Err(PacketError::Version(v)),
        }
    }

    fn parse_v4(b: &'a [u8]) -> Result<Self, PacketError> {
        if b.len() < 20 {
            return Err(PacketError::Truncated(b.len()));
        }
        let ihl = usize::from(b[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if ihl < 20 || ihl > total {
            return Err(PacketError::HeaderLength(ihl));
        }
        if total > b.len() {
            return Err(PacketError::Truncated(b.len()));
        }
        let b = &b[..total];
        let frag = u16::from_be_bytes([b[6], b[7]]);
        let offset = frag & 0x1fff;
        let proto = b[9];
        let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
        let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
        let l4 = (offset == 0).then_some(ihl);
        Ok(Packet {
            bytes: b,
            src,
            dst,
            proto,
            l4,
            dont_fragment: frag & 0x4000 != 0,
            transport: l4.map_or(Transport::Other, |o| transport(b, proto, o)),
        })
    }

    fn parse_v6(b: &'a [u8]) -> Result<Self, PacketError> {
        if b.len() < 40 {
            return Err(PacketError::Truncated(b.len()));
        }
        let total = 40 + usize::from(u16::from_be_bytes([b[4], b[5]]));
        if total > b.len() {
            return Err(PacketError::Truncated(b.len()));
        }
        let b = &b[..total];
        let addr = |i: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[i..i + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        let (src, dst) = (addr(8), addr(24));
        let mut next = b[6];
        let mut off = 40usize;
        let mut first_fragment = true;
        let mut walked = 0;
        // Hop-by-hop, routing, fragment, destination options.
        while matches!(next, 0 | 43 | 44 | 60) {
            walked += 1;
            if walked > MAX_EXTENSION_HEADERS {
                return Err(PacketError::TooManyExtensions);
            }
            let h = b.get(off..off + 8).ok_or(PacketError::Truncated(b.len()))?;
            let len = if next == 44 {
                first_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 == 0;
                8
            } else {
                (usize::from(h[1]) + 1) * 8
            };
            next = h[0];
            off += len;
            if off > b.len() {
                return Err(PacketError::Truncated(b.len()));
            }
        }
        let l4 = first_fragment.then_some(off);
        Ok(Packet {
            bytes: b,
            src,
            dst,
            proto: next,
            l4,
            dont_fragment: true,
            transport: l4.map_or(Transport::Other, |o| transport(b, next, o)),
        })
    }

    /// Whether this is IPv4.
    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }
}

/// The transport fields at `off` (a header cut short is [`Transport::Other`]).
fn transport(b: &[u8], proto: u8, off: usize) -> Transport {
    let t = || -> Option<Transport> {
        Some(match proto {
            proto::TCP => Transport::Tcp {
                src: u16_at(b, off)?,
                dst: u16_at(b, off + 2)?,
                seq: u32_at(b, off + 4)?,
                ack: u32_at(b, off + 8)?,
                flags: *b.get(off + 13)?,
            },
            proto::UDP => Transport::Udp {
                src: u16_at(b, off)?,
                dst: u16_at(b, off + 2)?,
            },
            proto::ICMP | proto::ICMPV6 => Transport::Icmp {
                ty: *b.get(off)?,
                code: *b.get(off + 1)?,
                ident: u16_at(b, off + 4).unwrap_or(0),
            },
            _ => Transport::Other,
        })
    };
    t().unwrap_or(Transport::Other)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build;

    pub(crate) fn v4(a: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    #[test]
    fn parses_a_tcp_syn_over_ipv4_and_ipv6() {
        let p = build::tcp(
            v4([100, 64, 0, 1]).into(),
            v4([100, 64, 0, 2]).into(),
            40000,
            22,
            7,
            0,
            tcp_flags::SYN,
            &[],
        )
        .expect("tcp");
        let q = Packet::parse(&p).expect("parses");
        assert_eq!(q.src, IpAddr::from([100, 64, 0, 1]));
        assert_eq!(q.proto, proto::TCP);
        assert!(matches!(
            q.transport,
            Transport::Tcp {
                src: 40000,
                dst: 22,
                flags: tcp_flags::SYN,
                seq: 7,
                ..
            }
        ));
        let a: Ipv6Addr = "fd00::1".parse().expect("addr");
        let b: Ipv6Addr = "fd00::2".parse().expect("addr");
        let p = build::tcp(a.into(), b.into(), 1, 2, 3, 0, tcp_flags::SYN, b"x").expect("tcp");
        let q = Packet::parse(&p).expect("parses");
        assert_eq!((q.src, q.dst), (a.into(), b.into()));
        assert!(matches!(q.transport, Transport::Tcp { src: 1, dst: 2, .. }));
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert_eq!(Packet::parse(&[]), Err(PacketError::Truncated(0)));
        assert_eq!(Packet::parse(&[0x50; 40]), Err(PacketError::Version(5)));
        let mut p = build::udp(
            v4([1, 1, 1, 1]).into(),
            v4([2, 2, 2, 2]).into(),
            1,
            2,
            b"hello",
        )
        .expect("udp");
        p[0] = 0x44; // IHL 16 bytes
        assert_eq!(Packet::parse(&p), Err(PacketError::HeaderLength(16)));
        let p = build::udp(
            v4([1, 1, 1, 1]).into(),
            v4([2, 2, 2, 2]).into(),
            1,
            2,
            b"hello",
        )
        .expect("udp");
        assert!(matches!(
            Packet::parse(&p[..p.len() - 1]),
            Err(PacketError::Truncated(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Packet::parse(&b);
        }
    }
}
