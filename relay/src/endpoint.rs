//! The QUIC endpoint and what happens to a connection before any door
//! sees it: the handshake budget (at most `max_handshakes` at once), the
//! TLS handshake, then by ALPN to the QUIC session door (`swb/1`) or to the
//! mesh (`swb-mesh/1`). This module and the crate root are the only places
//! that know both doors and mesh.

use crate::doors::session;
use crate::router::Router;
use crate::{RelayConfig, RelayError};
use std::sync::Arc;
use std::time::Duration;
use swb_wire::close;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A proven-or-not mesh connection and its handshake permit, for the mesh.
pub(crate) type MeshIncoming = (quinn::Connection, OwnedSemaphorePermit);

/// Bidirectional streams a new connection may open before its session
/// raises the limit (its first accepted stream does). quinn keeps an entry
/// per allowed stream in two hash maps; 3 fit their smallest table (4
/// buckets), where 8 took 16 each (~400 bytes more per idle client).
pub const INITIAL_STREAMS: u32 = 3;
/// Connection IDs the relay keeps issued to each client (see `bind`).
const MAX_ISSUED_CIDS: u32 = 3;
/// Ack-eliciting packets a peer may receive before it must acknowledge
/// (quinn's default without the extension: 1). 8 measured best of 1, 8
/// and 32 in `swbd-bench fanout` (same relay +10 %, mesh hop +5 % over 1;
/// 32 no better than 8); stream goodput, message rate and latency
/// unchanged.
const ACK_ELICITING_THRESHOLD: u32 = 8;
/// Used when the configured idle timeout does not fit QUIC's.
const DEFAULT_IDLE: Duration = Duration::from_secs(15);

/// What [`bind`] made: one endpoint per shard (the first also dials the
/// mesh), the initials the gates dropped, the shards' hand-over table.
pub(crate) struct Bound {
    pub(crate) endpoints: Vec<quinn::Endpoint>,
    pub(crate) initials_dropped: prometheus::IntCounter,
    pub(crate) shards: Arc<crate::shards::ShardTable>,
}

/// Binds the UDP socket(s) and builds the QUIC server endpoint of each
/// shard (see [`crate::shards`]).
pub(crate) fn bind(
    config: &RelayConfig,
    certs: Option<Arc<dyn rustls::server::ResolvesServerCert>>,
    carriers: Arc<crate::carrier::Carriers>,
) -> Result<Bound, RelayError> {
    let tls = config
        .identity
        .server_config_with(&[swb_wire::ALPN, swb_wire::MESH_ALPN], certs)?;
    let qcfg = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| crate::tls::TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(qcfg));
    let mut transport = quinn::TransportConfig::default();
    // Few streams at first: quinn keeps two hash-table entries per allowed
    // stream (tables sized by powers of two), and an idle client needs only
    // its control stream.
    // Sessions raise the limit as they use streams (up to a little above
    // `max_streams_per_peer`, so the refusal can be delivered), mesh links
    // once they proved the mesh key.
    transport.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Connection IDs: 3 issued per client (the handshake's and two spares
    // for path changes, renewed as they are retired) instead of quinn's 8
    // capped by the daemon's limit of 5: each is an entry in the endpoint's
    // routing table and the connection's own (heaptrack: the ID tables
    // 638 → 335 bytes per idle client).
    transport.max_issued_connection_ids(MAX_ISSUED_CIDS);
    // Flow control before authentication is the budget of a stranger;
    // sessions and mesh links raise the connection's window once proven.
    transport.receive_window(swb_quic::PREAUTH_RECEIVE_WINDOW.into());
    transport.stream_receive_window(swb_quic::STREAM_RECEIVE_WINDOW.into());
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .or_else(|_| quinn::IdleTimeout::try_from(DEFAULT_IDLE));
    transport.max_idle_timeout(idle.ok());
    // TUN packets ride datagrams; unread ones are bounded like the window.
    transport.datagram_receive_buffer_size(Some(swb_quic::RELAY_DATAGRAM_BUFFER));
    // Paths over TCP carriers take large packets, UDP ones what their
    // first link takes (1452 on Ethernet, quinn's bound).
    transport.path_mtu_upper_bound(Some(swb_quic::carrier::path_mtu_hook()));
    // Peers acknowledge every ACK_ELICITING_THRESHOLD + 1 packets (QUIC
    // ACK frequency extension) instead of every second one, or after
    // their ACK delay (25 ms, as for a lone packet before): a relay
    // fanning status out to many daemons handles far fewer ACK packets.
    // Out-of-order packets are still acknowledged at once.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    transport.ack_frequency_config(Some(ack));
    server.transport_config(Arc::new(transport));
    let n = config.shards;
    if n == 0 || n > crate::shards::MAX_SHARDS {
        return Err(RelayError::Config(format!(
            "shards must be 1 to {} (got {n})",
            crate::shards::MAX_SHARDS
        )));
    }
    let config_err = |e: prometheus::Error| RelayError::Config(e.to_string());
    let table = crate::shards::ShardTable::new(n).map_err(config_err)?;
    let runtime = Arc::new(crate::offload::MainRuntime(
        tokio::runtime::Handle::current(),
    ));
    let mut endpoints = Vec::with_capacity(n);
    let mut first_gate: Option<Arc<crate::gate::Gate>> = None;
    let mut addr = config.listen;
    for shard in 0..n {
        let at = addr;
        let bind_err = move |source| RelayError::Bind { addr: at, source };
        // One shard: a plain socket (a second relay on the port is refused).
        let sock = if n == 1 {
            crate::udp_socket(addr)
        } else {
            swb_quic::udp_socket_shared(addr)
        }
        .map_err(bind_err)?;
        // The others join the first one's port (port 0 picked one).
        addr = sock.local_addr().map_err(bind_err)?;
        let sock = quinn::Runtime::wrap_udp_socket(&*runtime, sock).map_err(bind_err)?;
        // TCP carriers enter the first shard's endpoint beside UDP.
        let sock: Arc<dyn quinn::AsyncUdpSocket> = Arc::new(crate::carrier::CarrierSocket::new(
            sock,
            carriers.clone(),
            shard == 0,
        ));
        let sock: Arc<dyn quinn::AsyncUdpSocket> = if n == 1 {
            sock
        } else {
            Arc::new(crate::shards::ShardSocket::new(sock, shard, table.clone()))
        };
        // Under the gate (its limits are the relay's, across shards).
        let gate = Arc::new(match &first_gate {
            None => crate::gate::Gate::new(sock, config.initials).map_err(config_err)?,
            Some(g) => g.share(sock),
        });
        first_gate.get_or_insert_with(|| gate.clone());
        let mut ep_config = swb_quic::carrier::endpoint_config();
        if n > 1 {
            let id = shard as u8;
            ep_config.cid_generator(move || Box::new(crate::shards::ShardCids { shard: id }));
        }
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            ep_config,
            Some(server.clone()),
            gate,
            runtime.clone(),
        )
        .map_err(bind_err)?;
        endpoints.push(endpoint);
    }
    let initials_dropped = first_gate
        .map(|g| g.dropped.clone())
        .ok_or_else(|| RelayError::Config("no shard".into()))?;
    Ok(Bound {
        endpoints,
        initials_dropped,
        shards: table,
    })
}

/// Takes one connection through its TLS handshake, then hands it on by
/// ALPN. Holds `permit` (a handshake slot) until the door or the mesh
/// releases it.
pub(crate) async fn connection(
    router: Arc<Router>,
    mesh: Option<mpsc::Sender<MeshIncoming>>,
    // Boxed: an argument's room stays in the task for its whole life,
    // long after the handshake took it (memory per idle client).
    incoming: Box<quinn::Incoming>,
    offload: Arc<crate::offload::Offload>,
    permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let hello_timeout = router.config().hello_timeout;
    let metrics = &router.services().metrics;
    // The server's first flight (key exchange, certificate signature) is
    // computed on a handshake thread; the rest runs here.
    let connecting = match offload.run(move || incoming.accept()).await {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            debug!("handshake failed: {e}");
            metrics.handshake("failed", "quic");
            return;
        }
        None => {
            warn!("a handshake job panicked; the connection is dropped");
            metrics.handshake("failed", "internal");
            return;
        }
    };
    let conn = tokio::select! {
        _ = cancel.cancelled() => return,
        c = tokio::time::timeout_at(started + hello_timeout, connecting) => match c {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!("handshake failed: {e}");
                metrics.handshake("failed", "quic");
                return;
            }
            Err(_) => {
                debug!("handshake timed out");
                metrics.handshake("failed", "timeout");
                return;
            }
        },
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(swb_wire::MESH_ALPN) {
        metrics.handshake("mesh", "link");
        match mesh {
            Some(tx) => {
                if tx.send((conn.clone(), permit)).await.is_err() {
                    conn.close(close::NORMAL.into(), b"relay leaving the mesh");
                }
            }
            None => conn.close(close::PROTOCOL.into(), b"this relay is not part of a mesh"),
        }
        return;
    }
    // A peer's session needs nothing more from TLS (no exporter, no peer
    // certificate): the TLS session's memory, about 4 KiB, is given back for the
    // connection's life (memory per idle client). Mesh links keep theirs for
    // the channel-bound proof.
    conn.release_handshake_state();
    session::run(router, conn, permit, started, cancel).await;
}
