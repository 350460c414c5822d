//! Mesh-key authentication of relay-to-relay links.
//!
//! Mesh links use ALPN `swb-mesh/1` on the relay's normal QUIC port. Both
//! relays prove they hold the shared mesh key with an HMAC-SHA256, under
//! that key, of keying material exported from *this* TLS session (RFC 5705
//! exporter) and a role label. The proof never reveals the key and is
//! worthless on any other connection, so a man in the middle — who would
//! have two different TLS sessions — cannot pass it on. This is what
//! authenticates a mesh link, which is why the dialing side accepts any
//! server certificate here; the certificate a relay presents is then pinned
//! in the relay map daemons receive. An API key cannot open a mesh link (it
//! is not the mesh key), and the mesh key is not an API key (`swbk_…`), so
//! neither credential works at the other door.

use super::membership::{MESH_IDLE, MESH_KEEPALIVE};
use ring::hmac;
use std::sync::Arc;
use swb_wire::MESH_ALPN;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-swb-mesh-1";
/// Streams one mesh link may have open at once: every forwarded stream and
/// call between two relays rides it.
pub(crate) const MESH_STREAMS: u32 = 4096;

/// The role label of the dialing side's proof.
pub(crate) const CLIENT: &[u8] = b"client";
/// The role label of the answering side's proof.
pub(crate) const SERVER: &[u8] = b"server";

/// The shared secret of a mesh. `Debug` never shows it.
#[derive(Clone)]
pub struct MeshKey(Arc<Vec<u8>>);

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

/// Errors of mesh configuration.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The key is too short.
    #[error("the mesh key must have at least 32 characters (e.g. `head -c 32 /dev/urandom | base64 > mesh.key`)")]
    ShortKey,
    /// The key file could not be read.
    #[error("mesh key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS client configuration for dialing other relays failed.
    #[error("mesh TLS configuration: {0}")]
    Tls(String),
}

impl MeshKey {
    /// A key from secret text (surrounding whitespace removed).
    pub fn new(secret: &str) -> Result<Self, MeshError> {
        let s = secret.trim();
        if s.len() < 32 {
            return Err(MeshError::ShortKey);
        }
        Ok(Self(Arc::new(s.as_bytes().to_vec())))
    }

    /// Reads a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text)
    }

    pub(crate) fn proof(&self, ekm: &[u8], role: &[u8]) -> Vec<u8> {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(role);
        ctx.update(ekm);
        ctx.sign().as_ref().to_vec()
    }

    pub(crate) fn verify(&self, ekm: &[u8], role: &[u8], proof: &[u8]) -> bool {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut msg = role.to_vec();
        msg.extend_from_slice(ekm);
        hmac::verify(&k, &msg, proof).is_ok()
    }
}

/// Keying material of this TLS session, the same on both ends.
pub(crate) fn ekm(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

/// Client TLS for mesh dials: any server certificate is accepted because
/// the link is authenticated by the channel-bound mesh-key proof (see the
/// module docs), and the certificate is then checked against the record.
#[derive(Debug)]
struct ProvenByMeshKey(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ProvenByMeshKey {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // The handshake signature is still checked: the peer holds the key
        // of the certificate it presented.
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC client configuration for dialing other relays.
pub(crate) fn client_config() -> Result<quinn::ClientConfig, MeshError> {
    let provider = Arc::new(swb_quic::tls_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MeshError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProvenByMeshKey(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| MeshError::Tls(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(q));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(MESH_KEEPALIVE));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(MESH_IDLE).ok());
    t.max_concurrent_bidi_streams(MESH_STREAMS.into());
    t.receive_window(swb_quic::MESH_RECEIVE_WINDOW.into());
    // Packets as large as the link toward the other relay takes.
    t.path_mtu_upper_bound(Some(swb_quic::carrier::path_mtu_hook()));
    c.transport_config(Arc::new(t));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_and_session() {
        let k = MeshKey::new(&"k".repeat(32)).expect("key");
        let other = MeshKey::new(&"x".repeat(32)).expect("key");
        let p = k.proof(b"session-1", CLIENT);
        assert!(k.verify(b"session-1", CLIENT, &p));
        assert!(!k.verify(b"session-2", CLIENT, &p), "another session");
        assert!(!k.verify(b"session-1", SERVER, &p), "the other role");
        assert!(!other.verify(b"session-1", CLIENT, &p), "another key");
        assert!(MeshKey::new("short").is_err());
        assert_eq!(format!("{k:?}"), "MeshKey(<redacted>)");
    }
}
