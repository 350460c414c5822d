//! Item 17: a run of PADDING frames is skipped in one step. `zero_prefix`
//! (in the patched `coding.rs`) must count exactly the zero bytes a
//! byte-at-a-time reader would have taken as PADDING frames, wherever the
//! run ends relative to its 32-byte steps.

use crate::coding::zero_prefix;
use proptest::prelude::*;

fn one_at_a_time(b: &[u8]) -> usize {
    b.iter().take_while(|&&x| x == 0).count()
}

#[test]
fn runs_around_the_steps() {
    for run in [0usize, 1, 2, 31, 32, 33, 63, 64, 65, 95, 16_000] {
        // Nothing after the run, or a frame (its first byte nonzero).
        for tail in [&[][..], &[1], &[0x06, 0], &[0x80, 0, 0, 0]] {
            let mut b = vec![0u8; run];
            b.extend_from_slice(tail);
            assert_eq!(zero_prefix(&b), run, "run {run}, tail {tail:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    /// Mostly zeros with a few other bytes anywhere: the same count as
    /// reading one byte at a time.
    #[test]
    fn counts_as_one_byte_at_a_time(b in proptest::collection::vec(
        prop_oneof![12 => Just(0u8), 1 => any::<u8>()], 0..300)) {
        prop_assert_eq!(zero_prefix(&b), one_at_a_time(&b));
    }
}
