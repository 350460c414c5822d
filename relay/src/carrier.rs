//! The relay's end of the TCP carrier (see [`swb_quic::carrier`]): daemons
//! whose network drops UDP upgrade an HTTPS connection at
//! [`swb_quic::carrier::PATH`] and send their QUIC packets over it. Each
//! carrier connection gets an address of its own in `100::/64` and its
//! packets enter the same quinn endpoint as UDP ones, through
//! [`CarrierSocket`], a layer between the UDP socket and the Initial gate
//! (so carried Initials are gated and counted like any). A QUIC connection
//! that moves between UDP and a carrier is a path migration to quinn.
//!
//! Bounded: [`MAX_CARRIERS`] connections at once, [`MAX_CARRIERS_PER_IP`]
//! per client address, [`swb_quic::carrier::QUEUE`] transmits and
//! [`swb_quic::carrier::QUEUE_BYTES`] queued toward each, packets of at
//! most [`swb_quic::carrier::MAX_PACKET`] bytes; a
//! carrier that carries nothing for [`CARRIER_IDLE`] is closed.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use swb_quic::carrier::{self, Inbound};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Carrier connections at once.
pub const MAX_CARRIERS: usize = 16_384;
/// Carrier connections at once from one client address.
pub const MAX_CARRIERS_PER_IP: usize = 256;
/// A carrier that carried no packet either way this long is closed (a
/// live QUIC connection sends at least a keep-alive every few seconds).
pub const CARRIER_IDLE: Duration = Duration::from_secs(60);
/// Bytes queued toward all carriers together at most (each also within
/// [`carrier::QUEUE_BYTES`]): past it new transmits are dropped, as a full
/// socket buffer would, and QUIC resends them.
pub const CARRIERS_QUEUE_BYTES: usize = 64 << 20;

/// Why a carrier was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// [`MAX_CARRIERS`] are open.
    Full,
    /// [`MAX_CARRIERS_PER_IP`] are open from that address.
    PerIp,
}

/// Every carrier connection of the relay.
#[derive(Debug)]
pub(crate) struct Carriers {
    inbound: Inbound,
    /// Each carrier's way out, and the client address it came from.
    out: Mutex<HashMap<SocketAddr, (carrier::Outbound, IpAddr)>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    next: AtomicU64,
    /// Bytes queued toward every carrier, within [`CARRIERS_QUEUE_BYTES`].
    queued: carrier::SharedQueue,
}

impl Default for Carriers {
    fn default() -> Self {
        Self {
            inbound: Inbound::default(),
            out: Mutex::default(),
            per_ip: Mutex::default(),
            next: AtomicU64::default(),
            queued: carrier::SharedQueue::new(CARRIERS_QUEUE_BYTES),
        }
    }
}

/// A carrier's place, given back when it ends.
pub(crate) struct Slot {
    carriers: Arc<Carriers>,
    ip: IpAddr,
    addr: SocketAddr,
    rx: carrier::OutboundRx,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.carriers
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.addr);
        let mut per_ip = self
            .carriers
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Carriers {
    /// Takes a place for a carrier from `ip`, before its upgrade is
    /// answered.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if out.len() >= MAX_CARRIERS {
            return Err(Refused::Full);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= MAX_CARRIERS_PER_IP {
            return Err(Refused::PerIp);
        }
        *n += 1;
        let addr = carrier::virtual_addr(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = carrier::outbound_sharing(&self.queued);
        out.insert(addr, (tx, ip));
        Ok(Slot {
            carriers: self.clone(),
            ip,
            addr,
            rx,
        })
    }

    /// The client address behind `a`: the carrier's TCP peer for a
    /// carrier's address (so per-address limits count the real client),
    /// else `a`'s own.
    pub(crate) fn client_ip(&self, a: SocketAddr) -> IpAddr {
        if !carrier::is_virtual(&a) {
            return a.ip();
        }
        self.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&a)
            .map_or(a.ip(), |(_, ip)| *ip)
    }

    /// Carrier connections open now.
    pub(crate) fn open(&self) -> usize {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Runs a carrier connection (the upgraded HTTPS stream) until it ends:
/// packets read go to the endpoint from the slot's address, packets quinn
/// sends to that address are written.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(io: S, mut slot: Slot) {
    let into_endpoint = slot.carriers.inbound.sender();
    let addr = slot.addr;
    match carrier::pump(io, &mut slot.rx, into_endpoint, addr, CARRIER_IDLE).await {
        carrier::PumpEnd::Idle => debug!(%addr, "carrier idle; closing it"),
        carrier::PumpEnd::Read(e) => debug!(%addr, "carrier ended: {e}"),
        carrier::PumpEnd::Closed | carrier::PumpEnd::Write => {}
    }
}

/// The endpoint's socket: UDP, plus every carrier connection (received
/// by the first shard's socket only, as owned packets the endpoint takes
/// without a copy; each shard sends on them).
pub(crate) struct CarrierSocket {
    udp: Arc<dyn quinn::AsyncUdpSocket>,
    carriers: Arc<Carriers>,
    /// Whether this socket reads what the carriers received.
    reads_carriers: bool,
}

impl std::fmt::Debug for CarrierSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierSocket").finish_non_exhaustive()
    }
}

impl CarrierSocket {
    pub(crate) fn new(
        udp: Arc<dyn quinn::AsyncUdpSocket>,
        carriers: Arc<Carriers>,
        reads_carriers: bool,
    ) -> Self {
        Self {
            udp,
            carriers,
            reads_carriers,
        }
    }
}

impl quinn::AsyncUdpSocket for CarrierSocket {
    swb_quic::pass_through_socket!(udp);

    fn try_send(&self, t: &quinn::udp::Transmit) -> io::Result<()> {
        if !carrier::is_virtual(&t.destination) {
            return self.udp.try_send(t);
        }
        let tx = self
            .carriers
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&t.destination)
            .map(|(tx, _)| tx.clone());
        // A carrier that is gone or full loses the packets, as UDP would.
        if let Some(tx) = tx {
            tx.try_send(carrier::frame(t));
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.udp.poll_recv(cx, bufs, meta)
    }

    /// What the carriers read, handed over as read (no copy).
    fn poll_recv_owned(
        &self,
        cx: &mut Context,
        out: &mut Vec<(SocketAddr, bytes::BytesMut)>,
        max: usize,
    ) -> Poll<()> {
        if !self.reads_carriers {
            return Poll::Pending;
        }
        self.carriers.inbound.poll_owned(cx, out, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_address_and_given_back() {
        let c = Arc::new(Carriers::default());
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let mut held = Vec::new();
        for _ in 0..MAX_CARRIERS_PER_IP {
            held.push(c.admit(ip).expect("within the cap"));
        }
        assert_eq!(c.admit(ip).err(), Some(Refused::PerIp));
        assert!(c.admit("192.0.2.2".parse().expect("ip")).is_ok());
        assert_ne!(held[0].addr, held[1].addr);
        assert!(carrier::is_virtual(&held[0].addr));
        assert_eq!(c.client_ip(held[0].addr), ip, "limits count the client");
        let real: SocketAddr = "192.0.2.9:5".parse().expect("addr");
        assert_eq!(c.client_ip(real), real.ip());
        held.pop();
        assert!(c.admit(ip).is_ok(), "a place given back is taken again");
        held.clear();
        assert_eq!(c.open(), 0);
        assert!(c.per_ip.lock().expect("lock").is_empty());
    }
}
