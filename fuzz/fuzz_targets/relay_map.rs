//! Gossip from another relay (relay maps, mesh member lists, welcomes),
//! merged into a relay's view of the mesh: never a panic, the relay always
//! in its own live set, memory bounded by `MAX_RELAYS`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    swb_relay::fuzzing::relay_map(data);
});
