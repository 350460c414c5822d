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
/// raises the limit.
pub(crate) const INITIAL_STREAMS: u32 = 8;
/// Used when the configured idle timeout does not fit QUIC's.
const DEFAULT_IDLE: Duration = Duration::from_secs(15);

/// Binds the UDP socket and builds the QUIC server endpoint.
pub(crate) fn bind(
    config: &RelayConfig,
    certs: Option<Arc<dyn rustls::server::ResolvesServerCert>>,
    carriers: Arc<crate::carrier::Carriers>,
) -> Result<(quinn::Endpoint, prometheus::IntCounter), RelayError> {
    let tls = config
        .identity
        .server_config_with(&[swb_wire::ALPN, swb_wire::MESH_ALPN], certs)?;
    let qcfg = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| crate::tls::TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(qcfg));
    let mut transport = quinn::TransportConfig::default();
    // Few streams at first: quinn keeps state per allowed stream (about
    // 80 bytes each), and an idle client needs only its control stream.
    // Sessions raise the limit as they use streams (up to a little above
    // `max_streams_per_peer`, so the refusal can be delivered), mesh links
    // once they proved the mesh key.
    transport.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Flow control before authentication is the budget of a stranger;
    // sessions and mesh links raise the connection's window once proven.
    transport.receive_window(swb_quic::PREAUTH_RECEIVE_WINDOW.into());
    transport.stream_receive_window(swb_quic::STREAM_RECEIVE_WINDOW.into());
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .or_else(|_| quinn::IdleTimeout::try_from(DEFAULT_IDLE));
    transport.max_idle_timeout(idle.ok());
    // TUN packets ride datagrams; unread ones are bounded like the window.
    transport.datagram_receive_buffer_size(Some(swb_quic::RELAY_DATAGRAM_BUFFER));
    server.transport_config(Arc::new(transport));
    let bind_err = |source| RelayError::Bind {
        addr: config.listen,
        source,
    };
    let runtime = Arc::new(crate::offload::MainRuntime(
        tokio::runtime::Handle::current(),
    ));
    let sock = crate::udp_socket(config.listen).map_err(bind_err)?;
    let sock = quinn::Runtime::wrap_udp_socket(&*runtime, sock).map_err(bind_err)?;
    // TCP carriers enter the endpoint beside UDP, under the gate.
    let sock: Arc<dyn quinn::AsyncUdpSocket> =
        Arc::new(crate::carrier::CarrierSocket::new(sock, carriers));
    let gate = Arc::new(
        crate::gate::Gate::new(sock, config.initials)
            .map_err(|e| RelayError::Config(e.to_string()))?,
    );
    let dropped = gate.dropped.clone();
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server),
        gate,
        runtime,
    )
    .map_err(bind_err)?;
    Ok((endpoint, dropped))
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
    session::run(router, conn, permit, started, cancel).await;
}
