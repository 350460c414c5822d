//! Commands that talk to a running daemon over its control socket:
//! `send`, `recv`, `status`.

use crate::{parse_duration, Output};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_daemon::control::{InMessage, StatusInfo};
use swb_daemon::Client;
use swb_wire::MAX_MESSAGE_BODY;

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Recipient: a peer name of your namespace (`london` or `london.switchboard`).
    #[arg(value_name = "TO")]
    to: String,
    /// Message body. Omit it or pass `-` to read the body from stdin.
    #[arg(value_name = "BODY")]
    body: Option<OsString>,
    /// How long to wait for the relay to accept (also covers a daemon that
    /// is reconnecting).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct RecvArgs {
    /// Wait this long for the first message (seconds, or like `500ms`, `2m`).
    /// 0 returns at once with what is waiting.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration)]
    wait: Duration,
    /// Take at most this many messages.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max: u32,
}

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Peer: `london` or `london.switchboard` (case-insensitive).
    #[arg(value_name = "HOST")]
    host: String,
    /// Port the peer exposes.
    #[arg(value_name = "PORT", default_value_t = 22)]
    port: u16,
    /// How long to wait for the daemon's relay connection, if it has none.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

/// `NAME` from `NAME` or `NAME.switchboard` (any case, trailing dot ok).
fn peer_of(host: &str) -> &str {
    let h = host.trim_end_matches('.');
    match h.len().checked_sub(".switchboard".len()) {
        Some(i) if h.is_char_boundary(i) && h[i..].eq_ignore_ascii_case(".switchboard") => &h[..i],
        _ => h,
    }
}

/// How long `swbd connect` waits for a cut stream's cause after its own
/// write failed.
const CUT_CAUSE_WAIT: Duration = Duration::from_secs(2);

pub(crate) async fn connect(a: ConnectArgs, out: &Output) -> Result<()> {
    let peer = peer_of(&a.host);
    let c = Client::connect(&out.control).await?;
    // Framed: the stream's end comes through, so a cut stream is an error
    // here (exit 1 with its cause), never a clean-looking EOF.
    let stream = c
        .connect_framed(peer, a.port, a.timeout)
        .await
        .with_context(|| format!("cannot connect to port {} of {peer}", a.port))?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let up = async {
        let mut stdin = tokio::io::stdin();
        let r = tokio::io::copy(&mut stdin, &mut wr).await;
        match r {
            // EOF on stdin closes only our sending side, cleanly.
            Ok(n) => tokio::io::AsyncWriteExt::shutdown(&mut wr)
                .await
                .map(|()| n),
            // A failed stdin is not a clean end: leave without `end`, and
            // the peer's side is reset.
            Err(e) => Err(e),
        }
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut rd, &mut stdout).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
        r
    };
    let stream_to = format!("the stream to port {} of {peer}", a.port);
    tokio::pin!(up, down);
    // A cut stream ends the command at once (stdin may never reach EOF); a
    // clean end of the peer's side leaves ours open until stdin ends.
    tokio::select! {
        d = &mut down => {
            d.with_context(|| format!("{stream_to} was cut"))?;
            up.await.with_context(|| format!("{stream_to}: cannot pass on stdin"))?;
        }
        u = &mut up => {
            if let Err(e) = u {
                // Writing fails as soon as a cut stream's end closes our
                // side; its cause comes on the reading side: say that one.
                if let Ok(Err(cause)) = tokio::time::timeout(CUT_CAUSE_WAIT, &mut down).await {
                    return Err(cause).with_context(|| format!("{stream_to} was cut"));
                }
                return Err(e).with_context(|| format!("{stream_to}: cannot pass on stdin"));
            }
            down.await.with_context(|| format!("{stream_to} was cut"))?;
        }
    }
    Ok(())
}

fn read_body(arg: Option<OsString>) -> Result<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    match arg {
        Some(b) if b != "-" => Ok(b.into_vec()),
        _ => {
            // Read one byte more than allowed, so an oversized body is
            // reported instead of silently cut.
            let mut body = Vec::new();
            std::io::stdin()
                .lock()
                .take(MAX_MESSAGE_BODY as u64 + 1)
                .read_to_end(&mut body)
                .context("cannot read the message body from stdin")?;
            Ok(body)
        }
    }
}

pub(crate) async fn send(a: SendArgs, out: &Output) -> Result<()> {
    let body = read_body(a.body)?;
    if body.len() > MAX_MESSAGE_BODY {
        bail!(
            "the message body is larger than the limit of {MAX_MESSAGE_BODY} bytes; send large data over a stream instead"
        );
    }
    let mut c = Client::connect(&out.control).await?;
    let sent = c
        .send(&a.to, &body, a.timeout)
        .await
        .with_context(|| format!("message to {} not sent", a.to))?;
    if out.json {
        outln!(
            "{}",
            serde_json::json!({"id": sent.id, "to": a.to, "online": sent.online})
        );
    } else if sent.online {
        eprintln!("swbd: sent to {} (id {})", a.to, sent.id);
    } else {
        eprintln!(
            "swbd: {} is not attached right now; the relay holds the message until it is (id {})",
            a.to, sent.id
        );
    }
    Ok(())
}

fn message_json(m: &InMessage) -> serde_json::Value {
    let body = m.body();
    let mut v = serde_json::json!({
        "id": m.id,
        "from": m.from,
        "sent_at_ms": m.sent_at_ms,
        "body_b64": m.body_b64,
    });
    if let Ok(text) = String::from_utf8(body) {
        v["body"] = serde_json::Value::String(text);
    }
    v
}

pub(crate) async fn recv(a: RecvArgs, out: &Output) -> Result<()> {
    let mut c = Client::connect(&out.control).await?;
    let msgs = c
        .recv(a.wait, a.max as usize)
        .await
        .context("cannot receive")?;
    if msgs.is_empty() {
        if !out.json {
            eprintln!(
                "swbd: no messages within {}",
                humantime::format_duration(a.wait)
            );
        }
        return Ok(());
    }
    {
        // Print everything first; acknowledge only what reached stdout. If
        // writing fails (closed pipe), nothing is acknowledged and the
        // daemon hands the messages out again.
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        for m in &msgs {
            if out.json {
                writeln!(w, "{}", message_json(m))
            } else {
                w.write_all(m.from.as_bytes())
                    .and_then(|()| w.write_all(b"\t"))
                    .and_then(|()| w.write_all(&m.body()))
                    .and_then(|()| w.write_all(b"\n"))
            }
            .context("cannot write to stdout; the messages were not acknowledged")?;
        }
        w.flush()
            .context("cannot write to stdout; the messages were not acknowledged")?;
    }
    c.ack(msgs.iter().map(|m| m.id.clone()).collect())
        .await
        .context("printed, but could not acknowledge; they will be received again")?;
    Ok(())
}

fn ago(since: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(since)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn print_status(s: &StatusInfo) -> Result<()> {
    outln!("state:      {}", s.state);
    outln!("name:       {}", s.name);
    outln!("namespace:  {}", s.namespace.as_deref().unwrap_or("-"));
    match &s.relay_id {
        Some(id) => outln!("relay:      {} (home relay {id})", s.relay),
        None => outln!("relay:      {}", s.relay),
    }
    if s.relays > 0 {
        outln!("relays:     {} live in the mesh", s.relays);
    }
    if let Some(since) = &s.connected_since {
        let t = humantime::parse_rfc3339(since).unwrap_or(UNIX_EPOCH);
        outln!("connected:  since {since} ({} ago)", ago(t));
    }
    if let Some(rtt) = s.rtt_ms {
        outln!("rtt:        {rtt:.2} ms");
    }
    if let Some(c) = &s.carrier {
        let how = if c == "tcp" {
            "tcp (QUIC inside TLS to the relay's HTTPS port: UDP does not get through)"
        } else {
            "udp"
        };
        outln!("carrier:    {how}");
    }
    if let Some(m) = s.path_mtu {
        outln!("path mtu:   {m} bytes");
    }
    if let Some(t) = &s.traffic {
        outln!(
            "traffic:    sent {} packets ({}), received {} packets ({}); {} lost ({} congestion events)",
            t.sent_packets,
            size(t.sent_bytes),
            t.received_packets,
            size(t.received_bytes),
            t.lost_packets,
            t.congestion_events
        );
    }
    if let Some(t) = &s.tun {
        outln!(
            "tun:        {} {} {} (mtu {}{})",
            t.interface,
            t.ipv4,
            t.ipv6,
            t.mtu,
            if t.offload { ", offload" } else { "" }
        );
    }
    if let Some(e) = &s.tun_error {
        outln!("tun:        off: {e}");
    }
    outln!("inbox:      {} waiting", s.inbox);
    if s.pending_sends > 0 {
        outln!("sending:    {} waiting for the relay", s.pending_sends);
    }
    if s.state != "connected" {
        outln!("attempts:   {}", s.attempts);
    }
    if let Some(e) = &s.last_error {
        outln!("last error: {e}");
    }
    Ok(())
}

/// A byte count in the largest binary unit that keeps it at least 1.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

pub(crate) async fn status(out: &Output) -> Result<()> {
    let mut c = Client::connect(&out.control).await?;
    let s = c.status().await?;
    if out.json {
        outln!("{}", serde_json::to_string(&s)?);
    } else {
        print_status(&s)?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct PingArgs {
    /// Peer: `london` or `london.switchboard`.
    #[arg(value_name = "PEER")]
    peer: String,
    /// Round trips to make.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// Pause between round trips.
    #[arg(long, short = 'i', value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// How long to wait for each answer (and for the stream to the peer).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

/// `swbd ping PEER`: round trips through the relays, answered by the
/// peer's daemon. One line per answer, then a summary; exit 1 when no
/// ping was answered (peer offline, or not of our namespace: one answer).
pub(crate) async fn ping(a: PingArgs, out: &Output) -> Result<()> {
    let peer = peer_of(&a.peer).to_string();
    let mut c = Client::connect(&out.control).await?;
    let mut rtts: Vec<Duration> = Vec::new();
    let mut last_err = None;
    for seq in 1..=a.count {
        if seq > 1 && !a.interval.is_zero() {
            tokio::time::sleep(a.interval).await;
        }
        match c.ping(&peer, a.timeout).await {
            Ok(p) => {
                let ms = p.rtt.as_secs_f64() * 1000.0;
                if out.json {
                    outln!(
                        "{}",
                        serde_json::json!({"seq": seq, "to": p.to, "rtt_ms": ms, "via": p.via})
                    );
                } else {
                    outln!("pong from {} via {}: {ms:.3} ms", p.to, p.via.join(" -> "));
                }
                rtts.push(p.rtt);
            }
            Err(swb_daemon::ControlError::Remote { code, message }) => {
                // Nothing answers: say so once, plainly, and stop.
                if rtts.is_empty() && seq == 1 && code != "timeout" {
                    bail!("cannot ping {peer}: {message}");
                }
                if out.json {
                    outln!(
                        "{}",
                        serde_json::json!({"seq": seq, "to": peer, "error": {"code": code, "message": message}})
                    );
                } else {
                    outln!("no answer from {peer} (ping {seq}): {message}");
                }
                last_err = Some(message);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let answered = rtts.len();
    if !out.json {
        rtts.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        if let (Some(min), Some(max)) = (rtts.first(), rtts.last()) {
            outln!(
                "{} sent, {answered} answered; round trip min/median/max {:.3}/{:.3}/{:.3} ms",
                a.count,
                ms(*min),
                ms(rtts[rtts.len() / 2]),
                ms(*max)
            );
        }
    }
    if answered == 0 {
        bail!(
            "no answer from {peer}: {}",
            last_err.unwrap_or_else(|| "no reply".into())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_in_the_largest_unit_that_keeps_them_at_least_one() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(16 << 20), "16.0 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(size(5 << 40), "5.0 TiB");
        assert_eq!(size(u64::MAX), "16777216.0 TiB");
    }
}
