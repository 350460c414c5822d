//! The control socket's compact encoding (`{"op":"compact"}`, then binary
//! frames): raw bodies and ids through a real relay, refusals of malformed
//! frames, version negotiation, and a client in another language.

use anyhow::{bail, Context, Result};
use std::time::Duration;
use swb_daemon::compact::Answer;
use swb_daemon::control::{Reply, Request};
use swb_daemon::ControlError;
use swb_tests::{TestDaemon, TestRelay, WAIT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[tokio::test]
async fn compact_sends_receive_and_acknowledge_raw_bodies_with_the_ids_the_sender_was_told(
) -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let (mut req, mut rep) = a.client().await?.compact().await?;
    // Bodies that are not UTF-8, an empty one, and a refusal in the middle
    // that must keep its place.
    let bodies: Vec<Vec<u8>> = (0..500u32)
        .map(|i| {
            let mut v = i.to_be_bytes().to_vec();
            v.extend([0xff, 0x00, 0xfe]);
            v
        })
        .chain([Vec::new()])
        .collect();
    for body in &bodies[..250] {
        req.send("b", body, WAIT).await?;
    }
    req.send("not a name!", b"x", WAIT).await?;
    for body in &bodies[250..] {
        req.send("b", body, WAIT).await?;
    }
    req.push(&Request::Status).await?;
    req.flush().await?;
    let mut ids = Vec::new();
    for i in 0..bodies.len() + 2 {
        match rep.next().await {
            Ok(Answer::Sent(s)) => {
                assert!(s.online);
                ids.push(s.id);
            }
            Err(ControlError::Remote { code, .. }) => {
                assert_eq!(i, 250, "the refusal keeps its place");
                assert_eq!(code, "bad_name");
            }
            Ok(Answer::Reply(r)) if matches!(*r, Reply::Status(_)) => {
                assert_eq!(i, bodies.len() + 1, "status answers after the sends")
            }
            other => bail!("unexpected answer {i}: {other:?}"),
        }
    }
    assert_eq!(ids.len(), bodies.len());

    let (mut req, mut rep) = b.client().await?.compact().await?;
    let mut got = Vec::new();
    while got.len() < bodies.len() {
        req.recv(WAIT, 200).await?;
        req.flush().await?;
        let Answer::Messages(batch) = rep.next().await? else {
            bail!("recv answered with something else");
        };
        anyhow::ensure!(!batch.is_empty(), "only {} arrived", got.len());
        let taken: Vec<_> = batch.iter().map(|m| m.id).collect();
        req.ack(&taken).await?;
        req.flush().await?;
        assert_eq!(rep.next().await?, Answer::Acked(taken.len()));
        got.extend(batch);
    }
    assert_eq!(
        got.iter().map(|m| m.body.to_vec()).collect::<Vec<_>>(),
        bodies,
        "bodies arrive byte for byte, in order"
    );
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert!(got.iter().all(|m| m.from == "a" && m.sent_at_ms > 0));
    // Acknowledged means gone: a JSON client on the same daemon sees none.
    let mut json = b.client().await?;
    assert!(json.recv(Duration::ZERO, 10).await?.is_empty());
    Ok(())
}

/// A raw compact connection: the JSON switch, then frames by hand.
struct Raw {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn open(d: &TestDaemon) -> Result<Self> {
        let s = UnixStream::connect(d.handle.control_path()).await?;
        let (r, wr) = s.into_split();
        let mut raw = Self {
            rd: BufReader::new(r),
            wr,
        };
        raw.wr
            .write_all(b"{\"op\":\"compact\",\"version\":1}\n")
            .await?;
        let line = raw.line().await?;
        assert_eq!(line, r#"{"reply":"compact","version":1}"#);
        Ok(raw)
    }

    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.rd.read_line(&mut line)).await??;
        Ok(line.trim_end().to_string())
    }

    async fn frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut f = vec![kind];
        f.extend((payload.len() as u32).to_be_bytes());
        f.extend(payload);
        self.wr.write_all(&f).await?;
        Ok(())
    }

    /// The next answer frame: (kind, payload); `None` at the end.
    async fn answer(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        let mut head = [0u8; 5];
        let n = tokio::time::timeout(WAIT, self.rd.read(&mut head[..1])).await??;
        if n == 0 {
            return Ok(None);
        }
        self.rd.read_exact(&mut head[1..]).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut p = vec![0u8; len];
        self.rd.read_exact(&mut p).await?;
        Ok(Some((head[0], p)))
    }

    /// The next answer, which must be a JSON error with `code`; returns its
    /// message.
    async fn error(&mut self, code: &str) -> Result<String> {
        let (kind, p) = self.answer().await?.context("connection closed")?;
        assert_eq!(kind, 0, "errors are JSON frames");
        let v: serde_json::Value = serde_json::from_slice(&p)?;
        assert_eq!(v["reply"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        Ok(v["message"].as_str().unwrap_or_default().to_string())
    }
}

#[tokio::test]
async fn malformed_compact_frames_get_specific_errors_and_the_connection_goes_on() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "a").await?;
    let mut raw = Raw::open(&d).await?;
    raw.frame(9, b"").await?;
    assert!(raw
        .error("bad_request")
        .await?
        .contains("unknown request kind 9"));
    raw.frame(2, &[0; 7]).await?;
    assert!(raw.error("bad_request").await?.contains("not 8"));
    // A name length past the end of the frame.
    raw.frame(1, &[0, 0, 3, 232, 40, b'b']).await?;
    assert!(raw.error("bad_request").await?.contains("short"));
    raw.frame(3, &[1; 20]).await?;
    assert!(raw.error("bad_request").await?.contains("16-byte ids"));
    raw.frame(0, br#"{"op":"send","to":"b","body_b64":"","timeout_ms":1}"#)
        .await?;
    assert!(raw.error("bad_request").await?.contains("their own frames"));
    raw.frame(0, br#"{"op":"compact","version":1}"#).await?;
    assert!(raw.error("bad_request").await?.contains("compact already"));
    raw.frame(0, b"{not json").await?;
    assert!(raw.error("bad_request").await?.contains("JSON"));
    // The connection still serves: a JSON request, and an ack of an id this
    // connection never took (0 acknowledged).
    raw.frame(0, br#"{"op":"status"}"#).await?;
    let (kind, p) = raw.answer().await?.context("closed")?;
    assert_eq!(kind, 0);
    let v: serde_json::Value = serde_json::from_slice(&p)?;
    assert_eq!(v["reply"], "status");
    raw.frame(3, &[7; 16]).await?;
    assert_eq!(raw.answer().await?, Some((3, 0u32.to_be_bytes().to_vec())));
    // A frame longer than the limit is refused from its header alone: the
    // daemon answers without waiting for (or making room for) the payload,
    // then closes the connection.
    let mut head = vec![1u8];
    head.extend(u32::MAX.to_be_bytes());
    raw.wr.write_all(&head).await?;
    raw.error("request_too_large").await?;
    assert_eq!(raw.answer().await?, None, "closed after the refusal");

    // A connection that ends inside a frame is told so.
    let mut raw = Raw::open(&d).await?;
    raw.wr.write_all(&[2, 0, 0, 0, 8, 0, 0]).await?;
    raw.wr.shutdown().await?;
    assert!(raw
        .error("bad_request")
        .await?
        .contains("inside a compact frame"));
    assert_eq!(raw.answer().await?, None);
    Ok(())
}

#[tokio::test]
async fn compact_version_is_negotiated_and_json_stays_the_default() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &key, "a").await?;
    let s = UnixStream::connect(d.handle.control_path()).await?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut next = async || -> Result<serde_json::Value> {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await??
            .context("closed")?;
        Ok(serde_json::from_str(&l)?)
    };
    // Version 0 does not exist: refused, and the connection stays JSON.
    w.write_all(b"{\"op\":\"compact\",\"version\":0}\n{\"op\":\"status\"}\n")
        .await?;
    assert_eq!(next().await?["code"], "bad_request");
    assert_eq!(next().await?["reply"], "status");
    // A client that speaks a later version gets the highest both speak.
    w.write_all(b"{\"op\":\"compact\",\"version\":7}\n").await?;
    let v = next().await?;
    assert_eq!(v["reply"], "compact");
    assert_eq!(v["version"], swb_daemon::compact::VERSION);
    Ok(())
}

#[tokio::test]
async fn a_compact_watch_delivers_updates_as_json_frames() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    let (mut req, mut rep) = a.client().await?.compact().await?;
    req.push(&Request::Watch {
        names: vec!["b".into()],
        timeout_ms: WAIT.as_millis() as u64,
    })
    .await?;
    req.flush().await?;
    let answer = rep.next().await?;
    assert!(
        matches!(&answer, Answer::Reply(r) if matches!(**r, Reply::Watching {})),
        "{answer:?}"
    );
    let mut set = std::collections::BTreeMap::new();
    set.insert("phase".to_string(), "deploying".to_string());
    b.client().await?.set_status(set, Vec::new(), WAIT).await?;
    loop {
        let Answer::Reply(r) = tokio::time::timeout(WAIT, rep.next()).await?? else {
            bail!("a watch answers with JSON frames");
        };
        let Reply::Update(v) = *r else {
            bail!("expected an update, got {r:?}");
        };
        assert_eq!(v.name, "b");
        if v.status.get("phase").map(String::as_str) == Some("deploying") {
            return Ok(());
        }
    }
}

/// What a program in another language writes: Python's standard library
/// only, following the README's description of the frames.
const PYTHON_CLIENT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.write(b'{"op":"compact","version":1}\n'); f.flush()
assert json.loads(f.readline()) == {"reply": "compact", "version": 1}
def frame(kind, payload):
    f.write(struct.pack(">BI", kind, len(payload)) + payload)
def answer():
    kind, n = struct.unpack(">BI", f.read(5))
    return kind, f.read(n)
to = sys.argv[2].encode()
frame(1, struct.pack(">IB", 10000, len(to)) + to + b"\x00from python\xff")
f.flush()
kind, p = answer()
assert kind == 1, (kind, p)
print(p[:16].hex(), p[16])
frame(2, struct.pack(">II", 10000, 10)); f.flush()
kind, p = answer()
assert kind == 2, (kind, p)
mid, sent_at, n = struct.unpack(">16sQB", p[:25])
sender = p[25:25 + n].decode()
(blen,) = struct.unpack(">I", p[25 + n:29 + n])
body = p[29 + n:29 + n + blen]
frame(3, mid); f.flush()
kind, p = answer()
assert (kind, p) == (3, struct.pack(">I", 1)), (kind, p)
print(mid.hex(), sender, body.hex())
"#;

#[tokio::test]
async fn a_python_program_speaks_the_compact_encoding() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "a").await?;
    let b = TestDaemon::start(&relay, &key, "b").await?;
    // b sends to a first, so that the Python program (on a) has a message
    // to take after its own send.
    let sent = b.send("a", b"\x01\x02 to python").await?;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(a.handle.control_path())
        .arg("b")
        .output()
        .await
        .context("python3 (./test installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "python client failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // Its send arrived at b, byte for byte, with the id it was told.
    let got = b.recv_n(1).await?;
    assert_eq!(got[0].body(), b"\x00from python\xff");
    assert_eq!(lines[0], format!("{} 1", got[0].id), "id and online");
    // It took b's message and acknowledged it.
    assert_eq!(
        lines[1],
        format!("{} b {}", sent.id, hex(b"\x01\x02 to python"))
    );
    assert!(a.client().await?.recv(Duration::ZERO, 10).await?.is_empty());
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
