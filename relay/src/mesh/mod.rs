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
//! Chosen over a gossip library (`chitchat`, `foca`): every relay keeps
//! QUIC links to its neighbours — all relays up to `--full-mesh-max`, its
//! row and column of a √N grid past that ([`swb_ring::Grid`]) — so link
//! health is a failure detector on exactly the paths that matter, and
//! each relay's gossip says which relays it hears: every relay is a
//! neighbour or a neighbour's neighbour. The rules live in [`membership`],
//! a state machine tested with simulated time.
//!
//! # Two hops
//!
//! A call for a relay with no live link from here goes to a live
//! neighbour that hears it, behind a [`swb_wire::MeshVia`] frame; that
//! relay splices the stream on (or, once, detours through a neighbour of
//! its own). Every call — messages, streams, status, HTTP operations —
//! takes that path unchanged; TUN packets carry a small via header.

pub mod auth;
mod calls_in;
mod calls_out;
mod handoff;
mod links;
pub(crate) mod membership;
mod mirror;

pub use auth::{MeshError, MeshKey};
pub(crate) use calls_out::{unavailable, CallError};
pub(crate) use handoff::handoff;
pub(crate) use links::dialer;
pub use membership::MESH_IDLE;

use crate::placement::Placement;
use crate::services::Services;
use membership::Membership;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use swb_wire::{MeshForward, RelayRecord};
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
    /// Live relays up to which every relay links to every other; past it,
    /// links follow a √N grid and calls may take two hops.
    pub full_mesh_max: usize,
}

/// Default of [`MeshConfig::full_mesh_max`] (`--full-mesh-max`).
pub const FULL_MESH_MAX: usize = 1000;

/// A call or stream using a link: while any is held, a link the grid no
/// longer wants stays up.
#[derive(Debug, Clone)]
pub(crate) struct LinkUse(#[allow(dead_code)] Arc<()>);

/// A link that is up, and which side dialled it.
struct LinkEntry {
    conn: quinn::Connection,
    dialer: String,
    /// One count per call or stream on it (both ways), plus this one.
    uses: Arc<()>,
    /// Since when the grid has not wanted it and nothing used it.
    surplus_since: Option<tokio::time::Instant>,
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
    /// Answers forward calls as relays did before calls carried many
    /// messages: the first message only (for tests of the callers'
    /// fallback).
    one_forward_per_call: AtomicBool,
    /// Ignores peers' announcements that they are leaving, as a relay
    /// that has not read them yet does (for tests of the handoff's race
    /// with them).
    ignore_leaving: AtomicBool,
    /// A forward to take after the first handoff pass of [`Mesh::leave`],
    /// as one that passed the leaving check just before the announcement
    /// and landed while the pass ran (for tests of the passes after it).
    late_forward: Mutex<Option<MeshForward>>,
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
            membership: Mutex::new(Membership::new(me.clone(), cfg.full_mesh_max)),
            me,
            key: cfg.key.clone(),
            services,
            placement,
            links: Mutex::new(HashMap::new()),
            seeds: Mutex::new(cfg.peers.iter().map(|p| (p.clone(), None)).collect()),
            changed: Notify::new(),
            leaving: AtomicBool::new(false),
            one_forward_per_call: AtomicBool::new(false),
            ignore_leaving: AtomicBool::new(false),
            late_forward: Mutex::new(None),
            mirrors: Mutex::new((HashSet::new(), JoinSet::new())),
            tasks,
            stop,
        })
    }

    /// See [`Mesh::one_forward_per_call`].
    pub(crate) fn answer_one_forward_per_call(&self) {
        self.one_forward_per_call.store(true, Ordering::Relaxed);
    }

    /// See [`Mesh::ignore_leaving`].
    pub(crate) fn ignore_leaving(&self) {
        self.ignore_leaving.store(true, Ordering::Relaxed);
    }

    /// See [`Mesh::late_forward`].
    pub(crate) fn land_after_first_leave_pass(&self, f: MeshForward) {
        *self.late_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Whether this relay announced it is leaving: it takes no more mail.
    pub(crate) fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
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
    fn conn_to(&self, id: &str) -> Option<(quinn::Connection, LinkUse)> {
        self.links()
            .get(id)
            .map(|l| (l.conn.clone(), LinkUse(l.uses.clone())))
    }

    /// How to reach relay `id`: its link when that is live, else the link
    /// to a live neighbour that hears it (`Some(id)`: pass it on to `id`),
    /// else its link if one is up at all.
    fn path_to(&self, id: &str) -> Option<(quinn::Connection, LinkUse, Option<String>)> {
        let now = tokio::time::Instant::now();
        let via = {
            let m = self.membership();
            if m.is_live(id, now) {
                None
            } else {
                m.via(id, now)
            }
        };
        if let Some(v) = via {
            if let Some((c, u)) = self.conn_to(&v) {
                self.services.metrics.mesh_two_hop.inc();
                return Some((c, u, Some(id.to_string())));
            }
        }
        self.conn_to(id).map(|(c, u)| (c, u, None))
    }

    /// Links to other relays that are up now.
    pub(crate) fn links_up(&self) -> usize {
        self.links().len()
    }

    /// The relays this relay has links to now.
    pub(crate) fn linked_ids(&self) -> Vec<String> {
        self.links().keys().cloned().collect()
    }

    /// Asks relay `to` a trivial question over the path a call would take
    /// now; that path (the relay it passed through, then `to`).
    pub(crate) async fn probe(&self, to: &str) -> Result<Vec<String>, CallError> {
        let path = match self.path_to(to) {
            Some((_, _, Some(_))) => {
                let via = self.membership().via(to, tokio::time::Instant::now());
                via.into_iter().chain([to.to_string()]).collect()
            }
            Some(_) => vec![to.to_string()],
            None => return Err(CallError::NoLink),
        };
        let q = swb_wire::MeshStatusQuery {
            // No namespace has this name: the answer is empty.
            namespace: "-probe-".into(),
            names: Vec::new(),
            watch: false,
        };
        let ask = async {
            let (_s, mut r, _u) = self.status_query(to, q).await?;
            while links::read_frame(&mut r).await?.is_some() {}
            Ok::<_, CallError>(())
        };
        tokio::time::timeout(calls_out::STATUS_FETCH_TIMEOUT, ask)
            .await
            .map_err(|_| CallError::Timeout)??;
        Ok(path)
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
