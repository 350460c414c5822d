//! The core relay path: registration, messages, refusals, reconnects.

use anyhow::Result;
use bytes::Bytes;
use std::time::Duration;
use swb_daemon::control::InMessage;
use swb_daemon::{ConnState, ControlError, DaemonError};
use swb_relay::keys::{self, KeysFile};
use swb_relay::MailboxLimits;
use swb_tests::{RawClient, RelayOptions, TestDaemon, TestRelay, UdpCut, WAIT};
use swb_wire::{Code, Frame, MessageId, MAX_MESSAGE_BODY};

fn code_of(r: Result<swb_daemon::control::Sent, ControlError>) -> String {
    match r {
        Err(ControlError::Remote { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn refused_code(r: Result<(), DaemonError>) -> Code {
    match r {
        Err(DaemonError::Refused(x)) => x.code,
        other => panic!("expected the relay to refuse, got {other:?}"),
    }
}

#[tokio::test]
async fn daemon_registers_and_reports_status() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "London").await?;
    let st = d.client().await?.status().await?;
    assert_eq!(st.state, "connected");
    assert_eq!(st.name, "london", "names are case-folded");
    assert_eq!(st.namespace.as_deref(), Some("acme"));
    assert_eq!(st.relay_id.as_deref(), Some("test-relay"));
    assert!(st.connected_since.is_some());
    assert!(st.rtt_ms.is_some());
    let peers = relay.handle().peers("acme");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].name, "london");
    assert_eq!(peers[0].via, swb_relay::Via::Quic);
    Ok(())
}

#[tokio::test]
async fn messages_flow_both_ways() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;

    let sent = laptop.send("london", b"deploy done").await?;
    assert!(sent.online);
    let got = london.recv(10).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, "laptop");
    assert_eq!(got[0].body(), b"deploy done");
    assert_eq!(got[0].id, sent.id);

    london.send("LAPTOP.switchboard", b"thanks").await?;
    let got = laptop.recv(10).await?;
    assert_eq!(
        (got[0].from.as_str(), got[0].body()),
        ("london", b"thanks".to_vec())
    );

    // Acknowledged mail is gone from the relay.
    let stats = relay
        .wait_stats("both acknowledged", |s| s.acked == 2)
        .await?;
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.held, 0);
    Ok(())
}

#[tokio::test]
async fn many_messages_arrive_in_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let mut c = a.client().await?;
    for i in 0..200 {
        c.send("b", format!("m{i}").as_bytes(), WAIT).await?;
    }
    let got = b.recv_n(200).await?;
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.body()).unwrap())
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
    Ok(())
}

#[tokio::test]
async fn offline_peer_gets_its_mail_when_it_attaches() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let sent = laptop.send("london", b"while you were away").await?;
    assert!(!sent.online, "london is not attached yet");
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let got = london.recv(10).await?;
    assert_eq!(got[0].body(), b"while you were away");
    assert_eq!(got[0].from, "laptop");
    Ok(())
}

#[tokio::test]
async fn bad_key_is_refused_and_the_daemon_stops() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let _real = relay.create_key("acme")?;
    let fake = swb_relay::keys::generate("acme", "")?.key;
    let d = TestDaemon::spawn(relay.daemon_config(&fake, "x", Default::default())).await?;
    assert_eq!(refused_code(d.join().await?), Code::UNAUTHORIZED);
    let d = TestDaemon::spawn(relay.daemon_config("not-a-key", "x", Default::default())).await?;
    assert_eq!(refused_code(d.join().await?), Code::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn revoked_key_is_refused_with_its_own_code() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    relay.revoke_key_in_file(&key)?;
    relay.handle().reload_keys()?;
    let d = TestDaemon::spawn(relay.daemon_config(&key, "x", Default::default())).await?;
    assert_eq!(refused_code(d.join().await?), Code::KEY_REVOKED);
    Ok(())
}

#[tokio::test]
async fn revoking_a_key_in_the_file_closes_its_live_sessions() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let doomed = relay.create_key("acme")?;
    let kept = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &doomed, "doomed").await?;
    let other = TestDaemon::start(&relay, &kept, "other").await?;
    // Only the file changes: the relay's poll must notice by itself.
    relay.revoke_key_in_file(&doomed)?;
    assert_eq!(refused_code(d.join().await?), Code::KEY_REVOKED);
    // Everyone else goes on.
    other.send("other", b"still here").await?;
    assert_eq!(other.recv(1).await?[0].body(), b"still here");
    Ok(())
}

#[tokio::test]
async fn a_keys_file_that_goes_missing_or_bad_revokes_nobody() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "a").await?;
    let path = relay.keys_path();
    let good = std::fs::read(&path)?;
    let file_ok = |want: u8| {
        let relay = &relay;
        async move {
            swb_tests::eventually("the relay's view of its keys file", WAIT, || async {
                let text = relay.handle().metrics_text();
                Ok(text
                    .contains(&format!("swb_relay_keys_file_ok {want}"))
                    .then_some(()))
            })
            .await
        }
    };
    // A deploy moves the file away for a while: the relay's poll notices
    // and keeps the keys it has; SIGHUP then is an error and changes nothing.
    let aside = path.with_extension("moved");
    std::fs::rename(&path, &aside)?;
    file_ok(0).await?;
    assert!(relay.handle().reload_keys().is_err());
    d.send("a", b"still here").await?;
    assert_eq!(d.recv(1).await?[0].body(), b"still here");
    let b = TestDaemon::start(&relay, &key, "b").await?;
    std::fs::rename(&aside, &path)?;
    file_ok(1).await?;
    // A file that is not valid: the same.
    std::fs::write(&path, "this is [not toml")?;
    file_ok(0).await?;
    b.send("a", b"and still").await?;
    assert_eq!(d.recv(1).await?[0].body(), b"and still");
    // A real revocation in a valid file still closes the sessions.
    std::fs::write(&path, &good)?;
    file_ok(1).await?;
    relay.revoke_key_in_file(&key)?;
    assert_eq!(refused_code(d.join().await?), Code::KEY_REVOKED);
    Ok(())
}

#[tokio::test]
async fn malformed_name_is_refused_by_daemon_and_relay() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    // The daemon checks before connecting...
    let e = TestDaemon::spawn(relay.daemon_config(&key, "bad name!", Default::default()))
        .await
        .err()
        .expect("daemon must refuse a bad name");
    assert!(e.to_string().contains("bad name!"), "{e}");
    // ...and the relay checks too, for clients that do not.
    let (_c, f) = RawClient::hello(&relay, &key, "bad name!").await?;
    match f {
        Frame::Refused(r) => assert_eq!(r.code, Code::BAD_NAME),
        other => panic!("expected Refused, got {other:?}"),
    }
    // Sending to a malformed name is refused too.
    let d = TestDaemon::start(&relay, &key, "ok").await?;
    assert_eq!(code_of(d.send("no_underscores", b"x").await), "bad_name");
    Ok(())
}

#[tokio::test]
async fn oversized_body_is_refused_by_daemon_and_relay() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "a").await?;
    let big = vec![b'x'; MAX_MESSAGE_BODY + 1];
    assert_eq!(code_of(d.send("a", &big).await), "body_too_large");
    // Exactly the limit is fine.
    d.send("a", &big[..MAX_MESSAGE_BODY]).await?;

    let (mut raw, f) = RawClient::hello(&relay, &key, "raw").await?;
    assert!(matches!(f, Frame::Welcome(_)));
    raw.write_frame(&Frame::Send(swb_wire::Send {
        req: 7,
        id: MessageId([1; 16]),
        to: "a".into(),
        body: Bytes::from(big),
    }))
    .await?;
    match raw.read_frame().await? {
        Frame::SendRefused(r) => {
            assert_eq!(r.req, 7);
            assert_eq!(r.refusal.code, Code::BODY_TOO_LARGE);
        }
        other => panic!("expected SendRefused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn sends_read_together_are_answered_together_each_once() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (mut raw, f) = RawClient::hello(&relay, &key, "raw").await?;
    assert!(matches!(f, Frame::Welcome(_)));
    // 40 sends in one write; the 20th names nobody a name can name.
    let bad = 20;
    let sends: Vec<Frame> = (1..=40u64)
        .map(|req| {
            Frame::Send(swb_wire::Send {
                req,
                id: MessageId([req as u8; 16]),
                to: if req == bad { "bad name!" } else { "away" }.into(),
                body: Bytes::from_static(b"hello"),
            })
        })
        .collect();
    raw.write_frames(&sends).await?;
    // Every answer once: runs of accepted sends merge into one frame (a
    // refusal needs no store and may overtake the acceptances before it).
    let (mut answers, mut frames) = (Vec::new(), 0);
    while answers.len() < sends.len() {
        match raw.read_frame().await? {
            Frame::SendsAccepted(b) => {
                frames += 1;
                answers.extend(b.accepted.iter().map(|a| (a.req, Ok(a.online))));
            }
            Frame::SendAccepted(a) => {
                frames += 1;
                answers.push((a.req, Ok(a.online)));
            }
            Frame::SendRefused(r) => answers.push((r.req, Err(r.refusal.code))),
            other => panic!("expected answers, got {other:?}"),
        }
    }
    answers.sort_by_key(|(req, _)| *req);
    let expected: Vec<_> = (1..=40u64)
        .map(|req| {
            (
                req,
                if req == bad {
                    Err(Code::BAD_NAME)
                } else {
                    Ok(false)
                },
            )
        })
        .collect();
    assert_eq!(answers, expected);
    assert!(
        frames < 39,
        "39 accepted sends written at once took {frames} answer frames"
    );
    // What was accepted is there, once each.
    let r = TestDaemon::start(&relay, &key, "away").await?;
    let got = r.recv_n(39).await?;
    assert_eq!(
        got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        (1..=40u8)
            .filter(|&i| u64::from(i) != bad)
            .map(|i| MessageId([i; 16]).to_string())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A relay whose mailboxes hold `n` messages.
async fn relay_with_mailboxes_of(n: usize) -> Result<TestRelay> {
    TestRelay::spawn_with(RelayOptions {
        limits: MailboxLimits {
            messages: n,
            ..MailboxLimits::default()
        },
        ..RelayOptions::default()
    })
    .await
}

/// Peer `offline` attaches and gets exactly the bodies "0", "1" and "2",
/// in order.
async fn offline_gets_0_1_2(relay: &TestRelay, key: &str) -> Result<Vec<InMessage>> {
    let r = TestDaemon::start(relay, key, "offline").await?;
    let got = r.recv_n(3).await?;
    assert_eq!(
        got.iter().map(|m| m.body()).collect::<Vec<_>>(),
        vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]
    );
    Ok(got)
}

#[tokio::test]
async fn full_mailbox_is_a_refusal_the_sender_sees() -> Result<()> {
    let relay = relay_with_mailboxes_of(3).await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "sender").await?;
    for i in 0..3 {
        d.send("offline", format!("{i}").as_bytes()).await?;
    }
    assert_eq!(
        code_of(d.send("offline", b"one too many").await),
        "mailbox_full"
    );
    // Nothing accepted was lost: the recipient gets exactly the three.
    offline_gets_0_1_2(&relay, &key).await?;
    // Room again.
    d.send("offline", b"fits now").await?;
    Ok(())
}

#[tokio::test]
async fn other_namespace_looks_exactly_like_a_name_nobody_holds() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let acme = relay.create_key("acme")?;
    let globex = relay.create_key("globex")?;
    let alice = TestDaemon::start(&relay, &acme, "alice").await?;
    let london_globex = TestDaemon::start(&relay, &globex, "london").await?;
    let peer_globex = TestDaemon::start(&relay, &globex, "peer").await?;

    let to_other_ns = alice.send("london", b"leak?").await?;
    let to_nobody = alice.send("nobody", b"hello?").await?;
    assert_eq!(to_other_ns.online, to_nobody.online);
    assert!(!to_other_ns.online);

    // london (globex) receives the marker from its own namespace first and
    // nothing else: a leaked message would sit before it in the mailbox.
    peer_globex.send("london", b"marker").await?;
    let mut c = london_globex.client().await?;
    let got = c.recv(WAIT, 100).await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].body(), b"marker");
    assert!(c.recv(Duration::ZERO, 100).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn daemon_reconnects_by_itself_after_a_relay_restart() -> Result<()> {
    let mut relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "london").await?;
    let first_since = match d.wait_state(|s| s.is_connected()).await? {
        ConnState::Connected { since, .. } => since,
        _ => unreachable!(),
    };
    relay.restart().await?;
    // It hears the goodbye, then reconnects to the new relay: a new
    // connection has a later `since`.
    d.wait_state(|s| matches!(s, ConnState::Connected { since, .. } if *since > first_since))
        .await?;
    assert_eq!(relay.handle().stats().attached, 1);
    d.send("london", b"after restart").await?;
    assert_eq!(d.recv(1).await?[0].body(), b"after restart");
    Ok(())
}

#[tokio::test]
async fn message_taken_but_not_acknowledged_comes_back() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    a.send("b", b"precious").await?;
    {
        // A `swbd recv` that dies before acknowledging.
        let mut c = b.client().await?;
        let got = c.recv(WAIT, 10).await?;
        assert_eq!(got[0].body(), b"precious");
    }
    let got = b.recv(10).await?;
    assert_eq!(got[0].body(), b"precious");
    Ok(())
}

#[tokio::test]
async fn unacknowledged_message_is_redelivered_after_the_daemon_reconnects() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let sent = a.send("b", b"survives a crash").await?;
    // b's daemon holds it (delivered) but nobody acknowledged it...
    let mut c = b.client().await?;
    let got = c.recv(WAIT, 10).await?;
    assert_eq!(got[0].id, sent.id);
    // ...then the daemon dies.
    b.handle.shutdown();
    b.join().await??;
    assert_eq!(relay.handle().stats().held, 1, "the relay still holds it");
    let b2 = TestDaemon::start(&relay, &key, "b").await?;
    let got = b2.recv(10).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].id, sent.id,
        "same id: the receiver can drop duplicates"
    );
    assert_eq!(got[0].body(), b"survives a crash");
    Ok(())
}

#[tokio::test]
async fn second_daemon_with_the_same_name_takes_over_and_the_first_stops() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let first = TestDaemon::start(&relay, &key, "london").await?;
    let second = TestDaemon::start(&relay, &key, "london").await?;
    let err = first.join().await?.expect_err("the first daemon must stop");
    assert_eq!(err.code(), Some(Code::REPLACED));
    assert!(err.to_string().contains("another daemon"), "{err}");
    // The second one works and is not disturbed.
    second.send("london", b"mine now").await?;
    assert_eq!(second.recv(1).await?[0].body(), b"mine now");
    assert!(second.handle.state().borrow().is_connected());
    Ok(())
}

#[tokio::test]
async fn the_same_daemon_attaching_again_moves_its_session_and_another_replaces_it() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let goodbye = |f: Frame| match f {
        Frame::Goodbye(r) => r.code,
        other => panic!("expected a goodbye, got {other:?}"),
    };
    let (mut first, f) = RawClient::hello_as(&relay, &key, "london", 7).await?;
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    // Instance 7 again, on a new connection: its old one ends as moved.
    let (mut second, f) = RawClient::hello_as(&relay, &key, "london", 7).await?;
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    assert_eq!(goodbye(first.read_frame().await?), Code::MOVED);
    // Another instance takes the name: the one it replaces stops.
    let (mut third, f) = RawClient::hello_as(&relay, &key, "london", 8).await?;
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    assert_eq!(goodbye(second.read_frame().await?), Code::REPLACED);
    // Mail reaches the session that holds the name now.
    let sender = TestDaemon::start(&relay, &key, "paris").await?;
    sender.send("london", b"to the third").await?;
    match third.read_frame().await? {
        Frame::Deliveries(d) => {
            let got: Vec<_> = d.into_delivers().collect();
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(
                (&got[0].from[..], &got[0].body[..]),
                ("paris", &b"to the third"[..])
            );
        }
        other => panic!("expected the message, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn garbage_on_a_connection_does_not_disturb_others() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "steady").await?;
    let mut bad = RawClient::open(&relay, b"GET / HTTP/1.1\r\n\r\n").await?;
    let _ = bad.read_preamble().await;
    // The relay says why and closes the bad connection.
    let closed = tokio::time::timeout(WAIT, bad.conn.closed()).await?;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    // A frame header announcing 4 GiB is refused before allocation.
    let mut huge = bytes::BytesMut::new();
    swb_wire::Preamble { version: 1 }.encode(&mut huge);
    huge.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff]);
    let bad2 = RawClient::open(&relay, &huge).await?;
    tokio::time::timeout(WAIT, bad2.conn.closed()).await?;
    d.send("steady", b"fine").await?;
    assert_eq!(d.recv(1).await?[0].body(), b"fine");
    Ok(())
}

#[tokio::test]
async fn unsupported_protocol_version_is_refused_with_a_reason() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let mut b = bytes::BytesMut::new();
    swb_wire::Preamble { version: 99 }.encode(&mut b);
    let mut c = RawClient::open(&relay, &b).await?;
    assert_eq!(c.read_preamble().await?.version, swb_wire::PROTOCOL_VERSION);
    match c.read_frame().await? {
        Frame::Refused(r) => assert_eq!(r.code, Code::UNSUPPORTED_VERSION),
        other => panic!("expected Refused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn key_created_while_the_relay_runs_works_at_once() -> Result<()> {
    // The periodic poll is an hour away and nobody calls reload: the relay
    // must look at the keys file itself when it sees an unknown key.
    let relay = TestRelay::spawn_with(RelayOptions {
        keys_poll: Duration::from_secs(3600),
        ..RelayOptions::default()
    })
    .await?;
    let path = relay.keys_path();
    let mut file = KeysFile::load(&path)?;
    let k = keys::generate("acme", "late")?;
    file.keys.push(k.entry);
    file.save(&path)?;
    let d = TestDaemon::start(&relay, &k.key, "late").await?;
    assert_eq!(
        d.client().await?.status().await?.namespace.as_deref(),
        Some("acme")
    );
    Ok(())
}

#[tokio::test]
async fn held_mail_survives_a_graceful_relay_restart() -> Result<()> {
    let mut relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    for i in 0..3 {
        let sent = laptop
            .send("london", format!("kept {i}").as_bytes())
            .await?;
        assert!(!sent.online);
    }
    relay.restart().await?;
    assert_eq!(
        relay.handle().stats().held,
        3,
        "restored from the state dir"
    );
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let got = london.recv_n(3).await?;
    let bodies: Vec<Vec<u8>> = got.iter().map(|m| m.body()).collect();
    assert_eq!(
        bodies,
        vec![b"kept 0".to_vec(), b"kept 1".to_vec(), b"kept 2".to_vec()]
    );
    Ok(())
}

/// Replies of one raw control connection to which `input` was written in
/// one go and then half-closed: one parsed JSON object per line.
async fn raw_control(d: &TestDaemon, input: &[u8]) -> Result<Vec<serde_json::Value>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(d.handle.control_path()).await?;
    let (mut r, mut w) = s.split();
    let mut out = Vec::new();
    let write = async {
        w.write_all(input).await?;
        w.shutdown().await
    };
    let (wr, rd) = tokio::join!(write, tokio::time::timeout(WAIT, r.read_to_end(&mut out)));
    wr?;
    rd??;
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| Ok(serde_json::from_slice(l)?))
        .collect()
}

fn send_line(to: &str, body: &[u8]) -> String {
    use base64::Engine;
    format!(
        "{{\"op\":\"send\",\"to\":\"{to}\",\"body_b64\":\"{}\",\"timeout_ms\":10000}}\n",
        base64::engine::general_purpose::STANDARD.encode(body)
    )
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_sends_arrive_in_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    // 1000 sends written before reading anything, with a status request, a
    // line that is not JSON and a send to a bad name among them; the
    // connection is half-closed right after: every request still gets its
    // answer, in request order.
    let mut input = String::new();
    for i in 0..1000 {
        input.push_str(&send_line("b", format!("m{i}").as_bytes()));
        match i {
            10 => input.push_str("{\"op\":\"status\"}\n"),
            20 => input.push_str("this is not json\n"),
            30 => input.push_str(&send_line("not a name!", b"x")),
            _ => {}
        }
    }
    let replies = raw_control(&a, input.as_bytes()).await?;
    assert_eq!(replies.len(), 1003, "one reply per request");
    let kinds: Vec<String> = replies
        .iter()
        .map(|r| match r["reply"].as_str() {
            Some("error") => format!("error:{}", r["code"].as_str().unwrap_or("")),
            Some(k) => k.to_string(),
            None => "?".into(),
        })
        .collect();
    assert_eq!(kinds[11], "status");
    assert_eq!(kinds[12 + 10], "error:bad_request");
    assert_eq!(kinds[12 + 10 + 11], "error:bad_name");
    assert_eq!(kinds.iter().filter(|k| *k == "sent").count(), 1000);
    let got = b.recv_n(1000).await?;
    let bodies: Vec<Vec<u8>> = got.iter().map(|m| m.body()).collect();
    let want: Vec<Vec<u8>> = (0..1000).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(bodies, want, "pipelined sends keep their order");
    // The ids the daemon answered are the ids that arrived, in order.
    let ids: Vec<&str> = replies
        .iter()
        .filter(|r| r["reply"] == "sent")
        .filter_map(|r| r["id"].as_str())
        .collect();
    let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, got_ids);
    Ok(())
}

#[tokio::test]
async fn answers_go_out_while_the_next_request_is_still_arriving() -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "a").await?;
    let s = tokio::net::UnixStream::connect(d.handle.control_path()).await?;
    let (r, mut w) = s.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    // A whole request (answered at once) and the start of the next in one
    // write; the client waits for the first answer before finishing the
    // second line. The answer must not wait for the rest of that line.
    let half = send_line("b", b"x");
    let (head, tail) = half.split_at(20);
    w.write_all(format!("not json\n{head}").as_bytes()).await?;
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the first answer waited for the next request"))??
        .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
    let v: serde_json::Value = serde_json::from_str(&first)?;
    assert_eq!(v["code"], "bad_request", "{first}");
    w.write_all(tail.as_bytes()).await?;
    let second = tokio::time::timeout(WAIT, lines.next_line())
        .await??
        .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
    let v: serde_json::Value = serde_json::from_str(&second)?;
    assert_eq!(v["reply"], "sent", "{second}");
    Ok(())
}

#[tokio::test]
async fn pipelined_refusals_keep_their_place() -> Result<()> {
    let relay = relay_with_mailboxes_of(3).await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "sender").await?;
    let (mut req, mut rep) = d.client().await?.pipeline();
    // Read together, so handed over in batches: a bad name among them and
    // a send with another timeout keep their places too.
    for i in 0..6 {
        match i {
            2 => req.send("not a name!", b"x", WAIT).await?,
            3 => req.send("offline", b"2", WAIT * 2).await?,
            _ => {
                req.send("offline", format!("{}", i.min(2)).as_bytes(), WAIT)
                    .await?
            }
        }
    }
    req.push(&swb_daemon::control::Request::Status).await?;
    req.flush().await?;
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(match rep.next().await {
            Ok(swb_daemon::control::Reply::Sent { .. }) => "sent".to_string(),
            Ok(swb_daemon::control::Reply::Status(_)) => "status".to_string(),
            Ok(other) => format!("{other:?}"),
            Err(ControlError::Remote { code, .. }) => code,
            Err(e) => return Err(e.into()),
        });
    }
    assert_eq!(
        seen,
        [
            "sent",
            "sent",
            "bad_name",
            "sent",
            "mailbox_full",
            "mailbox_full",
            "status"
        ]
    );
    // The three accepted, in order.
    offline_gets_0_1_2(&relay, &key).await?;
    Ok(())
}

/// A daemon `name` whose packets to and from `relay` pass through a cut.
async fn behind_cut(relay: &TestRelay, key: &str, name: &str) -> Result<(UdpCut, TestDaemon)> {
    let cut = UdpCut::start(relay.addr()).await?;
    let mut cfg = relay.daemon_config(key, name, std::path::PathBuf::new());
    cfg.relays = vec![cut.addr.to_string()];
    Ok((cut, TestDaemon::spawn(cfg).await?))
}

/// Sends read together are handed over together only when they share a
/// timeout: one whose timeout passes does not take a later one with it.
#[tokio::test]
async fn pipelined_sends_are_held_each_to_its_own_timeout() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (cut, d) = behind_cut(&relay, &key, "a").await?;
    d.wait_state(|s| s.is_connected()).await?;
    // The relay's answers are lost from now on.
    cut.cut_answers();
    let (mut req, mut rep) = d.client().await?.pipeline();
    req.send("b", b"short", Duration::from_millis(300)).await?;
    req.send("b", b"long", WAIT).await?;
    req.flush().await?;
    match rep.next().await {
        Err(ControlError::Remote { code, .. }) => assert_eq!(code, "timeout"),
        other => anyhow::bail!("expected the short send to time out, got {other:?}"),
    }
    // Answers get through again: the long send is answered in its time.
    cut.restore();
    match rep.next().await {
        Ok(swb_daemon::control::Reply::Sent { .. }) => {}
        other => anyhow::bail!("expected the long send accepted, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn rust_api_sends_receives_and_acknowledges_in_process() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let sent = a.handle.send("B", &b"hello from rust"[..], WAIT).await?;
    assert!(sent.online);
    let mut rx = b.handle.receiver();
    let got = rx.recv(10, WAIT).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, sent.id, "the id the sender was told");
    assert_eq!(got[0].from, "a");
    assert_eq!(&got[0].body[..], b"hello from rust");
    assert_eq!(rx.ack(&[got[0].id]).await?, 1);
    assert_eq!(rx.ack(&[got[0].id]).await?, 0, "acknowledged once");
    relay.wait_stats("acknowledged", |s| s.acked == 1).await?;
    // Refusals carry the control socket's codes.
    let e = a
        .handle
        .send("not a name!", &b"x"[..], WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.code, "bad_name");
    let big = vec![0u8; MAX_MESSAGE_BODY + 1];
    let e = a.handle.send("b", big, WAIT).await.unwrap_err();
    assert_eq!(e.code, "body_too_large");
    Ok(())
}

/// An acknowledgement counts the taken messages it names, in any order,
/// each once: the whole batch taken, in order (as most programs do), a
/// part out of order, names of messages not taken, and names again.
#[tokio::test]
async fn rust_api_acks_count_the_taken_messages_they_name_in_any_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let mut rx = b.handle.receiver();
    // `a` sends messages `range` to `b`; `b` takes them all (unacknowledged).
    let send_and_take = async |rx: &mut swb_daemon::Receiver, range: std::ops::Range<usize>| {
        let n = range.len();
        for i in range {
            a.handle.send("b", format!("m{i}"), WAIT).await?;
        }
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(rx.recv(10, WAIT).await?);
        }
        anyhow::Ok(got.iter().map(|m| m.id).collect::<Vec<MessageId>>())
    };
    let ids = send_and_take(&mut rx, 0..3).await?;
    assert_eq!(rx.ack(&ids).await?, 3, "the whole batch, in order");
    assert_eq!(rx.ack(&ids).await?, 0, "each once");
    relay.wait_stats("3 acknowledged", |s| s.acked == 3).await?;
    let ids = send_and_take(&mut rx, 3..7).await?;
    assert_eq!(rx.ack(&[ids[0]]).await?, 1, "a part, in order");
    assert_eq!(rx.ack(&[ids[3], ids[1]]).await?, 2, "a part, out of order");
    let stranger = MessageId([7; 16]);
    assert_eq!(
        rx.ack(&[ids[1], stranger]).await?,
        0,
        "acked already, and never taken"
    );
    // As many names as are leased, but not theirs.
    assert_eq!(rx.ack(&[stranger]).await?, 0);
    assert_eq!(rx.ack(&[ids[2]]).await?, 1, "the last one");
    relay.wait_stats("7 acknowledged", |s| s.acked == 7).await?;
    relay.wait_stats("none held", |s| s.held == 0).await?;
    Ok(())
}

/// The daemon encodes the sends its callers write into shared chunks of
/// memory: bodies of every size up to the limit, small and larger than a
/// chunk, pipelined to two names given in changing case, and a batch many
/// chunks long, each arrive whole and in the order sent.
#[tokio::test]
async fn rust_api_pipelined_sends_of_every_size_arrive_whole_and_in_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let c = TestDaemon::start(&relay, &key, "c").await?;
    let sizes = [
        1,
        100,
        16_000,
        MAX_MESSAGE_BODY,
        3,
        16_384,
        500,
        40_000,
        0,
        MAX_MESSAGE_BODY - 1,
        7,
    ];
    let body =
        |i: usize, n: usize| -> Vec<u8> { (0..n).map(|k| ((i * 31 + k) % 251) as u8).collect() };
    let tx = a.handle.sender();
    let mut pending = Vec::new();
    let (mut to_b, mut to_c) = (Vec::new(), Vec::new());
    for round in 0..4 {
        for (j, &n) in sizes.iter().enumerate() {
            let i = round * sizes.len() + j;
            let (to, want) = match i % 3 {
                0 => ("B", &mut to_b),
                1 => ("c.switchboard", &mut to_c),
                _ => ("b", &mut to_b),
            };
            want.push(body(i, n));
            pending.push(tx.submit(to, body(i, n), WAIT).await?);
        }
    }
    // A batch far larger than a chunk, and single sends after it.
    let big: Vec<Vec<u8>> = (0..8).map(|k| body(1000 + k, MAX_MESSAGE_BODY)).collect();
    to_c.extend(big.iter().cloned());
    let mut batch = tx
        .submit_batch(big.iter().map(|m| ("C", m.clone())), WAIT)
        .await?;
    for i in 2000..2003 {
        to_b.push(body(i, 200));
        pending.push(tx.submit("b", body(i, 200), WAIT).await?);
    }
    for r in batch.answer().await? {
        r?;
    }
    for mut p in pending {
        p.answer().await?;
    }
    for (d, want) in [(&b, to_b), (&c, to_c)] {
        let mut rx = d.handle.receiver();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let msgs = rx.recv(100, WAIT).await?;
            anyhow::ensure!(!msgs.is_empty(), "{} of {} arrived", got.len(), want.len());
            rx.ack(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
                .await?;
            got.extend(msgs.into_iter().map(|m| m.body.to_vec()));
        }
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "message {k}: {} bytes arrived, {} sent, or not the same bytes",
                g.len(),
                w.len()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn rust_api_sends_wait_for_a_connection_and_say_when_there_is_none() -> Result<()> {
    let mut relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    a.wait_state(|s| s.is_connected()).await?;
    a.handle.send("a", &b"connected"[..], WAIT).await?;
    // The relay goes: a send waits for a connection, then says there is
    // none (it is not queued behind a connection that is gone).
    relay.stop().await;
    a.wait_state(|s| !s.is_connected()).await?;
    let e = a
        .handle
        .send("a", &b"nobody"[..], Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.code, "not_connected", "{e:?}");
    // Back: sends go through again.
    relay.restart().await?;
    a.wait_state(|s| s.is_connected()).await?;
    a.handle.send("a", &b"again"[..], WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn rust_api_submitted_sends_keep_their_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    // As many as the recipient's mailbox holds (1000 by default).
    let mut pending = Vec::new();
    for i in 0..1000 {
        pending.push(a.handle.submit("b", format!("m{i}"), WAIT).await?);
    }
    let ids = answered(pending).await?;
    receive_in_order(&b, &ids).await
}

#[tokio::test]
async fn rust_api_batches_keep_their_order_among_single_sends() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let tx = a.handle.sender();
    // 1000 (the recipient's mailbox): batches of every size up to 64 and
    // single sends in between, one name spelled two ways.
    let (mut pending, mut i, mut size) = (Vec::new(), 0, 1);
    while i < 1000 {
        let n = size.min(1000 - i);
        let to = if size % 2 == 0 { "b" } else { "B.switchboard" };
        let msgs = (i..i + n).map(|k| (to, format!("m{k}")));
        pending.push(Pending::Batch(a.handle.submit_batch(msgs, WAIT).await?));
        i += n;
        if i < 1000 {
            pending.push(Pending::One(tx.submit("b", format!("m{i}"), WAIT).await?));
            i += 1;
        }
        size = size % 64 + 1;
    }
    let ids = answered_all(pending).await?;
    receive_in_order(&b, &ids).await
}

#[tokio::test]
async fn rust_api_batches_are_checked_whole_and_answered_per_message() -> Result<()> {
    let relay = relay_with_mailboxes_of(3).await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let tx = a.handle.sender();
    // A bad name or body anywhere: nothing of the batch is sent, and the
    // error says which message.
    let big = vec![0u8; MAX_MESSAGE_BODY + 1];
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("x", b"0".to_vec()),
        ("y", b"1".to_vec()),
        ("not a name!", b"2".to_vec()),
    ];
    let e = tx.send_batch(bad, WAIT).await.unwrap_err();
    assert_eq!(e.code, "bad_name", "{e:?}");
    assert!(e.message.starts_with("message 2 of the batch"), "{e:?}");
    let e = tx
        .send_batch([("x", b"0".to_vec()), ("x", big)], WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.code, "body_too_large", "{e:?}");
    assert!(e.message.starts_with("message 1 of the batch"), "{e:?}");
    let too_many = (0..=swb_daemon::MAX_SEND_BATCH).map(|_| ("x", &b"m"[..]));
    let e = tx.send_batch(too_many, WAIT).await.unwrap_err();
    assert_eq!(e.code, "batch_too_large", "{e:?}");
    assert!(tx
        .send_batch(Vec::<(&str, Vec<u8>)>::new(), WAIT)
        .await?
        .is_empty());
    // Nothing of those reached the relay; a probe send shows it is served.
    tx.send("a", &b"probe"[..], WAIT).await?;
    relay
        .wait_stats("only the probe held", |s| s.held == 1)
        .await?;
    // Five to a mailbox of three: each send answered for itself, in order.
    let answers = tx
        .send_batch((0..5).map(|i| ("offline", format!("{i}"))), WAIT)
        .await?;
    let codes: Vec<String> = answers
        .iter()
        .map(|r| match r {
            Ok(a) => {
                assert!(!a.online);
                "accepted".to_string()
            }
            Err(e) => e.code.clone(),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "accepted",
            "accepted",
            "accepted",
            "mailbox_full",
            "mailbox_full"
        ]
    );
    // Exactly the three accepted arrive, under the ids the batch gave.
    let got = offline_gets_0_1_2(&relay, &key).await?;
    let accepted: Vec<String> = answers[..3]
        .iter()
        .map(|r| r.clone().map(|a| a.id.to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        accepted
    );
    Ok(())
}

/// Each send's answer: accepted, under the id it was submitted with.
async fn answered(pending: Vec<swb_daemon::PendingSend>) -> Result<Vec<MessageId>> {
    answered_all(pending.into_iter().map(Pending::One).collect()).await
}

/// A send or a batch submitted through the Rust API.
enum Pending {
    One(swb_daemon::PendingSend),
    Batch(swb_daemon::PendingBatch),
}

/// [`answered`], for sends and batches in the order submitted.
async fn answered_all(pending: Vec<Pending>) -> Result<Vec<MessageId>> {
    let mut ids = Vec::new();
    for p in pending {
        match p {
            Pending::One(mut p) => {
                let id = p.id();
                assert_eq!(p.answer().await?.id, id, "each send accepted");
                ids.push(id);
            }
            Pending::Batch(mut b) => {
                let want = b.ids().to_vec();
                let got: Vec<MessageId> = (b.answer().await?.into_iter())
                    .map(|r| r.map(|a| a.id))
                    .collect::<Result<_, _>>()?;
                assert_eq!(got, want, "each send of the batch accepted, in order");
                ids.extend(want);
            }
        }
    }
    Ok(ids)
}

/// Receives and acknowledges "m0", "m1", … (as many as `ids`): each once,
/// in order, under the ids their sender was told.
async fn receive_in_order(b: &TestDaemon, ids: &[MessageId]) -> Result<()> {
    let n = ids.len();
    let mut rx = b.handle.receiver();
    let mut got = Vec::new();
    while got.len() < n {
        let batch = rx.recv(500, WAIT).await?;
        anyhow::ensure!(!batch.is_empty(), "only {} of {n} arrived", got.len());
        rx.ack(&batch.iter().map(|m| m.id).collect::<Vec<_>>())
            .await?;
        got.extend(batch);
    }
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "each once, in order");
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    Ok(())
}

/// Sends around a connection's death — answered before it, taken by the
/// relay with the answer lost, written by their callers on the dead
/// connection before the daemon noticed, submitted once the next one is up;
/// one by one and in batches — are each accepted once and arrive once, in
/// the order submitted.
#[tokio::test]
async fn sends_in_flight_when_the_connection_dies_arrive_once_and_in_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (cut, a) = behind_cut(&relay, &key, "a").await?;
    let first_since = match a.wait_state(|s| s.is_connected()).await? {
        ConnState::Connected { since, .. } => since,
        _ => unreachable!(),
    };
    // Ten at a time, one by one and as a batch in turn.
    let submit = |range: std::ops::Range<usize>| {
        let sender = a.handle.sender();
        async move {
            let mut pending = Vec::new();
            let all: Vec<usize> = range.collect();
            for (k, ten) in all.chunks(10).enumerate() {
                if k % 2 == 0 {
                    for i in ten {
                        let p = sender.submit("b", format!("m{i}"), WAIT).await?;
                        pending.push(Pending::One(p));
                    }
                } else {
                    let msgs = ten.iter().map(|i| ("b", format!("m{i}")));
                    pending.push(Pending::Batch(sender.submit_batch(msgs, WAIT).await?));
                }
            }
            anyhow::Ok(pending)
        }
    };
    let mut pending = submit(0..300).await?;
    relay.wait_stats("300 held", |s| s.held == 300).await?;
    // The relay's answers dropped: these reach it, their answers do not.
    cut.cut_answers();
    pending.extend(submit(300..450).await?);
    relay.wait_stats("450 held", |s| s.held == 450).await?;
    // Every packet dropped: the daemon serves the connection until the
    // QUIC idle timeout, and its callers write these on it.
    cut.cut();
    pending.extend(submit(450..600).await?);
    a.wait_state(|s| !s.is_connected()).await?;
    cut.restore();
    a.wait_state(|s| matches!(s, ConnState::Connected { since, .. } if *since > first_since))
        .await?;
    pending.extend(submit(600..1000).await?);
    let ids = answered_all(pending).await?;
    // The recipient comes afterwards: it gets what the relay holds.
    let b = TestDaemon::start(&relay, &key, "b").await?;
    receive_in_order(&b, &ids).await?;
    // No second copy of any is left behind.
    relay
        .wait_stats("all acknowledged", |s| s.held == 0)
        .await?;
    Ok(())
}

#[tokio::test]
async fn dropped_receiver_gives_unacknowledged_messages_back() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    for i in 0..3 {
        a.handle.send("b", format!("{i}"), WAIT).await?;
    }
    let mut first = b.handle.receiver();
    let mut taken = Vec::new();
    while taken.len() < 3 {
        taken.extend(first.recv(10, WAIT).await?);
    }
    first.ack(&[taken[0].id]).await?;
    drop(first);
    // The two it did not acknowledge go to the next reader, in order.
    let again = b.recv_n(2).await?;
    assert_eq!(
        again.iter().map(|m| m.body()).collect::<Vec<_>>(),
        vec![b"1".to_vec(), b"2".to_vec()]
    );
    Ok(())
}

#[tokio::test]
async fn relay_delivers_at_most_a_window_of_unacknowledged_messages() -> Result<()> {
    use swb_relay::DELIVERY_WINDOW;
    use swb_wire::{Ack, Ping};
    let relay = TestRelay::spawn_with(RelayOptions {
        limits: MailboxLimits {
            messages: 10_000,
            ..MailboxLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    // More mail than one window waits for `raw` before it attaches.
    let mut pending = Vec::new();
    for i in 0..DELIVERY_WINDOW + 100 {
        pending.push(a.handle.submit("raw", format!("{i}"), WAIT).await?);
    }
    for mut p in pending {
        p.answer().await?;
    }
    let (mut raw, first) = RawClient::hello(&relay, &key, "raw").await?;
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    let mut ids = Vec::new();
    while ids.len() < DELIVERY_WINDOW {
        match raw.read_frame().await? {
            Frame::Deliveries(d) => ids.extend(d.into_delivers().map(|d| d.id)),
            other => anyhow::bail!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(ids.len(), DELIVERY_WINDOW, "exactly one window is out");
    // A window is out: the relay waits for acks, so the pong comes next.
    raw.write_frame(&Frame::Ping(Ping { nonce: 7 })).await?;
    match raw.read_frame().await? {
        Frame::Pong(p) => assert_eq!(p.nonce, 7),
        other => anyhow::bail!("more than a window was delivered: {other:?}"),
    }
    // Acknowledging makes room: the rest arrives.
    raw.write_frame(&Frame::Ack(Ack {
        ids: ids[..100].to_vec(),
    }))
    .await?;
    let mut rest = 0;
    while rest < 100 {
        match raw.read_frame().await? {
            Frame::Deliveries(d) => rest += d.len(),
            other => anyhow::bail!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(rest, 100);
    Ok(())
}

/// Two senders' mail for a recipient that reads nothing fills its control
/// stream's flow-control window many times over: the relay's writes wait
/// part-way, with more mail arriving meanwhile. A recipient that catches up
/// reads every message once, whole, and in each sender's order.
#[tokio::test]
async fn mail_for_a_recipient_that_reads_nothing_arrives_whole_and_in_order() -> Result<()> {
    const EACH: usize = 200;
    const BODY: usize = 16 * 1024;
    let relay = TestRelay::spawn_with(RelayOptions {
        limits: MailboxLimits {
            messages: 10_000,
            bytes: 64 * 1024 * 1024,
            ..MailboxLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    // Attached before any mail: every message is delivered at once, into a
    // stream whose receive window (quinn's default, about 1.2 MB) holds a
    // fifth of the 6.5 MB sent.
    let (mut raw, first) = RawClient::hello(&relay, &key, "raw").await?;
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let c = TestDaemon::start(&relay, &key, "c").await?;
    let body = |who: &str, i: usize| {
        let mut b = format!("{who}{i:05}").into_bytes();
        b.resize(BODY, b'.');
        Bytes::from(b)
    };
    let send_all = |d: &TestDaemon, who: &'static str| {
        let h = d.handle.sender();
        async move {
            let mut pending = Vec::new();
            for i in 0..EACH {
                pending.push(h.submit("raw", body(who, i), WAIT).await?);
            }
            answered(pending).await
        }
    };
    // Both senders at once: their mail interleaves in the mailbox while the
    // relay's writes to the recipient wait for room.
    let (from_a, from_c) = tokio::join!(send_all(&a, "a"), send_all(&c, "c"));
    let (from_a, from_c) = (from_a?, from_c?);
    let mut next = std::collections::HashMap::from([("a", 0usize), ("c", 0usize)]);
    let mut got = 0;
    while got < 2 * EACH {
        let Frame::Deliveries(d) = raw.read_frame().await? else {
            anyhow::bail!("expected only deliveries");
        };
        for m in d.into_delivers() {
            let (who, ids) = match m.from.as_str() {
                "a" => ("a", &from_a),
                "c" => ("c", &from_c),
                other => anyhow::bail!("mail from {other}, who sent none"),
            };
            let i = next.entry(who).or_default();
            assert!(*i < EACH, "more than {EACH} messages from {who}");
            assert_eq!(
                m.id, ids[*i],
                "message {i} from {who}: out of order or repeated"
            );
            assert_eq!(m.body, body(who, *i), "message {i} from {who}: its body");
            *i += 1;
            got += 1;
        }
    }
    assert_eq!((next["a"], next["c"]), (EACH, EACH));
    Ok(())
}

#[tokio::test]
async fn relay_at_its_handshake_limit_refuses_at_once_and_the_daemon_gets_in_later() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        max_handshakes: 1,
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    // A connection that never says Hello holds the only handshake slot.
    let raw = RawClient::open(&relay, b"").await?;
    let d = TestDaemon::spawn(relay.daemon_config(&key, "late", std::path::PathBuf::new())).await?;
    relay
        .wait_stats("the daemon refused while the slot is taken", |s| {
            s.refused_busy >= 1
        })
        .await?;
    assert!(!d.handle.state().borrow().is_connected());
    // A refusal says when to come back (`swb_wire::busy`)...
    let mut ep = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    ep.set_default_client_config(swb_tests::raw_client_config_alpn(&relay, swb_wire::ALPN)?);
    match tokio::time::timeout(WAIT, ep.connect(relay.addr(), "localhost")?).await? {
        Err(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            let wait = swb_wire::busy::retry_in(&c.reason)
                .ok_or_else(|| anyhow::anyhow!("a refusal without a hint: {c}"))?;
            assert!(
                wait >= Duration::from_millis(250) && wait <= swb_wire::busy::MAX_RETRY_IN,
                "{wait:?}"
            );
        }
        other => anyhow::bail!("expected a busy refusal, got {other:?}"),
    }
    // ...and the daemon took its refusal as one.
    let why = match &*d.handle.state().borrow() {
        ConnState::Connecting { last_error, .. } => last_error.clone().unwrap_or_default(),
        other => anyhow::bail!("expected the daemon still connecting, got {other:?}"),
    };
    assert!(why.contains("the relay is busy; retrying within"), "{why}");
    // The slot frees when that connection goes; the daemon's retry gets in.
    drop(raw);
    tokio::time::timeout(WAIT, d.handle.connected())
        .await?
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

#[tokio::test]
async fn a_daemon_acknowledges_the_relays_packets_in_few_of_its_own() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    // One delivery per packet from the relay (each send waits for its
    // acceptance); nobody reads london's inbox, so all london sends back
    // are QUIC acknowledgements (and a keep-alive or two).
    let before = london.traffic().await?;
    let mut c = laptop.client().await?;
    for i in 0..400u32 {
        c.send("london", format!("m{i}").as_bytes(), WAIT).await?;
    }
    swb_tests::eventually("400 messages in london's inbox", WAIT, || async {
        Ok((london.client().await?.status().await?.inbox == 400).then_some(()))
    })
    .await?;
    let after = london.traffic().await?;
    let (received, sent) = (
        after.received_packets - before.received_packets,
        after.sent_packets - before.sent_packets,
    );
    eprintln!("london received {received} packets from the relay, sent {sent}");
    assert!(received >= 400, "400 deliveries in {received} packets");
    // The relay asks for an ACK every 9 ack-eliciting packets (QUIC ACK
    // frequency) or after 25 ms; QUIC's default, every 2nd, sends at
    // least half as many (checked: 200 for 400 without the request, 45
    // with it).
    assert!(
        sent * 3 < received,
        "{sent} packets back for {received}: one every {}",
        received / sent.max(1)
    );
    Ok(())
}

/// More messages than one Ack frame names (`MAX_ACK_IDS`), acknowledged in
/// one call through the Rust API: the caller writes them as several frames
/// and the relay forgets every one.
#[tokio::test]
async fn an_acknowledgement_of_more_than_one_frame_holds_reaches_the_relay_whole() -> Result<()> {
    const N: usize = swb_wire::MAX_ACK_IDS * 2 + 100;
    let relay = relay_with_mailboxes_of(N).await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "alpha").await?;
    let b = TestDaemon::start(&relay, &key, "beta").await?;
    let batch: Vec<(&str, Bytes)> = (0..N)
        .map(|i| ("beta", Bytes::from(i.to_string())))
        .collect();
    for chunk in batch.chunks(swb_daemon::MAX_SEND_BATCH) {
        for r in a
            .handle
            .sender()
            .submit_batch(chunk.iter().cloned(), WAIT)
            .await?
            .answer()
            .await?
        {
            r?;
        }
    }
    relay.wait_stats("all held", |s| s.held == N as u64).await?;
    let mut rx = b.handle.receiver();
    let mut got = Vec::new();
    while got.len() < N {
        let more = rx.recv(N - got.len(), WAIT).await?;
        anyhow::ensure!(!more.is_empty(), "received {} of {N}", got.len());
        got.extend(more);
    }
    let ids: Vec<MessageId> = got.iter().map(|m| m.id).collect();
    assert_eq!(rx.ack(&ids).await?, N);
    relay
        .wait_stats("every message forgotten", |s| {
            s.held == 0 && s.acked == N as u64
        })
        .await?;
    Ok(())
}
