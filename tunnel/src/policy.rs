//! Which packets arriving through the tunnel a peer lets in: by default
//! only what its exposed ports (`--expose`) would let in as streams, ICMP
//! echo (ping), ICMP errors (path MTU discovery needs them), and the
//! answers to flows this peer started itself; `--tun-allow-all` lets in
//! everything. The target daemon enforces it, so a peer's policy holds
//! whatever other peers send. Sans-IO: `now` comes from the caller.

use crate::packet::{proto, tcp_flags, Packet, Transport};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Outbound flows remembered at most (a full table forgets the oldest
/// half: answers to those flows are then refused like strangers').
pub const MAX_FLOWS: usize = 65_536;
/// How long an idle TCP flow is remembered.
pub const TCP_FLOW_IDLE: Duration = Duration::from_secs(30 * 60);
/// How long an idle UDP or ICMP flow is remembered.
pub const OTHER_FLOW_IDLE: Duration = Duration::from_secs(120);

/// What to do with an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the local IP stack.
    Allow,
    /// Closed to the sender: answer with [`crate::build::refuse`].
    Refuse,
    /// Drop silently (a stray segment, an unknown protocol), counted.
    Drop,
}

/// A flow as seen from this peer: protocol, the remote address, the
/// remote port (or ICMP identifier) and the local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Flow {
    proto: u8,
    remote: IpAddr,
    remote_port: u16,
    local_port: u16,
}

/// One peer's inbound policy and its table of outbound flows.
#[derive(Debug)]
pub struct Policy {
    allow_all: bool,
    ports: BTreeSet<u16>,
    flows: HashMap<Flow, Instant>,
}

fn is_icmp_error(proto: u8, ty: u8) -> bool {
    match proto {
        proto::ICMP => matches!(ty, 3 | 11 | 12),
        proto::ICMPV6 => matches!(ty, 1..=4),
        _ => false,
    }
}

fn is_echo_request(proto: u8, ty: u8) -> bool {
    (proto == proto::ICMP && ty == 8) || (proto == proto::ICMPV6 && ty == 128)
}

impl Policy {
    /// A policy admitting `ports` (and everything with `allow_all`).
    pub fn new(ports: impl IntoIterator<Item = u16>, allow_all: bool) -> Self {
        Self {
            allow_all,
            ports: ports.into_iter().collect(),
            flows: HashMap::new(),
        }
    }

    /// Replaces the exposed ports (a reload).
    pub fn set_ports(&mut self, ports: impl IntoIterator<Item = u16>) {
        self.ports = ports.into_iter().collect();
    }

    /// The flow key of `p` seen from the side that sent it (`outbound`)
    /// or received it.
    fn flow(p: &Packet<'_>, outbound: bool) -> Option<Flow> {
        let (remote, (remote_port, local_port)) = match (outbound, p.transport) {
            (true, Transport::Tcp { src, dst, .. } | Transport::Udp { src, dst }) => {
                (p.dst, (dst, src))
            }
            (false, Transport::Tcp { src, dst, .. } | Transport::Udp { src, dst }) => {
                (p.src, (src, dst))
            }
            (true, Transport::Icmp { ident, .. }) => (p.dst, (ident, 0)),
            (false, Transport::Icmp { ident, .. }) => (p.src, (ident, 0)),
            (_, Transport::Other) => return None,
        };
        Some(Flow {
            proto: p.proto,
            remote,
            remote_port,
            local_port,
        })
    }

    /// Notes a packet this peer sends into the tunnel: answers to it are
    /// let in.
    pub fn outbound(&mut self, p: &Packet<'_>, now: Instant) {
        if self.allow_all {
            return;
        }
        // Only echo requests start ICMP flows.
        if let Transport::Icmp { ty, .. } = p.transport {
            if !is_echo_request(p.proto, ty) {
                return;
            }
        }
        let Some(f) = Self::flow(p, true) else {
            return;
        };
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&f) {
            self.expire(now);
            if self.flows.len() >= MAX_FLOWS {
                // Forget the older half.
                let mut ages: Vec<Instant> = self.flows.values().copied().collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                self.flows.retain(|_, t| *t > cut);
            }
        }
        self.flows.insert(f, now);
    }

    /// Forgets flows idle past their time.
    pub fn expire(&mut self, now: Instant) {
        self.flows.retain(|f, t| {
            let idle = if f.proto == proto::TCP {
                TCP_FLOW_IDLE
            } else {
                OTHER_FLOW_IDLE
            };
            now.saturating_duration_since(*t) < idle
        });
    }

    /// Flows remembered now.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// What to do with `p`, arriving from another peer.
    pub fn inbound(&mut self, p: &Packet<'_>, now: Instant) -> Verdict {
        if self.allow_all {
            return Verdict::Allow;
        }
        let known = Self::flow(p, false).and_then(|f| self.flows.get_mut(&f));
        if let Some(t) = known {
            *t = now;
            return Verdict::Allow;
        }
        match p.transport {
            Transport::Tcp { dst, .. } | Transport::Udp { dst, .. }
                if self.ports.contains(&dst) =>
            {
                Verdict::Allow
            }
            Transport::Tcp { flags, .. } => {
                if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
                    Verdict::Refuse
                } else {
                    Verdict::Drop
                }
            }
            Transport::Udp { .. } => Verdict::Refuse,
            Transport::Icmp { ty, .. } if is_echo_request(p.proto, ty) => Verdict::Allow,
            Transport::Icmp { ty, .. } if is_icmp_error(p.proto, ty) => Verdict::Allow,
            _ => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;

    fn a() -> IpAddr {
        IpAddr::from([100, 64, 0, 1])
    }
    fn b() -> IpAddr {
        IpAddr::from([100, 64, 0, 2])
    }
    fn check(policy: &mut Policy, pkt: &[u8], now: Instant) -> Verdict {
        policy.inbound(&Packet::parse(pkt).expect("parses"), now)
    }

    #[test]
    fn exposed_ports_and_ping_are_let_in_the_rest_refused_or_dropped() {
        let now = Instant::now();
        let mut p = Policy::new([22], false);
        let syn = |port| build::tcp(a(), b(), 40000, port, 1, 0, tcp_flags::SYN, &[]).expect("syn");
        assert_eq!(check(&mut p, &syn(22), now), Verdict::Allow);
        assert_eq!(check(&mut p, &syn(5432), now), Verdict::Refuse);
        let stray = build::tcp(a(), b(), 40000, 5432, 1, 1, tcp_flags::ACK, &[]).expect("ack");
        assert_eq!(check(&mut p, &stray, now), Verdict::Drop);
        let dns = build::udp(a(), b(), 5000, 53, b"q").expect("udp");
        assert_eq!(check(&mut p, &dns, now), Verdict::Refuse);
        let ping = build::echo_request(a(), b(), 9, 1, b"hi").expect("ping");
        assert_eq!(check(&mut p, &ping, now), Verdict::Allow);
        let other = build::ip(a(), b(), 47, b"gre").expect("gre");
        assert_eq!(check(&mut p, &other, now), Verdict::Drop);
        let mut open = Policy::new([], true);
        assert_eq!(check(&mut open, &syn(5432), now), Verdict::Allow);
    }

    #[test]
    fn answers_to_flows_this_peer_started_are_let_in_until_idle() {
        let t0 = Instant::now();
        let mut p = Policy::new([], false);
        // b connects out to a:8080 and pings a.
        let out = build::tcp(b(), a(), 50000, 8080, 1, 0, tcp_flags::SYN, &[]).expect("syn");
        p.outbound(&Packet::parse(&out).expect("out"), t0);
        let ping = build::echo_request(b(), a(), 77, 1, b"").expect("ping");
        p.outbound(&Packet::parse(&ping).expect("ping"), t0);
        let synack = build::tcp(
            a(),
            b(),
            8080,
            50000,
            9,
            2,
            tcp_flags::SYN | tcp_flags::ACK,
            &[],
        )
        .expect("synack");
        assert_eq!(check(&mut p, &synack, t0), Verdict::Allow);
        let reply = build::icmp(a(), b(), 0, 0, [0, 77, 0, 1], b"").expect("reply");
        assert_eq!(check(&mut p, &reply, t0), Verdict::Allow);
        // Another source port of a is not the same flow.
        let other = build::tcp(a(), b(), 8081, 50000, 9, 2, tcp_flags::ACK, &[]).expect("other");
        assert_eq!(check(&mut p, &other, t0), Verdict::Drop);
        // Idle long enough, the UDP/ICMP flows go first, then TCP.
        p.expire(t0 + OTHER_FLOW_IDLE);
        assert_eq!(check(&mut p, &reply, t0 + OTHER_FLOW_IDLE), Verdict::Drop);
        assert_eq!(check(&mut p, &synack, t0 + OTHER_FLOW_IDLE), Verdict::Allow);
        let later = t0 + OTHER_FLOW_IDLE + TCP_FLOW_IDLE;
        p.expire(later);
        assert_eq!(p.flows(), 0);
    }

    #[test]
    fn the_flow_table_stays_bounded() {
        let t0 = Instant::now();
        let mut p = Policy::new([], false);
        for i in 0..(MAX_FLOWS as u32 + 10) {
            let port = (i % 60_000) as u16 + 1;
            let dst = IpAddr::from([100, 64, (i >> 16) as u8, (i >> 8) as u8]);
            let out = build::udp(b(), dst, port, 9, b"").expect("udp");
            p.outbound(
                &Packet::parse(&out).expect("out"),
                t0 + Duration::from_micros(u64::from(i)),
            );
        }
        assert!(p.flows() <= MAX_FLOWS, "{}", p.flows());
    }
}
