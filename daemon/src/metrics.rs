//! The daemon's metrics: one Prometheus registry per daemon, served by
//! `swbd up --metrics ADDR` (see `swb-metrics`). Labels take values from
//! fixed sets only (directions, outcomes): never a peer name or a key.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Registry};
use swb_metrics::{counter, counter_vec, float_gauge, gauge};

/// Every metric of a daemon.
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    /// 1 while registered at a relay (set at scrape time).
    pub(crate) connected: IntGauge,
    /// Relay connections established, the first one included.
    pub(crate) connects: IntCounter,
    /// Relay connections lost or moved (redirect) after being established.
    pub(crate) reconnects: IntCounter,
    /// Failed connection attempts.
    pub(crate) connect_failures: IntCounter,
    /// Smoothed QUIC round-trip time to the relay (set at scrape time).
    pub(crate) rtt_seconds: Gauge,
    /// Relays in the last relay map.
    pub(crate) relays: IntGauge,
    /// Sends the relay answered: `result` accepted|refused.
    pub(crate) sends: IntCounterVec,
    /// Messages delivered into the inbox (duplicates not counted).
    pub(crate) received: IntCounter,
    /// Messages waiting in the inbox now (set at scrape time).
    pub(crate) inbox: IntGauge,
    /// Streams by direction (`out`: to a peer, `in`: from a peer) and outcome.
    pub(crate) streams: IntCounterVec,
    /// Streams open now.
    pub(crate) streams_open: IntGauge,
    /// SOCKS clients connected now.
    pub(crate) socks_clients: IntGauge,
    /// SOCKS connections accepted since start.
    pub(crate) socks_connections: IntCounter,
    /// Moves to a fresh UDP socket (the route changed, or the relay went
    /// silent).
    pub(crate) rebinds: IntCounter,
    /// TUN packets not carried, by reason (resolved once: per packet).
    pub(crate) tun_dropped: TunDropped,
}

/// `swb_daemon_tun_dropped_total` by reason.
pub(crate) struct TunDropped {
    /// From the interface with a source that is not this peer's address.
    pub(crate) not_own_source: IntCounter,
    /// Bigger than the relay path takes: answered with ICMP "too big".
    pub(crate) too_big: IntCounter,
    /// To a port this peer does not expose: answered (TCP reset / ICMP).
    pub(crate) refused: IntCounter,
    /// Let in by no rule and answered by none (e.g. a stray ICMP).
    pub(crate) filtered: IntCounter,
    /// Not an IP packet, or addressed to someone else.
    pub(crate) malformed: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        Self {
            connected: gauge(&r, "swb_daemon_connected", "1 while the daemon is registered at a relay, else 0."),
            connects: counter(&r, "swb_daemon_connects_total", "Relay connections established (the first one included)."),
            reconnects: counter(&r, "swb_daemon_reconnects_total", "Relay connections that ended (lost, or moved to another relay) and were followed by a new attempt."),
            connect_failures: counter(&r, "swb_daemon_connect_failures_total", "Connection attempts to a relay that failed."),
            rtt_seconds: float_gauge(&r, "swb_daemon_rtt_seconds", "Smoothed QUIC round-trip time to the relay (0 when not connected)."),
            relays: gauge(&r, "swb_daemon_relays", "Relays in the mesh's last relay map."),
            sends: counter_vec(&r, "swb_daemon_messages_sent_total", "Sends the relay answered, by result (accepted, refused).", &["result"]),
            received: counter(&r, "swb_daemon_messages_received_total", "Messages delivered into the inbox (duplicates not counted)."),
            inbox: gauge(&r, "swb_daemon_inbox_messages", "Messages waiting in the inbox for a receiver."),
            streams: counter_vec(&r, "swb_daemon_streams_total", "Streams by direction (out: opened to a peer, in: from a peer) and result (accepted, refused).", &["direction", "result"]),
            streams_open: gauge(&r, "swb_daemon_streams_open", "Streams open now, both directions."),
            socks_clients: gauge(&r, "swb_daemon_socks_clients", "SOCKS5 clients connected now."),
            socks_connections: counter(&r, "swb_daemon_socks_connections_total", "SOCKS5 connections accepted since start."),
            rebinds: counter(&r, "swb_daemon_rebinds_total", "Moves of the relay connection to a fresh UDP socket: the local address changed, or the relay went silent."),
            tun_dropped: {
                let v = counter_vec(&r, "swb_daemon_tun_dropped_total", "TUN packets not carried, by reason: not_own_source (from the interface, source not this peer's address), too_big (answered with ICMP), refused (a port not exposed: answered with a TCP reset or ICMP), filtered, malformed.", &["reason"]);
                let c = |l: &str| v.with_label_values(&[l]);
                TunDropped {
                    not_own_source: c("not_own_source"),
                    too_big: c("too_big"),
                    refused: c("refused"),
                    filtered: c("filtered"),
                    malformed: c("malformed"),
                }
            },
            registry: r,
        }
    }
}

/// Counts something open while it lives (a stream, a SOCKS client).
pub(crate) struct Open(IntGauge);

impl Open {
    pub(crate) fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}
