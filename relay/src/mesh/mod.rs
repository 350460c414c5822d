//! The mesh layer: links to other relays and the calls that cross them.
//!
//! ```text
//! auth        mesh-key proofs bound to each TLS session, the dialing TLS config
//! membership  pure state machine: records, links, silence, the live set
//! links       dial / accept / run a link: keep-alives, gossip, inbound calls
//! calls_out   typed calls to another relay: forward a message, open a
//!             stream, receive / ack / set status (MeshCall), status queries
//! calls_in    the other side: hands each call to the local services
//! mirror      one upstream status subscription per watched remote peer
//! handoff     held mail to its new home when the ring moves it
//! ```
//!
//! The mesh calls local services for what arrives and publishes the live
//! set to placement; it never calls a front door, and no door calls it
//! (doors go through the router).
//!
//! # Membership: a relay map plus link health
//!
//! Chosen over a gossip library (`chitchat`, `foca`): a diameter-1 mesh
//! already keeps a QUIC link to every other relay, so link health is a
//! failure detector on exactly the path that matters. The rules live in
//! [`membership`], a state machine tested with simulated time.

pub mod auth;
mod calls_in;
mod calls_out;
mod handoff;
mod links;
pub(crate) mod membership;
mod mirror;

pub use auth::{MeshError, MeshKey};
pub(crate) use calls_out::CallError;
pub(crate) use handoff::handoff;
pub(crate) use links::dialer;
pub use membership::MESH_IDLE;

use crate::placement::Placement;
use crate::services::Services;
use membership::Membership;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use swb_wire::RelayRecord;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::info;

/// How this relay joins a mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The shared mesh key.
    pub key: MeshKey,
    /// Other relays to dial first (`host:port`); the rest is learned.
    pub peers: Vec<String>,
    /// Addresses other relays and daemons reach this relay at; default: the
    /// bound address.
    pub advertise: Vec<String>,
}

/// A link that is up, and which side dialled it.
struct LinkEntry {
    conn: quinn::Connection,
    dialer: String,
}

/// This relay's part in the mesh.
pub(crate) struct Mesh {
    me: RelayRecord,
    key: MeshKey,
    services: Arc<Services>,
    placement: Arc<Placement>,
    membership: Mutex<Membership>,
    links: Mutex<HashMap<String, LinkEntry>>,
    /// Seed address → relay id, once a handshake told us.
    seeds: Mutex<HashMap<String, Option<String>>>,
    /// Membership changed: gossip again, maybe dial.
    changed: Notify,
    /// This relay is stopping: links announce it.
    leaving: AtomicBool,
    /// Upstream status subscriptions for peers homed elsewhere: one per
    /// (namespace, name), owned here.
    #[allow(clippy::type_complexity)]
    mirrors: Mutex<(HashSet<(String, String)>, JoinSet<()>)>,
    /// Every task the mesh starts.
    tasks: TaskTracker,
    /// Ends the mesh's links and calls (after the mail handoff at shutdown).
    stop: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("me", &self.me.id).finish()
    }
}

impl Mesh {
    pub(crate) fn new(
        cfg: &MeshConfig,
        services: Arc<Services>,
        placement: Arc<Placement>,
        tasks: TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        let me = placement.me().clone();
        Arc::new(Self {
            membership: Mutex::new(Membership::new(me.clone())),
            me,
            key: cfg.key.clone(),
            services,
            placement,
            links: Mutex::new(HashMap::new()),
            seeds: Mutex::new(cfg.peers.iter().map(|p| (p.clone(), None)).collect()),
            changed: Notify::new(),
            leaving: AtomicBool::new(false),
            mirrors: Mutex::new((HashSet::new(), JoinSet::new())),
            tasks,
            stop,
        })
    }

    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, LinkEntry>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes the live set and hands it to placement.
    fn publish(&self) {
        let live = self.membership().live(tokio::time::Instant::now());
        let ids: Vec<String> = live.ring.ids().to_vec();
        if self.placement.publish(live) {
            info!(live = ?ids, "mesh live set changed");
        }
    }

    /// The connection of the link to relay `id`, if one is up.
    fn conn_to(&self, id: &str) -> Option<quinn::Connection> {
        self.links().get(id).map(|l| l.conn.clone())
    }

    /// Links to other relays that are up now.
    pub(crate) fn links_up(&self) -> usize {
        self.links().len()
    }

    /// Tells every linked relay this one is stopping: they take it out of
    /// their live set (and send its peers elsewhere) while the links stay
    /// up for the mail handoff.
    pub(crate) fn announce_leaving(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Stops every upstream status subscription.
    pub(crate) fn stop_mirrors(&self) {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .abort_all();
    }

    /// Closes every link (graceful stop: peers drop us at once).
    fn close_all(&self) {
        for l in self.links().values() {
            l.conn
                .close(swb_wire::close::NORMAL.into(), b"relay leaving the mesh");
        }
    }
}
