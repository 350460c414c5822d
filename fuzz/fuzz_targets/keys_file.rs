//! The keys file, as the relay reads it on start and on SIGHUP (a file an
//! operator's tooling writes, maybe half-written or hand-edited): parsing
//! never panics; a file that parses writes back to text that parses equal;
//! a key store built from it answers lookups of arbitrary key strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swb_relay::{KeyStore, KeysFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = KeysFile::parse(text, "fuzz") else {
        return;
    };
    let again = file.to_toml("fuzz").expect("a parsed keys file renders");
    assert_eq!(
        KeysFile::parse(&again, "fuzz").expect("rendered file parses"),
        file
    );
    let store = KeyStore::new(&file);
    for k in &file.keys {
        let _ = store.is_active(&k.id);
        let _ = store.allows(&k.id, "london");
        let _ = store.verify(&format!("swb_{}_{}", k.id, k.hash));
    }
    // The last line as a key someone presents.
    if let Some(line) = text.lines().last() {
        let _ = store.verify(line);
    }
});
