//! OCSP stapling: the relay fetches its certificate's status from the
//! issuer's responder, checks it, and staples it to every TLS handshake
//! (QUIC and HTTPS), refreshing it halfway to its `nextUpdate`.
//!
//! Modes (as NATS names them):
//! - `never`: no OCSP.
//! - `auto` (default): staple when the certificate names a responder (AIA)
//!   or `--ocsp-responder` is given and the chain holds its issuer; a
//!   responder that cannot be reached is logged and the relay serves
//!   without a staple.
//! - `always`: a responder and the issuer are required; a certificate the
//!   responder says is revoked is not served (start fails; at a refresh,
//!   handshakes are refused).
//! - `must`: as `always`, and the relay serves only with a current `good`
//!   staple: it does not start without one, and refuses handshakes once its
//!   staple expired without a fresh one.
//!
//! The last good response is kept in `<state-dir>/ocsp/<fingerprint>.der`,
//! so a restart staples at once even while the responder is down.

use crate::tls::Identity;
use prometheus::IntGauge;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_ocsp::{CertStatus, Checked};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How the relay staples OCSP responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OcspMode {
    /// Staple when a responder is known; otherwise serve without.
    #[default]
    Auto,
    /// Staple; never serve a revoked certificate.
    Always,
    /// Serve only with a current good staple.
    Must,
    /// No OCSP.
    Never,
}

impl std::str::FromStr for OcspMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "must" => Ok(Self::Must),
            "never" => Ok(Self::Never),
            _ => Err(format!(
                "OCSP mode {s:?}: expected auto, always, must or never"
            )),
        }
    }
}

impl std::fmt::Display for OcspMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Must => "must",
            Self::Never => "never",
        })
    }
}

/// OCSP stapling settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OcspConfig {
    /// The mode.
    pub mode: OcspMode,
    /// Responder URL (`http://…`) instead of the certificate's AIA.
    pub responder: Option<String>,
}

/// Why stapling cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StapleError {
    /// `always`/`must` without what stapling needs.
    #[error("--ocsp {mode}: {why}")]
    Unusable {
        /// The mode.
        mode: OcspMode,
        /// What is missing.
        why: String,
    },
    /// The responder says the certificate is revoked.
    #[error("--ocsp {0}: the OCSP responder says this certificate is revoked; the relay does not serve it")]
    Revoked(OcspMode),
    /// `must` and no good response could be had.
    #[error("--ocsp must: no current good OCSP response for the certificate: {0}")]
    NoGoodResponse(String),
}

/// Longest wait for the responder.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry after a failed fetch (doubling up to [`RETRY_MAX`]).
pub(crate) const RETRY_MIN: Duration = Duration::from_secs(30);
/// Longest wait between retries.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(600);
const MAX_HEADER: usize = 16 * 1024;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Staples the current response to every handshake: a rustls certificate
/// resolver whose answer the refresh task replaces. `None` (no certificate)
/// makes handshakes fail: a revoked certificate in `always`/`must`, or no
/// good staple in `must`.
#[derive(Debug)]
pub(crate) struct Stapler {
    mode: OcspMode,
    leaf: CertificateDer<'static>,
    issuer: CertificateDer<'static>,
    url: String,
    cache: Option<PathBuf>,
    plain: Arc<CertifiedKey>,
    serving: RwLock<Option<Arc<CertifiedKey>>>,
    held: RwLock<Option<(Vec<u8>, Checked)>>,
    /// 0 no staple, 1 good, 2 revoked, 3 unknown (metrics).
    pub(crate) gauge: IntGauge,
    /// Unix time the staple expires, 0 without one (metrics).
    pub(crate) expires_gauge: IntGauge,
}

impl ResolvesServerCert for Stapler {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.serving.read().ok().and_then(|s| s.clone())
    }
}

impl Stapler {
    /// Sets up stapling for `identity`, with the cached or a freshly fetched
    /// response. `Ok(None)`: no stapling (mode `never`, or `auto` without a
    /// responder or issuer).
    pub(crate) async fn start(
        identity: &Identity,
        config: &OcspConfig,
        state_dir: Option<&std::path::Path>,
    ) -> Result<Option<Arc<Self>>, crate::RelayError> {
        let mode = config.mode;
        if mode == OcspMode::Never {
            return Ok(None);
        }
        let unusable = |why: String| -> Result<Option<Arc<Self>>, crate::RelayError> {
            if mode == OcspMode::Auto {
                info!("OCSP stapling off: {why}");
                Ok(None)
            } else {
                Err(StapleError::Unusable { mode, why }.into())
            }
        };
        if mode == OcspMode::Auto && identity.chain.len() < 2 {
            // A self-signed (dev) certificate: nobody to ask.
            return Ok(None);
        }
        let Some(leaf) = identity.chain.first().cloned() else {
            return unusable("no certificate".into());
        };
        let Ok(leaf_cert) = swb_ocsp::Cert::parse(&leaf) else {
            return unusable("the certificate could not be parsed".into());
        };
        let issuer = identity.chain[1..]
            .iter()
            .find(|c| swb_ocsp::Cert::parse(c).is_ok_and(|ic| leaf_cert.issued_by_name(&ic)));
        let Some(issuer) = issuer.cloned() else {
            return unusable(
                "the certificate file holds no issuer certificate after the relay's (put the chain in it, leaf first)".into(),
            );
        };
        let url = match &config.responder {
            Some(u) => u.clone(),
            None => match leaf_cert
                .ocsp_urls()
                .iter()
                .find(|u| u.starts_with("http://"))
            {
                Some(u) => u.clone(),
                None => return unusable(
                    "the certificate names no http:// OCSP responder; pass --ocsp-responder URL"
                        .into(),
                ),
            },
        };
        if let Err(e) = parse_url(&url) {
            return Err(StapleError::Unusable { mode, why: e }.into());
        }
        let provider = rustls::crypto::ring::default_provider();
        let key = provider
            .key_provider
            .load_private_key(identity.key.clone_key())
            .map_err(|e| crate::tls::TlsError::Config(e.to_string()))?;
        let plain = Arc::new(CertifiedKey::new(identity.chain.clone(), key));
        let cache = state_dir.map(|d| {
            let fp = identity.fingerprint();
            let name = fp.trim_start_matches("sha256:");
            d.join("ocsp")
                .join(format!("{}.der", &name[..name.len().min(32)]))
        });
        let gauge = IntGauge::new(
            "swb_relay_ocsp_status",
            "The stapled OCSP status of the relay's certificate: 0 none, 1 good, 2 revoked, 3 unknown.",
        )
        .map_err(|e| crate::RelayError::Config(e.to_string()))?;
        let expires_gauge = IntGauge::new(
            "swb_relay_ocsp_staple_expires_timestamp_seconds",
            "When the stapled OCSP response expires (Unix time); 0 without one.",
        )
        .map_err(|e| crate::RelayError::Config(e.to_string()))?;
        let s = Arc::new(Self {
            mode,
            leaf,
            issuer,
            url,
            cache,
            serving: RwLock::new(match mode {
                OcspMode::Must => None,
                _ => Some(plain.clone()),
            }),
            plain,
            held: RwLock::new(None),
            gauge,
            expires_gauge,
        });
        // A cached response still current staples at once.
        if let Some(path) = &s.cache {
            if let Ok(der) = std::fs::read(path) {
                if let Ok(c) = s.check(&der) {
                    info!(status = %c.status, "OCSP response loaded from {}", path.display());
                    s.apply(Some((der, c)));
                }
            }
        }
        let fresh = s.held().is_some_and(|c| c.refresh_at() > unix_now());
        if !fresh {
            match s.fetch().await {
                Ok((der, c)) => {
                    s.save(&der);
                    s.apply(Some((der, c)));
                }
                Err(e) if mode == OcspMode::Must && s.held().is_none() => {
                    return Err(StapleError::NoGoodResponse(e).into());
                }
                Err(e) => {
                    warn!(url = %s.url, "OCSP response not fetched (serving without a new one; retrying): {e}")
                }
            }
        }
        match (mode, s.held().map(|c| c.status)) {
            (OcspMode::Always | OcspMode::Must, Some(CertStatus::Revoked { .. })) => {
                Err(StapleError::Revoked(mode).into())
            }
            (OcspMode::Must, st) if st != Some(CertStatus::Good) => {
                Err(StapleError::NoGoodResponse(format!(
                    "the responder's status is {}",
                    st.map_or("missing".into(), |s| s.to_string())
                ))
                .into())
            }
            _ => Ok(Some(s)),
        }
    }

    fn held(&self) -> Option<Checked> {
        self.held
            .read()
            .ok()
            .and_then(|h| h.as_ref().map(|(_, c)| c.clone()))
    }

    fn check(&self, der: &[u8]) -> Result<Checked, String> {
        let leaf = swb_ocsp::Cert::parse(&self.leaf).map_err(|e| e.to_string())?;
        let issuer = swb_ocsp::Cert::parse(&self.issuer).map_err(|e| e.to_string())?;
        swb_ocsp::check(der, &leaf, &issuer, unix_now()).map_err(|e| e.to_string())
    }

    /// Serves according to the mode and `held` (`None`: nothing current).
    fn apply(&self, held: Option<(Vec<u8>, Checked)>) {
        let status = held.as_ref().map(|(_, c)| c.status);
        let with_staple = |der: &[u8]| {
            let mut ck = (*self.plain).clone();
            ck.ocsp = Some(der.to_vec());
            Some(Arc::new(ck))
        };
        let serve = match (&held, status, self.mode) {
            (_, Some(CertStatus::Revoked { .. }), OcspMode::Always | OcspMode::Must) => {
                error!("the OCSP responder says the relay's certificate is revoked: refusing TLS handshakes until it is replaced");
                None
            }
            (Some((der, _)), Some(CertStatus::Good), _) => with_staple(der),
            (Some((der, _)), Some(CertStatus::Revoked { .. }), _) => {
                error!("the OCSP responder says the relay's certificate is revoked (stapled; --ocsp auto keeps serving it)");
                with_staple(der)
            }
            (_, _, OcspMode::Must) => {
                error!(?status, "no current good OCSP response: --ocsp must refuses TLS handshakes until one is fetched");
                None
            }
            _ => Some(self.plain.clone()),
        };
        self.gauge.set(match status {
            None => 0,
            Some(CertStatus::Good) => 1,
            Some(CertStatus::Revoked { .. }) => 2,
            Some(CertStatus::Unknown) => 3,
        });
        self.expires_gauge.set(
            held.as_ref()
                .filter(|(_, c)| c.status != CertStatus::Unknown)
                .map_or(0, |(_, c)| i64::try_from(c.expires()).unwrap_or(0)),
        );
        if let Ok(mut s) = self.serving.write() {
            *s = serve;
        }
        if let Ok(mut h) = self.held.write() {
            *h = held;
        }
    }

    fn save(&self, der: &[u8]) {
        let Some(path) = &self.cache else { return };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, der)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            warn!("cannot cache the OCSP response in {}: {e}", path.display());
        }
    }

    async fn fetch(&self) -> Result<(Vec<u8>, Checked), String> {
        let leaf = swb_ocsp::Cert::parse(&self.leaf).map_err(|e| e.to_string())?;
        let issuer = swb_ocsp::Cert::parse(&self.issuer).map_err(|e| e.to_string())?;
        let req = swb_ocsp::request(&leaf, &issuer);
        let der = tokio::time::timeout(FETCH_TIMEOUT, post(&self.url, &req))
            .await
            .map_err(|_| format!("{}: no answer within {FETCH_TIMEOUT:?}", self.url))??;
        let c = self.check(&der)?;
        Ok((der, c))
    }

    /// Keeps the staple current until `stop`: refreshes halfway to expiry,
    /// retries failures with backoff, drops a staple that expired.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut retry = RETRY_MIN;
        let mut failing = false;
        loop {
            let now = unix_now();
            // Failing means the last fetch, made at or past the staple's
            // refresh time, failed: retry with backoff (but not past its
            // expiry); else sleep until the refresh time.
            let wait = match self.held() {
                Some(c) if !failing => {
                    Duration::from_secs(c.refresh_at().saturating_sub(now).max(1))
                }
                Some(c) => retry.min(Duration::from_secs(c.expires().saturating_sub(now).max(1))),
                None => retry,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // A staple past its expiry is no longer served.
            if self.held().is_some_and(|c| c.expires() < unix_now()) {
                warn!("the stapled OCSP response expired without a fresh one");
                self.apply(None);
            }
            let fetched = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.fetch() => r,
            };
            match fetched {
                Ok((der, c)) => {
                    info!(status = %c.status, next_update = ?c.next_update, "OCSP response refreshed");
                    self.save(&der);
                    self.apply(Some((der, c)));
                    failing = false;
                    retry = RETRY_MIN;
                }
                Err(e) => {
                    warn!(url = %self.url, retry_in = ?retry, "OCSP refresh failed: {e}");
                    failing = true;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// `http://host[:port]/path` → (host, port, path).
fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("OCSP responder {url:?}: only http:// responders are supported (as RFC 6960 responders are)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => (authority, 80),
        },
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("OCSP responder {url:?}: no host"));
    }
    Ok((host.to_string(), port, path.to_string()))
}

/// POSTs an OCSP request (RFC 6960 appendix A.1) and returns the body.
async fn post(url: &str, req: &[u8]) -> Result<Vec<u8>, String> {
    let (host, port, path) = parse_url(url)?;
    let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/ocsp-request\r\nAccept: application/ocsp-response\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        req.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    s.write_all(req).await.map_err(|e| format!("{url}: {e}"))?;
    let limit = MAX_HEADER + swb_ocsp::MAX_RESPONSE_LEN;
    let mut buf = Vec::new();
    (&mut s)
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if buf.len() > limit {
        return Err(format!("{url}: answer larger than {limit} bytes"));
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "{url}: HTTP {}",
            head.lines().next().unwrap_or("").trim()
        ));
    }
    let mut body = buf[end + 4..].to_vec();
    if let Some(len) = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    }) {
        if body.len() < len {
            return Err(format!("{url}: answer cut short"));
        }
        body.truncate(len);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8888/ocsp").unwrap(),
            ("127.0.0.1".into(), 8888, "/ocsp".into())
        );
        assert_eq!(
            parse_url("http://ocsp.example").unwrap(),
            ("ocsp.example".into(), 80, "/".into())
        );
        assert_eq!(
            parse_url("http://[::1]:9/").unwrap(),
            ("::1".into(), 9, "/".into())
        );
        assert!(parse_url("https://ocsp.example").is_err());
        assert!(parse_url("http://:80/").is_err());
    }

    #[test]
    fn modes_parse_and_print() {
        for m in ["auto", "always", "must", "never"] {
            assert_eq!(m.parse::<OcspMode>().unwrap().to_string(), m);
        }
        assert!("sometimes".parse::<OcspMode>().is_err());
    }
}
