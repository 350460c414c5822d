//! A control-socket request line, as the daemon parses it from any local
//! process allowed to connect: it must never panic, and any request it
//! accepts must serialize back to a line that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swb_daemon::control::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let line = serde_json::to_vec(&req).expect("a request serializes");
        let again: Request = serde_json::from_slice(&line).expect("a serialized request parses");
        assert_eq!(req, again);
    }
});
