//! A compact control-socket frame (`kind u8 | len u32 | payload`), as the
//! daemon reads it after a client switched to the compact encoding, and a
//! reply frame as the client reads it: neither may panic, and a request the
//! daemon accepts must encode back to the same request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use swb_daemon::compact::{self, CompactRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    // Replies: the client's reader (the daemon is trusted, but a reader that
    // panics on a bad frame is a bug all the same).
    let _ = compact::answer(kind, Bytes::copy_from_slice(payload));
    let Ok(req) = compact::request(kind, payload) else {
        return;
    };
    let mut again = Vec::new();
    match &req {
        CompactRequest::Send { to, body, timeout } => {
            compact::put_send(&mut again, to, body, *timeout).expect("a read name is short")
        }
        CompactRequest::Recv { wait, max } => compact::put_recv(&mut again, *wait, *max),
        CompactRequest::Ack(ids) => compact::put_ack(&mut again, ids),
        CompactRequest::Json(r) => compact::put_json(&mut again, r),
    }
    let (k, len) = compact::header(&again, &[]).expect("a whole header");
    assert_eq!(again.len(), compact::HEADER + len);
    let back = compact::request(k, &again[compact::HEADER..]).expect("an encoded request reads");
    assert_eq!(back, req);
});
