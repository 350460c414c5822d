//! OCSP bytes from the network: a relay's responder answer, a daemon's
//! stapled response, and the certificates in both. Parsing and checking
//! never panic; only the one genuine response in the corpus checks good.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swb_ocsp::{check, Cert, CertStatus};

static CA: &[u8] = include_bytes!("../fixtures/ca.der");
static LEAF: &[u8] = include_bytes!("../fixtures/leaf.der");
/// 2026-11-30: within the fixture response's ten years.
const NOW: u64 = 1_796_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Cert::parse(data) {
        let _ = (c.ocsp_urls(), c.must_staple(), c.not_after());
        let _ = swb_ocsp::request(&c, &c);
    }
    let (Ok(leaf), Ok(ca)) = (Cert::parse(LEAF), Cert::parse(CA)) else {
        panic!("the fixtures parse");
    };
    if let Ok(c) = check(data, &leaf, &ca, NOW) {
        // Signed by the CA's key, which the fuzzer does not have: only
        // responses openssl made (the corpus seed) get here.
        assert!(matches!(c.status, CertStatus::Good));
    }
});
