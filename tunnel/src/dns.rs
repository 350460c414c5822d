//! The name responder's DNS codec (RFC 1035, the part a stub resolver
//! uses): one question in, an answer, NXDOMAIN or REFUSED out. Names under
//! `.switchboard` are this namespace's peers; nothing else is answered
//! (REFUSED sends the resolver to its next server). Every length is
//! checked against the message before it is read.

/// The zone the responder answers for.
pub const ZONE: &str = "switchboard";
/// TTL of an answer (addresses are stable; peers may come and go).
pub const TTL: u32 = 60;

/// Record types.
pub mod qtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Any.
    pub const ANY: u16 = 255;
}

/// Why a message is not a query this responder takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Shorter than its header or question.
    #[error("truncated DNS message")]
    Truncated,
    /// A response, another opcode, or not exactly one question.
    #[error("not a standard query with one question")]
    NotAQuery,
    /// A label longer than 63 bytes, a name over 255, or a compression
    /// pointer in the question.
    #[error("bad name in the question")]
    BadName,
}

/// One parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    /// The query id.
    pub id: u16,
    /// The header's flags (RD is echoed).
    flags: u16,
    /// The name's labels, lowercase.
    pub labels: Vec<String>,
    /// The record type asked for.
    pub qtype: u16,
    /// The question's bytes (name, type, class), echoed in the answer.
    question: &'a [u8],
}

impl<'a> Query<'a> {
    /// Parses a query.
    pub fn parse(m: &'a [u8]) -> Result<Self, DnsError> {
        if m.len() < 12 {
            return Err(DnsError::Truncated);
        }
        let id = u16::from_be_bytes([m[0], m[1]]);
        let flags = u16::from_be_bytes([m[2], m[3]]);
        let qd = u16::from_be_bytes([m[4], m[5]]);
        // QR must be 0 (a query), opcode 0 (standard).
        if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qd != 1 {
            return Err(DnsError::NotAQuery);
        }
        let mut i = 12;
        let mut labels = Vec::new();
        let mut total = 0usize;
        loop {
            let len = usize::from(*m.get(i).ok_or(DnsError::Truncated)?);
            i += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return Err(DnsError::BadName);
            }
            total += len + 1;
            if total > 255 {
                return Err(DnsError::BadName);
            }
            let l = m.get(i..i + len).ok_or(DnsError::Truncated)?;
            labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
            i += len;
        }
        let t = m.get(i..i + 4).ok_or(DnsError::Truncated)?;
        let qtype = u16::from_be_bytes([t[0], t[1]]);
        Ok(Query {
            id,
            flags,
            labels,
            qtype,
            question: &m[12..i + 4],
        })
    }

    /// The peer name asked about: `NAME` of `NAME.switchboard` (`None`
    /// for other names).
    pub fn peer(&self) -> Option<&str> {
        match self.labels.as_slice() {
            [name, zone] if zone == ZONE => Some(name),
            _ => None,
        }
    }

    fn header(&self, rcode: u16, answers: u16) -> Vec<u8> {
        // QR, AA, RD as asked; RA 0.
        let flags = 0x8000 | 0x0400 | (self.flags & 0x0100) | rcode;
        let mut out = Vec::with_capacity(12 + self.question.len() + 32);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&answers.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(self.question);
        out
    }

    /// The answer: the records of `addrs` this query's type asks for (an
    /// empty answer — NOERROR, no data — when the name has none of them).
    pub fn answer(&self, addrs: &[std::net::IpAddr]) -> Vec<u8> {
        let wanted: Vec<&std::net::IpAddr> = addrs
            .iter()
            .filter(|a| match self.qtype {
                qtype::A => a.is_ipv4(),
                qtype::AAAA => a.is_ipv6(),
                qtype::ANY => true,
                _ => false,
            })
            .collect();
        let mut out = self.header(0, wanted.len() as u16);
        for a in wanted {
            // A pointer to the question's name (offset 12).
            out.extend_from_slice(&[0xc0, 12]);
            let (ty, data) = match a {
                std::net::IpAddr::V4(v4) => (qtype::A, v4.octets().to_vec()),
                std::net::IpAddr::V6(v6) => (qtype::AAAA, v6.octets().to_vec()),
            };
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&TTL.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(&data);
        }
        out
    }

    /// "No such name" (a name under the zone that is no peer).
    pub fn nxdomain(&self) -> Vec<u8> {
        self.header(3, 0)
    }

    /// "Server failure" (the relay did not answer).
    pub fn servfail(&self) -> Vec<u8> {
        self.header(2, 0)
    }

    /// "Refused" (a name outside the zone).
    pub fn refused(&self) -> Vec<u8> {
        self.header(5, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn query(name: &str, ty: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn a_peer_name_gets_its_address_and_others_are_refused() {
        let m = query("London.switchboard", qtype::A);
        let q = Query::parse(&m).expect("query");
        assert_eq!(q.peer(), Some("london"));
        let addrs = [
            IpAddr::from([100, 64, 0, 7]),
            "fd00::7".parse().expect("v6"),
        ];
        let a = q.answer(&addrs);
        assert_eq!(&a[..2], &[0x12, 0x34], "same id");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one A record");
        assert_eq!(&a[a.len() - 4..], &[100, 64, 0, 7]);
        let q6 = query("london.switchboard", qtype::AAAA);
        let a6 = Query::parse(&q6).expect("q").answer(&addrs);
        assert_eq!(
            &a6[a6.len() - 16..],
            &"fd00::7"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets()
        );
        let other = query("example.com", qtype::A);
        let o = Query::parse(&other).expect("q");
        assert_eq!(o.peer(), None);
        assert_eq!(o.refused()[3] & 0x0f, 5);
        assert_eq!(q.nxdomain()[3] & 0x0f, 3);
    }

    #[test]
    fn malformed_queries_are_errors() {
        assert_eq!(Query::parse(&[0; 5]), Err(DnsError::Truncated));
        let mut m = query("a.switchboard", qtype::A);
        m[2] |= 0x80; // a response
        assert_eq!(Query::parse(&m), Err(DnsError::NotAQuery));
        let mut m = query("a.switchboard", qtype::A);
        m[12] = 0xc0; // a pointer in the question
        assert_eq!(Query::parse(&m), Err(DnsError::BadName));
        let m = query("a.switchboard", qtype::A);
        assert_eq!(Query::parse(&m[..m.len() - 1]), Err(DnsError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(q) = Query::parse(&b) {
                let _ = q.answer(&[IpAddr::from([1, 2, 3, 4])]);
            }
        }
    }
}
