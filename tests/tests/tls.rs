//! Relay authentication: CA-verified certificates (production mode) and
//! pinned fingerprints (dev mode). A relay that fails verification stops
//! the daemon with a message that says what to fix; nothing skips it.

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use swb_daemon::{DaemonError, Trust};
use swb_relay::Identity;
use swb_tests::{RelayOptions, TestDaemon, TestRelay};

struct Pki {
    ca_pem: PathBuf,
    identity: Identity,
}

/// A CA, and a relay certificate for `localhost` and `127.0.0.1` signed by
/// it, written as PEM files into `dir`.
fn pki(dir: &Path, tag: &str) -> Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("switchboard test CA {tag}"),
    );
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
        .signed_by(&leaf_key, &ca)?;
    let ca_pem = dir.join(format!("ca-{tag}.pem"));
    let cert = dir.join(format!("relay-{tag}.crt"));
    let key = dir.join(format!("relay-{tag}.key"));
    std::fs::write(&ca_pem, ca.pem())?;
    std::fs::write(&cert, leaf.pem() + &ca.pem())?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    Ok(Pki {
        ca_pem,
        identity: Identity::from_pem_files(&cert, &key)?,
    })
}

async fn relay_with(identity: Identity) -> Result<TestRelay> {
    TestRelay::spawn_with(RelayOptions {
        identity: Some(identity),
        ..RelayOptions::default()
    })
    .await
}

/// Starts a daemon with `trust` and returns how it ended (it must end).
async fn refused(
    relay: &TestRelay,
    key: &str,
    trust: Trust,
    server_name: Option<&str>,
) -> Result<String> {
    let mut cfg = relay.daemon_config(key, "peer", PathBuf::new());
    cfg.trust = trust;
    cfg.server_name = server_name.map(String::from);
    let d = TestDaemon::spawn(cfg).await?;
    match d.join().await? {
        Err(DaemonError::Untrusted(why)) => Ok(why),
        other => anyhow::bail!("expected an untrusted-relay stop, got {other:?}"),
    }
}

#[tokio::test]
async fn daemon_verifies_a_ca_signed_relay_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path(), "a")?;
    let relay = relay_with(pki.identity).await?;
    let key = relay.create_key("acme")?;
    // By IP address (the certificate names 127.0.0.1)...
    let mut cfg = relay.daemon_config(&key, "by-ip", PathBuf::new());
    cfg.trust = Trust::CaFile(pki.ca_pem.clone());
    let a = TestDaemon::spawn(cfg).await?;
    a.handle.connected().await.map_err(anyhow::Error::msg)?;
    // ...and by DNS name with --server-name.
    let mut cfg = relay.daemon_config(&key, "by-name", PathBuf::new());
    cfg.trust = Trust::CaFile(pki.ca_pem.clone());
    cfg.server_name = Some("localhost".into());
    let b = TestDaemon::spawn(cfg).await?;
    b.handle.connected().await.map_err(anyhow::Error::msg)?;
    a.send("by-name", b"verified").await?;
    assert_eq!(b.recv_n(1).await?[0].body(), b"verified");
    Ok(())
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_with_a_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = pki(dir.path(), "ours")?;
    let theirs = pki(dir.path(), "theirs")?;
    let relay = relay_with(theirs.identity).await?;
    let key = relay.create_key("acme")?;
    let why = refused(&relay, &key, Trust::CaFile(ours.ca_pem), None).await?;
    assert!(why.contains("certificate"), "{why}");
    Ok(())
}

#[tokio::test]
async fn certificate_for_another_name_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path(), "n")?;
    let relay = relay_with(pki.identity).await?;
    let key = relay.create_key("acme")?;
    let why = refused(
        &relay,
        &key,
        Trust::CaFile(pki.ca_pem),
        Some("relay.example.com"),
    )
    .await?;
    assert!(
        why.contains("relay.example.com") || why.contains("name"),
        "{why}"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_and_names_both() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let why = refused(&relay, &key, Trust::Fingerprint(wrong.clone()), None).await?;
    assert!(
        why.contains(&relay.fingerprint()),
        "should show the relay's fingerprint: {why}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_fingerprint_is_a_config_error_before_connecting() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let mut cfg = relay.daemon_config(&key, "peer", PathBuf::new());
    cfg.trust = Trust::Fingerprint("sha256:nothex".into());
    let err = TestDaemon::spawn(cfg)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("64 hex digits"), "{err}");
    Ok(())
}
