//! The address plan: every peer of a namespace gets a stable IPv4 address
//! in a CGNAT range (default `100.64.0.0/10`) and an IPv6 address in a
//! unique local /64 derived from the namespace (`fdXX:XXXX:XXXX::/64`, RFC
//! 4193, the 40-bit global ID from SHA-256 of the namespace), both from one
//! index. The [`Allocator`] hands indexes out once per name and keeps them
//! in an append-only file, so a name keeps its addresses across restarts.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The default IPv4 range (RFC 6598 shared address space).
pub const DEFAULT_V4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

/// What went wrong with the address plan or its file.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The IPv4 range is not usable.
    #[error("the IPv4 range {0}/{1} is not usable: a prefix of 8 to 30 bits, the network address (host bits zero)")]
    BadRange(Ipv4Addr, u8),
    /// Not `A.B.C.D/PREFIX`.
    #[error("{0:?} is not an IPv4 range (A.B.C.D/PREFIX, e.g. 100.64.0.0/10)")]
    RangeSyntax(String),
    /// Every address the namespace may have is taken.
    #[error(
        "all {0} addresses this namespace may have are assigned (addresses stay with their names)"
    )]
    Full(u32),
    /// The allocation file could not be read or written.
    #[error("address file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the allocation file is not `INDEX<TAB>NAME`.
    #[error("address file {path}, line {line}: not `INDEX<TAB>NAME` within the range")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// Parses and checks an IPv4 range for the plan (`100.64.0.0/10`).
pub fn parse_range(text: &str) -> Result<(Ipv4Addr, u8), AddrError> {
    let bad = || AddrError::RangeSyntax(text.to_string());
    let (a, p) = text.trim().split_once('/').ok_or_else(bad)?;
    let net: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    AddressPlan::new(net, prefix, "")?;
    Ok((net, prefix))
}

/// A namespace's address plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPlan {
    v4_net: u32,
    v4_prefix: u8,
    v6_net: [u8; 8],
}

impl AddressPlan {
    /// The plan of `namespace` over the IPv4 range `v4_net/v4_prefix`.
    pub fn new(v4_net: Ipv4Addr, v4_prefix: u8, namespace: &str) -> Result<Self, AddrError> {
        let net = u32::from(v4_net);
        let host_bits = 32u32.saturating_sub(u32::from(v4_prefix));
        if !(8..=30).contains(&v4_prefix) || net & ((1u32 << host_bits) - 1) != 0 {
            return Err(AddrError::BadRange(v4_net, v4_prefix));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, namespace.as_bytes());
        let g = digest.as_ref();
        Ok(Self {
            v4_net: net,
            v4_prefix,
            v6_net: [0xfd, g[0], g[1], g[2], g[3], g[4], 0, 0],
        })
    }

    /// Addresses there are (the range less its network and broadcast
    /// addresses).
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - u32::from(self.v4_prefix))) - 2
    }

    /// The IPv4 prefix length (the interface's netmask).
    pub fn v4_prefix(&self) -> u8 {
        self.v4_prefix
    }

    /// The addresses of index `i` (1 ..= capacity).
    pub fn addrs(&self, i: u32) -> Option<(Ipv4Addr, Ipv6Addr)> {
        if i == 0 || i > self.capacity() {
            return None;
        }
        let v4 = Ipv4Addr::from(self.v4_net | i);
        let mut v6 = [0u8; 16];
        v6[..8].copy_from_slice(&self.v6_net);
        v6[12..].copy_from_slice(&i.to_be_bytes());
        Some((v4, Ipv6Addr::from(v6)))
    }

    /// The index an address of this plan stands for.
    pub fn index_of(&self, ip: IpAddr) -> Option<u32> {
        let i = match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                let mask = !((1u32 << (32 - u32::from(self.v4_prefix))) - 1);
                if a & mask != self.v4_net {
                    return None;
                }
                a & !mask
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                if o[..8] != self.v6_net || o[8..12] != [0; 4] {
                    return None;
                }
                u32::from_be_bytes([o[12], o[13], o[14], o[15]])
            }
        };
        (1..=self.capacity()).contains(&i).then_some(i)
    }
}

/// Hands out one index per name, for good.
#[derive(Debug)]
pub struct Allocator {
    plan: AddressPlan,
    path: Option<PathBuf>,
    by_name: HashMap<String, u32>,
    by_index: HashMap<u32, String>,
    used: BTreeSet<u32>,
    /// Names it hands an index to at most.
    limit: u32,
    /// No index below this one is free (indexes are never given back).
    free_from: u32,
}

impl Allocator {
    /// An allocator kept in memory only (tests).
    pub fn in_memory(plan: AddressPlan) -> Self {
        Self {
            plan,
            path: None,
            by_name: HashMap::new(),
            by_index: HashMap::new(),
            used: BTreeSet::new(),
            limit: plan.capacity(),
            free_from: 1,
        }
    }

    /// At most `limit` names get an index (fewer than the range holds).
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit.min(self.plan.capacity());
        self
    }

    /// The allocator whose assignments live in `path` (created when
    /// missing).
    pub fn open(plan: AddressPlan, path: &Path) -> Result<Self, AddrError> {
        let io = |source| AddrError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut a = Self::in_memory(plan);
        a.path = Some(path.to_path_buf());
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        for (n, line) in text.lines().enumerate() {
            let corrupt = || AddrError::Corrupt {
                path: path.to_path_buf(),
                line: n + 1,
            };
            let (i, name) = line.split_once('\t').ok_or_else(corrupt)?;
            let i: u32 = i.parse().map_err(|_| corrupt())?;
            if plan.addrs(i).is_none() || name.is_empty() || a.used.contains(&i) {
                return Err(corrupt());
            }
            if a.by_name.insert(name.to_string(), i).is_some() {
                return Err(corrupt());
            }
            a.by_index.insert(i, name.to_string());
            a.used.insert(i);
        }
        Ok(a)
    }

    /// The index of `name`, assigning (and recording) the lowest free one
    /// the first time.
    pub fn assign(&mut self, name: &str) -> Result<u32, AddrError> {
        self.assign_wanting(name, None)
    }

    /// [`Allocator::assign`], giving a name it does not know the index it
    /// asks for when that one is free (a peer that had it before, from a
    /// table that was lost).
    pub fn assign_wanting(&mut self, name: &str, want: Option<u32>) -> Result<u32, AddrError> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(i);
        }
        if self.used.len() >= self.limit as usize {
            return Err(AddrError::Full(self.limit));
        }
        let wanted = want.filter(|w| self.plan.addrs(*w).is_some() && !self.used.contains(w));
        // Else the lowest free index (never below `free_from`).
        while self.used.contains(&self.free_from) {
            self.free_from += 1;
        }
        let i = wanted.unwrap_or(self.free_from);
        if i > self.plan.capacity() {
            return Err(AddrError::Full(self.plan.capacity()));
        }
        if let Some(path) = &self.path {
            let io = |source| AddrError::Io {
                path: path.clone(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{i}\t{name}\n").as_bytes())
                .map_err(io)?;
            f.sync_data().map_err(io)?;
        }
        self.by_name.insert(name.to_string(), i);
        self.by_index.insert(i, name.to_string());
        self.used.insert(i);
        Ok(i)
    }

    /// The index of `name`, if assigned.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name index `i` is assigned to, if any.
    pub fn name_of(&self, i: u32) -> Option<&str> {
        self.by_index.get(&i).map(String::as_str)
    }

    /// The plan.
    pub fn plan(&self) -> &AddressPlan {
        &self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> AddressPlan {
        AddressPlan::new(DEFAULT_V4_NET.0, DEFAULT_V4_NET.1, "acme").expect("plan")
    }

    #[test]
    fn the_plan_maps_indexes_to_addresses_and_back() {
        let p = plan();
        assert_eq!(p.capacity(), (1 << 22) - 2);
        let (v4, v6) = p.addrs(1).expect("1");
        assert_eq!(v4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(v6.octets()[0], 0xfd);
        assert_eq!(p.index_of(v4.into()), Some(1));
        assert_eq!(p.index_of(v6.into()), Some(1));
        let (v4, _) = p.addrs(300).expect("300");
        assert_eq!(v4, Ipv4Addr::new(100, 64, 1, 44));
        assert_eq!(p.addrs(0), None);
        assert_eq!(p.addrs(p.capacity() + 1), None);
        assert_eq!(p.index_of(IpAddr::from([10, 0, 0, 1])), None);
        // Another namespace has another ULA prefix.
        let other = AddressPlan::new(DEFAULT_V4_NET.0, 10, "globex").expect("plan");
        assert_ne!(other.addrs(1).expect("1").1, p.addrs(1).expect("1").1);
        assert_eq!(other.index_of(p.addrs(1).expect("1").1.into()), None);
        assert!(AddressPlan::new(Ipv4Addr::new(100, 64, 0, 1), 10, "x").is_err());
        assert!(AddressPlan::new(Ipv4Addr::new(100, 64, 0, 0), 31, "x").is_err());
    }

    #[test]
    fn ranges_parse_and_are_checked() {
        assert_eq!(parse_range("100.64.0.0/10").expect("ok"), DEFAULT_V4_NET);
        assert_eq!(
            parse_range(" 10.200.0.0/16 ").expect("ok"),
            (Ipv4Addr::new(10, 200, 0, 0), 16)
        );
        for bad in ["100.64.0.0", "100.64.0.0/x", "100.64/10", ""] {
            assert!(
                matches!(parse_range(bad), Err(AddrError::RangeSyntax(_))),
                "{bad}"
            );
        }
        // Host bits set, or a prefix outside 8..=30.
        for bad in ["100.64.0.1/10", "10.0.0.0/31", "10.0.0.0/4"] {
            assert!(
                matches!(parse_range(bad), Err(AddrError::BadRange(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_keep_their_index_across_a_reopen_and_a_full_range_says_so() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("addresses");
        let mut a = Allocator::open(plan(), &path).expect("open");
        assert_eq!(a.assign("london").expect("a"), 1);
        assert_eq!(a.assign("paris").expect("a"), 2);
        assert_eq!(a.assign("london").expect("a"), 1);
        let mut b = Allocator::open(plan(), &path).expect("reopen");
        assert_eq!(b.get("paris"), Some(2));
        assert_eq!(b.name_of(2), Some("paris"));
        assert_eq!(b.name_of(5), None);
        assert_eq!(b.assign("tokyo").expect("a"), 3);
        let small = AddressPlan::new(Ipv4Addr::new(10, 9, 0, 0), 30, "x").expect("plan");
        let mut c = Allocator::in_memory(small);
        assert_eq!(c.assign("a").expect("a"), 1);
        assert_eq!(c.assign("b").expect("b"), 2);
        assert!(matches!(c.assign("c"), Err(AddrError::Full(2))));
        // A namespace's cap below its range.
        let mut capped = Allocator::in_memory(plan()).with_limit(2);
        assert_eq!(capped.assign("a").expect("a"), 1);
        assert_eq!(capped.assign_wanting("b", Some(40)).expect("b"), 40);
        assert!(matches!(capped.assign("c"), Err(AddrError::Full(2))));
        assert_eq!(capped.assign("a").expect("known"), 1);
        // A peer that had index 7 before gets it back when it is free.
        let mut d = Allocator::in_memory(plan());
        assert_eq!(d.assign_wanting("back", Some(7)).expect("7"), 7);
        assert_eq!(d.assign_wanting("again", Some(7)).expect("1"), 1);
        assert_eq!(d.assign("next").expect("2"), 2);
        assert_eq!(d.assign_wanting("back", Some(9)).expect("kept"), 7);
        std::fs::write(&path, "1\tlondon\nnot a line\n").expect("write");
        assert!(matches!(
            Allocator::open(plan(), &path),
            Err(AddrError::Corrupt { line: 2, .. })
        ));
    }
}
