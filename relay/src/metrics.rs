//! The relay's metrics: one Prometheus registry per relay, served by
//! `--metrics ADDR` (see `swb-metrics`) and read back by
//! [`crate::RelayHandle::stats`]. Every count happens once, here.
//!
//! Labels take values from fixed sets only (handshake results and refusal
//! codes, HTTP route templates and status codes): never a peer name, a
//! namespace or a key, so the number of series is bounded.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use swb_metrics::{counter, counter_vec, gauge, seconds_histogram};

/// Every metric of a relay.
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    /// Sessions welcomed (registered), ever.
    pub(crate) sessions: IntCounter,
    /// Sessions attached now (set at scrape time).
    pub(crate) attached: IntGauge,
    /// Connections by how their handshake ended: `result` is `accepted`,
    /// `refused` or `failed`, `reason` a refusal code or failure kind.
    pub(crate) handshakes: IntCounterVec,
    /// Connection start (QUIC Initial) → session registered.
    pub(crate) handshake_seconds: Histogram,
    pub(crate) accepted: IntCounter,
    /// Sends accepted by another relay (the recipient's home) for a sender
    /// attached here.
    pub(crate) forwarded: IntCounter,
    /// Calls that carried sends made here to their recipients' home
    /// relays (one message or many each).
    pub(crate) forward_calls: IntCounter,
    pub(crate) refused_send: IntCounterVec,
    pub(crate) delivered: IntCounter,
    pub(crate) acked: IntCounter,
    pub(crate) expired: IntCounter,
    /// Handshake jobs the workers ran because the handshake threads had
    /// not started them in time (`offload::STARVED`).
    pub(crate) handshakes_taken_over: IntCounter,
    /// Accepted into a mailbox → first handed to a receiver.
    pub(crate) delivery_seconds: Histogram,
    pub(crate) held_messages: IntGauge,
    pub(crate) held_bytes: IntGauge,
    pub(crate) streams_open: IntGauge,
    pub(crate) streams_opened: IntCounter,
    pub(crate) streams_refused: IntCounter,
    /// Payload bytes spliced through this relay (both directions).
    pub(crate) stream_bytes: IntCounter,
    pub(crate) mesh_links: IntGauge,
    /// TCP carrier connections open now.
    pub(crate) carriers_open: IntGauge,
    pub(crate) mesh_refused: IntCounter,
    /// Calls and packets this relay sent through another relay (no live
    /// link of its own to their relay).
    pub(crate) mesh_two_hop: IntCounter,
    /// Streams and packets passed on for other relays, by result.
    pub(crate) mesh_via_passed: IntCounter,
    pub(crate) mesh_via_no_path: IntCounter,
    pub(crate) mesh_via_bytes: IntCounter,
    /// HTTP API requests by route template and status code.
    pub(crate) http_requests: IntCounterVec,
    /// Status changes published to watchers (after coalescing).
    pub(crate) status_publications: IntCounter,
    /// 1 while the keys file was usable at its last read.
    pub(crate) keys_file_ok: IntGauge,
    /// TUN packets (QUIC datagrams) by what became of them.
    pub(crate) tun: TunCounters,
}

/// `swb_relay_tun_packets_total` by result, resolved once (they count
/// every packet).
pub(crate) struct TunCounters {
    pub(crate) forwarded: IntCounter,
    pub(crate) spoofed: IntCounter,
    pub(crate) no_route: IntCounter,
    pub(crate) too_big: IntCounter,
    pub(crate) malformed: IntCounter,
    pub(crate) not_joined: IntCounter,
}

impl TunCounters {
    fn new(v: &IntCounterVec) -> Self {
        let c = |r: &str| v.with_label_values(&[r]);
        Self {
            forwarded: c("forwarded"),
            spoofed: c("spoofed"),
            no_route: c("no_route"),
            too_big: c("too_big"),
            malformed: c("malformed"),
            not_joined: c("not_joined"),
        }
    }
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
            sessions: counter(&r, "swb_relay_sessions_total", "Daemon sessions welcomed (registered) since start."),
            attached: gauge(&r, "swb_relay_sessions_attached", "Daemon sessions attached now."),
            handshakes: counter_vec(
                &r,
                "swb_relay_handshakes_total",
                "Connections by how their handshake ended: result accepted|refused|failed|redirected|mesh; reason is a refusal code or failure kind.",
                &["result", "reason"],
            ),
            handshake_seconds: seconds_histogram(&r, "swb_relay_handshake_seconds", "Time from a connection's first packet to its session being registered (QUIC, TLS, Hello, key check)."),
            accepted: counter(&r, "swb_relay_messages_accepted_total", "Messages accepted into a mailbox of this relay."),
            forwarded: counter(&r, "swb_relay_messages_forwarded_total", "Sends from peers attached here that the recipient's home relay accepted (one mesh hop)."),
            forward_calls: counter(&r, "swb_relay_mesh_forward_calls_total", "Calls that carried sends made here (by attached peers or over HTTP) to their recipients' home relays. A session's call takes every send it has queued for that relay: swb_relay_messages_forwarded_total over this is how far the mesh hop batches."),
            refused_send: counter_vec(&r, "swb_relay_messages_refused_total", "Sends refused, by refusal code.", &["code"]),
            delivered: counter(&r, "swb_relay_messages_delivered_total", "Messages handed to receivers (QUIC deliveries and HTTP receives, redeliveries included)."),
            acked: counter(&r, "swb_relay_messages_acknowledged_total", "Messages acknowledged by their receiver and forgotten."),
            expired: counter(&r, "swb_relay_messages_expired_total", "Messages dropped because their TTL ran out before anyone took them."),
            handshakes_taken_over: counter(&r, "swb_relay_handshakes_taken_over_total", "TLS handshakes the runtime's workers computed because the handshake threads (nice +10) had not started them within 250 ms: other processes keep the machine's cores busy."),
            delivery_seconds: seconds_histogram(&r, "swb_relay_delivery_seconds", "Time from a message's acceptance to its first hand-out to a receiver."),
            held_messages: gauge(&r, "swb_relay_mail_held_messages", "Messages held in mailboxes now."),
            held_bytes: gauge(&r, "swb_relay_mail_held_bytes", "Bytes held in mailboxes now, as the byte limits count them: body, sender name and 64 bytes per message."),
            streams_open: gauge(&r, "swb_relay_streams_open", "Data streams spliced through this relay now."),
            streams_opened: counter(&r, "swb_relay_streams_opened_total", "Data streams spliced since start."),
            streams_refused: counter(&r, "swb_relay_streams_refused_total", "Data streams refused (by the relay or the target)."),
            stream_bytes: counter(&r, "swb_relay_stream_bytes_total", "Payload bytes relayed on data streams, both directions."),
            mesh_links: gauge(&r, "swb_relay_mesh_links_up", "Mesh links to other relays up now."),
            carriers_open: gauge(&r, "swb_relay_tcp_carriers_open", "TCP carrier connections (QUIC packets over HTTPS, for clients whose network drops UDP) open now."),
            mesh_refused: counter(&r, "swb_relay_mesh_links_refused_total", "Mesh links refused for a missing or wrong mesh-key proof."),
            mesh_two_hop: counter(&r, "swb_relay_mesh_two_hop_total", "Mesh calls, streams and TUN packets this relay sent through another relay because it has no live link to their relay (past --full-mesh-max, or around a broken link)."),
            mesh_via_passed: counter(&r, "swb_relay_mesh_via_total", "Mesh streams and TUN packets another relay sent through this one, passed on."),
            mesh_via_no_path: counter(&r, "swb_relay_mesh_via_failed_total", "Mesh streams and TUN packets another relay sent through this one that could not be passed on (no live link to their relay); the stream is reset, so the sender hears it."),
            mesh_via_bytes: counter(&r, "swb_relay_mesh_via_bytes_total", "Bytes of mesh streams passed on for other relays, both directions."),
            http_requests: counter_vec(&r, "swb_relay_http_requests_total", "HTTP API requests by route template and status code.", &["route", "status"]),
            status_publications: counter(&r, "swb_relay_status_publications_total", "Status changes published to watchers (after coalescing)."),
            keys_file_ok: {
                let g = gauge(&r, "swb_relay_keys_file_ok", "1 when the keys file was readable and valid at its last read; 0 while the relay keeps the keys it has in memory because the file is missing, unreadable or not valid.");
                g.set(1);
                g
            },
            tun: TunCounters::new(&counter_vec(&r, "swb_relay_tun_packets_total", "TUN packets (QUIC datagrams) from attached peers and other relays by result: forwarded, spoofed (source not the sender's own address: dropped), no_route (no such peer attached), too_big (answered with ICMP), malformed, not_joined (from a connection that has not joined TUN mode: discarded at once).", &["result"])),
            registry: r,
        }
    }

    /// Counts a handshake's end.
    pub(crate) fn handshake(&self, result: &str, reason: &str) {
        self.handshakes.with_label_values(&[result, reason]).inc();
    }

    /// Counts a refused send.
    pub(crate) fn refused(&self, code: swb_wire::Code) {
        self.refused_send.with_label_values(&[code.as_str()]).inc();
    }

    /// All refused sends.
    pub(crate) fn refused_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.refused_send
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Handshakes that ended with `result`.
    pub(crate) fn handshakes_with(&self, result: &str) -> u64 {
        use prometheus::core::Collector;
        self.handshakes
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "result" && l.value() == result)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

/// Counts an open data stream while it lives.
pub(crate) struct OpenStream(IntGauge);

impl OpenStream {
    pub(crate) fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}
