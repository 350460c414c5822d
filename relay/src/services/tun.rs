//! TUN packets at the relay: one address allocator per namespace (kept in
//! `<data-dir>/tun/` when there is one), the table of attached peers by
//! address index, and the pump that carries a session's QUIC datagrams —
//! one IP packet each — to the peer its destination address names. A
//! packet whose source is not the sender's own address is dropped and
//! counted; one too big for the receiving connection is answered with
//! ICMP "fragmentation needed" / "packet too big".

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use swb_tunnel::{AddressPlan, Allocator, Packet};
use swb_wire::{Code, Refusal, TunAssigned};
use tokio_util::sync::CancellationToken;
use tracing::warn;

struct Attached {
    session: u64,
    conn: quinn::Connection,
}

struct Namespace {
    alloc: Allocator,
    attached: HashMap<u32, Attached>,
}

/// The relay's TUN state.
pub(crate) struct Tun {
    dir: Option<PathBuf>,
    v4: (std::net::Ipv4Addr, u8),
    spaces: Mutex<HashMap<String, Namespace>>,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

impl Tun {
    pub(crate) fn new(state_dir: Option<&std::path::Path>) -> Self {
        Self {
            dir: state_dir.map(|d| d.join("tun")),
            v4: swb_tunnel::addr::DEFAULT_V4_NET,
            spaces: Mutex::new(HashMap::new()),
        }
    }

    /// Assigns `name` of `ns` its addresses and routes packets for them to
    /// `conn` (replacing an earlier session of the same peer).
    pub(crate) fn join(
        &self,
        ns: &str,
        name: &str,
        want: Option<u32>,
        session: u64,
        conn: &quinn::Connection,
    ) -> Result<(TunAssigned, AddressPlan), Refusal> {
        let unavailable = |e: &dyn std::fmt::Display| {
            warn!("TUN addresses of a namespace: {e}");
            Refusal::new(Code::TUN_UNAVAILABLE, format!("no TUN address: {e}"))
        };
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        let space = match spaces.get_mut(ns) {
            Some(s) => s,
            None => {
                let plan =
                    AddressPlan::new(self.v4.0, self.v4.1, ns).map_err(|e| unavailable(&e))?;
                let alloc = match &self.dir {
                    Some(d) => {
                        std::fs::create_dir_all(d).map_err(|e| unavailable(&e))?;
                        Allocator::open(plan, &d.join(format!("{}.addresses", hex(ns))))
                            .map_err(|e| unavailable(&e))?
                    }
                    None => Allocator::in_memory(plan),
                };
                spaces.entry(ns.to_string()).or_insert(Namespace {
                    alloc,
                    attached: HashMap::new(),
                })
            }
        };
        let index = space
            .alloc
            .assign_wanting(name, want)
            .map_err(|e| match e {
                swb_tunnel::AddrError::Full(_) => {
                    Refusal::new(Code::NAMESPACE_FULL, format!("no TUN address: {e}"))
                }
                e => unavailable(&e),
            })?;
        space.attached.insert(
            index,
            Attached {
                session,
                conn: conn.clone(),
            },
        );
        let plan = *space.alloc.plan();
        let (v4, v6) = plan
            .addrs(index)
            .ok_or_else(|| unavailable(&"index out of range"))?;
        let mut v6_net = [0u8; 8];
        v6_net.copy_from_slice(&v6.octets()[..8]);
        let v4_net = u32::from(v4) & !((1u32 << (32 - u32::from(plan.v4_prefix()))) - 1);
        Ok((
            TunAssigned {
                index,
                v4_net: v4_net.to_be_bytes(),
                v4_prefix: plan.v4_prefix(),
                v6_net,
            },
            plan,
        ))
    }

    /// The address index `name` of `ns` has, if it ever joined.
    pub(crate) fn index_of(&self, ns: &str, name: &str) -> Option<u32> {
        let spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        spaces.get(ns)?.alloc.get(name)
    }

    /// The session `session` of the peer at `index` ended.
    pub(crate) fn leave(&self, ns: &str, index: u32, session: u64) {
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = spaces.get_mut(ns) {
            if s.attached.get(&index).is_some_and(|a| a.session == session) {
                s.attached.remove(&index);
            }
        }
    }

    /// The connection of the peer of `ns` that has address `dst`.
    fn route(&self, ns: &str, plan: &AddressPlan, dst: IpAddr) -> Option<quinn::Connection> {
        let i = plan.index_of(dst)?;
        let spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        spaces.get(ns)?.attached.get(&i).map(|a| a.conn.clone())
    }
}

/// Carries the datagrams `conn` sends (the session of the peer at `index`
/// of `ns`) until `stop` or the connection ends.
pub(crate) async fn pump(
    services: Arc<super::Services>,
    conn: quinn::Connection,
    ns: String,
    plan: AddressPlan,
    index: u32,
    stop: CancellationToken,
) {
    let Some((v4, v6)) = plan.addrs(index) else {
        return;
    };
    let (own4, own6) = (IpAddr::V4(v4), IpAddr::V6(v6));
    let m = &services.metrics;
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => return,
            d = conn.read_datagram() => match d {
                Ok(d) => d,
                Err(_) => return,
            },
        };
        let p = match Packet::parse(&d) {
            Ok(p) => p,
            Err(_) => {
                m.tun_packets.with_label_values(&["malformed"]).inc();
                continue;
            }
        };
        if p.src != own4 && p.src != own6 {
            m.tun_packets.with_label_values(&["spoofed"]).inc();
            continue;
        }
        let Some(to) = services.tun.route(&ns, &plan, p.dst) else {
            m.tun_packets.with_label_values(&["no_route"]).inc();
            continue;
        };
        match to.send_datagram(d.clone()) {
            Ok(()) => m.tun_packets.with_label_values(&["forwarded"]).inc(),
            Err(quinn::SendDatagramError::TooLarge) => {
                m.tun_packets.with_label_values(&["too_big"]).inc();
                let mtu = to
                    .max_datagram_size()
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(1200);
                if let Some(icmp) = swb_tunnel::build::too_big(&p, mtu) {
                    let _ = conn.send_datagram(icmp.into());
                }
            }
            Err(_) => m.tun_packets.with_label_values(&["no_route"]).inc(),
        }
    }
}
