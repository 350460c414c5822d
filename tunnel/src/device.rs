//! The virtual interface (Linux, over `tun-rs`): created with its
//! addresses and MTU, up, read and written one IP packet at a time. The
//! interface goes away when the [`Tun`] is dropped.

use std::net::{Ipv4Addr, Ipv6Addr};

/// How to create the interface.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name (at most 15 bytes), e.g. `swb0`.
    pub name: String,
    /// This peer's IPv4 address and the range's prefix length.
    pub v4: (Ipv4Addr, u8),
    /// This peer's IPv6 address and prefix length, if any.
    pub v6: Option<(Ipv6Addr, u8)>,
    /// The interface MTU.
    pub mtu: u16,
}

/// Why the interface could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A name the kernel would refuse.
    #[error("interface name {0:?}: 1 to 15 bytes of letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// The kernel refused (no CAP_NET_ADMIN, no /dev/net/tun, name taken…).
    #[error("cannot create TUN interface {name}: {source} (needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    Create {
        /// The interface.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A TUN interface.
pub struct Tun {
    dev: tun_rs::AsyncDevice,
    name: String,
    mtu: u16,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl Tun {
    /// Creates the interface, with its addresses, up. Must run inside a
    /// tokio runtime.
    pub fn create(cfg: &TunConfig) -> Result<Self, DeviceError> {
        let ok_name = !cfg.name.is_empty()
            && cfg.name.len() <= 15
            && cfg
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok_name {
            return Err(DeviceError::BadName(cfg.name.clone()));
        }
        let mut b = tun_rs::DeviceBuilder::new()
            .name(cfg.name.clone())
            .mtu(cfg.mtu)
            .ipv4(cfg.v4.0, cfg.v4.1, None);
        if let Some((a, p)) = cfg.v6 {
            b = b.ipv6(a, p);
        }
        let dev = b.build_async().map_err(|source| DeviceError::Create {
            name: cfg.name.clone(),
            source,
        })?;
        Ok(Self {
            dev,
            name: cfg.name.clone(),
            mtu: cfg.mtu,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The next packet the local stack sent into the interface.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.dev.recv(buf).await
    }

    /// Hands `packet` to the local stack, as if it arrived on the interface.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.dev.send(packet).await
    }
}
