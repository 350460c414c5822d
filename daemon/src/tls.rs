//! How the daemon trusts its relay: a pinned certificate fingerprint (dev
//! relays), a CA file, or the system's roots. There is no way to skip
//! verification.

use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How to verify the relay's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Accept exactly the certificate whose SHA-256 is this (`sha256:<hex>`).
    Fingerprint(String),
    /// Verify the chain against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Verify the chain against the operating system's roots.
    System,
}

/// What the daemon asks of the relay's stapled OCSP response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OcspPolicy {
    /// Ignore staples.
    Off,
    /// Check a staple when there is one: a certificate its issuer's
    /// responder says is revoked is refused. A certificate marked
    /// Must-Staple needs a current good staple.
    #[default]
    Check,
    /// A current good staple, signed by the certificate's issuer or a
    /// responder it delegated to, is required.
    Require,
}

impl std::str::FromStr for OcspPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "check" => Ok(Self::Check),
            "require" => Ok(Self::Require),
            _ => Err(format!("--ocsp {s:?}: expected off, check or require")),
        }
    }
}

/// Wraps a verifier with the checks of the stapled OCSP response (rustls's
/// own verifiers ignore it).
#[derive(Debug)]
struct Stapled {
    inner: Arc<dyn ServerCertVerifier>,
    policy: OcspPolicy,
    /// Certificates that may have issued the relay's (the CA file), for a
    /// chain that does not carry its issuer.
    issuers: Vec<CertificateDer<'static>>,
    note: VerifyNote,
}

impl Stapled {
    fn refuse(&self, why: String, e: rustls::CertificateError) -> rustls::Error {
        self.note.set(why);
        rustls::Error::InvalidCertificate(e)
    }

    fn check_staple(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        staple: &[u8],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        use rustls::CertificateError as E;
        let other = E::ApplicationVerificationFailure;
        let Ok(leaf) = swb_ocsp::Cert::parse(end_entity) else {
            return Ok(()); // webpki already judged the certificate itself
        };
        let required = self.policy == OcspPolicy::Require || leaf.must_staple();
        let why = if self.policy == OcspPolicy::Require {
            "--ocsp require"
        } else {
            "the certificate is marked OCSP Must-Staple"
        };
        if staple.is_empty() {
            if required {
                return Err(self.refuse(
                    format!("the relay stapled no OCSP response to its certificate, and {why}"),
                    other,
                ));
            }
            return Ok(());
        }
        let issuer = intermediates
            .iter()
            .map(|c| c.as_ref())
            .chain(self.issuers.iter().map(|c| c.as_ref()))
            .filter_map(|d| swb_ocsp::Cert::parse(d).ok())
            .find(|c| leaf.issued_by_name(c));
        let Some(issuer) = issuer else {
            if required {
                return Err(self.refuse(
                    format!("cannot check the relay's OCSP staple: its issuer's certificate is neither in the chain nor in the CA file, and {why}"),
                    other,
                ));
            }
            return Ok(());
        };
        match swb_ocsp::check(staple, &leaf, &issuer, now.as_secs()) {
            Ok(c) => match c.status {
                swb_ocsp::CertStatus::Good => Ok(()),
                swb_ocsp::CertStatus::Revoked { at } => Err(self.refuse(
                    format!("the relay's certificate is revoked (its issuer's OCSP responder says so, revoked at Unix time {at})"),
                    E::Revoked,
                )),
                swb_ocsp::CertStatus::Unknown if required => Err(self.refuse(
                    format!("the OCSP responder does not know the relay's certificate (status unknown), and {why}"),
                    other,
                )),
                swb_ocsp::CertStatus::Unknown => Ok(()),
            },
            Err(e) if required => Err(self.refuse(
                format!("the relay's OCSP staple is not usable ({e}), and {why}"),
                other,
            )),
            Err(_) => Ok(()),
        }
    }
}

impl ServerCertVerifier for Stapled {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.policy != OcspPolicy::Off {
            self.check_staple(end_entity, intermediates, ocsp_response, now)?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        false
    }
}

/// Errors building the TLS client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The fingerprint is not `sha256:` plus 64 hex digits.
    #[error("relay fingerprint {0:?} is not valid: expected sha256: followed by 64 hex digits (as `swbd relay --dev` prints)")]
    BadFingerprint(String),
    /// The CA file could not be read or holds no certificate.
    #[error("CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No system roots could be loaded.
    #[error("no system root certificates found ({0}); pass --ca FILE or --relay-fingerprint")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Parses `sha256:<64 hex>` (case-insensitive; `:` separators inside the hex allowed).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TrustError> {
    let bad = || TrustError::BadFingerprint(s.to_string());
    let lower = s.trim().to_ascii_lowercase();
    let hex: String = lower
        .strip_prefix("sha256:")
        .ok_or_else(bad)?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn fmt_fp(d: &[u8]) -> String {
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Remembers why the last verification failed, so the daemon can say it in
/// words instead of as a TLS alert number.
#[derive(Debug, Default, Clone)]
pub(crate) struct VerifyNote(Arc<Mutex<Option<String>>>);

impl VerifyNote {
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut n| n.take())
    }
    fn set(&self, s: String) {
        if let Ok(mut n) = self.0.lock() {
            *n = Some(s);
        }
    }
}

#[derive(Debug)]
struct Pinned {
    want: [u8; 32],
    provider: Arc<CryptoProvider>,
    note: VerifyNote,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = digest::digest(&digest::SHA256, end_entity.as_ref());
        let diff = got
            .as_ref()
            .iter()
            .zip(self.want.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(diff) == 0 {
            Ok(ServerCertVerified::assertion())
        } else {
            self.note.set(format!(
                "the relay's certificate is {}, not the pinned {}; check --relay-fingerprint (the relay prints it, and writes <data-dir>/fingerprint)",
                fmt_fp(got.as_ref()),
                fmt_fp(&self.want)
            ));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Trust {
    /// A rustls client config (TLS 1.3) that verifies a relay this way and
    /// offers these ALPN protocols: for clients of the relay's other doors
    /// (HTTPS) that want the same trust rules as the daemon.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TrustError> {
        let mut cfg = client_config(self, OcspPolicy::Check, b"", VerifyNote::default())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }
}

fn roots_from(
    certs: Vec<CertificateDer<'static>>,
) -> (rustls::RootCertStore, Vec<CertificateDer<'static>>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certs.iter().cloned());
    (roots, certs)
}

/// rustls's chain verifier over `roots`.
fn webpki(
    roots: rustls::RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TrustError> {
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TrustError::Config(e.to_string()))?;
    Ok(v)
}

/// Builds the rustls client config (TLS 1.3, ring) for `trust`, `ocsp` and
/// `alpn`.
pub(crate) fn client_config(
    trust: &Trust,
    ocsp: OcspPolicy,
    alpn: &[u8],
    note: VerifyNote,
) -> Result<rustls::ClientConfig, TrustError> {
    let provider = Arc::new(swb_quic::tls_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Config(e.to_string()))?;
    let (inner, issuers): (Arc<dyn ServerCertVerifier>, _) = match trust {
        Trust::Fingerprint(fp) => {
            let want = parse_fingerprint(fp)?;
            let pinned = Arc::new(Pinned {
                want,
                provider: provider.clone(),
                note: note.clone(),
            });
            (pinned, Vec::new())
        }
        Trust::CaFile(path) => {
            let ca_err = |reason: String| TrustError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            let (roots, issuers) = roots_from(certs);
            if roots.is_empty() {
                return Err(ca_err("no usable CERTIFICATE block".into()));
            }
            (webpki(roots, &provider)?, issuers)
        }
        Trust::System => {
            let loaded = rustls_native_certs::load_native_certs();
            let (roots, issuers) = roots_from(loaded.certs);
            if roots.is_empty() {
                let why = loaded
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "empty store".into());
                return Err(TrustError::NoSystemRoots(why));
            }
            (webpki(roots, &provider)?, issuers)
        }
    };
    let verifier = Arc::new(Stapled {
        inner,
        policy: ocsp,
        issuers,
        note,
    });
    let mut cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_connection_offers_aes_128_gcm_first() {
        let trust = Trust::Fingerprint(format!("sha256:{}", "ab".repeat(32)));
        let cfg = client_config(&trust, OcspPolicy::Check, b"x", VerifyNote::default())
            .expect("client config");
        let suites: Vec<_> = cfg
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites.first(),
            Some(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    }

    #[test]
    fn fingerprint_parsing() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{hex}")).unwrap(),
            [0xab; 32]
        );
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{}", hex.to_uppercase())).unwrap(),
            [0xab; 32]
        );
        assert!(parse_fingerprint(&hex).is_err());
        assert!(parse_fingerprint("sha256:abcd").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
