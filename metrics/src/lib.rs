//! The metrics endpoint of relays and daemons: Prometheus text format
//! (version 0.0.4) at `GET /metrics` over plain HTTP/1.1, on an address the
//! operator chooses (`--metrics 127.0.0.1:9090`) and should keep private.
//!
//! Each relay or daemon owns its own [`prometheus::Registry`] (several can
//! live in one process: tests, the demo), so this crate takes a render
//! function rather than a global recorder. We use the `prometheus` crate
//! (TiKV's) because it gives per-instance registries, counters that can be
//! read back (the relay's `stats()` are the metrics themselves, counted
//! once), and the classic text format that `promtool check metrics` lints;
//! `prometheus-client` writes OpenMetrics, whose `_total` naming
//! `promtool` reports as untyped metrics.
//!
//! Labels never carry peer names, namespaces or keys: every label value
//! comes from a fixed set in our code (result, reason code, route, status
//! class), so the number of series is bounded.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use prometheus;

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections served at once; more are closed at once (a scraper needs one).
pub const MAX_CONNECTIONS: usize = 16;

/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a scrape returns: called once per `GET /metrics`.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Encodes every metric of `registry` in the text format.
pub fn encode(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    // Encoding our own well-formed families into a Vec cannot fail.
    if prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_err()
    {
        buf.clear();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// A counter with a fixed name and help, registered in `registry`.
/// Names are constants of ours; an invalid one is a bug caught by tests.
pub fn counter(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("a valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("a metric registered once");
    c
}

/// A counter with labels (values from a fixed set of ours).
pub fn counter_vec(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::IntCounterVec {
    let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
        .expect("a valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("a metric registered once");
    c
}

/// A gauge.
pub fn gauge(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::IntGauge {
    let g = prometheus::IntGauge::new(name, help).expect("a valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("a metric registered once");
    g
}

/// A gauge that holds a float (seconds, ratios).
pub fn float_gauge(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("a valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("a metric registered once");
    g
}

/// A histogram of seconds with buckets from 50 µs to about 100 s.
pub fn seconds_histogram(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
) -> prometheus::Histogram {
    // 50 µs × 2^k: 50 µs, 100 µs, … 52 s (21 buckets).
    let buckets = prometheus::exponential_buckets(0.000_05, 2.0, 21).unwrap_or_default();
    let h = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets),
    )
    .expect("a valid metric name");
    registry
        .register(Box::new(h.clone()))
        .expect("a metric registered once");
    h
}

/// Serves `GET /metrics` on `listener` until `cancel`. Every connection
/// task is owned here and ends with it.
pub async fn serve(listener: TcpListener, render: Render, cancel: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%remote, "too many metrics connections; closing this one");
            continue;
        };
        let render = render.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(%remote, "metrics connection: {e}");
                },
            }
        });
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

fn answer<B>(req: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, render()),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_the_registry_and_nothing_else() {
        let reg = prometheus::Registry::new();
        let c = counter(&reg, "swb_test_things_total", "Things.");
        c.inc_by(3);
        let h = seconds_histogram(&reg, "swb_test_wait_seconds", "Waits.");
        h.observe(0.001);
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let r = reg.clone();
        let task = tokio::spawn(serve(l, Arc::new(move || encode(&r)), cancel.clone()));
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("swb_test_things_total 3"), "{ok}");
        assert!(
            ok.contains("swb_test_wait_seconds_bucket{le=\"0.0016\"} 1"),
            "{ok}"
        );
        let missing = get(addr, "/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        cancel.cancel();
        task.await.expect("serve ends with its token");
    }
}
