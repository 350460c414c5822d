//! TUN packets at the relay.
//!
//! - **Addresses**: each namespace has one allocator, at the relay the
//!   ring makes home of the namespace's TUN key ([`TUN_KEY`]); it is kept
//!   in `<data-dir>/tun/` when there is one. Other relays ask it over the
//!   mesh (`MeshOp::TunAssign`, `TunIndex`, `TunWho`) and remember what
//!   they learned (an index never changes owner).
//! - **Packets**: which session has which index here, and packets that
//!   arrive from other relays as mesh-link datagrams
//!   (`[ns length][ns][index][packet]`). The pump that reads a session's
//!   datagrams is the session door's (`doors::tun`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use swb_tunnel::names::TtlMap;
use swb_tunnel::{AddressPlan, Allocator};
use swb_wire::{Code, Refusal, TunAssigned};
use tracing::warn;

/// The placement key of a namespace's TUN allocator (not a valid peer
/// name, so no peer shares its home by accident of naming).
pub(crate) const TUN_KEY: &str = "-tun-";
/// Names of one namespace that get a TUN address at most: addresses are
/// kept for good (stable across reconnects), so a key cycling through
/// names must not grow the table without end.
pub(crate) const MAX_ADDRESSES: u32 = 65_536;
/// Index → name answers remembered per namespace.
const NAME_CACHE: usize = 65_536;
/// How long a learned index → name holds: an index moves when two relays
/// that handed addresses out apart are reconciled.
const NAME_TTL: std::time::Duration = std::time::Duration::from_secs(30);

struct Attached {
    session: u64,
    conn: quinn::Connection,
}

struct Namespace {
    plan: AddressPlan,
    /// The allocator, when this relay is the namespace's TUN home.
    alloc: Option<Allocator>,
    attached: HashMap<u32, Attached>,
    /// Index → name learned from the allocator's relay.
    names: TtlMap<u32, String>,
}

/// The relay's TUN state.
pub(crate) struct Tun {
    dir: Option<PathBuf>,
    v4: (std::net::Ipv4Addr, u8),
    spaces: Mutex<HashMap<String, Namespace>>,
    /// Grows whenever a session attaches or leaves: a pump's own cache of
    /// index → connection is good while this has not moved.
    generation: std::sync::atomic::AtomicU64,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(e: &dyn std::fmt::Display) -> Refusal {
    warn!("TUN addresses of a namespace: {e}");
    Refusal::new(Code::TUN_UNAVAILABLE, format!("no TUN address: {e}"))
}

/// The answer a daemon gets for `index` of `plan`.
pub(crate) fn assigned(plan: &AddressPlan, index: u32) -> Option<TunAssigned> {
    let (v4, v6) = plan.addrs(index)?;
    let mut v6_net = [0u8; 8];
    v6_net.copy_from_slice(&v6.octets()[..8]);
    let v4_net = u32::from(v4) & !((1u32 << (32 - u32::from(plan.v4_prefix()))) - 1);
    Some(TunAssigned {
        index,
        v4_net: v4_net.to_be_bytes(),
        v4_prefix: plan.v4_prefix(),
        v6_net,
    })
}

impl Tun {
    pub(crate) fn new(state_dir: Option<&std::path::Path>, v4: (std::net::Ipv4Addr, u8)) -> Self {
        Self {
            dir: state_dir.map(|d| d.join("tun")),
            v4,
            spaces: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn spaces(&self) -> std::sync::MutexGuard<'_, HashMap<String, Namespace>> {
        self.spaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the namespace's entry (made on first use; with its
    /// allocator opened when `allocator`).
    fn with_space<T>(
        &self,
        ns: &str,
        allocator: bool,
        f: impl FnOnce(&mut Namespace) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut spaces = self.spaces();
        if !spaces.contains_key(ns) {
            let plan = AddressPlan::new(self.v4.0, self.v4.1, ns).map_err(|e| unavailable(&e))?;
            spaces.insert(
                ns.to_string(),
                Namespace {
                    plan,
                    alloc: None,
                    attached: HashMap::new(),
                    names: TtlMap::new(NAME_TTL, NAME_CACHE),
                },
            );
        }
        let space = spaces
            .get_mut(ns)
            .ok_or_else(|| unavailable(&"namespace entry vanished"))?;
        if allocator && space.alloc.is_none() {
            space.alloc = Some(
                match &self.dir {
                    Some(d) => {
                        std::fs::create_dir_all(d).map_err(|e| unavailable(&e))?;
                        Allocator::open(space.plan, &d.join(format!("{}.addresses", hex(ns))))
                            .map_err(|e| unavailable(&e))?
                    }
                    None => Allocator::in_memory(space.plan),
                }
                .with_limit(MAX_ADDRESSES),
            );
        }
        f(space)
    }

    /// The namespace's address plan.
    pub(crate) fn plan(&self, ns: &str) -> Result<AddressPlan, Refusal> {
        self.with_space(ns, false, |s| Ok(s.plan))
    }

    /// At the allocator's relay: the index of `name`, assigned if new.
    pub(crate) fn allocate(&self, ns: &str, name: &str, want: Option<u32>) -> Result<u32, Refusal> {
        self.with_space(ns, true, |s| {
            let alloc = s
                .alloc
                .as_mut()
                .ok_or_else(|| unavailable(&"no allocator"))?;
            alloc.assign_wanting(name, want).map_err(|e| match e {
                swb_tunnel::AddrError::Full(_) => {
                    Refusal::new(Code::NAMESPACE_FULL, format!("no TUN address: {e}"))
                }
                e => unavailable(&e),
            })
        })
    }

    /// At the allocator's relay: the index `name` has, if any.
    pub(crate) fn index_of(&self, ns: &str, name: &str) -> Option<u32> {
        self.with_space(ns, true, |s| Ok(s.alloc.as_ref().and_then(|a| a.get(name))))
            .ok()
            .flatten()
    }

    /// At the allocator's relay: who has index `i`.
    pub(crate) fn name_of(&self, ns: &str, i: u32) -> Option<String> {
        self.with_space(ns, true, |s| {
            Ok(s.alloc
                .as_ref()
                .and_then(|a| a.name_of(i))
                .map(str::to_string))
        })
        .ok()
        .flatten()
    }

    /// Who has index `i`, as learned before (any relay).
    pub(crate) fn cached_name(&self, ns: &str, i: u32) -> Option<String> {
        let spaces = self.spaces();
        spaces.get(ns)?.names.get(&i).cloned()
    }

    pub(crate) fn remember_name(&self, ns: &str, i: u32, name: &str) {
        let _ = self.with_space(ns, false, |s| {
            s.names.insert(i, name.to_string());
            Ok(())
        });
    }

    /// Routes packets for `index` of `ns` to `conn` (a session attached
    /// here; a later session of the same peer replaces it).
    pub(crate) fn attach(&self, ns: &str, index: u32, session: u64, conn: &quinn::Connection) {
        let _ = self.with_space(ns, false, |s| {
            s.attached.insert(
                index,
                Attached {
                    session,
                    conn: conn.clone(),
                },
            );
            self.bump();
            Ok(())
        });
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever the attached sessions change (see [`Tun::local`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The session `session` of the peer at `index` ended.
    pub(crate) fn leave(&self, ns: &str, index: u32, session: u64) {
        let mut spaces = self.spaces();
        if let Some(s) = spaces.get_mut(ns) {
            if s.attached.get(&index).is_some_and(|a| a.session == session) {
                s.attached.remove(&index);
                self.bump();
            }
        }
    }

    /// The connection of the peer at index `i` of `ns`, if attached here.
    /// Unchanged while [`Tun::generation`] is (read it first).
    pub(crate) fn local(&self, ns: &str, i: u32) -> Option<quinn::Connection> {
        self.spaces()
            .get(ns)?
            .attached
            .get(&i)
            .map(|a| a.conn.clone())
    }

    /// A packet from another relay for index `i` of `ns`: to its session.
    pub(crate) fn deliver_from_mesh(
        &self,
        metrics: &crate::metrics::Metrics,
        datagram: bytes::Bytes,
    ) {
        let Some((ns, i, packet)) = decode_mesh(&datagram) else {
            metrics.tun.malformed.inc();
            return;
        };
        match self.local(ns, i) {
            Some(c) if c.send_datagram(datagram.slice(packet..)).is_ok() => {
                metrics.tun.forwarded.inc()
            }
            _ => metrics.tun.no_route.inc(),
        }
    }
}

/// A packet for index `i` of `ns` as a mesh-link datagram.
pub(crate) fn encode_mesh(ns: &str, i: u32, packet: &[u8]) -> Option<bytes::Bytes> {
    let n = u8::try_from(ns.len()).ok()?;
    let mut b = Vec::with_capacity(1 + ns.len() + 4 + packet.len());
    b.push(n);
    b.extend_from_slice(ns.as_bytes());
    b.extend_from_slice(&i.to_be_bytes());
    b.extend_from_slice(packet);
    Some(b.into())
}

/// The namespace, index and where the packet starts in a mesh datagram.
fn decode_mesh(b: &[u8]) -> Option<(&str, u32, usize)> {
    let n = usize::from(*b.first()?);
    let ns = std::str::from_utf8(b.get(1..1 + n)?).ok()?;
    let i = b.get(1 + n..5 + n)?;
    Some((ns, u32::from_be_bytes([i[0], i[1], i[2], i[3]]), 5 + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_datagrams_round_trip_and_junk_is_refused() {
        let b = encode_mesh("acme", 7, b"packet").expect("encodes");
        let (ns, i, at) = decode_mesh(&b).expect("decodes");
        assert_eq!((ns, i, &b[at..]), ("acme", 7, &b"packet"[..]));
        assert!(decode_mesh(&[]).is_none());
        assert!(decode_mesh(&[9, b'a']).is_none());
        assert!(decode_mesh(&[1, 0xff, 0, 0, 0, 1]).is_none(), "not UTF-8");
        assert!(encode_mesh(&"n".repeat(300), 1, b"").is_none());
    }
}
