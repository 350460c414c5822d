//! What operators and users check a running network with: Prometheus
//! metrics of relays and daemons (scraped over HTTP and linted by
//! `promtool`), and `ping` through one relay and across a mesh.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use swb_tests::{
    mesh3, name_homed_on, promtool_check, sample, scrape, send_and_collect, HashServer, RawClient,
    RelayOptions, TestDaemon, TestRelay,
};

const PING_WAIT: Duration = Duration::from_secs(10);

fn value(text: &str, series: &str) -> Result<f64> {
    sample(text, series).with_context(|| format!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn relay_and_daemon_metrics_count_what_happened_and_pass_promtool() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        metrics: true,
        limits: swb_relay::MailboxLimits {
            messages: 3,
            ..swb_relay::MailboxLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let hs = HashServer::start().await?;
    let local = "127.0.0.1:0".parse()?;
    let a =
        TestDaemon::start_with(&relay, &key, "alpha", |c| c.metrics_listen = Some(local)).await?;
    let target = hs.addr.to_string();
    let b = TestDaemon::start_with(&relay, &key, "beta", |c| {
        c.metrics_listen = Some(local);
        c.expose = vec![swb_daemon::Exposure { port: 9000, target }];
    })
    .await?;

    // Traffic of every kind: messages, a refused send, a stream, HTTP, a
    // refused hello, a ping.
    for i in 0..3 {
        a.send("beta", format!("m{i}").as_bytes()).await?;
    }
    // A fourth waiting message does not fit beta's mailbox.
    assert!(a.send("beta", b"one too many").await.is_err());
    b.recv_n(3).await?;
    let s = a.open_stream("beta", 9000).await?;
    let (sent, back) = send_and_collect(s, 7, 1 << 20).await?;
    assert_eq!(sent, back);
    assert_eq!(relay.http(Some(&key))?.get("/v1/peers").await?.status, 200);
    let (_, refused) = RawClient::hello(&relay, "swbk_nope_nope", "gamma").await?;
    assert!(
        matches!(refused, swb_wire::Frame::Refused(_)),
        "{refused:?}"
    );
    a.handle.ping("beta", PING_WAIT).await?;
    relay.wait_stats("3 acks", |s| s.acked >= 3).await?;

    let r = scrape(relay.handle().metrics_addr().context("relay metrics")?).await?;
    promtool_check(&r).await?;
    assert_eq!(value(&r, "swb_relay_messages_accepted_total")?, 3.0);
    assert_eq!(value(&r, "swb_relay_messages_acknowledged_total")?, 3.0);
    assert!(value(&r, "swb_relay_messages_delivered_total")? >= 3.0);
    assert_eq!(
        value(
            &r,
            "swb_relay_messages_refused_total{code=\"mailbox_full\"}"
        )?,
        1.0
    );
    assert_eq!(value(&r, "swb_relay_delivery_seconds_count")?, 3.0);
    assert_eq!(value(&r, "swb_relay_sessions_attached")?, 2.0);
    assert_eq!(
        value(
            &r,
            "swb_relay_handshakes_total{reason=\"ok\",result=\"accepted\"}"
        )?,
        2.0
    );
    assert_eq!(
        value(
            &r,
            "swb_relay_handshakes_total{reason=\"unauthorized\",result=\"refused\"}"
        )?,
        1.0
    );
    assert_eq!(value(&r, "swb_relay_handshake_seconds_count")?, 2.0);
    assert!(value(&r, "swb_relay_stream_bytes_total")? >= f64::from(1u32 << 20));
    assert!(
        value(&r, "swb_relay_streams_opened_total")? >= 2.0,
        "stream and ping"
    );
    assert_eq!(
        value(
            &r,
            "swb_relay_http_requests_total{route=\"/v1/peers\",status=\"200\"}"
        )?,
        1.0
    );
    assert_eq!(value(&r, "swb_relay_mail_held_messages")?, 0.0);
    // Bounded labels: no peer names, namespaces or keys in any series.
    for secret in ["alpha", "beta", "gamma", "acme", key.as_str()] {
        ensure!(
            !r.contains(secret),
            "{secret:?} appears in the relay metrics"
        );
    }

    let am = scrape(a.handle.metrics_addr().context("daemon metrics")?).await?;
    promtool_check(&am).await?;
    assert_eq!(value(&am, "swb_daemon_connected")?, 1.0);
    assert_eq!(value(&am, "swb_daemon_connects_total")?, 1.0);
    assert_eq!(
        value(&am, "swb_daemon_messages_sent_total{result=\"accepted\"}")?,
        3.0
    );
    assert_eq!(
        value(&am, "swb_daemon_messages_sent_total{result=\"refused\"}")?,
        1.0
    );
    assert!(
        value(
            &am,
            "swb_daemon_streams_total{direction=\"out\",result=\"accepted\"}"
        )? >= 2.0
    );
    assert!(value(&am, "swb_daemon_rtt_seconds")? > 0.0);
    let bm = scrape(b.handle.metrics_addr().context("daemon metrics")?).await?;
    promtool_check(&bm).await?;
    assert_eq!(value(&bm, "swb_daemon_messages_received_total")?, 3.0);
    assert!(
        value(
            &bm,
            "swb_daemon_streams_total{direction=\"in\",result=\"accepted\"}"
        )? >= 1.0
    );
    for secret in ["alpha", "beta", "acme", key.as_str()] {
        ensure!(
            !am.contains(secret) && !bm.contains(secret),
            "{secret:?} in daemon metrics"
        );
    }
    Ok(())
}

#[tokio::test]
async fn ping_answers_through_one_relay_without_any_exposed_port() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let other = relay.create_key("other")?;
    let a = TestDaemon::start(&relay, &key, "alpha").await?;
    let _b = TestDaemon::start(&relay, &key, "beta").await?;
    let _c = TestDaemon::start(&relay, &other, "gamma").await?;

    // Several pings on one control connection share one ping stream.
    let before = relay.handle().stats().streams_opened;
    let mut c = a.client().await?;
    for _ in 0..3 {
        let p = c.ping("Beta.switchboard", PING_WAIT).await?;
        assert_eq!(p.to, "beta");
        assert_eq!(p.via, vec!["test-relay".to_string()]);
        assert!(p.rtt > Duration::ZERO && p.rtt < PING_WAIT);
    }
    assert_eq!(relay.handle().stats().streams_opened, before + 1);

    // The Rust API.
    let p = a.handle.ping("beta", PING_WAIT).await?;
    assert_eq!(p.via, vec!["test-relay".to_string()]);

    // Offline, and of another namespace: the same answer.
    let answer = |to: &'static str| {
        let c = a.client();
        async move {
            match c.await?.ping(to, PING_WAIT).await {
                Err(swb_daemon::ControlError::Remote { code, message }) => {
                    Ok::<_, anyhow::Error>((code, message.replace(to, "NAME")))
                }
                other => anyhow::bail!("ping {to}: expected a refusal, got {other:?}"),
            }
        }
    };
    let offline = answer("nobody").await?;
    assert_eq!(offline.0, "peer_offline");
    assert_eq!(answer("gamma").await?, offline);
    Ok(())
}

#[tokio::test]
async fn port_zero_cannot_be_exposed_it_is_the_ping_service() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let mut cfg = relay.daemon_config(&key, "alpha", std::path::PathBuf::new());
    cfg.expose = vec![swb_daemon::Exposure {
        port: swb_wire::PING_PORT,
        target: "127.0.0.1:22".into(),
    }];
    let e = TestDaemon::spawn(cfg)
        .await
        .err()
        .context("spawn should fail")?;
    ensure!(e.to_string().contains("ping"), "{e}");
    Ok(())
}

#[tokio::test]
async fn ping_across_the_mesh_names_both_relays() -> Result<()> {
    let (relays, api) = mesh3('p').await?;
    let ids = ["r1", "r2", "r3"];
    let a_name = name_homed_on(&ids, "acme", "r2");
    let b_name = name_homed_on(&ids, "acme", "r3");
    let a = TestDaemon::start(&relays[0], &api, &a_name).await?;
    let _b = TestDaemon::start(&relays[0], &api, &b_name).await?;
    let p = a.client().await?.ping(&b_name, PING_WAIT).await?;
    assert_eq!(p.via, vec!["r2".to_string(), "r3".to_string()]);
    Ok(())
}
