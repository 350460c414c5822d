//! Mesh links: dialing (the lower id dials the higher, seeds by everyone
//! until identified), accepting, and running a link — keep-alives and
//! gossip on its control stream, and every call the other relay opens on
//! its own stream. Each link reports to [`super::membership`].

use super::auth::{self, CLIENT, MESH_STREAMS, SERVER};
use super::membership::MESH_KEEPALIVE;
use super::{LinkEntry, Mesh};
use crate::services::splice::write_frame;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{
    close, Frame, MeshHello, MeshWelcome, Ping, RelayMap, RelayRecord, PROTOCOL_VERSION,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Time a mesh handshake (dial or accept, proofs both ways) may take.
pub(crate) const MESH_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the dialer looks for relays to (re)dial.
const REDIAL: Duration = Duration::from_millis(500);

/// Reads a frame of a mesh stream (at most `MAX_FRAME_LEN`).
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
) -> Result<Option<Frame>, swb_quic::FrameIoError> {
    swb_quic::read_frame(recv, swb_wire::MAX_FRAME_LEN).await
}

/// Why a mesh handshake failed.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{0}")]
    Io(#[from] swb_quic::FrameIoError),
    #[error("connection: {0}")]
    Conn(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("no TLS keying material")]
    NoKeyingMaterial,
    #[error("the first mesh frame is not MeshHello")]
    NoHello,
    #[error("no MeshWelcome (wrong mesh key?)")]
    NoWelcome,
    #[error("mesh key proof failed")]
    BadProof,
    #[error("the relay could not prove the mesh key")]
    ServerProof,
    #[error("its certificate does not match its record")]
    CertificateMismatch,
}

impl Mesh {
    /// Registers a link; false if a better link to the same relay exists
    /// (the one the smaller id dialled wins).
    fn register(&self, peer: &RelayRecord, conn: &quinn::Connection, dialer: &str) -> bool {
        {
            let mut links = self.links();
            if let Some(existing) = links.get(&peer.id) {
                let preferred = std::cmp::min(self.me.id.as_str(), peer.id.as_str());
                if existing.conn.close_reason().is_none() && existing.dialer == preferred {
                    return false;
                }
                existing
                    .conn
                    .close(close::REFUSED.into(), b"duplicate mesh link");
            }
            links.insert(
                peer.id.clone(),
                LinkEntry {
                    conn: conn.clone(),
                    dialer: dialer.to_string(),
                    uses: Arc::new(()),
                    surplus_since: None,
                },
            );
            self.membership().link_up(peer, tokio::time::Instant::now());
        }
        self.publish();
        self.changed.notify_waiters();
        true
    }

    /// Whether `conn` is the registered link to `id`.
    fn is_current(&self, id: &str, conn: &quinn::Connection) -> bool {
        self.links()
            .get(id)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
    }

    fn unregister(&self, id: &str, conn: &quinn::Connection) {
        {
            let mut links = self.links();
            if links
                .get(id)
                .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
            {
                links.remove(id);
                self.membership().link_down(id, tokio::time::Instant::now());
            }
        }
        self.publish();
        self.changed.notify_waiters();
    }

    fn merge(&self, records: &[RelayRecord]) {
        let new = self
            .membership()
            .merge(records, tokio::time::Instant::now());
        if new {
            self.changed.notify_waiters();
        }
    }
}

/// Serves an inbound mesh link (ALPN `swb-mesh/1`) until it ends. The
/// handshake permit is held until the other relay proved the mesh key.
pub(crate) async fn accept(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    permit: tokio::sync::OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    // A relay that announced it is leaving takes no new links: one made
    // now would make it live again to the other side until it times out.
    if mesh.leaving.load(Ordering::Relaxed) {
        conn.close(close::NORMAL.into(), b"relay leaving the mesh");
        return;
    }
    let remote = conn.remote_address();
    let setup = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let Some(Frame::MeshHello(h)) = read_frame(&mut recv).await? else {
            return Err(SetupError::NoHello);
        };
        let ekm = auth::ekm(&conn).ok_or(SetupError::NoKeyingMaterial)?;
        if h.version != PROTOCOL_VERSION || !mesh.key.verify(&ekm, CLIENT, &h.proof) {
            return Err(SetupError::BadProof);
        }
        let mut members = mesh.membership().gossip(tokio::time::Instant::now());
        members.truncate(swb_wire::RELAY_MAP_PAGE);
        let welcome = MeshWelcome {
            relay: mesh.me.clone(),
            proof: mesh.key.proof(&ekm, SERVER),
            members,
        };
        write_frame(&mut send, &Frame::MeshWelcome(welcome)).await?;
        Ok((h.relay, send, recv))
    };
    let setup = async {
        tokio::select! {
            r = tokio::time::timeout(MESH_SETUP_TIMEOUT, setup) => r,
            never = crate::limits::discard_datagrams(&conn, &mesh.services.metrics.tun.not_joined) => match never {},
        }
    };
    let (peer, send, recv) = match setup.await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            mesh.services.metrics.mesh_refused.inc();
            static REFUSED_LOG: crate::limits::LogLimit =
                crate::limits::LogLimit::new(std::time::Duration::from_secs(10));
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(%remote, suppressed, "mesh link refused: {e}");
            }
            conn.close(close::REFUSED.into(), b"mesh authentication failed");
            return;
        }
        Err(_) => {
            conn.close(close::REFUSED.into(), b"mesh handshake timed out");
            return;
        }
    };
    drop(permit);
    // Proven: now it may carry every forwarded stream and call.
    conn.set_max_concurrent_bi_streams(MESH_STREAMS.into());
    conn.set_receive_window(swb_quic::MESH_RECEIVE_WINDOW.into());
    let dialer = peer.id.clone();
    run_link(mesh, conn, peer, dialer, send, recv, cancel).await;
}

/// Dials `addr` and runs the link until it ends.
async fn dial(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: String,
    cancel: CancellationToken,
) {
    let setup = async {
        let sa = tokio::net::lookup_host(&addr)
            .await
            .map_err(|_| SetupError::Resolve(addr.clone()))?
            .next()
            .ok_or_else(|| SetupError::Resolve(addr.clone()))?;
        let conn = endpoint.connect_with(client, sa, "relay")?.await?;
        let ekm = auth::ekm(&conn).ok_or(SetupError::NoKeyingMaterial)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = MeshHello {
            version: PROTOCOL_VERSION,
            relay: mesh.me.clone(),
            proof: mesh.key.proof(&ekm, CLIENT),
        };
        write_frame(&mut send, &Frame::MeshHello(hello)).await?;
        let Some(Frame::MeshWelcome(w)) = read_frame(&mut recv).await? else {
            return Err(SetupError::NoWelcome);
        };
        if !mesh.key.verify(&ekm, SERVER, &w.proof) {
            conn.close(close::REFUSED.into(), b"mesh authentication failed");
            return Err(SetupError::ServerProof);
        }
        // The record must name the certificate it actually presented.
        let presented = conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(crate::tls::fingerprint));
        if presented.as_deref() != Some(w.relay.fingerprint.as_str()) {
            conn.close(
                close::REFUSED.into(),
                b"certificate does not match the relay record",
            );
            return Err(SetupError::CertificateMismatch);
        }
        Ok((conn, w, send, recv))
    };
    match tokio::time::timeout(MESH_SETUP_TIMEOUT, setup).await {
        Ok(Ok((conn, w, send, recv))) => {
            mesh.seeds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(addr)
                .and_modify(|v| *v = Some(w.relay.id.clone()));
            mesh.merge(&w.members);
            let me = mesh.me.id.clone();
            run_link(mesh, conn, w.relay, me, send, recv, cancel).await;
        }
        Ok(Err(e)) => debug!(%addr, "mesh dial failed: {e}"),
        Err(_) => debug!(%addr, "mesh dial timed out"),
    }
}

/// Runs a proven link: keep-alives and gossip out, membership news in,
/// and the calls the other relay opens, each on its own stream.
async fn run_link(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    peer: RelayRecord,
    dialer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    cancel: CancellationToken,
) {
    if peer.id == mesh.me.id {
        conn.close(close::REFUSED.into(), b"same relay id");
        warn!(
            "a relay with this relay's own id ({}) dialled in; ids must be unique",
            peer.id
        );
        return;
    }
    if !mesh.register(&peer, &conn, &dialer) {
        conn.close(close::REFUSED.into(), b"duplicate mesh link");
        return;
    }
    info!(peer = %peer.id, "mesh link up");
    // Ranked: membership news first, then keep-alives.
    let speak = async {
        let mut keepalive = tokio::time::interval(MESH_KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        // What this link was last told this relay hears: the whole map
        // once, then only what changed.
        let mut told: Option<BTreeMap<String, RelayRecord>> = None;
        loop {
            let notified = mesh.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let frames: Vec<Frame> = if mesh.leaving.load(Ordering::Relaxed) {
                vec![Frame::MeshLeaving]
            } else {
                let now: BTreeMap<String, RelayRecord> = mesh
                    .membership()
                    .gossip(tokio::time::Instant::now())
                    .into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect();
                let frames = gossip_frames(told.as_ref(), &now, &mesh.me);
                told = Some(now);
                frames
            };
            for f in &frames {
                if write_frame(&mut send, f).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    biased;
                    _ = &mut notified => break,
                    _ = keepalive.tick() => {
                        nonce += 1;
                        if write_frame(&mut send, &Frame::Ping(Ping { nonce })).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let listen = async {
        let mut pages = swb_wire::RelayMapPages::default();
        loop {
            let f = read_frame(&mut recv).await;
            if let Ok(Some(_)) = &f {
                mesh.membership()
                    .heard(&peer.id, tokio::time::Instant::now());
            }
            // A link replaced by a newer one to the same relay may still
            // deliver old news: only the registered link speaks for it.
            let current = mesh.is_current(&peer.id, &conn);
            match f {
                Ok(Some(Frame::MeshMembersDelta(_) | Frame::MeshMembers(_))) if !current => {}
                Ok(Some(Frame::MeshMembersDelta(d))) => {
                    let new = mesh.membership().claims_changed(
                        &peer.id,
                        &d.add,
                        &d.remove,
                        tokio::time::Instant::now(),
                    );
                    mesh.publish();
                    if new {
                        mesh.changed.notify_waiters();
                    }
                }
                // A neighbour's whole gossip: the relays it hears.
                Ok(Some(Frame::MeshMembers(m))) => {
                    if let Some(all) = pages.add(m) {
                        let new =
                            mesh.membership()
                                .claimed(&peer.id, &all, tokio::time::Instant::now());
                        mesh.publish();
                        if new {
                            mesh.changed.notify_waiters();
                        }
                    }
                }
                Ok(Some(Frame::MeshLeaving)) if !mesh.ignore_leaving.load(Ordering::Relaxed) => {
                    info!(peer = %peer.id, "relay is leaving the mesh");
                    mesh.membership().leaving(&peer.id);
                    mesh.publish();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    // Calls the other relay sends us, each on its own stream.
    let calls = async {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let m = mesh.clone();
                        let using = mesh.conn_to(&peer.id).map(|(_, u)| u);
                        let from = peer.id.clone();
                        tasks.spawn(mesh.tasks.track_future(async move {
                            let _using = using;
                            super::calls_in::serve(&m, &from, send, recv).await;
                        }));
                    }
                    Err(_) => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    };
    // TUN packets for peers attached here, as datagrams.
    let packets = async {
        while let Ok(d) = conn.read_datagram().await {
            match super::calls_out::decode_via(&d) {
                Some((to, inner)) => mesh.pass_datagram(to, d.slice(inner..)),
                None => mesh
                    .services
                    .tun
                    .deliver_from_mesh(&mesh.services.metrics, d),
            }
        }
    };
    tokio::select! {
        _ = speak => {}
        _ = listen => {}
        _ = calls => {}
        _ = packets => {}
        _ = conn.closed() => {}
        _ = cancel.cancelled() => conn.close(close::NORMAL.into(), b"relay leaving the mesh"),
    }
    mesh.unregister(&peer.id, &conn);
    info!(peer = %peer.id, reason = ?conn.close_reason(), "mesh link down");
}

/// What to tell a link of the relays this relay hears (`now`, itself
/// included) when it was last told `told`: the whole map the first time
/// (or when the changes would not fit a frame), else the changes, else
/// nothing.
fn gossip_frames(
    told: Option<&BTreeMap<String, RelayRecord>>,
    now: &BTreeMap<String, RelayRecord>,
    me: &RelayRecord,
) -> Vec<Frame> {
    let whole = || {
        // This relay's own record first, as receivers expect.
        let mut all = vec![me.clone()];
        all.extend(now.values().filter(|r| r.id != me.id).cloned());
        RelayMap::pages(&all)
            .into_iter()
            .map(Frame::MeshMembers)
            .collect()
    };
    let Some(told) = told else {
        return whole();
    };
    let add: Vec<RelayRecord> = now
        .values()
        .filter(|r| told.get(&r.id) != Some(*r))
        .cloned()
        .collect();
    let remove: Vec<String> = told
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    if add.is_empty() && remove.is_empty() {
        Vec::new()
    } else if swb_wire::MeshMembersDelta::fits(add.len(), remove.len()) {
        vec![Frame::MeshMembersDelta(swb_wire::MeshMembersDelta {
            add,
            remove,
        })]
    } else {
        whole()
    }
}

/// How long a link the grid does not want stays up unused before it is
/// closed (a mesh growing past `--full-mesh-max` thins out to the grid).
const SURPLUS_GRACE: Duration = Duration::from_secs(10);

impl Mesh {
    /// Closes links the grid does not want that nothing used for
    /// [`SURPLUS_GRACE`].
    fn close_surplus(&self, now: tokio::time::Instant) {
        let surplus = self.membership().surplus(now);
        let mut links = self.links();
        for (id, l) in links.iter_mut() {
            let idle = Arc::strong_count(&l.uses) == 1;
            if !surplus.contains(id) || !idle {
                l.surplus_since = None;
                continue;
            }
            let since = *l.surplus_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= SURPLUS_GRACE {
                debug!(peer = %id, "closing a mesh link the grid does not want");
                l.conn.close(close::NORMAL.into(), b"link not in the grid");
            }
        }
    }
}

/// Dials seeds and learned members until `cancel`, ages out records and
/// re-checks link silence; owns every link it starts (and `accepted`,
/// the links other relays dialled, which arrive through `incoming`).
pub(crate) async fn dialer(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    mut incoming: tokio::sync::mpsc::Receiver<(
        quinn::Connection,
        tokio::sync::OwnedSemaphorePermit,
    )>,
    cancel: CancellationToken,
) {
    let client = match auth::client_config() {
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
        // Ranked: stop first, then links other relays dialled, then redials.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some((conn, permit)) = incoming.recv() => {
                links.spawn(mesh.tasks.track_future(accept(mesh.clone(), conn, permit, cancel.clone())));
                continue;
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            _ = tick.tick() => {}
            _ = mesh.changed.notified() => {}
        }
        let now = tokio::time::Instant::now();
        let gone = mesh.membership().expire(now);
        if !gone.is_empty() {
            debug!(?gone, "forgot relays nobody has heard of for a while");
        }
        // Silent links leave the live set even before QUIC gives up on them,
        // and out of this relay's gossip: neighbours hear of it.
        mesh.publish();
        if mesh.membership().gossip_changed(now) {
            mesh.changed.notify_waiters();
        }
        mesh.close_surplus(now);
        dialing.retain(|_, h| !h.is_finished());
        if mesh.leaving.load(Ordering::Relaxed) {
            // Leaving: no new links (see `accept`).
            continue;
        }
        let targets: Vec<String> = {
            let live = mesh.placement.live_now();
            let m = mesh.membership();
            // A seed is dialled until it is known and live by any path (past
            // --full-mesh-max it need not be a neighbour).
            let mut t: Vec<String> = mesh
                .seeds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, id)| {
                    id.as_deref()
                        .is_none_or(|id| !m.linked(id) && !live.relays.contains_key(id))
                })
                .map(|(a, _)| a.clone())
                .collect();
            t.extend(
                m.dial_targets(now)
                    .into_iter()
                    .filter_map(|r| r.addrs.first().cloned()),
            );
            t
        };
        for addr in targets {
            if mesh.me.addrs.contains(&addr) || dialing.contains_key(&addr) {
                continue;
            }
            let h = links.spawn(mesh.tasks.track_future(dial(
                mesh.clone(),
                endpoint.clone(),
                client.clone(),
                addr.clone(),
                cancel.clone(),
            )));
            dialing.insert(addr, h);
        }
    }
    mesh.close_all();
    while links.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, incarnation: u64) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            addrs: vec![format!("{id}.example:7443")],
            fingerprint: format!("sha256:{id}"),
            incarnation,
        }
    }

    fn map(rs: &[RelayRecord]) -> BTreeMap<String, RelayRecord> {
        rs.iter().map(|r| (r.id.clone(), r.clone())).collect()
    }

    #[test]
    fn a_link_hears_the_whole_map_once_then_only_changes() {
        let me = rec("m", 1);
        let first = map(&[rec("b", 1), me.clone(), rec("a", 1)]);
        let f = gossip_frames(None, &first, &me);
        let [Frame::MeshMembers(whole)] = f.as_slice() else {
            panic!("{f:?}")
        };
        let ids: Vec<&str> = whole.relays.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["m", "a", "b"], "own record first");
        assert!(gossip_frames(Some(&first), &first, &me).is_empty());
        let next = map(&[me.clone(), rec("a", 2), rec("c", 1)]);
        let f = gossip_frames(Some(&first), &next, &me);
        let [Frame::MeshMembersDelta(d)] = f.as_slice() else {
            panic!("{f:?}")
        };
        let added: Vec<&str> = d.add.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(added, ["a", "c"], "a restarted, c is new");
        assert_eq!(d.remove, ["b"]);
        // Too many changes for one frame: the whole map again.
        let many = map(&(0..swb_wire::RELAY_MAP_PAGE + 1)
            .map(|i| rec(&format!("r{i}"), 1))
            .collect::<Vec<_>>());
        let f = gossip_frames(Some(&first), &many, &me);
        assert!(f.iter().all(|f| matches!(f, Frame::MeshMembers(_))));
        assert!(f.len() >= 2);
    }
}
