//! TUN mode (`swbd up --tun`): a virtual interface with this peer's
//! addresses, its packets carried as QUIC datagrams through the relay.
//!
//! The interface outlives connections: it is made at the first
//! `TunAnswer` and kept through reconnects (the relay gives the same
//! address back). One task reads the interface for as long as the daemon
//! runs and sends each packet on the connection of the moment; one task
//! per connection reads its datagrams into the interface. Inbound packets
//! pass this peer's [`Policy`] (its exposed ports, ping, answers to its own
//! flows, or everything with `--tun-allow-all`); a closed port answers
//! with a TCP reset or ICMP unreachable, a packet too big for the path
//! with ICMP "fragmentation needed" / "packet too big", and TCP SYNs have
//! their MSS clamped to the interface MTU either way.

use crate::Shared;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use swb_tunnel::device::{Tun, TunConfig};
use swb_tunnel::{build, mss, Packet, Policy, Verdict};
use swb_wire::TunAssigned;
use tracing::{info, warn, Instrument};

/// The interface MTU at first: IPv6's minimum, which a QUIC datagram
/// carries on any path that takes 1350-byte UDP payloads. Once QUIC's
/// path MTU discovery found more, the interface follows ([`mtu_for`]).
pub const TUN_MTU: u16 = 1280;
/// Room kept between the relay connection's largest datagram and the
/// interface MTU: a mesh hop's header (namespace and index, up to 69
/// bytes) and a little for a path that shrinks before QUIC notices.
const MTU_HEADROOM: usize = 80;
/// The largest QUIC packet a UDP path over Ethernet discovers (quinn's
/// bound): what the interface is sized for, whatever this daemon's own
/// path takes, since the peer's path to its relay may be no larger.
const UDP_MTU_BOUND: usize = 1452;
/// How often the interface MTU is checked against the connection's.
const MTU_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// The interface MTU for a connection whose datagrams carry up to
/// `max_datagram` bytes: that less [`MTU_HEADROOM`], between [`TUN_MTU`]
/// and the interface's maximum. Packets bigger than the path of the moment
/// still get ICMP "too big" (here or at the relay).
pub fn mtu_for(max_datagram: usize) -> u16 {
    let m = max_datagram.saturating_sub(MTU_HEADROOM);
    u16::try_from(m)
        .unwrap_or(u16::MAX)
        .clamp(TUN_MTU, swb_tunnel::device::MAX_MTU)
}

/// What `--tun` asks for.
#[derive(Debug, Clone)]
pub struct TunSettings {
    /// Interface name.
    pub name: String,
    /// Let every packet in (`--tun-allow-all`), not just exposed ports.
    pub allow_all: bool,
}

/// Why TUN mode is off.
#[derive(Debug, Clone)]
pub(crate) struct TunError {
    /// What to tell the user.
    pub(crate) reason: String,
    /// The interface cannot be made here: no use asking the relay again.
    pub(crate) lasting: bool,
}

/// Records why TUN mode is off (and logs it, once per reason).
pub(crate) fn off(shared: &Shared, reason: String, lasting: bool) {
    let mut slot = shared.tun_error.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().map(|e| &e.reason) != Some(&reason) {
        warn!("TUN mode off: {reason}");
    }
    *slot = Some(TunError { reason, lasting });
}

/// Whether to ask the relay for TUN addresses on a new connection.
pub(crate) fn wanted(shared: &Shared) -> bool {
    shared.config.tun.is_some()
        && !shared
            .tun_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|e| e.lasting)
}

/// A running interface.
pub(crate) struct TunState {
    dev: Tun,
    /// The namespace's plan and this peer's place in it, as the relay's
    /// allocator last answered (the interface follows a new answer).
    at: tokio::sync::watch::Sender<TunAssigned>,
    /// The connection (`stable_id`) whose datagram pump runs (a second
    /// answer on it starts none).
    pumped: Mutex<Option<usize>>,
    policy: Mutex<Policy>,
    /// Peer name → index, as the relay answered, and when (an index moves
    /// when addresses handed out apart are reconciled: [`NAME_TTL`]).
    known: Mutex<swb_tunnel::names::TtlMap<String, u32>>,
}

impl std::fmt::Debug for TunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.addrs();
        f.debug_struct("TunState")
            .field("dev", &self.dev)
            .field("v4", &v4)
            .field("v6", &v6)
            .finish()
    }
}

impl TunState {
    /// The interface's name.
    pub(crate) fn interface(&self) -> &str {
        self.dev.name()
    }

    /// This peer's index in the namespace.
    pub(crate) fn index(&self) -> u32 {
        self.at.borrow().index
    }

    /// This peer's addresses now.
    pub(crate) fn addrs(&self) -> (Ipv4Addr, Ipv6Addr) {
        let a = *self.at.borrow();
        addrs(&a, a.index)
    }

    /// Moves the interface to the addresses of `a` (the allocator gave
    /// another index than the one it had: another relay handed that one out
    /// while it did not see the allocator). Connections on the old
    /// addresses end; the name responder moves too.
    fn readdress(&self, a: &TunAssigned) -> std::io::Result<()> {
        let old = *self.at.borrow();
        let (_, old6) = addrs(&old, old.index);
        let (v4, v6) = addrs(a, a.index);
        self.dev
            .readdress((v4, a.v4_prefix), Some((v6, 64)), Some((old6, 64)))?;
        self.at.send_replace(*a);
        Ok(())
    }

    /// The interface MTU of the moment.
    pub(crate) fn mtu(&self) -> u16 {
        self.dev.mtu()
    }

    /// Whether the interface has segmentation offload.
    pub(crate) fn offload(&self) -> bool {
        self.dev.offload()
    }

    fn policy(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The addresses of `index` in the plan `a` came with.
fn addrs(a: &TunAssigned, index: u32) -> (Ipv4Addr, Ipv6Addr) {
    let v4 = Ipv4Addr::from(u32::from_be_bytes(a.v4_net) | index);
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&a.v6_net);
    o[12..].copy_from_slice(&index.to_be_bytes());
    (v4, Ipv6Addr::from(o))
}

/// Takes the relay's answer on `conn`: makes the interface the first time
/// (the reader task with it), and starts this connection's datagram pump.
pub(crate) fn assigned(shared: &Arc<Shared>, a: &TunAssigned, conn: &quinn::Connection) {
    let Some(settings) = shared.config.tun.clone() else {
        return;
    };
    let (v4, v6) = addrs(a, a.index);
    let state = {
        let mut slot = shared.tun.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(s) if *s.at.borrow() == *a => s.clone(),
            Some(s) => {
                // The allocator gave another index (another relay handed
                // ours out while it did not see the allocator, or the
                // allocator lost its table): peers reach us at the new
                // addresses, so the interface moves there.
                let (had, _) = s.addrs();
                match s.readdress(a) {
                    Ok(()) => {
                        warn!(interface = %s.interface(), %had, now = %v4, "the relay's allocator gave this peer other TUN addresses: the interface moved to them (connections on the old ones end)")
                    }
                    Err(e) => {
                        off(
                            shared,
                            format!("cannot move the TUN interface to {v4}: {e}"),
                            true,
                        );
                        return;
                    }
                }
                s.clone()
            }
            None => {
                let dev = match Tun::create(&TunConfig {
                    name: settings.name.clone(),
                    v4: (v4, a.v4_prefix),
                    v6: Some((v6, 64)),
                    mtu: TUN_MTU,
                }) {
                    Ok(d) => d,
                    Err(e) => {
                        off(shared, e.to_string(), true);
                        return;
                    }
                };
                let ports = shared
                    .exposures()
                    .iter()
                    .map(|e| e.port)
                    .collect::<Vec<_>>();
                let s = Arc::new(TunState {
                    dev,
                    at: tokio::sync::watch::Sender::new(*a),
                    pumped: Mutex::new(None),
                    policy: Mutex::new(Policy::new(ports, settings.allow_all)),
                    known: Mutex::new(swb_tunnel::names::TtlMap::new(NAME_TTL, NAME_CACHE)),
                });
                info!(interface = %s.interface(), %v4, %v6, offload = s.dev.offload(), "TUN interface up");
                *shared.tun_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *slot = Some(s.clone());
                shared
                    .tasks
                    .spawn(from_interface(shared.clone(), s.clone()).in_current_span());
                shared
                    .tasks
                    .spawn(names(shared.clone(), s.clone()).in_current_span());
                s
            }
        }
    };
    let first = state
        .pumped
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(conn.stable_id())
        != Some(conn.stable_id());
    if first {
        shared.tasks.spawn(follow_mtu(state.clone(), conn.clone()));
        shared
            .tasks
            .spawn(from_relay(shared.clone(), state, conn.clone()));
    }
}

/// Keeps the interface MTU at what `conn`'s path carries ([`mtu_for`]),
/// for as long as the connection lives: up once QUIC's path MTU discovery
/// found room, down when the path shrinks.
async fn follow_mtu(s: Arc<TunState>, conn: quinn::Connection) {
    let mut tick = tokio::time::interval(MTU_CHECK);
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tick.tick() => {}
        }
        let Some(max) = conn.max_datagram_size() else {
            return;
        };
        // Over the TCP carrier (or a loopback or jumbo-frame link) the relay
        // path takes far larger packets than a peer's UDP path may: the
        // interface stays at what an Ethernet UDP path could give (the same
        // datagram overhead, on quinn's MTU bound).
        let mtu = usize::from(conn.stats().path.current_mtu);
        let max = max.saturating_sub(mtu.saturating_sub(UDP_MTU_BOUND));
        let (want, now) = (mtu_for(max), s.dev.mtu());
        if want != now {
            match s.dev.set_mtu(want) {
                Ok(()) => {
                    info!(interface = %s.interface(), from = now, to = want, "TUN interface MTU follows the relay path")
                }
                Err(e) => {
                    warn!(interface = %s.interface(), "cannot set the TUN interface MTU to {want}: {e}");
                    return;
                }
            }
        }
    }
}

/// The exposed ports changed (a reload): the policy follows.
pub(crate) fn exposures_changed(shared: &Shared) {
    if let Some(s) = &*shared.tun.lock().unwrap_or_else(|p| p.into_inner()) {
        let ports = shared
            .exposures()
            .iter()
            .map(|e| e.port)
            .collect::<Vec<_>>();
        s.policy().set_ports(ports);
    }
}

/// Packets the local stack sends into the interface → the relay, a
/// batch (one 64 KiB burst with offload) at a time.
async fn from_interface(shared: Arc<Shared>, s: Arc<TunState>) {
    let mut r = s.dev.reader();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            res = s.dev.recv_batch(&mut r) => if let Err(e) = res {
                warn!("reading the TUN interface failed: {e}; TUN mode off");
                return;
            },
        };
        let conn = shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let max = conn
            .as_ref()
            .and_then(|c| c.max_datagram_size())
            .unwrap_or(0);
        let now = std::time::Instant::now();
        let mtu = s.dev.mtu();
        let (clamp4, clamp6) = (mss::mss_for(mtu, true), mss::mss_for(mtu, false));
        let (own4, own6) = s.addrs();
        let (own4, own6) = (IpAddr::V4(own4), IpAddr::V6(own6));
        let mut too_big = Vec::new();
        {
            let mut policy = s.policy();
            let c = &shared.metrics.tun_dropped;
            for pkt in r.packets() {
                mss::clamp(pkt, clamp4, clamp6);
                let Ok(p) = Packet::parse(pkt) else {
                    c.malformed.inc();
                    continue;
                };
                // Only what this peer sends as itself (not a router's traffic).
                if p.src != own4 && p.src != own6 {
                    c.not_own_source.inc();
                    continue;
                }
                policy.outbound(&p, now);
                let Some(conn) = &conn else { continue };
                if p.bytes.len() > max {
                    c.too_big.inc();
                    let mtu = u16::try_from(max).unwrap_or(u16::MAX).max(576);
                    too_big.extend(build::too_big(&p, mtu));
                    continue;
                }
                let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(p.bytes));
            }
        }
        for icmp in too_big {
            let _ = s.dev.send(&icmp).await;
        }
    }
}

/// Datagrams from the relay on `conn` → the local stack, through the
/// policy: what is already queued goes in one batch (coalesced with
/// offload), so a burst costs the kernel one pass, and one packet alone
/// is not held back. Ends with the connection.
async fn from_relay(shared: Arc<Shared>, s: Arc<TunState>, conn: quinn::Connection) {
    use futures_util::FutureExt;
    let c = &shared.metrics.tun_dropped;
    let mut w = s.dev.writer();
    while let Ok(first) = conn.read_datagram().await {
        let mut next = Some(first);
        let (own4, own6) = s.addrs();
        let (own4, own6) = (IpAddr::V4(own4), IpAddr::V6(own6));
        {
            let mut policy = s.policy();
            let now = std::time::Instant::now();
            while let Some(d) = next.take() {
                match Packet::parse(&d) {
                    Ok(p) if p.dst == own4 || p.dst == own6 => match policy.inbound(&p, now) {
                        Verdict::Allow => {
                            w.push(p.bytes);
                        }
                        Verdict::Refuse => {
                            c.refused.inc();
                            if let Some(answer) = build::refuse(&p) {
                                let _ = conn.send_datagram(answer.into());
                            }
                        }
                        Verdict::Drop => c.filtered.inc(),
                    },
                    _ => c.malformed.inc(),
                }
                if !w.is_full() {
                    next = conn.read_datagram().now_or_never().and_then(Result::ok);
                }
            }
        }
        if let Err(e) = s.dev.send_batch(&mut w).await {
            warn!("writing the TUN interface failed: {e}");
            return;
        }
    }
}

/// How long the name responder waits for the relay.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Names remembered (unknown names are asked again).
const NAME_CACHE: usize = 4096;
/// How long a remembered name → index holds.
const NAME_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The index of peer `name`: `Some(None)` when it has none, `None` when
/// the relay did not answer in time.
async fn resolve(shared: &Shared, name: &str) -> Option<Option<u32>> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    let cmd = crate::session::Cmd::TunResolve {
        name: name.to_string(),
        reply,
    };
    shared.cmd_tx.send(cmd).await.ok()?;
    tokio::time::timeout(RESOLVE_TIMEOUT, rx).await.ok()?.ok()
}

/// The TUN addresses of peer `name`: `Some(None)` when it has none,
/// `None` when the relay did not answer in time.
pub(crate) async fn lookup(
    shared: &Shared,
    s: &TunState,
    name: &str,
) -> Option<Option<(Ipv4Addr, Ipv6Addr)>> {
    if name == shared.config.name {
        return Some(Some(s.addrs()));
    }
    let known = s
        .known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .copied();
    let index = match known {
        Some(i) => Some(i),
        None => resolve(shared, name).await?,
    };
    let Some(i) = index else {
        return Some(None);
    };
    s.known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_string(), i);
    let plan = *s.at.borrow();
    Some(Some(addrs(&plan, i)))
}

/// Peers `swbd peers` lists with TUN addresses at most (each may cost the
/// relay a lookup).
const ANNOTATE_MAX: usize = 1024;

/// Adds each peer's TUN addresses to `views` when this daemon runs TUN.
pub(crate) async fn annotate(shared: &Shared, views: &mut [crate::status::StatusView]) {
    let s = shared.tun.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(s) = s else { return };
    for v in views.iter_mut().take(ANNOTATE_MAX) {
        if let Some(Some((v4, v6))) = lookup(shared, &s, &v.name).await {
            v.tun = Some(crate::control::TunAddrs {
                ipv4: v4.to_string(),
                ipv6: v6.to_string(),
            });
        }
    }
}

/// The name responder: `NAME.switchboard` → the peer's addresses, at this
/// peer's IPv4 address, port 53. Points systemd-resolved at it for the
/// `switchboard` domain of the interface when `resolvectl` is there.
async fn names(shared: Arc<Shared>, s: Arc<TunState>) {
    use swb_tunnel::dns::Query;
    let mut moved = s.at.subscribe();
    let mut buf = vec![0u8; 1500];
    // Bound again at the new address when the interface moves.
    'bind: loop {
        moved.borrow_and_update();
        let (v4, _) = s.addrs();
        let sock = match tokio::net::UdpSocket::bind((v4, 53)).await {
            Ok(sock) => sock,
            Err(e) => {
                warn!("no name responder at {v4}:53: {e}");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    r = moved.changed() => if r.is_err() { return } else { continue 'bind },
                }
            }
        };
        split_dns(&s).await;
        loop {
            let (n, from) = tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = moved.changed() => if r.is_err() { return } else { continue 'bind },
                r = sock.recv_from(&mut buf) => match r {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            let Ok(q) = Query::parse(&buf[..n]) else {
                continue;
            };
            let reply = match q.peer() {
                None => q.refused(),
                Some(name) => match lookup(&shared, &s, name).await {
                    Some(Some((v4, v6))) => q.answer(&[IpAddr::V4(v4), IpAddr::V6(v6)]),
                    Some(None) => q.nxdomain(),
                    None => q.servfail(),
                },
            };
            let _ = sock.send_to(&reply, from).await;
        }
    }
}

/// Asks systemd-resolved to send `*.switchboard` to the responder on this
/// interface (split DNS, like Tailscale's MagicDNS); says what to do
/// instead where there is no `resolvectl`.
async fn split_dns(s: &TunState) {
    let dns = s.addrs().0.to_string();
    if point_resolver("resolvectl", s.interface(), &dns).await {
        info!(responder = %dns, "NAME.switchboard resolves through systemd-resolved");
    } else {
        info!(
            responder = %dns,
            "NAME.switchboard: no systemd-resolved here; point the resolver at {dns} (e.g. `nameserver {dns}` first in /etc/resolv.conf) to use names"
        );
    }
}

/// `resolvectl dns IFC DNS` and `resolvectl domain IFC ~switchboard` with
/// `program`: whether both succeeded.
async fn point_resolver(program: &str, ifc: &str, dns: &str) -> bool {
    let run = |args: [String; 3]| {
        let program = program.to_string();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(program)
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|st| st.success())
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        }
    };
    run(["dns".into(), ifc.into(), dns.into()]).await
        && run(["domain".into(), ifc.into(), "~switchboard".into()]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interface_mtu_follows_the_datagram_size_within_its_bounds() {
        // quinn's first 1200-byte packets: IPv6's minimum still.
        assert_eq!(mtu_for(1_162), TUN_MTU);
        assert_eq!(mtu_for(0), TUN_MTU);
        // An Ethernet path after discovery (1452-byte UDP payloads).
        assert_eq!(mtu_for(1_420), 1_340);
        // Jumbo paths: at most the interface maximum.
        assert_eq!(mtu_for(8_900), swb_tunnel::device::MAX_MTU);
    }

    #[tokio::test]
    async fn split_dns_gives_systemd_resolved_the_responder_and_the_domain() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("calls");
        let fake = dir.path().join("resolvectl");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let fake = fake.to_str().expect("utf-8");
        assert!(point_resolver(fake, "swb0", "100.64.0.7").await);
        let calls = std::fs::read_to_string(&log).expect("log");
        assert_eq!(calls, "dns swb0 100.64.0.7\ndomain swb0 ~switchboard\n");
        // No resolvectl, or one that fails: false (the daemon says what to
        // do instead).
        assert!(!point_resolver("/nonexistent/resolvectl", "swb0", "100.64.0.7").await);
        assert!(!point_resolver("false", "swb0", "100.64.0.7").await);
    }
}
