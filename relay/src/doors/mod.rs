//! Front doors: where requests from peers and scripts enter. Each parses,
//! checks limits and authenticates, then hands the operation to the
//! [`crate::router`]. Doors never import the mesh.
//!
//! ```text
//! session        QUIC control stream of a daemon: Hello, sends, acks, deliveries
//! streams        QUIC data streams: StreamOpen → router → splice
//! status_streams QUIC status streams: watch, set, peers
//! http           HTTPS + JSON: the same operations for scripts
//! ```

pub(crate) mod http;
pub(crate) mod session;
pub(crate) mod status_streams;
pub(crate) mod streams;
pub(crate) mod tun;
mod wake_gate;

/// Least time between keys-file reads triggered by unknown keys.
pub(crate) const KEYS_REFRESH_GAP: std::time::Duration = std::time::Duration::from_millis(100);
