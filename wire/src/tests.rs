use super::*;
use proptest::prelude::*;

fn arb_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_refusal() -> impl Strategy<Value = Refusal> {
    (any::<u16>(), ".{0,64}").prop_map(|(c, m)| Refusal {
        code: Code(c),
        message: m,
    })
}

fn arb_record() -> impl Strategy<Value = RelayRecord> {
    (
        "[a-z0-9-]{1,12}",
        proptest::collection::vec("[a-z0-9.:]{1,20}", 0..3),
        "sha256:[0-9a-f]{8}",
        any::<u64>(),
    )
        .prop_map(|(id, addrs, fingerprint, incarnation)| RelayRecord {
            id,
            addrs,
            fingerprint,
            incarnation,
        })
}

fn arb_mesh_op() -> impl Strategy<Value = MeshOp> {
    prop_oneof![
        (any::<u64>(), any::<u32>()).prop_map(|(wait_ms, max)| MeshOp::Receive { wait_ms, max }),
        proptest::collection::vec(arb_id(), 0..20).prop_map(|ids| MeshOp::Ack { ids }),
        (
            proptest::collection::vec(("[a-z]{1,8}", ".{0,20}"), 0..4),
            proptest::collection::vec("[a-z]{1,8}", 0..3),
        )
            .prop_map(|(set, clear)| MeshOp::SetStatus(SetStatus {
                set,
                clear,
                replace: false
            })),
        proptest::option::of(any::<u32>()).prop_map(|want| MeshOp::TunAssign { want }),
        Just(MeshOp::TunIndex),
        any::<u32>().prop_map(|index| MeshOp::TunWho { index }),
    ]
}

fn arb_mesh_answer() -> impl Strategy<Value = MeshAnswer> {
    prop_oneof![
        (arb_id(), "[a-z]{0,63}", arb_bytes(512), any::<u64>()).prop_map(
            |(id, from, body, sent_at_ms)| MeshAnswer::Message(Deliver {
                id,
                from,
                body,
                sent_at_ms
            })
        ),
        Just(MeshAnswer::Received),
        any::<u32>().prop_map(MeshAnswer::Acked),
        proptest::option::of(any::<u32>()).prop_map(MeshAnswer::TunIndex),
        proptest::option::of("[a-z0-9-]{1,63}").prop_map(MeshAnswer::TunName),
        arb_refusal().prop_map(MeshAnswer::Refused),
        ("[a-z]{1,10}", any::<(u64, bool, u64, u64)>()).prop_map(
            |(name, (version, online, since_ms, updated_ms))| {
                MeshAnswer::Status(StatusUpdate {
                    name,
                    version,
                    online,
                    since_ms,
                    updated_ms,
                    fields: [("k".to_string(), "v".to_string())].into(),
                    lagged: false,
                })
            }
        ),
    ]
}

/// A status update: any name (the decoders read what they are sent), keys
/// of the status key alphabet, any values.
fn arb_status_update() -> impl Strategy<Value = StatusUpdate> {
    (
        ".{0,12}",
        any::<(u64, bool, u64, u64, bool)>(),
        proptest::collection::btree_map("[a-z0-9.:_-]{1,8}", ".{0,20}", 0..5),
    )
        .prop_map(
            |(name, (version, online, since_ms, updated_ms, lagged), fields)| StatusUpdate {
                name,
                version,
                online,
                since_ms,
                updated_ms,
                fields,
                lagged,
            },
        )
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            ".{0,100}",
            "[a-z0-9-]{0,63}",
            ".{0,20}",
            any::<u64>()
        )
            .prop_map(|(version, key, name, agent, instance)| {
                Frame::Hello(Hello {
                    version,
                    key,
                    name,
                    agent,
                    instance,
                })
            }),
        (
            ".{0,20}",
            "[a-z]{0,63}",
            ".{0,10}",
            any::<u64>(),
            any::<u64>(),
            any::<(u32, u32, u64, u64)>()
        )
            .prop_map(|(namespace, name, relay_id, session, server_time_ms, l)| {
                Frame::Welcome(Welcome {
                    namespace,
                    name,
                    relay_id,
                    session,
                    server_time_ms,
                    limits: Limits {
                        max_message_body: l.0,
                        mailbox_messages: l.1,
                        mailbox_bytes: l.2,
                        message_ttl_secs: l.3,
                    },
                })
            }),
        arb_refusal().prop_map(Frame::Refused),
        ("[a-z0-9-]{0,63}", any::<u16>())
            .prop_map(|(to, port)| Frame::StreamOpen(StreamOpen { to, port })),
        ("[a-z0-9-]{0,63}", any::<u16>())
            .prop_map(|(from, port)| Frame::StreamIncoming(StreamIncoming { from, port })),
        proptest::option::of(arb_refusal())
            .prop_map(|refusal| Frame::StreamReply(StreamReply { refusal })),
        (
            proptest::collection::vec("[a-z0-9-]{1,20}", 0..5),
            any::<bool>()
        )
            .prop_map(|(names, once)| Frame::StatusWatch(StatusWatch { names, once })),
        arb_status_update().prop_map(Frame::StatusUpdate),
        (
            proptest::collection::vec(("[a-z]{1,8}", ".{0,20}"), 0..4),
            proptest::collection::vec("[a-z]{1,8}", 0..3),
            any::<bool>()
        )
            .prop_map(|(set, clear, replace)| Frame::SetStatus(SetStatus {
                set,
                clear,
                replace
            })),
        Just(Frame::PeersQuery),
        Just(Frame::MeshLeaving),
        ("[a-z]{0,8}", "[a-z0-9-]{0,63}", arb_mesh_op()).prop_map(|(namespace, name, op)| {
            Frame::MeshCall(MeshCall {
                namespace,
                name,
                op,
            })
        }),
        arb_mesh_answer().prop_map(Frame::MeshAnswer),
        "[a-z0-9-]{0,63}".prop_map(|relay| Frame::PingInfo(PingInfo { relay })),
        proptest::option::of(any::<u32>()).prop_map(|want| Frame::TunJoin(TunJoin { want })),
        (any::<u64>(), "[a-z0-9-]{0,63}")
            .prop_map(|(req, name)| Frame::TunResolve(TunResolve { req, name })),
        (any::<u64>(), proptest::option::of(any::<u32>()))
            .prop_map(|(req, index)| Frame::TunResolved(TunResolved { req, index })),
        (
            any::<u32>(),
            any::<[u8; 4]>(),
            any::<u8>(),
            any::<[u8; 8]>()
        )
            .prop_map(|(index, v4_net, v4_prefix, v6_net)| Frame::TunAnswer(
                TunAnswer::Assigned(TunAssigned {
                    index,
                    v4_net,
                    v4_prefix,
                    v6_net
                })
            )),
        "[a-z ]{0,40}".prop_map(|m| Frame::TunAnswer(TunAnswer::Refused(Refusal::new(
            Code::TUN_UNAVAILABLE,
            m
        )))),
        (
            "[a-z]{1,8}",
            proptest::collection::vec("[a-z]{1,8}", 0..3),
            any::<bool>()
        )
            .prop_map(|(namespace, names, watch)| Frame::MeshStatusQuery(
                MeshStatusQuery {
                    namespace,
                    names,
                    watch
                }
            )),
        arb_record().prop_map(Frame::Redirect),
        (
            proptest::collection::vec(arb_record(), 0..3),
            proptest::collection::vec("[a-z0-9-]{1,16}", 0..3)
        )
            .prop_map(|(add, remove)| Frame::MeshMembersDelta(MeshMembersDelta { add, remove })),
        ("[a-z0-9-]{1,16}", 0..=MAX_VIA_TTL)
            .prop_map(|(to, ttl)| Frame::MeshVia(MeshVia { to, ttl })),
        ("[a-z]{1,8}", "[a-z]{1,8}", "[a-z]{1,8}", any::<u16>()).prop_map(
            |(namespace, from, to, port)| {
                Frame::MeshStreamOpen(MeshStreamOpen {
                    namespace,
                    from,
                    to,
                    port,
                })
            }
        ),
        (
            "[a-z]{1,8}",
            "[a-z]{1,8}",
            "[a-z]{1,8}",
            arb_id(),
            arb_bytes(512),
            any::<u64>()
        )
            .prop_map(
                |(namespace, from, to, id, body, sent_at_ms)| Frame::MeshForward(MeshForward {
                    namespace,
                    from,
                    to,
                    id,
                    body,
                    sent_at_ms,
                    hops: (sent_at_ms % 3) as u8,
                })
            ),
        (proptest::collection::vec(arb_record(), 0..4), any::<bool>())
            .prop_map(|(relays, more)| Frame::RelayMap(RelayMap { relays, more })),
        (proptest::collection::vec(arb_record(), 0..4), any::<bool>())
            .prop_map(|(relays, more)| Frame::MeshMembers(RelayMap { relays, more })),
        (
            any::<u16>(),
            arb_record(),
            proptest::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(version, relay, proof)| Frame::MeshHello(MeshHello {
                version,
                relay,
                proof
            })),
        (
            arb_record(),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(arb_record(), 0..3)
        )
            .prop_map(|(relay, proof, members)| Frame::MeshWelcome(MeshWelcome {
                relay,
                proof,
                members
            })),
        (any::<u64>(), arb_id(), "[a-z]{0,63}", arb_bytes(2048))
            .prop_map(|(req, id, to, body)| Frame::Send(Send { req, id, to, body })),
        (any::<u64>(), arb_id(), any::<bool>())
            .prop_map(|(req, id, online)| Frame::SendAccepted(SendAccepted { req, id, online })),
        proptest::collection::vec((any::<u64>(), any::<bool>()), 0..64).prop_map(|v| {
            Frame::SendsAccepted(SendsAccepted {
                accepted: v
                    .into_iter()
                    .map(|(req, online)| Accepted { req, online })
                    .collect(),
            })
        }),
        (any::<u64>(), arb_refusal())
            .prop_map(|(req, refusal)| Frame::SendRefused(SendRefused { req, refusal })),
        (arb_id(), "[a-z]{0,63}", arb_bytes(2048), any::<u64>()).prop_map(
            |(id, from, body, sent_at_ms)| {
                Frame::Deliver(Deliver {
                    id,
                    from,
                    body,
                    sent_at_ms,
                })
            }
        ),
        proptest::collection::vec(
            (
                "[a-z]{0,63}",
                proptest::collection::vec((arb_id(), arb_bytes(256), any::<u64>()), 0..8)
            ),
            0..8
        )
        .prop_map(|runs| Frame::Deliveries(Deliveries {
            runs: runs
                .into_iter()
                .map(|(from, msgs)| DeliveryRun {
                    from,
                    msgs: msgs
                        .into_iter()
                        .map(|(id, body, sent_at_ms)| Delivered {
                            id,
                            body,
                            sent_at_ms
                        })
                        .collect(),
                })
                .collect(),
        })),
        proptest::collection::vec(arb_id(), 0..50).prop_map(|ids| Frame::Ack(Ack { ids })),
        any::<u64>().prop_map(|nonce| Frame::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Frame::Pong(Ping { nonce })),
        arb_refusal().prop_map(Frame::Goodbye),
    ]
}

proptest! {
    #[test]
    fn message_id_hex_is_lowercase_per_byte_and_parses_back(id in arb_id()) {
        let s = id.to_string();
        let want: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
        prop_assert_eq!(&s, &want);
        prop_assert_eq!(MessageId::parse_hex(&s), Some(id));
    }

    #[test]
    fn every_frame_round_trips_and_encoded_len_is_exact(frame in arb_frame()) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        prop_assert_eq!(buf.len(), frame.encoded_len().unwrap());
        match decode(&buf).unwrap() {
            Decoded::Frame { frame: back, consumed } => {
                prop_assert_eq!(consumed, buf.len());
                prop_assert_eq!(back, frame);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn byte_at_a_time_reader_yields_the_same_frames(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let mut r = FrameReader::new();
        let mut out = Vec::new();
        for b in wire.iter() {
            r.buf().put_u8(*b);
            while let Some(f) = r.next_frame().unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert!(!r.has_partial());
    }

    #[test]
    fn status_update_fields_encode_as_a_list_of_pairs(
        fields in proptest::collection::vec(("[a-z]{1,8}", ".{0,20}"), 0..6),
        (version, since_ms) in any::<(u64, u64)>(),
    ) {
        // `StatusUpdate` as it was, with the fields a list: what daemons
        // and relays of earlier builds write and read.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Listed {
            name: String,
            version: u64,
            online: bool,
            since_ms: u64,
            updated_ms: u64,
            fields: Vec<(String, String)>,
            lagged: bool,
        }
        let mut sorted: std::collections::BTreeMap<String, String> = Default::default();
        for (k, v) in &fields {
            sorted.insert(k.clone(), v.clone());
        }
        let listed = Listed {
            name: "london".into(),
            version,
            online: true,
            since_ms,
            updated_ms: since_ms / 2,
            fields: sorted.clone().into_iter().collect(),
            lagged: false,
        };
        let map = StatusUpdate {
            name: "london".into(),
            version,
            online: true,
            since_ms,
            updated_ms: since_ms / 2,
            fields: sorted.clone(),
            lagged: false,
        };
        // The same bytes both ways.
        let listed_bytes = postcard::to_stdvec(&listed).unwrap();
        prop_assert_eq!(&postcard::to_stdvec(&map).unwrap(), &listed_bytes);
        prop_assert_eq!(&postcard::from_bytes::<Listed>(&listed_bytes).unwrap(), &listed);
        // A list in any order, with a key twice (a peer's bug or an
        // attack): read as a map, the last value of a key wins, as the
        // daemon's view collected from the list did.
        let unsorted = Listed {
            fields: fields.clone(),
            ..listed
        };
        let got: StatusUpdate = postcard::from_bytes(&postcard::to_stdvec(&unsorted).unwrap()).unwrap();
        let collected: std::collections::BTreeMap<String, String> = fields.into_iter().collect();
        prop_assert_eq!(got.fields, collected);
    }

    #[test]
    fn decoder_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&data);
    }
}

#[test]
fn oversized_frame_header_is_refused_before_allocation() {
    let mut b = BytesMut::new();
    b.put_u8(FrameType::Send as u8);
    b.put_u32(u32::MAX);
    assert_eq!(
        decode(&b),
        Err(DecodeError::FrameTooLarge {
            ty: 4,
            len: u32::MAX,
            max: MAX_FRAME_LEN as u32,
        })
    );
    let mut r = FrameReader::new();
    r.buf().extend_from_slice(&b);
    assert!(r.next_frame().is_err());
    assert!(
        r.buf().capacity() < 1024,
        "reader must not reserve for a refused frame"
    );
}

#[test]
fn a_readers_own_limit_refuses_a_frame_from_its_header() {
    let ping = Frame::Ping(Ping { nonce: 300 }).to_bytes().unwrap();
    let body = ping.len() - HEADER_LEN;
    // A frame at the limit is read; one byte over is refused from the
    // header alone, with the limit it broke, before any body arrives.
    let mut r = FrameReader::with_limit(body);
    r.buf().extend_from_slice(&ping);
    assert_eq!(r.next_frame(), Ok(Some(Frame::Ping(Ping { nonce: 300 }))));
    let mut r = FrameReader::with_limit(body - 1);
    r.buf().extend_from_slice(&ping[..HEADER_LEN]);
    assert_eq!(
        r.next_frame(),
        Err(DecodeError::FrameTooLarge {
            ty: FrameType::Ping as u8,
            len: body as u32,
            max: body as u32 - 1,
        })
    );
    // A limit above the wire's is the wire's.
    let mut r = FrameReader::with_limit(usize::MAX);
    let mut b = BytesMut::new();
    b.put_u8(FrameType::Send as u8);
    b.put_u32(MAX_FRAME_LEN as u32 + 1);
    r.buf().extend_from_slice(&b);
    assert!(matches!(
        r.next_frame(),
        Err(DecodeError::FrameTooLarge { max, .. }) if max as usize == MAX_FRAME_LEN
    ));
}

#[test]
fn unknown_frame_types_are_skipped() {
    let mut r = FrameReader::new();
    // type 200, 3 bytes of body, then a Ping.
    r.buf().extend_from_slice(&[200, 0, 0, 0, 3, 1, 2, 3]);
    Frame::Ping(Ping { nonce: 7 }).encode(r.buf()).unwrap();
    assert_eq!(
        r.next_frame().unwrap(),
        Some(Frame::Ping(Ping { nonce: 7 }))
    );
    assert_eq!(r.skipped(), 1);
}

#[test]
fn incomplete_is_explicit() {
    let bytes = Frame::Ping(Ping { nonce: 300 }).to_bytes().unwrap();
    assert_eq!(
        decode(&bytes[..2]),
        Ok(Decoded::Incomplete { needed: HEADER_LEN })
    );
    assert_eq!(
        decode(&bytes[..HEADER_LEN]),
        Ok(Decoded::Incomplete {
            needed: bytes.len()
        })
    );
}

#[test]
fn trailing_bytes_inside_a_frame_are_malformed() {
    let mut b = BytesMut::new();
    b.put_u8(FrameType::Ping as u8);
    b.put_u32(3);
    b.extend_from_slice(&[1, 0, 0]);
    assert!(matches!(decode(&b), Err(DecodeError::Malformed { .. })));
}

#[test]
fn encode_refuses_oversized_frames_and_writes_nothing() {
    let f = Frame::Send(Send {
        req: 1,
        id: MessageId([0; 16]),
        to: "x".into(),
        body: Bytes::from(vec![0u8; MAX_FRAME_LEN + 1]),
    });
    let mut b = BytesMut::new();
    assert!(matches!(
        f.encode(&mut b),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(b.is_empty());
}

#[test]
fn a_body_just_over_the_message_limit_still_fits_a_frame() {
    // The relay must be able to decode it to refuse it with body_too_large.
    let f = Frame::Send(Send {
        req: 1,
        id: MessageId([0; 16]),
        to: "a".repeat(MAX_NAME_LEN),
        body: Bytes::from(vec![0u8; MAX_MESSAGE_BODY + 1]),
    });
    assert!(f.encoded_len().unwrap() - HEADER_LEN <= MAX_FRAME_LEN);
}

#[test]
fn preamble_round_trip_and_bad_magic() {
    let mut b = BytesMut::new();
    Preamble { version: 1 }.encode(&mut b);
    assert_eq!(
        Preamble::decode(&mut b.clone()),
        Ok(Some(Preamble { version: 1 }))
    );
    assert_eq!(Preamble::decode(&mut BytesMut::from(&b[..3])), Ok(None));
    assert_eq!(
        Preamble::decode(&mut BytesMut::from(&b"GET / HTTP/1.1"[..])),
        Err(DecodeError::BadMagic)
    );
    assert_eq!(
        Preamble::decode(&mut BytesMut::from(&b"X"[..])),
        Err(DecodeError::BadMagic)
    );
}

#[test]
fn hello_debug_never_shows_the_key_or_the_instance() {
    let h = Hello {
        version: 1,
        key: "swbk_secret".into(),
        name: "n".into(),
        agent: "a".into(),
        instance: 987_654_321,
    };
    let shown = format!("{h:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(!shown.contains("987654321"), "{shown}");
}

#[test]
fn codes_have_stable_names() {
    assert_eq!(Code::MAILBOX_FULL.as_str(), "mailbox_full");
    assert_eq!(Code::from_name("mailbox_full"), Some(Code::MAILBOX_FULL));
    assert_eq!(Code(999).as_str(), "unknown");
}

#[test]
fn message_id_hex_round_trip() {
    let id = MessageId([0xab; 16]);
    assert_eq!(MessageId::parse_hex(&id.to_string()), Some(id));
    assert_eq!(MessageId::parse_hex("zz"), None);
}

#[test]
fn status_changes_are_checked_against_the_limits() {
    use std::collections::BTreeMap;
    let set = |kv: &[(&str, &str)]| SetStatus {
        set: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        clear: vec![],
        replace: false,
    };
    let cur = apply_status(&BTreeMap::new(), &set(&[("load", "0.3"), ("build", "1")])).unwrap();
    assert_eq!(cur.len(), 2);
    let clear = SetStatus {
        set: vec![],
        clear: vec!["build".into()],
        replace: false,
    };
    let cleared = apply_status(&cur, &clear).unwrap();
    assert_eq!(cleared.keys().collect::<Vec<_>>(), vec!["load"]);
    let replaced = apply_status(
        &cur,
        &SetStatus {
            replace: true,
            ..set(&[("x", "1")])
        },
    )
    .unwrap();
    assert_eq!(replaced.len(), 1);
    assert_eq!(
        apply_status(&cur, &set(&[("bad key", "1")]))
            .unwrap_err()
            .code,
        Code::BAD_STATUS
    );
    assert_eq!(
        apply_status(&cur, &set(&[("", "1")])).unwrap_err().code,
        Code::BAD_STATUS
    );
    let big = "v".repeat(MAX_STATUS_BYTES);
    assert_eq!(
        apply_status(&cur, &set(&[("k", &big)])).unwrap_err().code,
        Code::STATUS_TOO_LARGE
    );
    let many: Vec<(String, String)> = (0..=MAX_STATUS_KEYS)
        .map(|i| (format!("k{i}"), String::new()))
        .collect();
    let r = apply_status(
        &BTreeMap::new(),
        &SetStatus {
            set: many,
            clear: vec![],
            replace: false,
        },
    );
    assert_eq!(r.unwrap_err().code, Code::STATUS_TOO_LARGE);
}

/// The largest record the limits allow.
fn worst_record(i: usize) -> RelayRecord {
    let mut id = format!("r{i}-");
    id.extend(std::iter::repeat_n('x', MAX_RELAY_ID_LEN - id.len()));
    RelayRecord {
        id,
        addrs: vec!["a".repeat(MAX_RELAY_ADDR_LEN); MAX_RELAY_ADDRS],
        fingerprint: "f".repeat(MAX_FINGERPRINT_LEN),
        incarnation: u64::MAX,
    }
}

#[test]
fn the_largest_relay_record_is_within_its_named_bound() {
    let r = worst_record(0);
    let len = postcard::to_allocvec(&r).expect("encodes").len();
    assert!(
        len <= MAX_RELAY_RECORD_LEN,
        "{len} > {MAX_RELAY_RECORD_LEN}"
    );
}

#[test]
fn a_relay_map_of_the_largest_allowed_size_travels_in_pages() {
    let all: Vec<RelayRecord> = (0..MAX_RELAYS).map(worst_record).collect();
    let pages = RelayMap::pages(&all);
    assert_eq!(pages.len(), MAX_RELAYS.div_ceil(RELAY_MAP_PAGE));
    let mut whole = RelayMapPages::default();
    let mut got = None;
    for p in pages {
        for f in [Frame::RelayMap(p.clone()), Frame::MeshMembers(p.clone())] {
            let mut b = BytesMut::new();
            f.encode(&mut b).expect("a page fits one frame");
            assert!(b.len() <= HEADER_LEN + MAX_FRAME_LEN);
            match decode(&b).expect("decodes") {
                Decoded::Frame { frame, .. } => assert_eq!(frame, f),
                other => panic!("{other:?}"),
            }
        }
        assert!(got.is_none(), "the map was whole before its last page");
        got = whole.add(p);
    }
    assert_eq!(got.expect("whole after the last page"), all);
    // An empty map is one page.
    assert_eq!(RelayMap::pages(&[]).len(), 1);
}

#[test]
fn a_members_delta_that_fits_encodes_within_one_frame() {
    let add: Vec<RelayRecord> = (0..RELAY_MAP_PAGE / 2).map(worst_record).collect();
    let mut remove = Vec::new();
    while MeshMembersDelta::fits(add.len(), remove.len() + 1) {
        remove.push("z".repeat(MAX_RELAY_ID_LEN));
    }
    let f = Frame::MeshMembersDelta(MeshMembersDelta { add, remove });
    let mut b = BytesMut::new();
    f.encode(&mut b).expect("what fits encodes");
    match decode(&b).expect("decodes") {
        Decoded::Frame { frame, .. } => assert_eq!(frame, f),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_full_sends_accepted_frame_fits_and_one_more_answer_is_refused() {
    // The largest request numbers, so every answer takes its most bytes.
    let answer = Accepted {
        req: u64::MAX,
        online: true,
    };
    let mut f = SendsAccepted {
        accepted: vec![answer; MAX_SENDS_ACCEPTED],
    };
    let mut b = BytesMut::new();
    Frame::SendsAccepted(f.clone())
        .encode(&mut b)
        .expect("a full frame is within MAX_FRAME_LEN");
    assert!(
        matches!(decode(&b), Ok(Decoded::Frame { frame: Frame::SendsAccepted(g), .. }) if g == f)
    );
    f.accepted.push(answer);
    let mut b = BytesMut::new();
    Frame::SendsAccepted(f).encode(&mut b).expect("encodes");
    assert!(matches!(
        decode(&b),
        Err(DecodeError::FieldTooLarge {
            field: "sends_accepted.accepted",
            ..
        })
    ));
}

/// Encodes and decodes `f`, which must fit in a frame.
fn round_trip(f: &Deliveries) -> Deliveries {
    let mut b = BytesMut::new();
    Frame::Deliveries(f.clone())
        .encode(&mut b)
        .expect("a built frame is within MAX_FRAME_LEN");
    match decode(&b) {
        Ok(Decoded::Frame {
            frame: Frame::Deliveries(g),
            ..
        }) => g,
        other => panic!("{other:?}"),
    }
}

#[test]
fn deliveries_builder_frames_fit_and_keep_every_message_in_order() {
    let id = |n: u32| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        MessageId(b)
    };
    // Small messages past the message limit, from alternating senders in
    // runs of three; then bodies so large that few fit a frame; then one of
    // the largest body a message may have.
    let mut want = Vec::new();
    for n in 0..5000u32 {
        let from = if (n / 3) % 2 == 0 {
            "alpha"
        } else {
            "bravo-long-name"
        };
        want.push((
            from,
            id(n),
            Bytes::from(vec![n as u8; 8]),
            u64::MAX - n as u64,
        ));
    }
    for n in 5000..5020u32 {
        want.push(("charlie", id(n), Bytes::from(vec![1u8; 30_000]), 1));
    }
    want.push((
        "delta",
        id(9999),
        Bytes::from(vec![2u8; MAX_MESSAGE_BODY]),
        2,
    ));
    let mut builder = DeliveriesBuilder::new();
    let mut frames = Vec::new();
    for (from, id, body, at) in want.iter().cloned() {
        frames.extend(builder.push(from, id, body, at));
    }
    frames.extend(builder.finish());
    assert!(builder.finish().is_none(), "finish empties the builder");
    assert!(
        frames.len() >= 3,
        "the message limit and the size limit cut frames"
    );
    let mut got = Vec::new();
    for f in &frames {
        assert!(!f.is_empty());
        let items = f.runs.len() + f.len();
        assert!(items <= MAX_DELIVERIES, "{items} items");
        // Consecutive messages of one sender share a run.
        assert!(f.runs.windows(2).all(|w| w[0].from != w[1].from));
        let g = round_trip(f);
        assert_eq!(&g, f);
        got.extend(g.into_delivers());
    }
    assert_eq!(got.len(), want.len());
    for (d, (from, id, body, at)) in got.iter().zip(&want) {
        assert_eq!(
            (&d.from[..], d.id, &d.body, d.sent_at_ms),
            (*from, *id, body, *at)
        );
    }
}

#[test]
fn encode_send_writes_the_bytes_of_a_send_frame() {
    for (to, body) in [
        ("bob", Bytes::new()),
        ("a-much-longer-peer-name", Bytes::from(vec![5u8; 300])),
        ("x", Bytes::from(vec![1u8; MAX_MESSAGE_BODY])),
    ] {
        for req in [0, 127, 128, u64::MAX] {
            let id = MessageId([req as u8; 16]);
            let mut want = BytesMut::from(&b"prefix"[..]);
            let mut got = want.clone();
            Frame::Send(Send {
                req,
                id,
                to: to.into(),
                body: body.clone(),
            })
            .encode(&mut want)
            .expect("encodes");
            encode_send(&mut got, req, id, to, &body).expect("encodes");
            assert_eq!(got, want, "to {to}, req {req}, {} bytes", body.len());
        }
    }
    // Over the frame limit: refused, nothing written.
    let mut b = BytesMut::new();
    let huge = Bytes::from(vec![0u8; MAX_FRAME_LEN + 1]);
    assert!(matches!(
        encode_send(&mut b, 1, MessageId([0; 16]), "bob", &huge),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(b.is_empty());
}

#[test]
fn a_builder_with_a_message_cap_cuts_frames_at_it() {
    let id = |n: u32| MessageId([n as u8; 16]);
    let mut builder = DeliveriesBuilder::with_max_messages(3);
    let mut frames = Vec::new();
    let mut want = Vec::new();
    for n in 0..8u32 {
        // Runs of two, so a cut falls inside a run as well as between.
        let from = if n / 2 % 2 == 0 { "a" } else { "b" };
        want.push((from, id(n)));
        frames.extend(builder.push(from, id(n), Bytes::from_static(b"x"), 0));
    }
    frames.extend(builder.finish());
    let sizes: Vec<usize> = frames.iter().map(Deliveries::len).collect();
    assert_eq!(sizes, vec![3, 3, 2]);
    let got: Vec<(String, MessageId)> = frames
        .into_iter()
        .flat_map(Deliveries::into_delivers)
        .map(|d| (d.from, d.id))
        .collect();
    let want: Vec<(String, MessageId)> = want.into_iter().map(|(f, i)| (f.into(), i)).collect();
    assert_eq!(got, want, "every message once, in order");
    // A cap of zero is taken as one: no empty frames.
    let mut one = DeliveriesBuilder::with_max_messages(0);
    assert!(one.push("a", id(0), Bytes::new(), 0).is_none());
    assert_eq!(
        one.push("a", id(1), Bytes::new(), 0).map(|f| f.len()),
        Some(1)
    );
}

#[test]
fn a_deliveries_frame_over_its_message_limit_is_refused() {
    let msg = Delivered {
        id: MessageId([0; 16]),
        body: Bytes::new(),
        sent_at_ms: 0,
    };
    // One run of MAX_DELIVERIES - 1 messages: at the limit.
    let mut f = Deliveries {
        runs: vec![DeliveryRun {
            from: "a".into(),
            msgs: vec![msg.clone(); MAX_DELIVERIES - 1],
        }],
    };
    assert_eq!(round_trip(&f), f);
    f.runs[0].msgs.push(msg);
    let mut b = BytesMut::new();
    Frame::Deliveries(f).encode(&mut b).expect("encodes");
    assert!(matches!(
        decode(&b),
        Err(DecodeError::FieldTooLarge {
            field: "deliveries.messages",
            ..
        })
    ));
}

#[test]
fn relay_records_beyond_the_limits_are_refused() {
    let mut r = worst_record(1);
    r.id.push('y');
    let mut b = BytesMut::new();
    Frame::Redirect(r).encode(&mut b).expect("encodes");
    assert!(matches!(
        decode(&b),
        Err(DecodeError::FieldTooLarge {
            field: "relay.id",
            ..
        })
    ));
}

#[test]
fn a_busy_refusal_reason_round_trips_and_is_capped() {
    use std::time::Duration;
    let wait = Duration::from_millis(1234);
    assert_eq!(busy::retry_in(busy::reason(wait).as_bytes()), Some(wait));
    assert_eq!(
        busy::retry_in(busy::reason(Duration::from_secs(3600)).as_bytes()),
        Some(busy::MAX_RETRY_IN)
    );
    assert_eq!(
        busy::retry_in(b"busy; retry in 999999999 ms"),
        Some(busy::MAX_RETRY_IN)
    );
    for bad in [
        &b""[..],
        b"busy; retry in  ms",
        b"busy; retry in -5 ms",
        b"busy; retry in 12",
        b"busy; retry in 1e3 ms",
        b"busy; retry in 9999999999 ms",
        b"refused",
        b"\xff\xfe",
    ] {
        assert_eq!(busy::retry_in(bad), None, "{bad:?}");
    }
}

proptest! {
    #[test]
    fn any_refusal_reason_reads_without_panicking(reason in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Some(d) = busy::retry_in(&reason) {
            prop_assert!(d <= busy::MAX_RETRY_IN);
        }
    }
}

use hot::{by_hand, by_postcard};

/// A hot frame: its type and its postcard body.
fn arb_hot() -> impl Strategy<Value = (FrameType, Vec<u8>)> {
    let delivered =
        (arb_id(), arb_bytes(40), any::<u64>()).prop_map(|(id, body, sent_at_ms)| Delivered {
            id,
            body,
            sent_at_ms,
        });
    let run = (".{0,8}", proptest::collection::vec(delivered, 0..4))
        .prop_map(|(from, msgs)| DeliveryRun { from, msgs });
    prop_oneof![
        (any::<u64>(), arb_id(), ".{0,12}", arb_bytes(64)).prop_map(|(req, id, to, body)| {
            let v = Send { req, id, to, body };
            (FrameType::Send, postcard::to_stdvec(&v).unwrap())
        }),
        proptest::collection::vec(arb_id(), 0..8)
            .prop_map(|ids| { (FrameType::Ack, postcard::to_stdvec(&Ack { ids }).unwrap()) }),
        proptest::collection::vec((any::<u64>(), any::<bool>()), 0..8).prop_map(|a| {
            let accepted = a
                .into_iter()
                .map(|(req, online)| Accepted { req, online })
                .collect();
            let v = SendsAccepted { accepted };
            (FrameType::SendsAccepted, postcard::to_stdvec(&v).unwrap())
        }),
        proptest::collection::vec(run, 0..4).prop_map(|runs| {
            let v = Deliveries { runs };
            (FrameType::Deliveries, postcard::to_stdvec(&v).unwrap())
        }),
        arb_status_update()
            .prop_map(|v| (FrameType::StatusUpdate, postcard::to_stdvec(&v).unwrap())),
        (any::<u64>(), arb_id(), any::<bool>()).prop_map(|(req, id, online)| {
            let v = SendAccepted { req, id, online };
            (FrameType::SendAccepted, postcard::to_stdvec(&v).unwrap())
        }),
        (
            (".{0,8}", ".{0,8}", ".{0,12}"),
            arb_id(),
            arb_bytes(64),
            any::<u64>(),
            any::<u8>()
        )
            .prop_map(|((namespace, from, to), id, body, sent_at_ms, hops)| {
                let v = MeshForward {
                    namespace,
                    from,
                    to,
                    id,
                    body,
                    sent_at_ms,
                    hops,
                };
                (FrameType::MeshForward, postcard::to_stdvec(&v).unwrap())
            }),
    ]
}

/// Bytes a hostile or broken peer might send in place of a hot frame's
/// body: a valid body with bytes overwritten, inserted and cut off.
fn arb_hot_damaged() -> impl Strategy<Value = (FrameType, Vec<u8>)> {
    (
        arb_hot(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..2),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|((ty, mut b), sets, inserts, cut, do_cut)| {
            for (i, v) in inserts {
                let at = i.index(b.len() + 1);
                b.insert(at, v);
            }
            if !b.is_empty() {
                for (i, v) in sets {
                    let at = i.index(b.len());
                    b[at] = v;
                }
            }
            if do_cut {
                b.truncate(cut.index(b.len() + 1));
            }
            (ty, b)
        })
}

/// A hot frame as a value.
fn arb_hot_frame() -> impl Strategy<Value = Frame> {
    arb_hot().prop_map(|(ty, b)| by_postcard(ty, &b).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// The hand-written encoders write, and count, postcard's bytes.
    #[test]
    fn hot_encoders_write_what_postcard_writes(f in arb_hot_frame()) {
        let body = match &f {
            Frame::Send(v) => postcard::to_stdvec(v),
            Frame::Ack(v) => postcard::to_stdvec(v),
            Frame::SendsAccepted(v) => postcard::to_stdvec(v),
            Frame::Deliveries(v) => postcard::to_stdvec(v),
            // Encoded by postcard itself: the test holds `encoded_len` to it.
            Frame::StatusUpdate(v) => postcard::to_stdvec(v),
            Frame::SendAccepted(v) => postcard::to_stdvec(v),
            Frame::MeshForward(v) => postcard::to_stdvec(v),
            _ => unreachable!("not a hot frame"),
        }
        .unwrap();
        let mut want = vec![f.frame_type() as u8];
        want.extend((body.len() as u32).to_be_bytes());
        want.extend(&body);
        let mut out = BytesMut::from(&b"kept"[..]);
        f.encode(&mut out).unwrap();
        prop_assert_eq!(&out[..4], b"kept");
        prop_assert_eq!(&out[4..], &want[..]);
        prop_assert_eq!(f.encoded_len().unwrap(), want.len());
        if let Frame::Send(s) = &f {
            let mut parts = BytesMut::new();
            encode_send(&mut parts, s.req, s.id, &s.to, &s.body).unwrap();
            prop_assert_eq!(&parts[..], &want[..]);
        }
    }

    /// The hand-written decoders read every valid body as postcard does.
    #[test]
    fn hot_decoders_read_what_postcard_wrote((ty, b) in arb_hot()) {
        let want = by_postcard(ty, &b).unwrap();
        prop_assert_eq!(by_hand(ty, &b).unwrap(), want);
    }

    /// And any other bytes too: the same value, or both refuse.
    #[test]
    fn hot_decoders_agree_with_postcard((ty, b) in arb_hot_damaged()) {
        match (by_hand(ty, &b), by_postcard(ty, &b)) {
            (Ok(a), Ok(p)) => prop_assert_eq!(a, p),
            (Err(_), Err(_)) => {}
            (a, p) => prop_assert!(false, "hand {:?}, postcard {:?}", a, p),
        }
    }
}

/// Edges the random bodies rarely reach: varints at ten bytes, counts past
/// the limits, counts the body cannot hold.
#[test]
fn hot_decoders_agree_at_the_edges() {
    let id = [7u8; 16];
    let mut cases: Vec<(FrameType, Vec<u8>)> = Vec::new();
    // req = u64::MAX (ten bytes, last 0x01); then a tenth byte of 0x02;
    // then eleven bytes of continuation.
    let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    for req in [
        max.to_vec(),
        [&max[..9], &[0x02]].concat(),
        vec![0x80; 11],
        vec![0x80, 0x00], // zero, written long: postcard accepts it
    ] {
        let b = [req, id.to_vec(), vec![1, b'a', 1, b'x']].concat();
        cases.push((FrameType::Send, b));
    }
    // A name that is not UTF-8.
    cases.push((
        FrameType::Send,
        [vec![1], id.to_vec(), vec![1, 0xff, 0]].concat(),
    ));
    // A bool that is neither 0 nor 1.
    cases.push((FrameType::SendsAccepted, vec![1, 5, 2]));
    // A single answer: the longest req, a bad bool, one byte short.
    cases.push((
        FrameType::SendAccepted,
        [max.to_vec(), id.to_vec(), vec![1]].concat(),
    ));
    cases.push((
        FrameType::SendAccepted,
        [vec![3], id.to_vec(), vec![2]].concat(),
    ));
    cases.push((
        FrameType::SendAccepted,
        [vec![3], id[..15].to_vec()].concat(),
    ));
    // A forward: the longest time, a namespace that is not UTF-8, a body
    // longer than what is left, and no hop count.
    let fwd = |ns: &[u8], body: &[u8], at: &[u8], hops: &[u8]| {
        [
            vec![ns.len() as u8],
            ns.to_vec(),
            vec![1, b'a', 1, b'b'],
            id.to_vec(),
            body.to_vec(),
            at.to_vec(),
            hops.to_vec(),
        ]
        .concat()
    };
    cases.push((FrameType::MeshForward, fwd(b"ns", &[1, b'x'], &max, &[1])));
    cases.push((
        FrameType::MeshForward,
        fwd(&[0xc3, 0x28], &[1, b'x'], &[5], &[0]),
    ));
    cases.push((FrameType::MeshForward, fwd(b"ns", &[9, b'x'], &[5], &[0])));
    cases.push((FrameType::MeshForward, fwd(b"ns", &[1, b'x'], &[5], &[])));
    // Counts at, past and far past the limits, with and without the bytes.
    let varint = |mut n: u64| {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    };
    for n in [MAX_ACK_IDS as u64, MAX_ACK_IDS as u64 + 1, u64::MAX] {
        let full = [varint(n), id.repeat(n.min(2000) as usize)].concat();
        cases.push((FrameType::Ack, full));
        cases.push((FrameType::Ack, varint(n)));
    }
    for n in [MAX_SENDS_ACCEPTED as u64, MAX_SENDS_ACCEPTED as u64 + 1] {
        let full = [varint(n), [1u8, 1].repeat(n as usize)].concat();
        cases.push((FrameType::SendsAccepted, full));
    }
    // Deliveries: runs and messages together at and past the limit.
    let msg = [id.to_vec(), vec![0, 0]].concat();
    for (runs, per_run) in [
        (1usize, MAX_DELIVERIES - 1),
        (1, MAX_DELIVERIES),
        (2, 2047),
        (2, 2048),
    ] {
        let mut b = varint(runs as u64);
        for _ in 0..runs {
            b.extend([0]);
            b.extend(varint(per_run as u64));
            b.extend(msg.repeat(per_run));
        }
        cases.push((FrameType::Deliveries, b));
    }
    cases.push((
        FrameType::Deliveries,
        [varint(1), vec![0], varint(u64::MAX)].concat(),
    ));
    // A status update: a key twice (the last value wins, both ways), a
    // field count the body cannot hold, a value that is not UTF-8, and a
    // `lagged` of 2.
    let head = [vec![1, b'p'], varint(u64::MAX), vec![1, 0, 0]].concat();
    let pair = |k: &[u8], v: &[u8]| {
        [
            varint(k.len() as u64),
            k.to_vec(),
            varint(v.len() as u64),
            v.to_vec(),
        ]
        .concat()
    };
    for (fields, lagged) in [
        (
            [varint(2), pair(b"k", b"1"), pair(b"k", b"2")].concat(),
            0u8,
        ),
        (varint(u64::MAX), 0),
        ([varint(1), pair(b"k", &[0xc3, 0x28])].concat(), 0),
        ([varint(1), pair(b"k", b"v")].concat(), 2),
    ] {
        let b = [head.clone(), fields, vec![lagged]].concat();
        cases.push((FrameType::StatusUpdate, b));
    }
    let mut oks = 0;
    for (ty, b) in cases {
        match (by_hand(ty, &b), by_postcard(ty, &b)) {
            (Ok(a), Ok(p)) => {
                assert_eq!(a, p);
                oks += 1;
            }
            (Err(_), Err(_)) => {}
            (a, p) => panic!("{ty:?} {b:02x?}: hand {a:?}, postcard {p:?}"),
        }
    }
    // Those that should decode did (not every case failed alike): two
    // sends, each limit exactly met, the status with a key twice, the
    // longest answer and the longest forward.
    assert_eq!(oks, 9);
}
