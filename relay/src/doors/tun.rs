//! A TUN session's datagram pump: each QUIC datagram the daemon sends —
//! one IP packet — goes to the peer its destination address names: on this
//! relay directly, on another as a mesh-link datagram through the router.
//! A packet whose source is not the sender's own address is dropped and
//! counted; one too big for the next hop is answered with ICMP
//! "fragmentation needed" / "packet too big".

use crate::router::{Route, Router};
use crate::services::tun::encode_mesh;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use swb_tunnel::{AddressPlan, Packet};
use tokio_util::sync::CancellationToken;

/// Destinations a pump remembers at most.
const LOCAL_CACHE: usize = 256;

/// Carries the datagrams `conn` sends (the session of the peer at `index`
/// of `ns`) until `stop` or the connection ends.
pub(crate) async fn pump(
    router: Arc<Router>,
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
    let services = router.services().clone();
    let m = &services.metrics;
    let c = &m.tun;
    // index → its connection here (or none), while the relay's attached
    // sessions stay as they were: no lock per packet.
    let mut cache: HashMap<u32, Option<quinn::Connection>> = HashMap::new();
    let mut cached_at = services.tun.generation();
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => return,
            d = conn.read_datagram() => match d {
                Ok(d) => d,
                Err(_) => return,
            },
        };
        let Ok(p) = Packet::parse(&d) else {
            c.malformed.inc();
            continue;
        };
        if p.src != own4 && p.src != own6 {
            c.spoofed.inc();
            continue;
        }
        let Some(i) = plan.index_of(p.dst) else {
            c.no_route.inc();
            continue;
        };
        // Err: the largest packet the next hop takes, when it is too big.
        let now = services.tun.generation();
        if now != cached_at || cache.len() >= LOCAL_CACHE {
            cache.clear();
            cached_at = now;
        }
        let local = cache
            .entry(i)
            .or_insert_with(|| services.tun.local(&ns, i))
            .clone();
        let sent: Result<(), Option<usize>> = match local {
            Some(to) => match to.send_datagram(d.clone()) {
                Ok(()) => Ok(()),
                Err(quinn::SendDatagramError::TooLarge) => Err(to.max_datagram_size()),
                Err(_) => {
                    c.no_route.inc();
                    continue;
                }
            },
            None => {
                // Homed on another relay: one mesh hop.
                let name = match services.tun.cached_name(&ns, i) {
                    Some(n) => Some(n),
                    None => {
                        let n = router.tun_name(&ns, i).await;
                        if let Some(n) = &n {
                            services.tun.remember_name(&ns, i, n);
                        }
                        n
                    }
                };
                let home = name.and_then(|n| match router.route(&ns, &n) {
                    Route::Remote(h) => Some(h.id.clone()),
                    Route::Local => None,
                });
                let (Some(home), Some(md)) = (home, encode_mesh(&ns, i, &d)) else {
                    c.no_route.inc();
                    continue;
                };
                match router.mesh_datagram(&home, md) {
                    Ok(()) => Ok(()),
                    Err(Some(max)) => Err(Some(max.saturating_sub(5 + ns.len()))),
                    Err(None) => {
                        c.no_route.inc();
                        continue;
                    }
                }
            }
        };
        match sent {
            Ok(()) => c.forwarded.inc(),
            Err(max) => {
                c.too_big.inc();
                let mtu = max.and_then(|s| u16::try_from(s).ok()).unwrap_or(1200);
                if let Some(icmp) = swb_tunnel::build::too_big(&p, mtu) {
                    let _ = conn.send_datagram(icmp.into());
                }
            }
        }
    }
}
