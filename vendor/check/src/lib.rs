//! The vendored quinn-proto's send buffer (`vendor/quinn-proto`, patched:
//! see its `SWITCHBOARD.md`, item 15) and its skip over a run of PADDING
//! frames (item 17, in `coding.rs`), compiled here with the few modules
//! it uses, so that its unit tests — upstream's and the model test below —
//! run in this workspace: quinn-proto itself is a `[patch]`, not a member,
//! and Cargo does not build a non-member's tests. Nothing here is used by
//! any binary.

// Upstream's code as it is: what this crate leaves unused, and
// quinn-proto's own cfgs and lints, are not findings here.
#![allow(dead_code, unused_imports, unexpected_cfgs, clippy::all)]

// Upstream's formatting (edition 2024 style), not this workspace's.
#[rustfmt::skip]
#[path = "../../quinn-proto/src/coding.rs"]
mod coding;
#[rustfmt::skip]
#[path = "../../quinn-proto/src/range_set/mod.rs"]
mod range_set;
#[rustfmt::skip]
#[path = "../../quinn-proto/src/connection/send_buffer.rs"]
mod send_buffer;
#[rustfmt::skip]
#[path = "../../quinn-proto/src/varint.rs"]
mod varint;

pub(crate) use varint::VarInt;

#[cfg(test)]
mod model;
#[cfg(test)]
mod padding;
