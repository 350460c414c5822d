//! OCSP (RFC 6960) for Switchboard's relays and daemons: the request a relay
//! sends its certificate's responder, and the checks both sides make of a
//! response before trusting it — that it answers for exactly this
//! certificate, is signed by the issuer or a responder the issuer delegated
//! to (`id-kp-OCSPSigning`), and is current. Sans-IO: the relay fetches
//! over HTTP, rustls carries the staple.
//!
//! rustls's webpki verifier ignores stapled responses; the daemon wraps it
//! with [`check`] (see `swb_daemon::tls`).

mod der;

use der::{Reader, Tlv};
use ring::digest;
use ring::signature::{self, UnparsedPublicKey};

/// How far a responder's clock may run ahead of ours.
pub const CLOCK_SKEW_SECS: u64 = 5 * 60;
/// How long a response without `nextUpdate` counts as current.
pub const MAX_AGE_WITHOUT_NEXT_UPDATE_SECS: u64 = 24 * 3600;
/// Largest response accepted (relay fetches and daemon staples).
pub const MAX_RESPONSE_LEN: usize = 64 * 1024;

/// Why a certificate or an OCSP response cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OcspError {
    /// Not the DER it claims to be.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The responder answered with an error status instead of a response.
    #[error("the OCSP responder answered {0} ({name})", name = response_status_name(*.0))]
    ResponderStatus(u8),
    /// No single response in it is for this certificate.
    #[error("the OCSP response is not for this certificate")]
    NotForThisCertificate,
    /// An algorithm this code does not verify.
    #[error("unsupported signature algorithm in the {0}")]
    UnsupportedAlgorithm(&'static str),
    /// The signature does not verify with the issuer's key or any
    /// delegated responder's.
    #[error("the OCSP response is not signed by the certificate's issuer or a responder it delegated to")]
    BadSignature,
    /// `thisUpdate` is in the future.
    #[error("the OCSP response is not valid yet (thisUpdate {0}, more than 5 min ahead)")]
    NotYetValid(u64),
    /// `nextUpdate` has passed (or the response is older than a day and
    /// names no `nextUpdate`).
    #[error("the OCSP response expired at {0} (Unix time)")]
    Expired(u64),
    /// Too big.
    #[error("the OCSP response is larger than {MAX_RESPONSE_LEN} bytes")]
    TooLarge,
}

fn response_status_name(s: u8) -> &'static str {
    match s {
        1 => "malformedRequest",
        2 => "internalError",
        3 => "tryLater",
        5 => "sigRequired",
        6 => "unauthorized",
        _ => "unknown status",
    }
}

/// A certificate's status, as a responder states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    /// Not revoked.
    Good,
    /// Revoked at this time (Unix seconds).
    Revoked {
        /// When.
        at: u64,
    },
    /// The responder does not know the certificate.
    Unknown,
}

impl std::fmt::Display for CertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertStatus::Good => f.write_str("good"),
            CertStatus::Revoked { .. } => f.write_str("revoked"),
            CertStatus::Unknown => f.write_str("unknown"),
        }
    }
}

/// A checked response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The certificate's status.
    pub status: CertStatus,
    /// `thisUpdate`, Unix seconds.
    pub this_update: u64,
    /// `nextUpdate`, Unix seconds, if stated.
    pub next_update: Option<u64>,
}

impl Checked {
    /// When the response stops counting as current (Unix seconds).
    pub fn expires(&self) -> u64 {
        self.next_update
            .unwrap_or(self.this_update + MAX_AGE_WITHOUT_NEXT_UPDATE_SECS)
    }

    /// When a holder should fetch a new one: halfway to expiry, and at
    /// least a minute after `thisUpdate`.
    pub fn refresh_at(&self) -> u64 {
        let life = self.expires().saturating_sub(self.this_update);
        self.this_update + (life / 2).max(60)
    }
}

// OIDs (content bytes).
const OID_SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_OCSP_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];
const OID_AIA: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x01];
const OID_AD_OCSP: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01];
const OID_EKU: &[u8] = &[0x55, 0x1d, 0x25];
const OID_KP_OCSP_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x09];
const OID_TLS_FEATURE: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x18];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const OID_RSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const OID_RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const OID_RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// The parts of an X.509 certificate OCSP needs.
#[derive(Debug, Clone)]
pub struct Cert<'a> {
    tbs: &'a [u8],
    sig_alg: &'a [u8],
    signature: &'a [u8],
    serial: &'a [u8],
    issuer: &'a [u8],
    subject: &'a [u8],
    key_alg: &'a [u8],
    key_curve: Option<&'a [u8]>,
    key: &'a [u8],
    not_before: u64,
    not_after: u64,
    ocsp_urls: Vec<String>,
    ocsp_signing: bool,
    must_staple: bool,
}

fn alg_oid<'a>(t: Tlv<'a>, what: &'static str) -> Result<(&'a [u8], Option<Tlv<'a>>), OcspError> {
    let mut r = Reader::new(t.content);
    let oid = r.expect(der::OID, what)?.content;
    let params = if r.is_empty() {
        None
    } else {
        Some(r.any(what)?)
    };
    Ok((oid, params))
}

impl<'a> Cert<'a> {
    /// Parses a DER certificate.
    pub fn parse(der_bytes: &'a [u8]) -> Result<Self, OcspError> {
        const W: &str = "certificate";
        let mut outer = Reader::new(der_bytes);
        let mut c = outer.sequence(W)?;
        let tbs_tlv = c.expect(der::SEQUENCE, W)?;
        let (sig_alg, _) = alg_oid(c.expect(der::SEQUENCE, W)?, W)?;
        let signature = der::bit_string(c.any(W)?, W)?;
        let mut t = Reader::new(tbs_tlv.content);
        t.optional(der::ctx(0), W)?;
        let serial = t.expect(der::INTEGER, W)?.content;
        t.expect(der::SEQUENCE, W)?; // signature algorithm
        let issuer = t.expect(der::SEQUENCE, W)?.whole;
        let mut validity = t.sequence(W)?;
        let nb = validity.any(W)?;
        let not_before = der::time(nb, W)?;
        let na = validity.any(W)?;
        let not_after = der::time(na, W)?;
        let subject = t.expect(der::SEQUENCE, W)?.whole;
        let mut spki = t.sequence(W)?;
        let (key_alg, params) = alg_oid(spki.expect(der::SEQUENCE, W)?, W)?;
        let key_curve = params.filter(|p| p.tag == der::OID).map(|p| p.content);
        let key = der::bit_string(spki.any(W)?, W)?;
        let mut cert = Cert {
            tbs: tbs_tlv.whole,
            sig_alg,
            signature,
            serial,
            issuer,
            subject,
            key_alg,
            key_curve,
            key,
            not_before,
            not_after,
            ocsp_urls: Vec::new(),
            ocsp_signing: false,
            must_staple: false,
        };
        t.optional(der::ctx_prim(1), W)?;
        t.optional(der::ctx_prim(2), W)?;
        if let Some(exts) = t.optional(der::ctx(3), W)? {
            let mut list = Reader::new(exts.content).sequence(W)?;
            while !list.is_empty() {
                let mut ext = list.sequence(W)?;
                let oid = ext.expect(der::OID, W)?.content;
                ext.optional(der::BOOLEAN, W)?;
                let value = ext.expect(der::OCTET_STRING, W)?.content;
                cert.extension(oid, value)?;
            }
        }
        Ok(cert)
    }

    fn extension(&mut self, oid: &[u8], value: &'a [u8]) -> Result<(), OcspError> {
        const W: &str = "certificate extension";
        if oid == OID_AIA {
            let mut list = Reader::new(value).sequence(W)?;
            while !list.is_empty() {
                let mut ad = list.sequence(W)?;
                let method = ad.expect(der::OID, W)?.content;
                let loc = ad.any(W)?;
                // accessLocation [6] uniformResourceIdentifier
                if method == OID_AD_OCSP && loc.tag == der::ctx_prim(6) {
                    if let Ok(url) = std::str::from_utf8(loc.content) {
                        self.ocsp_urls.push(url.to_string());
                    }
                }
            }
        } else if oid == OID_EKU {
            let mut list = Reader::new(value).sequence(W)?;
            while !list.is_empty() {
                if list.expect(der::OID, W)?.content == OID_KP_OCSP_SIGNING {
                    self.ocsp_signing = true;
                }
            }
        } else if oid == OID_TLS_FEATURE {
            // TLSFeature ::= SEQUENCE OF INTEGER; status_request is 5.
            let mut list = Reader::new(value).sequence(W)?;
            while !list.is_empty() {
                if list.expect(der::INTEGER, W)?.content == [5] {
                    self.must_staple = true;
                }
            }
        }
        Ok(())
    }

    /// The OCSP responder URLs named in the certificate (AIA).
    pub fn ocsp_urls(&self) -> &[String] {
        &self.ocsp_urls
    }

    /// Whether the certificate asks for a staple (TLS feature
    /// `status_request`, "OCSP Must-Staple").
    pub fn must_staple(&self) -> bool {
        self.must_staple
    }

    /// Whether `issuer`'s subject is this certificate's issuer.
    pub fn issued_by_name(&self, issuer: &Cert<'_>) -> bool {
        self.issuer == issuer.subject
    }

    /// `notAfter`, Unix seconds.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// `notBefore`, Unix seconds.
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Checks `signed` was signed with this certificate's key using `alg`.
    fn verify(
        &self,
        alg: &[u8],
        signed: &[u8],
        sig: &[u8],
        what: &'static str,
    ) -> Result<(), OcspError> {
        let algo: &dyn signature::VerificationAlgorithm = match (alg, self.key_alg, self.key_curve)
        {
            (OID_ECDSA_SHA256, OID_EC_PUBLIC_KEY, Some(OID_P256)) => {
                &signature::ECDSA_P256_SHA256_ASN1
            }
            (OID_ECDSA_SHA256, OID_EC_PUBLIC_KEY, Some(OID_P384)) => {
                &signature::ECDSA_P384_SHA256_ASN1
            }
            (OID_ECDSA_SHA384, OID_EC_PUBLIC_KEY, Some(OID_P256)) => {
                &signature::ECDSA_P256_SHA384_ASN1
            }
            (OID_ECDSA_SHA384, OID_EC_PUBLIC_KEY, Some(OID_P384)) => {
                &signature::ECDSA_P384_SHA384_ASN1
            }
            (OID_RSA_SHA256, _, _) => &signature::RSA_PKCS1_2048_8192_SHA256,
            (OID_RSA_SHA384, _, _) => &signature::RSA_PKCS1_2048_8192_SHA384,
            (OID_RSA_SHA512, _, _) => &signature::RSA_PKCS1_2048_8192_SHA512,
            (OID_ED25519, OID_ED25519, _) => &signature::ED25519,
            _ => return Err(OcspError::UnsupportedAlgorithm(what)),
        };
        UnparsedPublicKey::new(algo, self.key)
            .verify(signed, sig)
            .map_err(|_| OcspError::BadSignature)
    }
}

/// The CertID of `cert` (issued by `issuer`) with the hash algorithm `alg`
/// (SHA-1 or SHA-256): issuer name hash, issuer key hash, serial.
fn cert_id(cert: &Cert<'_>, issuer: &Cert<'_>, alg: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let d = match alg {
        OID_SHA1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        OID_SHA256 => &digest::SHA256,
        _ => return None,
    };
    Some((
        digest::digest(d, cert.issuer).as_ref().to_vec(),
        digest::digest(d, issuer.key).as_ref().to_vec(),
    ))
}

/// The DER OCSP request for `cert`, issued by `issuer` (one CertID, SHA-1
/// as responders expect, no nonce so responses can be cached).
pub fn request(cert: &Cert<'_>, issuer: &Cert<'_>) -> Vec<u8> {
    let (name_hash, key_hash) = cert_id(cert, issuer, OID_SHA1).unwrap_or_default();
    let mut alg = Vec::new();
    der::write(der::OID, OID_SHA1, &mut alg);
    der::write(der::NULL, &[], &mut alg);
    let mut id = Vec::new();
    der::write(der::SEQUENCE, &alg, &mut id);
    der::write(der::OCTET_STRING, &name_hash, &mut id);
    der::write(der::OCTET_STRING, &key_hash, &mut id);
    der::write(der::INTEGER, cert.serial, &mut id);
    let mut cert_id = Vec::new();
    der::write(der::SEQUENCE, &id, &mut cert_id);
    let mut req = Vec::new();
    der::write(der::SEQUENCE, &cert_id, &mut req);
    let mut list = Vec::new();
    der::write(der::SEQUENCE, &req, &mut list);
    let mut tbs = Vec::new();
    der::write(der::SEQUENCE, &list, &mut tbs);
    let mut out = Vec::new();
    der::write(der::SEQUENCE, &tbs, &mut out);
    out
}

/// Checks an OCSP response for `cert` (issued by `issuer`) at `now` (Unix
/// seconds): a successful basic response, a single response for exactly
/// this certificate, signed by the issuer or by a certificate the issuer
/// signed for `id-kp-OCSPSigning`, current. Returns the status it states —
/// a revoked certificate is a successful check whose status is `Revoked`.
pub fn check(
    response: &[u8],
    cert: &Cert<'_>,
    issuer: &Cert<'_>,
    now: u64,
) -> Result<Checked, OcspError> {
    const W: &str = "OCSP response";
    if response.len() > MAX_RESPONSE_LEN {
        return Err(OcspError::TooLarge);
    }
    let mut outer = Reader::new(response);
    let mut resp = outer.sequence(W)?;
    let status = resp.expect(der::ENUMERATED, W)?.content;
    if status != [0] {
        return Err(OcspError::ResponderStatus(
            status.first().copied().unwrap_or(255),
        ));
    }
    let bytes = resp.expect(der::ctx(0), W)?;
    let mut rb = Reader::new(bytes.content).sequence(W)?;
    if rb.expect(der::OID, W)?.content != OID_OCSP_BASIC {
        return Err(OcspError::Malformed("OCSP response type (not basic)"));
    }
    let basic = rb.expect(der::OCTET_STRING, W)?.content;
    let mut b = Reader::new(basic).sequence(W)?;
    let tbs = b.expect(der::SEQUENCE, W)?;
    let (sig_alg, _) = alg_oid(b.expect(der::SEQUENCE, W)?, W)?;
    let signature = der::bit_string(b.any(W)?, W)?;
    let mut delegates = Vec::new();
    if let Some(certs) = b.optional(der::ctx(0), W)? {
        let mut list = Reader::new(certs.content).sequence(W)?;
        while !list.is_empty() {
            delegates.push(list.expect(der::SEQUENCE, W)?.whole);
        }
    }

    // Who signed it: the issuer, or a responder the issuer delegated to.
    let signed_by_issuer = match issuer.verify(sig_alg, tbs.whole, signature, "OCSP response") {
        Ok(()) => true,
        Err(OcspError::BadSignature) => false,
        Err(e) => return Err(e),
    };
    if !signed_by_issuer {
        let delegated = delegates.iter().any(|d| {
            let Ok(dc) = Cert::parse(d) else { return false };
            dc.ocsp_signing
                && dc.issued_by_name(issuer)
                && dc.not_before <= now
                && dc.not_after >= now
                && issuer
                    .verify(dc.sig_alg, dc.tbs, dc.signature, "responder certificate")
                    .is_ok()
                && dc
                    .verify(sig_alg, tbs.whole, signature, "OCSP response")
                    .is_ok()
        });
        if !delegated {
            return Err(OcspError::BadSignature);
        }
    }

    let mut data = Reader::new(tbs.content);
    data.optional(der::ctx(0), W)?;
    data.any(W)?; // responderID
    data.expect(der::GENERALIZED_TIME, W)?; // producedAt
    let mut responses = data.sequence(W)?;
    while !responses.is_empty() {
        let mut single = responses.sequence(W)?;
        let mut id = single.sequence(W)?;
        let (hash_alg, _) = alg_oid(id.expect(der::SEQUENCE, W)?, W)?;
        let name_hash = id.expect(der::OCTET_STRING, W)?.content;
        let key_hash = id.expect(der::OCTET_STRING, W)?.content;
        let serial = id.expect(der::INTEGER, W)?.content;
        let Some((want_name, want_key)) = cert_id(cert, issuer, hash_alg) else {
            continue;
        };
        if serial != cert.serial || name_hash != want_name || key_hash != want_key {
            continue;
        }
        let st = single.any(W)?;
        let status = match st.tag {
            t if t == der::ctx_prim(0) => CertStatus::Good,
            t if t == der::ctx(1) => {
                let at = Reader::new(st.content).expect(der::GENERALIZED_TIME, W)?;
                CertStatus::Revoked {
                    at: der::time(at, W)?,
                }
            }
            t if t == der::ctx_prim(2) => CertStatus::Unknown,
            _ => return Err(OcspError::Malformed("certificate status")),
        };
        let this_update = der::time(single.expect(der::GENERALIZED_TIME, W)?, W)?;
        let next_update = match single.optional(der::ctx(0), W)? {
            Some(n) => Some(der::time(
                Reader::new(n.content).expect(der::GENERALIZED_TIME, W)?,
                W,
            )?),
            None => None,
        };
        let checked = Checked {
            status,
            this_update,
            next_update,
        };
        if this_update > now + CLOCK_SKEW_SECS {
            return Err(OcspError::NotYetValid(this_update));
        }
        if checked.expires() < now {
            return Err(OcspError::Expired(checked.expires()));
        }
        return Ok(checked);
    }
    Err(OcspError::NotForThisCertificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x03\x0a\x01\x00",
            b"\x30\x80",
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(Cert::parse(bad).is_err());
        }
    }

    #[test]
    fn responder_errors_are_named() {
        // OCSPResponse { responseStatus tryLater }
        let resp = [0x30, 0x03, 0x0a, 0x01, 0x03];
        let e = OcspError::ResponderStatus(3);
        assert!(e.to_string().contains("tryLater"));
        // A response is checked before any certificate is needed.
        let _ = resp;
    }

    #[test]
    fn a_certificate_validity_is_read_both_ends() {
        let mut p = rcgen::CertificateParams::new(vec!["responder.test".into()]).expect("params");
        p.not_before = rcgen::date_time_ymd(2030, 1, 2);
        p.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("cert");
        let c = Cert::parse(cert.der()).expect("parses");
        // 2030-01-02 and 2031-01-02, 00:00 UTC.
        assert_eq!(c.not_before(), 1_893_542_400);
        assert_eq!(c.not_after(), 1_925_078_400);
    }

    #[test]
    fn refresh_halfway_to_expiry() {
        let c = Checked {
            status: CertStatus::Good,
            this_update: 1000,
            next_update: Some(1000 + 7200),
        };
        assert_eq!(c.refresh_at(), 1000 + 3600);
        let no_next = Checked {
            next_update: None,
            ..c
        };
        assert_eq!(no_next.expires(), 1000 + MAX_AGE_WITHOUT_NEXT_UPDATE_SECS);
    }
}
