//! The JSON bodies of `POST /v1/messages`, `POST /v1/messages/ack` and
//! `PUT /v1/status`, parsed and checked as the relay does before anything
//! is stored: no panic, and what passes is within the documented limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    swb_relay::fuzzing::http_body(data);
});
