//! Relay-to-relay links and membership.
//!
//! # Authentication
//!
//! Mesh links use ALPN `swb-mesh/1` on the relay's normal QUIC port. Both
//! relays prove they hold the shared mesh key with an HMAC-SHA256, under
//! that key, of keying material exported from *this* TLS session (RFC 5705
//! exporter) and a role label. The proof never reveals the key and is
//! worthless on any other connection, so a man in the middle — who would
//! have two different TLS sessions — cannot pass it on. This is what
//! authenticates a mesh link, which is why the dialing side accepts any
//! server certificate here; the certificate a relay presents is then pinned
//! in the relay map daemons receive. An API key cannot open a mesh link (it
//! is not the mesh key), and the mesh key is not an API key (`swbk_…`), so
//! neither credential works at the other door.
//!
//! # Membership: a relay map plus link health
//!
//! Chosen over a gossip library (`chitchat`, `foca`): a diameter-1 mesh
//! already keeps a QUIC link to every other relay, and QUIC's keep-alive and
//! idle timeout are a failure detector on exactly the path that matters.
//! Each relay gossips the relay records it knows over its links; the live
//! set is this relay plus every relay it has a working link to. The lower
//! id dials the higher (seeds are dialled by everyone until identified), so
//! every pair has one link. A graceful stop closes the links at once; a dead
//! relay drops out after the mesh idle timeout ([`MESH_IDLE`]), so all
//! relays agree on the live set within that time plus one redial interval.

use crate::streams::write_frame;
use crate::tls::fingerprint;
use ring::hmac;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swb_ring::Ring;
use swb_wire::{Frame, MeshHello, MeshWelcome, RelayMap, RelayRecord, MESH_ALPN, PROTOCOL_VERSION};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A mesh link silent this long is dead.
pub const MESH_IDLE: Duration = Duration::from_secs(3);
const MESH_KEEPALIVE: Duration = Duration::from_millis(750);
const REDIAL: Duration = Duration::from_millis(500);
const EXPORTER_LABEL: &[u8] = b"EXPORTER-swb-mesh-1";
/// Largest mesh control frame.
const MAX_MESH_FRAME: usize = 1 << 20;

/// The shared secret of a mesh. `Debug` never shows it.
#[derive(Clone)]
pub struct MeshKey(Arc<Vec<u8>>);

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

/// Errors of mesh configuration.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The key is too short.
    #[error("the mesh key must have at least 32 characters (e.g. `head -c 32 /dev/urandom | base64 > mesh.key`)")]
    ShortKey,
    /// The key file could not be read.
    #[error("mesh key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl MeshKey {
    /// A key from secret text (surrounding whitespace removed).
    pub fn new(secret: &str) -> Result<Self, MeshError> {
        let s = secret.trim();
        if s.len() < 32 {
            return Err(MeshError::ShortKey);
        }
        Ok(Self(Arc::new(s.as_bytes().to_vec())))
    }

    /// Reads a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text)
    }

    fn proof(&self, ekm: &[u8], role: &[u8]) -> Vec<u8> {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(role);
        ctx.update(ekm);
        ctx.sign().as_ref().to_vec()
    }

    fn verify(&self, ekm: &[u8], role: &[u8], proof: &[u8]) -> bool {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut msg = role.to_vec();
        msg.extend_from_slice(ekm);
        hmac::verify(&k, &msg, proof).is_ok()
    }
}

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

/// The relays this relay can reach now (itself included) and the ring
/// over them.
#[derive(Debug, Clone)]
pub struct LiveSet {
    /// Placement over the live relays.
    pub ring: Ring,
    /// Their records, by id.
    pub relays: BTreeMap<String, RelayRecord>,
}

struct LinkEntry {
    conn: quinn::Connection,
    dialer: String,
}

#[derive(Default)]
struct State {
    members: BTreeMap<String, RelayRecord>,
    /// Linked relays that announced they are stopping.
    leaving: std::collections::HashSet<String>,
    links: HashMap<String, LinkEntry>,
    /// Seed address → relay id, once a handshake told us.
    seeds: HashMap<String, Option<String>>,
}

/// This relay's view of the mesh.
pub(crate) struct Mesh {
    pub(crate) me: RelayRecord,
    key: MeshKey,
    state: Mutex<State>,
    live: watch::Sender<Arc<LiveSet>>,
    /// Membership changed: gossip again, maybe dial.
    changed: Notify,
    /// This relay is stopping: links announce it.
    leaving: std::sync::atomic::AtomicBool,
    /// Upstream status subscriptions for peers homed elsewhere: one per
    /// (namespace, name), owned here.
    #[allow(clippy::type_complexity)]
    pub(crate) mirrors: Mutex<(std::collections::HashSet<(String, String)>, JoinSet<()>)>,
}

impl Mesh {
    pub(crate) fn new(me: RelayRecord, cfg: &MeshConfig) -> Arc<Self> {
        let relays: BTreeMap<String, RelayRecord> = [(me.id.clone(), me.clone())].into();
        let live = LiveSet {
            ring: Ring::new([me.id.clone()]),
            relays,
        };
        let state = State {
            seeds: cfg.peers.iter().map(|p| (p.clone(), None)).collect(),
            ..State::default()
        };
        Arc::new(Self {
            me,
            key: cfg.key.clone(),
            state: Mutex::new(state),
            live: watch::Sender::new(Arc::new(live)),
            changed: Notify::new(),
            leaving: std::sync::atomic::AtomicBool::new(false),
            mirrors: Mutex::new((std::collections::HashSet::new(), JoinSet::new())),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to live-set changes.
    /// Links to other relays that are up now.
    pub(crate) fn links_up(&self) -> usize {
        self.state().links.len()
    }

    pub(crate) fn live(&self) -> watch::Receiver<Arc<LiveSet>> {
        self.live.subscribe()
    }

    fn records(&self) -> Vec<RelayRecord> {
        let st = self.state();
        let mut v: Vec<RelayRecord> = st.members.values().cloned().collect();
        v.push(self.me.clone());
        v
    }

    fn merge(&self, records: &[RelayRecord]) {
        let mut new = false;
        {
            let mut st = self.state();
            for r in records {
                if r.id == self.me.id || r.id.is_empty() {
                    continue;
                }
                if st.members.get(&r.id) != Some(r) {
                    st.members.insert(r.id.clone(), r.clone());
                    new = true;
                }
            }
        }
        if new {
            self.recompute();
            self.changed.notify_waiters();
        }
    }

    fn recompute(&self) {
        let live = {
            let st = self.state();
            let mut relays: BTreeMap<String, RelayRecord> = BTreeMap::new();
            relays.insert(self.me.id.clone(), self.me.clone());
            for id in st.links.keys().filter(|id| !st.leaving.contains(*id)) {
                if let Some(r) = st.members.get(id) {
                    relays.insert(id.clone(), r.clone());
                }
            }
            LiveSet {
                ring: Ring::new(relays.keys().cloned()),
                relays,
            }
        };
        let changed = self.live.borrow().ring != live.ring;
        if changed {
            info!(live = ?live.ring.ids(), "mesh live set changed");
            self.live.send_replace(Arc::new(live));
        }
    }

    /// Registers a link; false if a better link to the same relay exists
    /// (the one the smaller id dialled wins).
    fn register(&self, peer: &RelayRecord, conn: &quinn::Connection, dialer: &str) -> bool {
        {
            let mut st = self.state();
            if let Some(existing) = st.links.get(&peer.id) {
                let preferred = std::cmp::min(self.me.id.as_str(), peer.id.as_str());
                if existing.conn.close_reason().is_none() && existing.dialer == preferred {
                    return false;
                }
                existing.conn.close(0u32.into(), b"duplicate mesh link");
            }
            st.members.insert(peer.id.clone(), peer.clone());
            st.links.insert(
                peer.id.clone(),
                LinkEntry {
                    conn: conn.clone(),
                    dialer: dialer.to_string(),
                },
            );
        }
        self.recompute();
        self.changed.notify_waiters();
        true
    }

    fn unregister(&self, id: &str, conn: &quinn::Connection) {
        {
            let mut st = self.state();
            if st
                .links
                .get(id)
                .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
            {
                st.links.remove(id);
                st.leaving.remove(id);
            }
        }
        self.recompute();
    }

    /// Tells every linked relay this one is stopping: they take it out of
    /// their live set (and send its peers elsewhere) while the links stay
    /// up for the mail handoff.
    pub(crate) fn announce_leaving(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
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
    pub(crate) fn close_all(&self) {
        for l in self.state().links.values() {
            l.conn.close(0u32.into(), b"relay leaving the mesh");
        }
    }
}

/// The record of the home relay of `(ns, name)` if that is not this relay.
pub(crate) fn home_elsewhere(shared: &crate::Shared, ns: &str, name: &str) -> Option<RelayRecord> {
    let mesh = shared.mesh.as_ref()?;
    let live = mesh.live.borrow().clone();
    let home = live.ring.home(ns, name)?;
    if home == mesh.me.id {
        return None;
    }
    live.relays.get(home).cloned()
}

/// The live relays, for daemons (just this relay outside a mesh).
pub(crate) fn relay_map(shared: &crate::Shared) -> RelayMap {
    match &shared.mesh {
        Some(m) => RelayMap {
            relays: m.live.borrow().relays.values().cloned().collect(),
        },
        None => RelayMap {
            relays: vec![shared.me.clone()],
        },
    }
}

/// Serves one request stream from another relay.
async fn serve_rpc(
    shared: Arc<crate::Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let first = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv)).await {
        Ok(Ok(Some(f))) => f,
        _ => {
            let _ = send.reset(0u32.into());
            return;
        }
    };
    match first {
        Frame::MeshForward(f) => {
            let reply = forward_in(&shared, f);
            let _ = write_frame(&mut send, &reply).await;
            let _ = send.finish();
        }
        Frame::MeshStreamOpen(o) => {
            let to = match swb_wire::normalize_name(&o.to) {
                Ok(t) => t,
                Err(e) => {
                    let r = swb_wire::Refusal::new(
                        swb_wire::Code::BAD_NAME,
                        format!("{e}: {:?}", o.to),
                    );
                    let _ = write_frame(
                        &mut send,
                        &Frame::StreamReply(swb_wire::StreamReply { refusal: Some(r) }),
                    )
                    .await;
                    let _ = send.finish();
                    return;
                }
            };
            match crate::streams::open_local(&shared, &o.namespace, &o.from, &to, o.port).await {
                Err(r) => {
                    let _ = write_frame(
                        &mut send,
                        &Frame::StreamReply(swb_wire::StreamReply { refusal: Some(r) }),
                    )
                    .await;
                    let _ = send.finish();
                }
                Ok((tsend, trecv, reply, _slot)) => {
                    let accepted = reply.refusal.is_none();
                    if write_frame(&mut send, &Frame::StreamReply(reply))
                        .await
                        .is_err()
                        || !accepted
                    {
                        let _ = send.finish();
                        return;
                    }
                    let _open = crate::metrics::OpenStream::new(&shared.metrics.streams_open);
                    let bytes = &shared.metrics.stream_bytes;
                    let _ = tokio::join!(
                        crate::streams::pipe(recv, tsend, bytes),
                        crate::streams::pipe(trecv, send, bytes)
                    );
                }
            }
        }
        Frame::MeshHttp(h) => {
            let (status, body) =
                crate::http::serve_forwarded(&shared, &shared.mesh_stop, &h.json).await;
            let mut out = status.to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            let _ = send.write_all(&out).await;
            let _ = send.finish();
        }
        Frame::MeshStatusQuery(q) => {
            let _ = write_frame(
                &mut send,
                &Frame::StreamReply(swb_wire::StreamReply { refusal: None }),
            )
            .await;
            if q.names.is_empty() {
                let known = shared.registry().status.known(&q.namespace);
                for s in known {
                    if write_frame(&mut send, &Frame::StatusUpdate(s.to_update(false)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = send.finish();
                return;
            }
            let Ok(names) = crate::status_streams::names(&q.names) else {
                let _ = send.finish();
                return;
            };
            let w = crate::status_streams::StatusWatcher::new(&shared, &q.namespace, &names);
            crate::status_streams::pump(w, names.len(), q.watch, &mut send, &mut recv).await;
            let _ = send.finish();
        }
        other => {
            debug!("unexpected mesh request {:?}", other.frame_type());
            let _ = send.reset(0u32.into());
        }
    }
}

/// Runs an HTTP API operation at relay `home`: (status, JSON body).
pub(crate) async fn http_call(
    shared: &crate::Shared,
    home: &str,
    json: String,
) -> Result<(u16, Vec<u8>), String> {
    let conn = shared
        .mesh
        .as_ref()
        .and_then(|m| m.state().links.get(home).map(|l| l.conn.clone()))
        .ok_or("no mesh link")?;
    let call = async {
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut s, &Frame::MeshHttp(swb_wire::MeshHttp { json })).await?;
        let _ = s.finish();
        let all = r.read_to_end(16 << 20).await.map_err(|e| e.to_string())?;
        if all.len() < 2 {
            return Err("empty answer".to_string());
        }
        Ok((u16::from_be_bytes([all[0], all[1]]), all[2..].to_vec()))
    };
    // A receive may wait up to its `wait`; allow for it.
    tokio::time::timeout(shared.config.http.max_wait + Duration::from_secs(10), call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Opens a status query to relay `home`.
async fn status_query(
    shared: &crate::Shared,
    home: &str,
    q: swb_wire::MeshStatusQuery,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let conn = shared
        .mesh
        .as_ref()
        .and_then(|m| m.state().links.get(home).map(|l| l.conn.clone()))
        .ok_or("no mesh link")?;
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut s, &Frame::MeshStatusQuery(q)).await?;
    match read_frame(&mut r).await? {
        Some(Frame::StreamReply(swb_wire::StreamReply { refusal: None })) => Ok((s, r)),
        _ => Err("status query refused".into()),
    }
}

/// Every known peer of `ns`: this relay's, and every other live relay's
/// (each peer's newest value wins).
pub(crate) async fn known_everywhere(
    shared: &crate::Shared,
    ns: &str,
) -> Vec<Arc<crate::Snapshot>> {
    let mut all: BTreeMap<String, Arc<crate::Snapshot>> = shared
        .registry()
        .status
        .known(ns)
        .into_iter()
        .map(|s| (s.name.to_string(), s))
        .collect();
    let Some(mesh) = &shared.mesh else {
        return all.into_values().collect();
    };
    let others: Vec<String> = mesh
        .live
        .borrow()
        .ring
        .ids()
        .iter()
        .filter(|id| **id != mesh.me.id)
        .cloned()
        .collect();
    for id in others {
        let q = swb_wire::MeshStatusQuery {
            namespace: ns.to_string(),
            names: Vec::new(),
            watch: false,
        };
        let fetch = async {
            let (_s, mut r) = status_query(shared, &id, q).await?;
            let mut out = Vec::new();
            while let Some(f) = read_frame(&mut r).await? {
                if let Frame::StatusUpdate(u) = f {
                    out.push(u);
                }
            }
            Ok::<_, String>(out)
        };
        match tokio::time::timeout(Duration::from_secs(5), fetch).await {
            Ok(Ok(updates)) => {
                for u in updates {
                    let snap = Arc::new(crate::status::Snapshot::from_update(&u));
                    let newer = all.get(&u.name).is_none_or(|s| s.version < snap.version);
                    if newer {
                        all.insert(u.name.clone(), snap);
                    }
                }
            }
            Ok(Err(e)) => debug!(relay = %id, "peers query failed: {e}"),
            Err(_) => debug!(relay = %id, "peers query timed out"),
        }
    }
    all.into_values().collect()
}

/// Before watching `names` in `ns` here: fetch the current values of those
/// homed on other relays into the board, and (for a lasting watch) start
/// one upstream subscription per such peer unless one runs.
pub(crate) async fn prepare_watch(
    shared: &Arc<crate::Shared>,
    ns: &str,
    names: &[String],
    lasting: bool,
) {
    let Some(mesh) = &shared.mesh else {
        return;
    };
    let mut by_home: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in names {
        if let Some(h) = home_elsewhere(shared, ns, n) {
            by_home.entry(h.id).or_default().push(n.clone());
        }
    }
    for (home, names) in by_home {
        let q = swb_wire::MeshStatusQuery {
            namespace: ns.to_string(),
            names: names.clone(),
            watch: false,
        };
        let fetch = async {
            let (_s, mut r) = status_query(shared, &home, q).await?;
            while let Some(f) = read_frame(&mut r).await? {
                if let Frame::StatusUpdate(u) = f {
                    shared
                        .registry()
                        .status
                        .mirror_update(ns, &u, tokio::time::Instant::now());
                }
            }
            Ok::<_, String>(())
        };
        if let Ok(Err(e)) | Err(e) = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| "timed out".to_string())
        {
            debug!(%home, "status fetch failed: {e}");
        }
        if lasting {
            for n in names {
                let key = (ns.to_string(), n.clone());
                let mut m = mesh.mirrors.lock().unwrap_or_else(|p| p.into_inner());
                if m.0.insert(key.clone()) {
                    m.1.spawn(mirror(shared.clone(), key));
                }
            }
        }
    }
}

/// Keeps the board's copy of a peer homed elsewhere up to date while
/// anyone here watches it; follows the peer when its home moves.
async fn mirror(shared: Arc<crate::Shared>, key: (String, String)) {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    let Some(mesh) = shared.mesh.clone() else {
        return;
    };
    let mut live = mesh.live();
    // The first check comes after the watcher that asked had time to subscribe.
    let mut check = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    // Ends when the peer is homed here (the board is authoritative then),
    // nobody watches it any more, or the relay stops.
    'outer: while let Some(home) = home_elsewhere(&shared, ns, name) {
        let q = swb_wire::MeshStatusQuery {
            namespace: ns.to_string(),
            names: vec![name.to_string()],
            watch: true,
        };
        let sub = status_query(&shared, &home.id, q).await;
        let Ok((_send, mut recv)) = sub else {
            tokio::time::sleep(REDIAL).await;
            if !shared.registry().status.watched(ns, name) {
                break;
            }
            continue;
        };
        loop {
            tokio::select! {
                f = read_frame(&mut recv) => match f {
                    Ok(Some(Frame::StatusUpdate(u))) => {
                        shared.registry().status.mirror_update(ns, &u, tokio::time::Instant::now());
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => continue 'outer,
                },
                r = live.changed() => {
                    if r.is_err() {
                        break 'outer;
                    }
                    continue 'outer; // the home may have moved
                }
                _ = check.tick() => {
                    if !shared.registry().status.watched(ns, name) {
                        break 'outer;
                    }
                }
            }
        }
    }
    mesh.mirrors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .remove(&key);
}

/// Opens a stream to `port` of `to`, homed on relay `home`, over the mesh.
pub(crate) async fn open_stream(
    shared: &crate::Shared,
    home: &str,
    ns: &str,
    from: &str,
    to: &str,
    port: u16,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        swb_wire::StreamReply,
        Option<crate::streams::StreamSlot>,
    ),
    swb_wire::Refusal,
> {
    let unavailable = |why: String| {
        swb_wire::Refusal::new(
            swb_wire::Code::PEER_OFFLINE,
            format!("{to}'s home relay ({home}) is unreachable right now ({why})"),
        )
    };
    let conn = shared
        .mesh
        .as_ref()
        .and_then(|m| m.state().links.get(home).map(|l| l.conn.clone()))
        .ok_or_else(|| unavailable("no mesh link".into()))?;
    let setup = async {
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let open = swb_wire::MeshStreamOpen {
            namespace: ns.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            port,
        };
        write_frame(&mut s, &Frame::MeshStreamOpen(open)).await?;
        match crate::streams::read_header(&mut r)
            .await
            .map_err(|e| e.to_string())?
        {
            Frame::StreamReply(reply) => Ok((s, r, reply)),
            other => Err(format!("answered {:?}", other.frame_type())),
        }
    };
    match tokio::time::timeout(shared.config.stream_setup_timeout, setup).await {
        Ok(Ok((s, r, reply))) => Ok((s, r, reply, None)),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(swb_wire::Refusal::new(
            swb_wire::Code::TIMEOUT,
            format!("{to}'s home relay did not answer in time"),
        )),
    }
}

/// A message another relay forwarded for a peer homed here.
fn forward_in(shared: &crate::Shared, f: swb_wire::MeshForward) -> Frame {
    let refused = |code, msg: String| {
        Frame::SendRefused(swb_wire::SendRefused {
            req: 0,
            refusal: swb_wire::Refusal::new(code, msg),
        })
    };
    if f.body.len() > swb_wire::MAX_MESSAGE_BODY {
        return refused(swb_wire::Code::BODY_TOO_LARGE, "body too large".into());
    }
    let to = match swb_wire::normalize_name(&f.to) {
        Ok(t) => t,
        Err(e) => return refused(swb_wire::Code::BAD_NAME, format!("{e}: {:?}", f.to)),
    };
    let r = shared.registry().enqueue(
        &f.namespace,
        &f.from,
        &to,
        f.id,
        f.body,
        f.sent_at_ms,
        tokio::time::Instant::now(),
    );
    match r {
        crate::registry::Enqueued::Accepted { online } => {
            shared.metrics.accepted.inc();
            Frame::SendAccepted(swb_wire::SendAccepted {
                req: 0,
                id: f.id,
                online,
            })
        }
        crate::registry::Enqueued::Refused(r) => {
            shared.metrics.refused(r.code);
            Frame::SendRefused(swb_wire::SendRefused { req: 0, refusal: r })
        }
    }
}

/// Forwards a message to `home`, the relay holding the recipient's
/// mailbox. Returns whether the recipient is attached there.
pub(crate) async fn forward(
    shared: &crate::Shared,
    home: &str,
    f: swb_wire::MeshForward,
) -> Result<bool, swb_wire::Refusal> {
    let to = f.to.clone();
    let unavailable = |why: String| {
        swb_wire::Refusal::new(
            swb_wire::Code::TIMEOUT,
            format!("the home relay of {to} ({home}) is unreachable right now ({why}); retry"),
        )
    };
    let conn = shared
        .mesh
        .as_ref()
        .and_then(|m| m.state().links.get(home).map(|l| l.conn.clone()))
        .ok_or_else(|| unavailable("no mesh link".into()))?;
    let rpc = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Frame::MeshForward(f)).await?;
        let _ = send.finish();
        read_frame(&mut recv).await
    };
    match tokio::time::timeout(Duration::from_secs(10), rpc).await {
        Ok(Ok(Some(Frame::SendAccepted(a)))) => Ok(a.online),
        Ok(Ok(Some(Frame::SendRefused(r)))) => Err(r.refusal),
        Ok(Ok(_)) => Err(unavailable(format!("no answer for {to}"))),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("timed out".into())),
    }
}

/// Hands held mail to the relays that are its home on `ring` (this relay
/// is not, or no longer): forwarded one by one, removed here only once the
/// new home accepted it. Returns (handed off, kept).
pub(crate) async fn handoff(shared: &crate::Shared, ring: &Ring) -> (usize, usize) {
    let Some(mesh) = &shared.mesh else {
        return (0, 0);
    };
    let me = mesh.me.id.clone();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let held = shared.registry().export(tokio::time::Instant::now(), wall);
    let (mut moved, mut kept) = (0, 0);
    for m in held {
        let Some(home) = ring.home(&m.ns, &m.to).map(str::to_string) else {
            continue;
        };
        if home == me {
            continue;
        }
        let (ns, to, id) = (m.ns.clone(), m.to.clone(), m.id);
        let f = swb_wire::MeshForward {
            namespace: m.ns,
            from: m.from,
            to: m.to,
            id: m.id,
            body: m.body,
            sent_at_ms: m.sent_at_ms,
        };
        match forward(shared, &home, f).await {
            Ok(_) => {
                shared.registry().ack(&ns, &to, &[id]);
                moved += 1;
            }
            Err(r) => {
                kept += 1;
                debug!(%ns, %to, %home, "handoff failed: {r}");
            }
        }
    }
    (moved, kept)
}

/// Keying material of this TLS session, the same on both ends.
fn ekm(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, String> {
    Ok(crate::streams::read_frame(recv, MAX_MESH_FRAME).await?)
}

/// Serves an inbound mesh link (ALPN `swb-mesh/1`) until it ends.
pub(crate) async fn accept(
    shared: Arc<crate::Shared>,
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    cancel: CancellationToken,
) {
    let remote = conn.remote_address();
    // Mesh links carry every forwarded stream and request between two relays.
    conn.set_max_concurrent_bi_streams(4096u32.into());
    let setup = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let Some(Frame::MeshHello(h)) = read_frame(&mut recv).await? else {
            return Err("the first mesh frame is not MeshHello".to_string());
        };
        let ekm = ekm(&conn).ok_or("no TLS keying material")?;
        if h.version != PROTOCOL_VERSION || !mesh.key.verify(&ekm, b"client", &h.proof) {
            return Err("mesh key proof failed".to_string());
        }
        let welcome = MeshWelcome {
            relay: mesh.me.clone(),
            proof: mesh.key.proof(&ekm, b"server"),
            members: mesh.records(),
        };
        write_frame(&mut send, &Frame::MeshWelcome(welcome)).await?;
        Ok((h.relay, send, recv))
    };
    let (peer, send, recv) = match tokio::time::timeout(Duration::from_secs(10), setup).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            shared.metrics.mesh_refused.inc();
            warn!(%remote, "mesh link refused: {e}");
            conn.close(1u32.into(), b"mesh authentication failed");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"mesh handshake timed out");
            return;
        }
    };
    let dialer = peer.id.clone();
    run_link(shared, mesh, conn, peer, dialer, send, recv, cancel).await;
}

/// Dials `addr` and runs the link until it ends.
async fn dial(
    shared: Arc<crate::Shared>,
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: String,
    cancel: CancellationToken,
) {
    let setup = async {
        let sa = tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let conn = endpoint
            .connect_with(client, sa, "relay")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let ekm = ekm(&conn).ok_or("no TLS keying material")?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = MeshHello {
            version: PROTOCOL_VERSION,
            relay: mesh.me.clone(),
            proof: mesh.key.proof(&ekm, b"client"),
        };
        write_frame(&mut send, &Frame::MeshHello(hello)).await?;
        let Some(Frame::MeshWelcome(w)) = read_frame(&mut recv).await? else {
            return Err("no MeshWelcome (wrong mesh key?)".to_string());
        };
        if !mesh.key.verify(&ekm, b"server", &w.proof) {
            conn.close(1u32.into(), b"mesh authentication failed");
            return Err("the relay could not prove the mesh key".to_string());
        }
        // The record must name the certificate it actually presented.
        let presented = conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(fingerprint));
        if presented.as_deref() != Some(w.relay.fingerprint.as_str()) {
            conn.close(1u32.into(), b"certificate does not match the relay record");
            return Err("its certificate does not match its record".to_string());
        }
        Ok((conn, w, send, recv))
    };
    match tokio::time::timeout(Duration::from_secs(10), setup).await {
        Ok(Ok((conn, w, send, recv))) => {
            mesh.state()
                .seeds
                .entry(addr)
                .and_modify(|v| *v = Some(w.relay.id.clone()));
            mesh.merge(&w.members);
            let me = mesh.me.id.clone();
            run_link(shared, mesh, conn, w.relay, me, send, recv, cancel).await;
        }
        Ok(Err(e)) => debug!(%addr, "mesh dial failed: {e}"),
        Err(_) => debug!(%addr, "mesh dial timed out"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_link(
    shared: Arc<crate::Shared>,
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    peer: RelayRecord,
    dialer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    cancel: CancellationToken,
) {
    if peer.id == mesh.me.id {
        conn.close(1u32.into(), b"same relay id");
        warn!(
            "a relay with this relay's own id ({}) dialled in; ids must be unique",
            peer.id
        );
        return;
    }
    if !mesh.register(&peer, &conn, &dialer) {
        conn.close(0u32.into(), b"duplicate mesh link");
        return;
    }
    info!(peer = %peer.id, "mesh link up");
    let gossip = async {
        loop {
            let notified = mesh.changed.notified();
            let f = if mesh.leaving.load(std::sync::atomic::Ordering::Relaxed) {
                Frame::MeshLeaving
            } else {
                Frame::MeshMembers(RelayMap {
                    relays: mesh.records(),
                })
            };
            if write_frame(&mut send, &f).await.is_err() {
                return;
            }
            notified.await;
        }
    };
    let listen = async {
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::MeshMembers(m))) => mesh.merge(&m.relays),
                Ok(Some(Frame::MeshLeaving)) => {
                    info!(peer = %peer.id, "relay is leaving the mesh");
                    mesh.state().leaving.insert(peer.id.clone());
                    mesh.recompute();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    // Requests the other relay sends us, each on its own stream.
    let rpcs = async {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        tasks.spawn(serve_rpc(shared.clone(), send, recv));
                    }
                    Err(_) => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.abort_all();
    };
    tokio::select! {
        _ = gossip => {}
        _ = listen => {}
        _ = rpcs => {}
        _ = conn.closed() => {}
        _ = cancel.cancelled() => conn.close(0u32.into(), b"relay leaving the mesh"),
    }
    mesh.unregister(&peer.id, &conn);
    info!(peer = %peer.id, reason = ?conn.close_reason(), "mesh link down");
}

/// Client TLS for mesh dials: any server certificate is accepted because
/// the link is authenticated by the channel-bound mesh-key proof (see the
/// module docs), and the certificate is then checked against the record.
#[derive(Debug)]
struct ProvenByMeshKey(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ProvenByMeshKey {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // The handshake signature is still checked: the peer holds the key
        // of the certificate it presented.
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProvenByMeshKey(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut c = quinn::ClientConfig::new(Arc::new(q));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(MESH_KEEPALIVE));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(MESH_IDLE).ok());
    t.max_concurrent_bidi_streams(4096u32.into());
    c.transport_config(Arc::new(t));
    Ok(c)
}

/// Dials seeds and learned members (the lower id dials the higher) until
/// `cancel`; owns every link it starts.
pub(crate) async fn dialer(
    shared: Arc<crate::Shared>,
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
) {
    let client = match client_config() {
        Ok(c) => c,
        Err(e) => {
            warn!("mesh disabled: {e}");
            return;
        }
    };
    let mut links = JoinSet::new();
    let mut dialing: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let mut tick = tokio::time::interval(REDIAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            _ = mesh.changed.notified() => {}
            Some(_) = links.join_next(), if !links.is_empty() => {}
        }
        dialing.retain(|_, h| !h.is_finished());
        let targets: Vec<String> = {
            let st = mesh.state();
            let linked = |id: &str| st.links.contains_key(id);
            let mut t: Vec<String> = st
                .seeds
                .iter()
                .filter(|(_, id)| id.as_deref().is_none_or(|id| !linked(id)))
                .map(|(a, _)| a.clone())
                .collect();
            for r in st.members.values() {
                if mesh.me.id < r.id && !linked(&r.id) {
                    if let Some(a) = r.addrs.first() {
                        t.push(a.clone());
                    }
                }
            }
            t
        };
        for addr in targets {
            if mesh.me.addrs.contains(&addr) || dialing.contains_key(&addr) {
                continue;
            }
            let h = links.spawn(dial(
                shared.clone(),
                mesh.clone(),
                endpoint.clone(),
                client.clone(),
                addr.clone(),
                cancel.clone(),
            ));
            dialing.insert(addr, h);
        }
    }
    mesh.close_all();
    while links.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_and_session() {
        let k = MeshKey::new(&"k".repeat(32)).unwrap();
        let other = MeshKey::new(&"x".repeat(32)).unwrap();
        let p = k.proof(b"session-1", b"client");
        assert!(k.verify(b"session-1", b"client", &p));
        assert!(!k.verify(b"session-2", b"client", &p), "another session");
        assert!(!k.verify(b"session-1", b"server", &p), "the other role");
        assert!(!other.verify(b"session-1", b"client", &p), "another key");
        assert!(MeshKey::new("short").is_err());
        assert_eq!(format!("{k:?}"), "MeshKey(<redacted>)");
    }
}
