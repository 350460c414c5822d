//! The SOCKS5 parsers, fed what a local client sends: greeting, RFC 1929
//! username/password, request. They must never panic, never claim more
//! bytes than they were given, and answer the same for a prefix that was
//! `Incomplete` once the rest arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swb_socks::{parse_greeting, parse_request, parse_user_pass, Parsed};

fn check<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    parse: impl Fn(&[u8]) -> Result<Parsed<T>, swb_socks::Error>,
) {
    let whole = parse(data);
    if let Ok(Parsed::Done(_, used)) = &whole {
        assert!(*used <= data.len() && *used > 0);
        // Bytes after the message do not change it.
        let again = parse(&data[..*used]);
        assert_eq!(again, whole);
    }
    // Every prefix of a complete message is Incomplete or the same error.
    for cut in 0..data.len().min(300) {
        match (parse(&data[..cut]), &whole) {
            (Ok(Parsed::Incomplete), _) => {}
            (Ok(Parsed::Done(_, used)), _) => assert!(used <= cut),
            (Err(_), Err(_)) => {}
            (Err(e), Ok(_)) => panic!("prefix of {cut} bytes errs ({e}) though the whole parses"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, parse_greeting);
    check(data, parse_user_pass);
    check(data, parse_request);
});
