//! OCSP stapling, both sides, against a real responder: `openssl ocsp`
//! serving a private CA's index on a loopback port it picks itself. The
//! relay fetches, checks, caches and staples the response; the daemon
//! checks the staple (`--ocsp check|require`). Cases: good (signed by the
//! CA and by a delegated responder), revoked, unknown, missing, expired.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, SerialNumber,
};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};
use swb_daemon::{DaemonError, OcspPolicy, Trust};
use swb_relay::{Identity, OcspConfig, OcspMode};
use swb_tests::{line_with, need_program, RelayOptions, TestDaemon, TestRelay};
use tokio::io::AsyncBufReadExt;

const SERIAL: [u8; 2] = [0x10, 0x01];

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
}

/// authorityInfoAccess with one OCSP responder URL.
fn aia(url: &str) -> CustomExtension {
    let mut ad = vec![
        0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x86,
    ];
    der_len(url.len(), &mut ad);
    ad.extend_from_slice(url.as_bytes());
    let mut one = vec![0x30];
    der_len(ad.len(), &mut one);
    one.extend_from_slice(&ad);
    let mut all = vec![0x30];
    der_len(one.len(), &mut all);
    all.extend_from_slice(&one);
    CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], all)
}

/// The TLS feature extension `status_request` ("OCSP Must-Staple").
fn must_staple() -> CustomExtension {
    CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 5, 5, 7, 1, 24],
        vec![0x30, 0x03, 0x02, 0x01, 0x05],
    )
}

/// A private CA (and a delegated OCSP signer it certified) as PEM files in
/// `dir`; [`Ca::issue`] makes the relay's certificate.
struct Ca {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_pem: PathBuf,
    ca_key: PathBuf,
    delegate: (PathBuf, PathBuf),
}

/// The relay's certificate: chain file (leaf, CA) and key.
struct Leaf {
    chain: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Leaf {
    fn identity(&self) -> Result<Identity> {
        Ok(Identity::from_pem_files(&self.chain, &self.key)?)
    }
}

impl Ca {
    fn new(dir: &Path) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchboard OCSP test CA");
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params, key)?;
        let del_key = KeyPair::generate()?;
        let mut dp = CertificateParams::new(Vec::<String>::new())?;
        dp.distinguished_name
            .push(rcgen::DnType::CommonName, "switchboard OCSP responder");
        dp.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
        let del = dp.signed_by(&del_key, &ca)?;
        let w = |name: &str, text: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_pem: w("ca.pem", &ca.pem())?,
            ca_key: w("ca.key", &key_pem)?,
            delegate: (
                w("responder.pem", &del.pem())?,
                w("responder.key", &del_key.serialize_pem())?,
            ),
            ca,
        })
    }

    /// The relay's certificate (serial 0x1001) for localhost and 127.0.0.1.
    fn issue(&self, aia_url: Option<&str>, extra: Vec<CustomExtension>) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        p.serial_number = Some(SerialNumber::from_slice(&SERIAL));
        if let Some(u) = aia_url {
            p.custom_extensions.push(aia(u));
        }
        p.custom_extensions.extend(extra);
        let leaf = p.signed_by(&key, &self.ca)?;
        let chain = self.dir.join("chain.pem");
        let key_path = self.dir.join("leaf.key");
        std::fs::write(&chain, leaf.pem() + &self.ca.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Leaf {
            chain,
            key: key_path,
            der: leaf.der().to_vec(),
        })
    }

    /// openssl's CA database: the relay certificate valid or revoked, or
    /// absent (the responder then answers `unknown`).
    fn write_index(&self, status: Status) -> Result<PathBuf> {
        let line = match status {
            Status::Good => "V\t491231235959Z\t\t1001\tunknown\t/CN=relay\n",
            Status::Revoked => "R\t491231235959Z\t250101000000Z\t1001\tunknown\t/CN=relay\n",
            Status::Unknown => "V\t491231235959Z\t\t2002\tunknown\t/CN=other\n",
        };
        let p = self.dir.join("index.txt");
        std::fs::write(&p, line)?;
        Ok(p)
    }

    fn signer(&self, delegated: bool) -> (&Path, &Path) {
        if delegated {
            (&self.delegate.0, &self.delegate.1)
        } else {
            (&self.ca_pem, &self.ca_key)
        }
    }

    fn ca_der(&self) -> Vec<u8> {
        self.ca.der().to_vec()
    }
}

#[derive(Clone, Copy)]
enum Status {
    Good,
    Revoked,
    Unknown,
}

/// `openssl ocsp` as a responder on a port of its choosing.
struct Responder {
    _child: tokio::process::Child,
    url: String,
}

async fn responder(ca: &Ca, status: Status, delegated: bool) -> Result<Responder> {
    let openssl = need_program("openssl", "openssl")?;
    let index = ca.write_index(status)?;
    let (rsigner, rkey) = ca.signer(delegated);
    let mut child = tokio::process::Command::new(openssl)
        .args(["ocsp", "-port", "0", "-nmin", "60", "-ignore_err", "-index"])
        .arg(&index)
        .arg("-CA")
        .arg(&ca.ca_pem)
        .arg("-rsigner")
        .arg(rsigner)
        .arg("-rkey")
        .arg(rkey)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("responder stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    // "ACCEPT [::]:38747 PID=19998"
    let line = line_with(&mut lines, "ACCEPT").await?;
    let port = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    Ok(Responder {
        _child: child,
        url: format!("http://127.0.0.1:{port}/"),
    })
}

async fn relay(leaf: &Leaf, mode: OcspMode, responder: Option<&str>) -> Result<TestRelay> {
    TestRelay::spawn_with(RelayOptions {
        identity: Some(leaf.identity()?),
        ocsp: OcspConfig {
            mode,
            responder: responder.map(String::from),
        },
        ..RelayOptions::default()
    })
    .await
}

/// A daemon trusting the private CA with `policy`: Ok when it attached,
/// Err(reason) when it stopped on the relay's certificate.
async fn attach(relay: &TestRelay, ca: &Ca, policy: OcspPolicy) -> Result<Result<(), String>> {
    let key = relay.create_key("acme")?;
    let mut cfg = relay.daemon_config(&key, "peer", PathBuf::new());
    cfg.trust = Trust::CaFile(ca.ca_pem.clone());
    cfg.ocsp = policy;
    let d = TestDaemon::spawn(cfg).await?;
    if d.handle.connected().await.is_ok() {
        return Ok(Ok(()));
    }
    match d.join().await? {
        Err(DaemonError::Untrusted(why)) => Ok(Err(why)),
        other => bail!("expected an untrusted-relay stop, got {other:?}"),
    }
}

#[tokio::test]
async fn good_staple_from_the_certificates_responder_is_required_and_cached() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let r = responder(&ca, Status::Good, false).await?;
    let leaf = ca.issue(Some(&r.url), vec![])?;
    let mut relay = relay(&leaf, OcspMode::Must, None).await?;
    assert_eq!(attach(&relay, &ca, OcspPolicy::Require).await?, Ok(()));
    // Cached: with the responder gone, a restart in `must` staples at once.
    let cached = std::fs::read_dir(relay.dir().join("state/ocsp"))?.count();
    assert_eq!(cached, 1, "one cached response");
    drop(r);
    relay.restart().await?;
    assert_eq!(attach(&relay, &ca, OcspPolicy::Require).await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn response_signed_by_a_delegated_responder_is_accepted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let r = responder(&ca, Status::Good, true).await?;
    // No AIA in the certificate: the responder comes from --ocsp-responder.
    let leaf = ca.issue(None, vec![])?;
    let relay = relay(&leaf, OcspMode::Always, Some(&r.url)).await?;
    assert_eq!(attach(&relay, &ca, OcspPolicy::Require).await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn revoked_certificate_is_not_served_and_not_trusted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let r = responder(&ca, Status::Revoked, false).await?;
    let leaf = ca.issue(Some(&r.url), vec![])?;
    for mode in [OcspMode::Always, OcspMode::Must] {
        let err = match relay(&leaf, mode, None).await {
            Ok(_) => bail!("--ocsp {mode} served a revoked certificate"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("revoked"), "{err}");
    }
    // `auto` serves it with the revoked staple; a checking daemon refuses.
    let relay = relay(&leaf, OcspMode::Auto, None).await?;
    let why = attach(&relay, &ca, OcspPolicy::Check)
        .await?
        .expect_err("a daemon attached to a revoked certificate");
    assert!(why.contains("revoked"), "{why}");
    // `--ocsp off` is the explicit way to not care.
    assert_eq!(attach(&relay, &ca, OcspPolicy::Off).await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn unknown_certificate_gets_no_staple() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let r = responder(&ca, Status::Unknown, false).await?;
    let leaf = ca.issue(Some(&r.url), vec![])?;
    let err = match relay(&leaf, OcspMode::Must, None).await {
        Ok(_) => bail!("--ocsp must served without a good staple"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("unknown"), "{err}");
    let relay = relay(&leaf, OcspMode::Always, None).await?;
    let why = attach(&relay, &ca, OcspPolicy::Require)
        .await?
        .expect_err("attached without a staple");
    assert!(why.contains("no OCSP response"), "{why}");
    assert_eq!(attach(&relay, &ca, OcspPolicy::Check).await?, Ok(()));
    Ok(())
}

#[tokio::test]
async fn missing_staple_fails_require_and_must_staple() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let leaf = ca.issue(None, vec![])?;
    let relay = relay(&leaf, OcspMode::Never, None).await?;
    let why = attach(&relay, &ca, OcspPolicy::Require)
        .await?
        .expect_err("attached without a staple");
    assert!(why.contains("--ocsp require"), "{why}");
    assert_eq!(attach(&relay, &ca, OcspPolicy::Check).await?, Ok(()));
    // A certificate marked Must-Staple needs one even under `check`.
    let ms = ca.issue(None, vec![must_staple()])?;
    let relay = self::relay(&ms, OcspMode::Never, None).await?;
    let why = attach(&relay, &ca, OcspPolicy::Check)
        .await?
        .expect_err("attached to a Must-Staple certificate without a staple");
    assert!(why.contains("Must-Staple"), "{why}");
    // `always` without a responder to ask cannot start.
    let err = match self::relay(&leaf, OcspMode::Always, None).await {
        Ok(_) => bail!("--ocsp always started without a responder"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--ocsp-responder"), "{err}");
    Ok(())
}

/// The checks themselves, on responses `openssl ocsp` made offline from our
/// request: current, expired, not yet valid, tampered, for another
/// certificate.
#[tokio::test]
async fn responses_are_checked_for_time_signature_and_certificate() -> Result<()> {
    let openssl = need_program("openssl", "openssl")?;
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let leaf = ca.issue(None, vec![])?;
    let index = ca.write_index(Status::Good)?;
    let ca_der = ca.ca_der();
    let leaf_c = swb_ocsp::Cert::parse(&leaf.der)?;
    let ca_c = swb_ocsp::Cert::parse(&ca_der)?;
    let req = dir.path().join("req.der");
    std::fs::write(&req, swb_ocsp::request(&leaf_c, &ca_c))?;
    let resp = dir.path().join("resp.der");
    let st = std::process::Command::new(&openssl)
        .args(["ocsp", "-nmin", "1", "-index"])
        .arg(&index)
        .arg("-CA")
        .arg(&ca.ca_pem)
        .arg("-rsigner")
        .arg(&ca.ca_pem)
        .arg("-rkey")
        .arg(&ca.ca_key)
        .arg("-reqin")
        .arg(&req)
        .arg("-respout")
        .arg(&resp)
        .output()?;
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let der = std::fs::read(&resp)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let c = swb_ocsp::check(&der, &leaf_c, &ca_c, now)?;
    assert_eq!(c.status, swb_ocsp::CertStatus::Good);
    let next = c.next_update.context("openssl states nextUpdate")?;
    assert!(
        next > now && next <= now + 61,
        "nextUpdate one minute ahead"
    );
    assert!(matches!(
        swb_ocsp::check(&der, &leaf_c, &ca_c, next + 1),
        Err(swb_ocsp::OcspError::Expired(_))
    ));
    assert!(matches!(
        swb_ocsp::check(&der, &leaf_c, &ca_c, now - 3600),
        Err(swb_ocsp::OcspError::NotYetValid(_))
    ));
    // Tampered: one digit of producedAt (the first GeneralizedTime) changed.
    let mut bad = der.clone();
    let at = bad
        .windows(2)
        .position(|w| w == [0x18, 0x0f])
        .context("producedAt")?;
    bad[at + 2 + 13] ^= 1;
    assert_eq!(
        swb_ocsp::check(&bad, &leaf_c, &ca_c, now),
        Err(swb_ocsp::OcspError::BadSignature)
    );
    // Checked against another CA: not signed by it.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir)?;
    let ca2_der = Ca::new(&other_dir)?.ca_der();
    let ca2_c = swb_ocsp::Cert::parse(&ca2_der)?;
    let e = swb_ocsp::check(&der, &leaf_c, &ca2_c, now).expect_err("checked against another CA");
    assert_eq!(e, swb_ocsp::OcspError::BadSignature);
    Ok(())
}
