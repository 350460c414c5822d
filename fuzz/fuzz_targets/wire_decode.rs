//! Feeds arbitrary bytes to the frame decoder, as a relay reads them from an
//! untrusted peer. It must never panic or allocate beyond the named limits,
//! and every frame it accepts must re-encode to a frame that decodes equal.
//! The four frames decoded by hand must decode as postcard decodes them.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use swb_wire::{decode, Decoded, FrameReader};

fuzz_target!(|data: &[u8]| {
    // The hand-written decoders against postcard.
    swb_wire::fuzz_hot_frames(data);
    // One-shot decoder.
    if let Ok(Decoded::Frame { frame, consumed }) = decode(data) {
        assert!(consumed <= data.len());
        let mut out = BytesMut::new();
        if frame.encode(&mut out).is_ok() {
            match decode(&out) {
                Ok(Decoded::Frame { frame: again, .. }) => assert_eq!(frame, again),
                other => panic!("re-encoded frame did not decode: {other:?}"),
            }
        }
    }
    // Streaming reader: preamble, then frames, fed in two pieces.
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut r = FrameReader::new();
    let mut have_preamble = false;
    for piece in [&data[..split], &data[split..]] {
        r.buf().extend_from_slice(piece);
        if !have_preamble {
            match r.preamble() {
                Ok(Some(_)) => have_preamble = true,
                Ok(None) => continue,
                Err(_) => return,
            }
        }
        loop {
            match r.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        // Buffer growth stays bounded by the frame limit, whatever the input.
        assert!(
            r.buf().capacity()
                <= swb_wire::MAX_FRAME_LEN + swb_wire::HEADER_LEN + data.len() + 64 * 1024
        );
    }
});
