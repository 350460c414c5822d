//! The relay's TLS identity: a development certificate created (and reused)
//! in the data directory, or PEM files of a real certificate chain.

use ring::digest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Errors while loading or creating the relay's certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// PEM content is not usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("could not generate a development certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// A certificate chain and its private key.
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// `sha256:<hex>` of a DER certificate: what `--relay-fingerprint` pins.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = digest::digest(&digest::SHA256, cert.as_ref());
    let mut s = String::from("sha256:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Identity {
    /// Fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> String {
        self.chain.first().map(fingerprint).unwrap_or_default()
    }

    /// Loads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |p: &Path, e: rustls::pki_types::pem::Error| match e {
            rustls::pki_types::pem::Error::Io(source) => TlsError::Io {
                path: p.display().to_string(),
                source,
            },
            other => TlsError::Pem {
                path: p.display().to_string(),
                reason: other.to_string(),
            },
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert.display().to_string(),
                reason: "no CERTIFICATE block found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        Ok(Self { chain, key })
    }

    /// Loads `relay.crt`/`relay.key` from `dir`, or creates a self-signed pair
    /// for `localhost`, `127.0.0.1`, `::1` and `extra_names` and stores it
    /// there (key mode 0600). Also writes `<dir>/fingerprint`.
    pub fn dev_in_dir(dir: &Path, extra_names: &[String]) -> Result<Self, TlsError> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| TlsError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cert_path = dir.join("relay.crt");
        let key_path = dir.join("relay.key");
        let id = if cert_path.exists() && key_path.exists() {
            Self::from_pem_files(&cert_path, &key_path)?
        } else {
            let mut names = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ];
            names.extend(extra_names.iter().cloned());
            let ck = rcgen::generate_simple_self_signed(names)
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io(&key_path))?;
                f.write_all(ck.signing_key.serialize_pem().as_bytes())
                    .map_err(io(&key_path))?;
            }
            std::fs::write(&cert_path, ck.cert.pem()).map_err(io(&cert_path))?;
            Self::from_pem_files(&cert_path, &key_path)?
        };
        let fp_path = dir.join("fingerprint");
        std::fs::write(&fp_path, format!("{}\n", id.fingerprint())).map_err(io(&fp_path))?;
        Ok(id)
    }

    /// A throwaway self-signed identity held only in memory (tests, demo).
    pub fn ephemeral() -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// A rustls server config (TLS 1.3 only, ring provider) with these ALPNs.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config_with(alpn, None)
    }

    /// As [`Identity::server_config`], the certificate (and its OCSP
    /// staple) coming from `resolver` when given.
    pub(crate) fn server_config_with(
        &self,
        alpn: &[&[u8]],
        resolver: Option<Arc<dyn rustls::server::ResolvesServerCert>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let builder =
            rustls::ServerConfig::builder_with_provider(Arc::new(swb_quic::tls_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_no_client_auth();
        let mut cfg = match resolver {
            Some(r) => builder.with_cert_resolver(r),
            None => builder
                .with_single_cert(self.chain.clone(), self.key.clone_key())
                .map_err(|e| TlsError::Config(e.to_string()))?,
        };
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        // The provider's order (AES-128-GCM first), whatever a client
        // prefers: a daemon older than that order gets it too.
        cfg.ignore_client_order = true;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client config of `provider`'s suites that trusts nothing: the
    /// suite is chosen from the ClientHello, before any certificate.
    fn client(provider: rustls::crypto::CryptoProvider) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }

    /// The suite `server` picks for `client`'s ClientHello.
    fn picked(client: rustls::ClientConfig, server: rustls::ServerConfig) -> rustls::CipherSuite {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let mut s = rustls::ServerConnection::new(Arc::new(server)).expect("server");
        let mut hello = Vec::new();
        c.write_tls(&mut hello).expect("ClientHello");
        s.read_tls(&mut hello.as_slice()).expect("read ClientHello");
        s.process_new_packets().expect("ClientHello accepted");
        s.negotiated_cipher_suite().expect("a suite").suite()
    }

    fn without_aes_128() -> rustls::crypto::CryptoProvider {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .retain(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        p
    }

    #[test]
    fn the_relay_picks_aes_128_gcm_even_for_a_client_preferring_aes_256() {
        let id = Identity::ephemeral().expect("identity");
        let default_order = rustls::crypto::ring::default_provider();
        assert_eq!(
            default_order.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "this test's client must prefer AES-256 to show the relay's choice"
        );
        let server = id.server_config(&[b"test"]).expect("server config");
        assert_eq!(
            picked(client(default_order), server),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A client without it still gets a suite it offers.
        let server = id.server_config(&[b"test"]).expect("server config");
        assert_eq!(
            picked(client(without_aes_128()), server),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }

    #[test]
    fn a_daemon_asks_for_aes_128_gcm_of_a_relay_that_follows_the_client() {
        let id = Identity::ephemeral().expect("identity");
        // A relay of rustls' default order, which follows the client's.
        let older = || {
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(id.chain.clone(), id.key.clone_key())
            .expect("server config")
        };
        assert_eq!(
            picked(client(rustls::crypto::ring::default_provider()), older()),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the older relay follows the client"
        );
        assert_eq!(
            picked(client(swb_quic::tls_provider()), older()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
