//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the
//! relay's parsing and merging code, without sockets. Each takes untrusted
//! bytes, must never panic, and checks what must hold whatever the input.

use crate::doors::http::handlers;
use crate::mesh::membership::Membership;
use swb_wire::{Decoded, Frame, RelayRecord};

/// An HTTP request body, as each body-taking route parses and checks it.
pub fn http_body(data: &[u8]) {
    if let Ok(r) = handlers::parse_json::<handlers::SendReq>(data) {
        if let Ok(s) = handlers::check_send(r) {
            assert!(s.payload_len() <= swb_wire::MAX_MESSAGE_BODY);
        }
    }
    if let Ok(r) = handlers::parse_json::<handlers::AckReq>(data) {
        if let Ok((_, ids)) = handlers::check_ack(r) {
            assert!(ids.len() <= swb_wire::MAX_ACK_IDS);
        }
    }
    if let Ok(r) = handlers::parse_json::<handlers::SetStatusReq>(data) {
        let _ = handlers::check_set_status(r);
    }
}

/// Gossip from another relay: the frames in `data` (relay maps and mesh
/// member lists), merged into a relay's view of the mesh between link ups,
/// link downs and expiries driven by the same bytes.
pub fn relay_map(data: &[u8]) {
    let me = RelayRecord {
        id: "r-me".into(),
        addrs: vec!["127.0.0.1:1".into()],
        fingerprint: "sha256:00".into(),
        incarnation: 1,
    };
    // A small full-mesh threshold: the grid rules run too.
    let mut m = Membership::new(me, 4);
    let t0 = tokio::time::Instant::now();
    let mut now = t0;
    let mut rest = data;
    while let Ok(Decoded::Frame { frame, consumed }) = swb_wire::decode(rest) {
        rest = &rest[consumed.min(rest.len())..];
        let records = match frame {
            Frame::MeshMembers(map) | Frame::RelayMap(map) => map.relays,
            Frame::MeshWelcome(w) => w.members,
            Frame::MeshMembersDelta(d) => {
                let from = d.add.first().map(|r| r.id.clone()).unwrap_or_default();
                m.claims_changed(&from, &d.add, &d.remove, now);
                d.add
            }
            _ => Vec::new(),
        };
        // Steer with the next byte: gossip or a neighbour's claims, a
        // link up or down, time passing.
        let op = rest.first().copied().unwrap_or(0);
        match records.first() {
            Some(r) if op % 5 == 4 => {
                m.claimed(&r.id.clone(), &records, now);
            }
            _ => {
                m.merge(&records, now);
            }
        }
        if let Some(r) = records.first() {
            match op % 5 {
                0 => m.link_up(r, now),
                1 => m.link_down(&r.id, now),
                _ => {}
            }
        }
        now += std::time::Duration::from_secs(u64::from(op));
        m.expire(now);
        let live = m.live(now);
        assert!(
            live.relays.contains_key("r-me"),
            "a relay is always in its own live set"
        );
        assert!(m.gossip(now).len() <= swb_wire::MAX_RELAYS + 1);
        assert!(m.known_len() <= swb_wire::MAX_RELAYS);
        let _ = m.dial_targets(now);
        let _ = m.surplus(now);
    }
}
