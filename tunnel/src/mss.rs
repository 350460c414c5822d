//! TCP MSS clamping: a SYN that crosses the tunnel has its maximum segment
//! size option lowered to what fits the tunnel's MTU, so TCP never sends a
//! segment that would need fragments (and never depends on ICMP getting
//! through for path MTU discovery).

use crate::packet::{proto, tcp_flags, Packet, Transport};

/// The largest MSS for TCP over IPv4 / IPv6 in packets of at most `mtu`
/// bytes (IP and TCP headers without options).
pub fn mss_for(mtu: u16, v4: bool) -> u16 {
    mtu.saturating_sub(if v4 { 40 } else { 60 })
}

/// Updates a ones' complement checksum for a 16-bit field changing from
/// `old` to `new` (RFC 1624, eqn. 3).
fn adjust(check: u16, old: u16, new: u16) -> u16 {
    let mut acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Lowers the MSS option of a TCP SYN in `pkt` to at most `max` (for the
/// packet's family); true when it changed. Anything that is not a SYN
/// with a well-formed MSS option is left alone.
pub fn clamp(pkt: &mut [u8], max_v4: u16, max_v6: u16) -> bool {
    let (l4, v4) = match Packet::parse(pkt) {
        Ok(p) if p.proto == proto::TCP => match (p.l4, p.transport) {
            (Some(l4), Transport::Tcp { flags, .. }) if flags & tcp_flags::SYN != 0 => {
                (l4, p.is_v4())
            }
            _ => return false,
        },
        _ => return false,
    };
    let max = if v4 { max_v4 } else { max_v6 };
    let Some(&off_byte) = pkt.get(l4 + 12) else {
        return false;
    };
    let end = l4 + usize::from(off_byte >> 4) * 4;
    if end > pkt.len() {
        return false;
    }
    let mut i = l4 + 20;
    while i < end {
        match pkt[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&len) = pkt.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([pkt[i + 2], pkt[i + 3]]);
                    if old <= max {
                        return false;
                    }
                    pkt[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    let c = u16::from_be_bytes([pkt[l4 + 16], pkt[l4 + 17]]);
                    pkt[l4 + 16..l4 + 18].copy_from_slice(&adjust(c, old, max).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;
    use std::net::IpAddr;

    fn syn_with_mss(s: IpAddr, d: IpAddr, mss: u16) -> Vec<u8> {
        // 20-byte header + NOP, NOP, MSS option, then SACK-permitted + pad.
        let m = mss.to_be_bytes();
        let mut l4 = vec![
            0x9c,
            0x40,
            0,
            22,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            8 << 4,
            tcp_flags::SYN,
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ];
        l4.extend_from_slice(&[1, 1, 2, 4, m[0], m[1], 4, 2, 0, 0, 0, 0]);
        build::ip(s, d, proto::TCP, &l4).expect("syn")
    }

    #[test]
    fn a_syn_mss_above_the_tunnel_is_lowered_and_the_checksum_still_verifies() {
        for (s, d) in [
            (IpAddr::from([100, 64, 0, 1]), IpAddr::from([100, 64, 0, 2])),
            ("fd7a::1".parse().expect("a"), "fd7a::2".parse().expect("a")),
        ] {
            let mut p = syn_with_mss(s, d, 1460);
            let want = syn_with_mss(s, d, 1240);
            assert!(clamp(&mut p, 1240, 1240));
            assert_eq!(
                p, want,
                "same bytes as a SYN built with MSS 1240 (checksum included)"
            );
            // Already small enough: untouched.
            assert!(!clamp(&mut p, 1300, 1300));
        }
        assert_eq!(mss_for(1280, true), 1240);
        assert_eq!(mss_for(1280, false), 1220);
    }

    #[test]
    fn non_syns_and_bad_options_are_left_alone() {
        let (s, d) = (IpAddr::from([1, 1, 1, 1]), IpAddr::from([2, 2, 2, 2]));
        let mut ack = build::tcp(s, d, 1, 2, 3, 4, tcp_flags::ACK, &[]).expect("ack");
        let before = ack.clone();
        assert!(!clamp(&mut ack, 100, 100));
        assert_eq!(ack, before);
        let mut bad = syn_with_mss(s, d, 1460);
        let before = bad.clone();
        bad[43] = 0; // the MSS option's length byte: 0 is malformed
        let malformed = bad.clone();
        assert!(!clamp(&mut bad, 100, 100));
        assert_eq!(bad, malformed);
        assert_ne!(bad, before);
    }
}
