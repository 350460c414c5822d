//! Building IP packets: the answers the tunnel gives on a peer's behalf (a
//! TCP reset for a closed port, ICMP "port unreachable", "fragmentation
//! needed" / "packet too big"), and packets for tests. Every builder
//! returns `None` when the two addresses are of different families.

use crate::packet::{proto, tcp_flags, Packet, Transport};
use std::net::IpAddr;

/// Hop limit / TTL of packets built here.
const TTL: u8 = 64;
/// How much of an offending packet an ICMPv4 error quotes (RFC 1812: as
/// much as fits in 576 bytes).
const ICMP4_QUOTE: usize = 576 - 20 - 8;
/// The same for ICMPv6 (RFC 4443: as much as fits in the minimum MTU).
const ICMP6_QUOTE: usize = 1280 - 40 - 8;

/// Adds `data` to a ones' complement sum.
fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// Folds a ones' complement sum into the checksum field's value.
fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(0, data))
}

/// The sum of the pseudo-header of a transport checksum.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(acc, &s.octets());
            acc = sum(acc, &d.octets());
            acc += u32::from(proto) + len as u32;
        }
        (s, d) => {
            let o = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            acc = sum(acc, &o(s));
            acc = sum(acc, &o(d));
            acc += len as u32 + u32::from(proto);
        }
    }
    acc
}

/// An IP packet from `src` to `dst` carrying `l4` of protocol `proto`,
/// with the transport checksum (TCP, UDP, ICMP, ICMPv6) filled in.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Option<Vec<u8>> {
    let mut l4 = l4.to_vec();
    let at = match proto {
        proto::TCP => Some(16),
        proto::UDP => Some(6),
        proto::ICMP | proto::ICMPV6 => Some(2),
        _ => None,
    };
    if let Some(at) = at {
        if l4.len() >= at + 2 {
            l4[at..at + 2].copy_from_slice(&[0, 0]);
            let acc = if proto == proto::ICMP {
                0
            } else {
                pseudo(src, dst, proto, l4.len())
            };
            let mut c = fold(sum(acc, &l4));
            if proto == proto::UDP && c == 0 {
                c = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + l4.len()).ok()?;
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, TTL, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(&l4);
            Some(h)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(l4.len()).ok()?;
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[proto, TTL]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&l4);
            Some(h)
        }
        _ => None,
    }
}

/// A TCP segment (no options).
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let mut l4 = Vec::with_capacity(20 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(payload);
    ip(src, dst, proto::TCP, &l4)
}

/// A UDP datagram.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(8 + payload.len()).ok()?;
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&len.to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip(src, dst, proto::UDP, &l4)
}

/// An ICMP / ICMPv6 message: type, code, the 4 bytes after the checksum,
/// then `body`.
pub fn icmp(
    src: IpAddr,
    dst: IpAddr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Option<Vec<u8>> {
    let mut l4 = vec![ty, code, 0, 0];
    l4.extend_from_slice(&rest);
    l4.extend_from_slice(body);
    let p = if src.is_ipv4() {
        proto::ICMP
    } else {
        proto::ICMPV6
    };
    ip(src, dst, p, &l4)
}

/// An echo request (ping) with identifier `ident` and sequence `seq`.
pub fn echo_request(
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq: u16,
    body: &[u8],
) -> Option<Vec<u8>> {
    let ty = if src.is_ipv4() { 8 } else { 128 };
    let i = ident.to_be_bytes();
    let s = seq.to_be_bytes();
    icmp(src, dst, ty, 0, [i[0], i[1], s[0], s[1]], body)
}

/// "Fragmentation needed" (ICMPv4 3/4) or "packet too big" (ICMPv6 2/0)
/// for `p`, telling its sender the path takes at most `mtu` bytes; sent as
/// if from `p`'s destination, quoting the start of `p`.
pub fn too_big(p: &Packet<'_>, mtu: u16) -> Option<Vec<u8>> {
    if p.is_v4() {
        let q = &p.bytes[..p.bytes.len().min(ICMP4_QUOTE)];
        let m = mtu.to_be_bytes();
        icmp(p.dst, p.src, 3, 4, [0, 0, m[0], m[1]], q)
    } else {
        let q = &p.bytes[..p.bytes.len().min(ICMP6_QUOTE)];
        icmp(p.dst, p.src, 2, 0, u32::from(mtu).to_be_bytes(), q)
    }
}

/// The answer to a packet for a port that is closed to its sender: a TCP
/// reset for TCP (the caller sees "connection refused" at once), ICMP
/// "port unreachable" for anything else — from `p`'s destination. `None`
/// for a TCP reset (never answered) or a family mix-up.
pub fn refuse(p: &Packet<'_>) -> Option<Vec<u8>> {
    match p.transport {
        Transport::Tcp { flags, .. } if flags & tcp_flags::RST != 0 => None,
        Transport::Tcp {
            src,
            dst,
            flags,
            seq,
            ack,
        } => {
            let l4 = p.l4?;
            let data_off = usize::from(p.bytes.get(l4 + 12)? >> 4) * 4;
            let mut len = p.bytes.len().saturating_sub(l4 + data_off) as u32;
            if flags & tcp_flags::SYN != 0 {
                len += 1;
            }
            if flags & tcp_flags::FIN != 0 {
                len += 1;
            }
            if flags & tcp_flags::ACK != 0 {
                tcp(p.dst, p.src, dst, src, ack, 0, tcp_flags::RST, &[])
            } else {
                tcp(
                    p.dst,
                    p.src,
                    dst,
                    src,
                    0,
                    seq.wrapping_add(len),
                    tcp_flags::RST | tcp_flags::ACK,
                    &[],
                )
            }
        }
        _ if p.is_v4() => {
            let q = &p.bytes[..p.bytes.len().min(ICMP4_QUOTE)];
            icmp(p.dst, p.src, 3, 3, [0; 4], q)
        }
        _ => {
            let q = &p.bytes[..p.bytes.len().min(ICMP6_QUOTE)];
            icmp(p.dst, p.src, 1, 4, [0; 4], q)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Packet;

    /// A transport checksum verifies: summing the segment with its
    /// checksum and the pseudo-header gives zero.
    fn verifies(p: &Packet<'_>) -> bool {
        let l4 = &p.bytes[p.l4.expect("l4")..];
        let acc = if p.proto == proto::ICMP {
            0
        } else {
            pseudo(p.src, p.dst, p.proto, l4.len())
        };
        fold(sum(acc, l4)) == 0
    }

    #[test]
    fn checksums_verify_for_every_builder_in_both_families() {
        let v4 = (IpAddr::from([100, 64, 0, 1]), IpAddr::from([100, 64, 0, 2]));
        let v6: (IpAddr, IpAddr) = (
            "fd7a::1".parse().expect("addr"),
            "fd7a::2".parse().expect("addr"),
        );
        for (s, d) in [v4, v6] {
            for b in [
                tcp(s, d, 1, 2, 3, 4, tcp_flags::SYN, b"odd").expect("tcp"),
                udp(s, d, 5, 6, b"hello").expect("udp"),
                echo_request(s, d, 7, 8, b"ping").expect("echo"),
            ] {
                let p = Packet::parse(&b).expect("parses");
                assert!(verifies(&p), "{p:?}");
                if s.is_ipv4() {
                    assert_eq!(checksum(&b[..20]), 0, "IPv4 header checksum");
                }
            }
        }
        assert!(
            tcp(v4.0, v6.1, 1, 2, 3, 4, 0, &[]).is_none(),
            "families mixed"
        );
    }

    #[test]
    fn a_syn_to_a_closed_port_gets_a_reset_that_acks_it() {
        let (s, d) = (IpAddr::from([100, 64, 0, 1]), IpAddr::from([100, 64, 0, 2]));
        let syn = tcp(s, d, 40000, 5432, 1000, 0, tcp_flags::SYN, &[]).expect("syn");
        let rst = refuse(&Packet::parse(&syn).expect("syn")).expect("rst");
        let r = Packet::parse(&rst).expect("rst parses");
        assert_eq!((r.src, r.dst), (d, s));
        assert!(verifies(&r));
        assert_eq!(
            r.transport,
            Transport::Tcp {
                src: 5432,
                dst: 40000,
                flags: tcp_flags::RST | tcp_flags::ACK,
                seq: 0,
                ack: 1001
            }
        );
        // A reset is never answered.
        assert!(refuse(&r).is_none());
    }

    #[test]
    fn udp_to_a_closed_port_and_an_oversized_packet_get_icmp() {
        let (s, d) = (IpAddr::from([100, 64, 0, 1]), IpAddr::from([100, 64, 0, 2]));
        let u = udp(s, d, 1, 53, b"q").expect("udp");
        let icmp = refuse(&Packet::parse(&u).expect("udp")).expect("icmp");
        let p = Packet::parse(&icmp).expect("parses");
        assert!(matches!(
            p.transport,
            Transport::Icmp { ty: 3, code: 3, .. }
        ));
        assert!(verifies(&p));
        let big = udp(s, d, 1, 2, &[0u8; 1400]).expect("big");
        let tb = too_big(&Packet::parse(&big).expect("big"), 1280).expect("tb");
        let p = Packet::parse(&tb).expect("parses");
        assert!(matches!(
            p.transport,
            Transport::Icmp { ty: 3, code: 4, .. }
        ));
        assert_eq!(u16::from_be_bytes([tb[26], tb[27]]), 1280, "next-hop MTU");
        assert!(tb.len() <= 576, "quotes at most 576 bytes in all");
        assert!(verifies(&p));
        let (s6, d6): (IpAddr, IpAddr) =
            ("fd7a::1".parse().expect("a"), "fd7a::2".parse().expect("a"));
        let big = udp(s6, d6, 1, 2, &[0u8; 1400]).expect("big6");
        let tb = too_big(&Packet::parse(&big).expect("big6"), 1280).expect("tb6");
        let p = Packet::parse(&tb).expect("parses");
        assert!(matches!(
            p.transport,
            Transport::Icmp { ty: 2, code: 0, .. }
        ));
        assert!(tb.len() <= 1280);
        assert!(verifies(&p));
    }
}
