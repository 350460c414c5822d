//! A minimal DER reader: enough of X.690 to walk certificates and OCSP
//! responses. Single-byte tags, definite lengths up to 4 bytes; anything
//! else is malformed.

use crate::OcspError;

pub(crate) const BOOLEAN: u8 = 0x01;
pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const BIT_STRING: u8 = 0x03;
pub(crate) const OCTET_STRING: u8 = 0x04;
pub(crate) const NULL: u8 = 0x05;
pub(crate) const OID: u8 = 0x06;
pub(crate) const ENUMERATED: u8 = 0x0a;
pub(crate) const SEQUENCE: u8 = 0x30;
pub(crate) const UTC_TIME: u8 = 0x17;
pub(crate) const GENERALIZED_TIME: u8 = 0x18;

/// Context-specific tag `[n]`, constructed.
pub(crate) const fn ctx(n: u8) -> u8 {
    0xa0 | n
}

/// Context-specific tag `[n]`, primitive.
pub(crate) const fn ctx_prim(n: u8) -> u8 {
    0x80 | n
}

/// One element: its tag, its content and all of its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) content: &'a [u8],
    pub(crate) whole: &'a [u8],
}

/// Reads consecutive elements from a byte slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn peek_tag(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// The next element, whatever its tag.
    pub(crate) fn any(&mut self, what: &'static str) -> Result<Tlv<'a>, OcspError> {
        let bad = || OcspError::Malformed(what);
        let tag = *self.buf.first().ok_or_else(bad)?;
        if tag & 0x1f == 0x1f {
            return Err(bad());
        }
        let first = *self.buf.get(1).ok_or_else(bad)?;
        let (len, head) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return Err(bad());
            }
            let bytes = self.buf.get(2..2 + n).ok_or_else(bad)?;
            let len = bytes.iter().fold(0usize, |a, b| (a << 8) | *b as usize);
            (len, 2 + n)
        };
        let end = head.checked_add(len).ok_or_else(bad)?;
        let whole = self.buf.get(..end).ok_or_else(bad)?;
        self.buf = &self.buf[end..];
        Ok(Tlv {
            tag,
            content: &whole[head..],
            whole,
        })
    }

    /// The next element, which must have `tag`.
    pub(crate) fn expect(&mut self, tag: u8, what: &'static str) -> Result<Tlv<'a>, OcspError> {
        let t = self.any(what)?;
        if t.tag != tag {
            return Err(OcspError::Malformed(what));
        }
        Ok(t)
    }

    /// The next element if it has `tag`.
    pub(crate) fn optional(
        &mut self,
        tag: u8,
        what: &'static str,
    ) -> Result<Option<Tlv<'a>>, OcspError> {
        if self.peek_tag() == Some(tag) {
            self.expect(tag, what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A SEQUENCE's content as a reader.
    pub(crate) fn sequence(&mut self, what: &'static str) -> Result<Reader<'a>, OcspError> {
        Ok(Reader::new(self.expect(SEQUENCE, what)?.content))
    }
}

/// The bits of a BIT STRING with no unused bits.
pub(crate) fn bit_string<'a>(t: Tlv<'a>, what: &'static str) -> Result<&'a [u8], OcspError> {
    match t.content.split_first() {
        Some((0, bits)) if t.tag == BIT_STRING => Ok(bits),
        _ => Err(OcspError::Malformed(what)),
    }
}

/// Writes a DER element.
pub(crate) fn write(tag: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

/// Seconds since the Unix epoch of a GeneralizedTime (`YYYYMMDDHHMMSS[.f]Z`)
/// or UTCTime (`YYMMDDHHMMSSZ`).
pub(crate) fn time(t: Tlv<'_>, what: &'static str) -> Result<u64, OcspError> {
    let bad = || OcspError::Malformed(what);
    let s = std::str::from_utf8(t.content).map_err(|_| bad())?;
    let s = s.strip_suffix('Z').ok_or_else(bad)?;
    let (year, rest) = match t.tag {
        GENERALIZED_TIME => {
            let y: i64 = s.get(..4).ok_or_else(bad)?.parse().map_err(|_| bad())?;
            (y, &s[4..])
        }
        UTC_TIME => {
            let y: i64 = s.get(..2).ok_or_else(bad)?.parse().map_err(|_| bad())?;
            (if y < 50 { 2000 + y } else { 1900 + y }, &s[2..])
        }
        _ => return Err(bad()),
    };
    // Fractional seconds (GeneralizedTime only) are dropped.
    let rest = rest.split('.').next().unwrap_or(rest);
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n = |i: usize| -> i64 { rest[i..i + 2].parse().unwrap_or(99) };
    let (mo, d, h, mi, se) = (n(0), n(2), n(4), n(6), n(8));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let days = days_from_civil(year, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs).map_err(|_| bad())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(s: &str) -> u64 {
        let mut v = Vec::new();
        write(GENERALIZED_TIME, s.as_bytes(), &mut v);
        time(Reader::new(&v).any("t").unwrap(), "t").unwrap()
    }

    #[test]
    fn times() {
        assert_eq!(gt("19700101000000Z"), 0);
        assert_eq!(gt("20261130083033Z"), 1_796_027_433);
        assert_eq!(gt("20000229120000.123Z"), 951_825_600);
        let mut v = Vec::new();
        write(UTC_TIME, b"261130083033Z", &mut v);
        assert_eq!(
            time(Reader::new(&v).any("t").unwrap(), "t").unwrap(),
            1_796_027_433
        );
    }

    #[test]
    fn lengths_round_trip_and_truncation_is_malformed() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let mut v = Vec::new();
            write(OCTET_STRING, &vec![7u8; len], &mut v);
            let t = Reader::new(&v).any("x").unwrap();
            assert_eq!(t.content.len(), len);
            assert_eq!(t.whole.len(), v.len());
            assert!(Reader::new(&v[..v.len() - 1]).any("x").is_err() || len == 0);
        }
        assert!(Reader::new(&[0x30, 0x85, 1, 1, 1, 1, 1]).any("x").is_err());
        assert!(Reader::new(&[0x1f, 0x01, 0x00]).any("x").is_err());
    }
}
