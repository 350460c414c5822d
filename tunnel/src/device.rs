//! The virtual interface (Linux, over `tun-rs`): created with its
//! addresses and MTU, up, read and written in batches. The interface goes
//! away when the [`Tun`] is dropped.
//!
//! Where the kernel allows (`IFF_VNET_HDR` + `TUNSETOFFLOAD`, Linux ≥ 4.x)
//! the interface takes TCP (and UDP) segmentation offload: the local stack
//! hands one read a whole 64 KiB TCP burst, split here into MTU-sized
//! packets ([`Reader`]), and a batch of packets written back is coalesced
//! into as few large ones as their flows allow ([`Writer`], GRO) — one
//! system call and one pass through the kernel's TCP stack per burst
//! instead of per packet, the way wireguard-go and Tailscale do it.
//! Without offload the same API reads and writes one packet per call.

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
    mtu: std::sync::atomic::AtomicU16,
    offload: bool,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload)
            .finish()
    }
}

/// The largest MTU the interface is given (the read buffers' size).
pub const MAX_MTU: u16 = 1500;
/// Room before each packet for the virtio header offload needs.
const HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Packets per batch: a 64 KiB burst split at the smallest MTU (1280)
/// is 52 packets.
pub const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// A coalesced write buffer larger than this is given back after a flush
/// (a batch may grow a few to 64 KiB).
const KEEP_CAPACITY: usize = 16 * 1024;

/// Buffers for [`Tun::recv_batch`]: one raw read, split into packets.
pub struct Reader {
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("n", &self.n).finish()
    }
}

impl Reader {
    /// The packets of the last [`Tun::recv_batch`], each writable in place
    /// (MSS clamping).
    pub fn packets(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.bufs
            .iter_mut()
            .zip(&self.sizes)
            .take(self.n)
            .map(|(b, &len)| &mut b[..len])
    }
}

/// Packets queued for [`Tun::send_batch`].
pub struct Writer {
    bufs: Vec<Vec<u8>>,
    used: usize,
    gro: tun_rs::GROTable,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("used", &self.used).finish()
    }
}

impl Writer {
    /// Queues a copy of `packet`. False when the batch is full (send it
    /// first).
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if self.used == BATCH {
            return false;
        }
        if self.used == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(HEADROOM + 1500));
        }
        let b = &mut self.bufs[self.used];
        b.clear();
        b.resize(HEADROOM, 0);
        b.extend_from_slice(packet);
        self.used += 1;
        true
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Whether another packet fits.
    pub fn is_full(&self) -> bool {
        self.used == BATCH
    }
}

/// An error from the kernel (the interface is gone, …) as opposed to one
/// packet the offload code could not split or merge.
fn is_os_error(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some()
}

/// Whether the kernel would take `name` for an interface.
pub fn check_name(name: &str) -> Result<(), DeviceError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(DeviceError::BadName(name.to_string()))
    }
}

impl Tun {
    /// Creates the interface, with its addresses, up; with segmentation
    /// offload where the kernel takes it. Must run inside a tokio runtime.
    pub fn create(cfg: &TunConfig) -> Result<Self, DeviceError> {
        check_name(&cfg.name)?;
        let build = |offload: bool| {
            let mut b = tun_rs::DeviceBuilder::new()
                .name(cfg.name.clone())
                .mtu(cfg.mtu.min(MAX_MTU))
                .offload(offload)
                .ipv4(cfg.v4.0, cfg.v4.1, None);
            if let Some((a, p)) = cfg.v6 {
                b = b.ipv6(a, p);
            }
            b.build_async()
        };
        let (dev, offload) = match build(true) {
            Ok(d) => (d, true),
            // An older kernel without TUNSETOFFLOAD: one packet per call.
            Err(_) => (
                build(false).map_err(|source| DeviceError::Create {
                    name: cfg.name.clone(),
                    source,
                })?,
                false,
            ),
        };
        let offload = offload && dev.tcp_gso();
        Ok(Self {
            dev,
            name: cfg.name.clone(),
            mtu: cfg.mtu.min(MAX_MTU).into(),
            offload,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the interface's MTU (at most [`MAX_MTU`]).
    pub fn set_mtu(&self, mtu: u16) -> std::io::Result<()> {
        let mtu = mtu.min(MAX_MTU);
        self.dev.set_mtu(mtu)?;
        self.mtu.store(mtu, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Moves the interface to other addresses: `v4` replaces the IPv4
    /// address; `v6` is added and `old_v6` (if another) removed.
    pub fn readdress(
        &self,
        v4: (Ipv4Addr, u8),
        v6: Option<(Ipv6Addr, u8)>,
        old_v6: Option<(Ipv6Addr, u8)>,
    ) -> std::io::Result<()> {
        self.dev.set_network_address(v4.0, v4.1, None)?;
        // No duplicate address detection on a point-to-point interface:
        // without this the new IPv6 address stays tentative (unusable as a
        // source) for a second or more.
        // If it cannot be turned off, the address is only usable a little
        // later: worth a line, not a failure.
        let dad = format!("/proc/sys/net/ipv6/conf/{}/accept_dad", self.name);
        if let Err(e) = std::fs::write(&dad, "0") {
            tracing::debug!("cannot turn off duplicate address detection ({dad}: {e}); the new IPv6 address stays tentative for a moment");
        }
        if let Some((a, p)) = v6 {
            self.dev.add_address_v6(a, p)?;
        }
        if let Some((a, p)) = old_v6.filter(|o| Some(*o) != v6) {
            self.dev.remove_address_v6(a, p)?;
        }
        Ok(())
    }

    /// Whether the kernel took segmentation offload.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Buffers for [`Tun::recv_batch`].
    pub fn reader(&self) -> Reader {
        // With offload a GSO packet is split into segments of at most the
        // MTU; without, one packet of up to the MTU lands in the first.
        let each = usize::from(MAX_MTU);
        let n = if self.offload { BATCH } else { 1 };
        Reader {
            raw: vec![0; HEADROOM + 65_535],
            bufs: vec![vec![0; each]; n],
            sizes: vec![0; n],
            n: 0,
        }
    }

    /// An empty batch for [`Tun::send_batch`].
    pub fn writer(&self) -> Writer {
        Writer {
            bufs: Vec::new(),
            used: 0,
            gro: tun_rs::GROTable::default(),
        }
    }

    /// The next packets the local stack sent into the interface, into
    /// `r`: their number. Zero when what the kernel gave could not be
    /// split (counted by the caller as nothing); an error only when the
    /// interface itself failed.
    pub async fn recv_batch(&self, r: &mut Reader) -> std::io::Result<usize> {
        r.n = 0;
        let res = if self.offload {
            self.dev
                .recv_multiple(&mut r.raw, &mut r.bufs, &mut r.sizes, 0)
                .await
        } else {
            let n = self.dev.recv(&mut r.bufs[0]).await?;
            r.sizes[0] = n;
            Ok(1)
        };
        match res {
            Ok(n) => {
                r.n = n.min(r.bufs.len());
                Ok(r.n)
            }
            Err(e) if is_os_error(&e) => Err(e),
            Err(_) => Ok(0),
        }
    }

    /// Hands the packets queued in `w` to the local stack, as if they
    /// arrived on the interface (coalesced where offload allows), and
    /// empties `w`. Packets the kernel refuses are dropped as IP allows;
    /// an error only when the interface itself failed.
    pub async fn send_batch(&self, w: &mut Writer) -> std::io::Result<()> {
        if w.used == 0 {
            return Ok(());
        }
        let used = std::mem::take(&mut w.used);
        let res = self
            .dev
            .send_multiple(&mut w.gro, &mut w.bufs[..used], HEADROOM)
            .await;
        for b in &mut w.bufs[..used] {
            if b.capacity() > KEEP_CAPACITY {
                *b = Vec::with_capacity(HEADROOM + 1500);
            }
        }
        match res {
            Err(e) if e.raw_os_error() == Some(libc_ebadfd()) => Err(e),
            _ => Ok(()),
        }
    }

    /// Hands one packet to the local stack.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        if !self.offload {
            return self.dev.send(packet).await.map(drop);
        }
        // A zero virtio header: no offload asked for this one.
        let mut b = vec![0u8; HEADROOM + packet.len()];
        b[HEADROOM..].copy_from_slice(packet);
        self.dev.send(&b).await.map(drop)
    }
}

/// `EBADFD`: the interface's descriptor is no longer usable.
const fn libc_ebadfd() -> i32 {
    77
}
