//! Switchboard's TUN mode: with `swbd up --tun`, a machine gets a virtual
//! interface and an address for every peer of its namespace, and any IP
//! program reaches them.
//!
//! This crate holds the parts that know nothing about relays:
//! - [`device`]: the virtual interface, over [`tun-rs`](https://docs.rs/tun-rs)
//!   2.x. Not the older `tun-tap` crate: it is built on tokio-core 0.1 and
//!   cannot run under tokio 1. Linux first; the platform stays behind
//!   [`device::Tun`].
//! - [`addr`]: the address plan (CGNAT IPv4 + a ULA /64 per namespace) and
//!   the durable per-namespace allocator.
//! - [`packet`]: a checked view of one IP packet; [`build`]: the packets
//!   the tunnel answers with (TCP reset, ICMP unreachable, "fragmentation
//!   needed" / "packet too big").
//! - [`policy`]: which inbound packets a peer lets in (its exposed ports,
//!   ping, answers to its own flows); [`mss`]: TCP MSS clamping.

pub mod addr;
pub mod build;
#[cfg(all(target_os = "linux", feature = "device"))]
pub mod device;
pub mod dns;
pub mod mss;
pub mod names;
pub mod packet;
pub mod policy;

pub use addr::{AddrError, AddressPlan, Allocator};
pub use packet::{Packet, PacketError, Transport};
pub use policy::{Policy, Verdict};
