//! The send buffer against a model of the stream: whatever was written,
//! acknowledged (in any order) and declared lost, every range
//! `poll_transmit` hands out reads back, through `get`, as the bytes
//! written there — read the way `write_stream_frames` reads it, piece by
//! piece. The searches `get` starts where the last one ended (the patch)
//! must stay right as acknowledged segments leave the front.

use crate::send_buffer::SendBuffer;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The application writes this many bytes (one segment).
    Write(usize),
    /// A packet takes up to this many bytes.
    Poll(usize),
    /// The peer acknowledges `start..start + len` (of what was sent, and
    /// not waiting to be sent again: an acknowledgement is of a packet).
    Ack(u64, u64),
    /// A packet carrying `start..start + len` is declared lost (of what
    /// was sent and not acknowledged).
    Lose(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..300).prop_map(Op::Write),
        3 => (17usize..2000).prop_map(Op::Poll),
        2 => (0u64..4000, 1u64..1500).prop_map(|(a, l)| Op::Ack(a, l)),
        1 => (0u64..4000, 1u64..1500).prop_map(|(a, l)| Op::Lose(a, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn every_range_sent_reads_back_as_written(ops in proptest::collection::vec(op(), 1..200)) {
        let mut buf = SendBuffer::new();
        let mut written: Vec<u8> = Vec::new();
        let mut acked: Vec<bool> = Vec::new();
        let mut lost: Vec<bool> = Vec::new();
        let mut sent = 0u64;
        for o in ops {
            match o {
                Op::Write(n) => {
                    let data: Vec<u8> = (0..n).map(|i| ((written.len() + i) % 251) as u8).collect();
                    written.extend_from_slice(&data);
                    acked.resize(written.len(), false);
                    lost.resize(written.len(), false);
                    buf.write(data.into());
                }
                Op::Poll(max) => {
                    let (range, _) = buf.poll_transmit(max);
                    sent = sent.max(range.end);
                    for b in range.clone() {
                        lost[b as usize] = false;
                    }
                    let mut at = range.clone();
                    let mut read = Vec::new();
                    while at.start != at.end {
                        let piece = buf.get(at.clone());
                        prop_assert!(!piece.is_empty(), "nothing at {:?}", at);
                        at.start += piece.len() as u64;
                        read.extend_from_slice(piece);
                    }
                    prop_assert_eq!(&read[..], &written[range.start as usize..range.end as usize]);
                }
                Op::Ack(start, len) => {
                    let end = (start + len).min(sent);
                    if start < end && !(start..end).any(|b| lost[b as usize]) {
                        for b in start..end {
                            acked[b as usize] = true;
                        }
                        buf.ack(start..end);
                    }
                }
                Op::Lose(start, len) => {
                    let end = (start + len).min(sent);
                    if start < end && !(start..end).any(|b| acked[b as usize] || lost[b as usize]) {
                        for b in start..end {
                            lost[b as usize] = true;
                        }
                        buf.retransmit(start..end);
                    }
                }
            }
        }
    }
}
