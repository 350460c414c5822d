//! Small internets from Linux network namespaces, for tests.
//!
//! [`Internet::new`] builds: a **public** segment (a bridge in its own
//! namespace) holding the relays at `10.0.0.10`, `10.0.0.11`, …; and
//! **sites**, each a NAT router (nftables masquerade) on the public segment
//! at `10.0.0.(100 + i)` with one host behind it at `192.168.(i + 1).2`.
//! Hosts reach the relays through their router; nothing on the public
//! segment can open a connection to a host, and sites cannot reach each
//! other except through a relay — as machines behind two home routers.
//!
//! Every namespace has a name unique to this process and test, and is
//! removed (its processes killed first) when the [`Internet`] is dropped,
//! panics included. Interfaces are created inside their namespaces and
//! never exist in the host's.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` (iproute2) and `nft`
//! (nftables). Without them [`Internet::new`] returns `Ok(None)` after a
//! printed notice — unless `SWB_REQUIRE_NETNS=1` (CI), where it fails.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);
/// NAT rebindings so far (each takes a port range not used before).
static REBINDS: AtomicU32 = AtomicU32::new(0);

/// Whether a missing capability must fail instead of skip.
pub fn required() -> bool {
    std::env::var("SWB_REQUIRE_NETNS").is_ok_and(|v| v == "1")
}

fn run(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn program(name: &str, package: &str) -> Result<String> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).exists() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed: apt-get install {package} (./test does this)")
}

/// A network namespace this test made.
#[derive(Debug, Clone)]
pub struct Ns {
    /// Its name (`ip netns exec NAME …`).
    pub name: String,
}

impl Ns {
    /// `program args…` inside this namespace (killed when dropped).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .kill_on_drop(true);
        c
    }

    /// Runs `ip -n NS args…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// Runs `args…` inside the namespace and waits for success.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// The `/etc/resolv.conf` programs started in this namespace (by
    /// `ip netns exec`, from now on) see; removed with the namespace.
    pub fn resolv_conf(&self, content: &str) -> Result<()> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), content)?;
        Ok(())
    }

    /// Applies an nftables script (`nft -f`) inside the namespace.
    pub fn nft(&self, script: &str) -> Result<()> {
        let nft = program("nft", "nftables")?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{}-{n}.nft", self.name));
        std::fs::write(&path, script)?;
        let r = self.exec(&[&nft, "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        r
    }
}

/// A machine: its namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace.
    pub ns: Ns,
    /// Its address (on the public segment, or on its site's LAN).
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` inside this machine's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        self.ns.command(program)
    }
}

/// A NAT router and the host behind it.
#[derive(Debug, Clone)]
pub struct Site {
    /// The router, at its public address.
    pub router: Host,
    /// The host behind it, at its LAN address.
    pub host: Host,
}

impl Site {
    /// Drops `percent` % of the packets the router forwards, both ways (a
    /// lossy uplink); 0 removes the loss.
    pub fn loss(&self, percent: u32) -> Result<()> {
        let nft = program("nft", "nftables")?;
        let _ = self
            .router
            .ns
            .exec(&[&nft, "delete", "table", "inet", "impair"]);
        if percent == 0 {
            return Ok(());
        }
        let rule = if percent >= 100 {
            "drop".to_string()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let rules = format!(
            "table inet impair {{\n  chain lossy {{\n    type filter hook forward priority -10; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        self.router.ns.nft(&rules)
    }

    /// Limits what the site sends to the public segment to `mbit` Mbit/s
    /// (`tc tbf` on the router's public interface); 0 removes the limit.
    /// The kernel here has no `netem`: delay is not emulated.
    pub fn rate(&self, mbit: u32) -> Result<()> {
        let _ = self
            .router
            .ns
            .exec(&["tc", "qdisc", "del", "dev", "eth0", "root"]);
        if mbit == 0 {
            return Ok(());
        }
        self.router.ns.exec(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            "64kb",
            "latency",
            "50ms",
        ])
    }
}

impl Site {
    /// The router drops every UDP packet it would forward, both ways (a
    /// network that lets only TCP out), or (`false`) no longer does.
    pub fn block_udp(&self, on: bool) -> Result<()> {
        let nft = program("nft", "nftables")?;
        let _ = self
            .router
            .ns
            .exec(&[&nft, "delete", "table", "inet", "noudp"]);
        if !on {
            return Ok(());
        }
        self.router.ns.nft(
            "table inet noudp {\n  chain through {\n    type filter hook forward priority -20; policy accept;\n    meta l4proto udp drop\n  }\n}\n",
        )
    }

    /// The router forwards nothing from its LAN: the host reaches the
    /// internet only through a proxy on the router itself.
    pub fn block_forwarding(&self) -> Result<()> {
        self.router.ns.nft(
            "table inet nofwd {\n  chain through {\n    type filter hook forward priority -20; policy accept;\n    iifname \"lan0\" drop\n  }\n}\n",
        )
    }

    /// A NAT rebinding: the router forgets every mapping (its conntrack
    /// table flushed) and maps new flows to a port range it has not used
    /// before, so the next packet of every flow leaves from a new port —
    /// to the relay, each peer behind this router moved.
    pub fn rebind(&self) -> Result<()> {
        let conntrack = program("conntrack", "conntrack")?;
        let k = REBINDS.fetch_add(1, Ordering::Relaxed) % 40;
        let lo = 20_000 + k * 1000;
        let ns = &self.router.ns;
        ns.nft(&format!(
            "flush chain ip nat post\n\
             add rule ip nat post oifname \"eth0\" meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}\n\
             add rule ip nat post oifname \"eth0\" masquerade\n",
            hi = lo + 999
        ))?;
        // `conntrack -F` exits 1 when it deleted nothing (still fine).
        let _ = ns.exec(&[&conntrack, "-F"]);
        Ok(())
    }
}

/// The emulated internet; removed when dropped.
#[derive(Debug)]
pub struct Internet {
    /// The public segment's namespace (holds the bridge).
    pub public: Ns,
    /// Relay machines on the public segment.
    pub relays: Vec<Host>,
    /// Sites behind NAT.
    pub sites: Vec<Site>,
    made: Vec<Ns>,
}

impl Internet {
    /// `relays` relay machines and `sites` NAT'ed sites, or `None` (after
    /// a notice) when namespaces cannot be made here and CI does not
    /// require them.
    pub fn new(test: &str, relays: usize, sites: usize) -> Result<Option<Self>> {
        let why = if !rustix::process::geteuid().is_root() {
            Some("not root".to_string())
        } else if let Err(e) = program("ip", "iproute2").and(program("nft", "nftables")) {
            Some(e.to_string())
        } else {
            None
        };
        if let Some(why) = why {
            if required() {
                bail!("{test}: network namespaces needed and SWB_REQUIRE_NETNS=1, but {why}");
            }
            eprintln!("NOTICE: {test} skipped: network namespaces need root, iproute2 and nftables ({why})");
            return Ok(None);
        }
        let mut net = Internet {
            public: Ns {
                name: String::new(),
            },
            relays: Vec::new(),
            sites: Vec::new(),
            made: Vec::new(),
        };
        net.build(relays, sites)?;
        Ok(Some(net))
    }

    /// Every link between site `site`'s host and the relay machines takes
    /// frames of `mtu` bytes (jumbo frames, for 9000): the host's and the
    /// router's interfaces, the router's and the relays' ports on the
    /// public bridge. The other sites keep Ethernet's 1500.
    pub fn set_site_mtu(&self, site: usize, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        let s = &self.sites[site];
        s.host.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        s.router.ns.ip(&["link", "set", "lan0", "mtu", &mtu])?;
        s.router.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        self.public
            .ip(&["link", "set", &format!("s{site}"), "mtu", &mtu])?;
        for (i, r) in self.relays.iter().enumerate() {
            r.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
            self.public
                .ip(&["link", "set", &format!("r{i}"), "mtu", &mtu])?;
        }
        Ok(())
    }

    /// The host of site `from` loses its only interface (down) and gets a
    /// new one, to the router of site `to` (a laptop leaving one network
    /// for another): a new LAN, a new address (returned), a new NAT.
    pub fn move_host(&self, from: usize, to: usize) -> Result<Ipv4Addr> {
        let host = &self.sites[from].host.ns;
        let router = &self.sites[to].router.ns;
        let n = SEQ.fetch_add(1, Ordering::Relaxed) % 100;
        let (h_if, r_if) = (format!("eth{}", n + 1), format!("lan{}", n + 1));
        let net = |h: u8| Ipv4Addr::new(192, 168, 100 + n as u8, h);
        run(&[
            "ip",
            "link",
            "add",
            &h_if,
            "netns",
            &host.name,
            "type",
            "veth",
            "peer",
            "name",
            &r_if,
            "netns",
            &router.name,
        ])?;
        router.ip(&["addr", "add", &format!("{}/24", net(1)), "dev", &r_if])?;
        router.ip(&["link", "set", &r_if, "up"])?;
        router.nft(&format!(
            "add rule ip filter through iifname \"{r_if}\" accept\n"
        ))?;
        host.ip(&["addr", "add", &format!("{}/24", net(2)), "dev", &h_if])?;
        // The old interface goes away (its routes with it), then the new
        // one comes up and carries the default route.
        host.ip(&["link", "set", "eth0", "down"])?;
        host.ip(&["link", "set", &h_if, "up"])?;
        host.ip(&["route", "replace", "default", "via", &net(1).to_string()])?;
        Ok(net(2))
    }

    fn ns(&mut self, role: &str) -> Result<Ns> {
        let name = format!(
            "swb{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = Ns { name };
        self.made.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
    fn veth(a: &Ns, a_if: &str, b: &Ns, b_if: &str) -> Result<()> {
        run(&[
            "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
            "netns", &b.name,
        ])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    fn build(&mut self, relays: usize, sites: usize) -> Result<()> {
        let public = self.ns("pub")?;
        public.ip(&["link", "add", "br0", "type", "bridge"])?;
        public.ip(&["link", "set", "br0", "up"])?;
        self.public = public.clone();
        for i in 0..relays {
            let ns = self.ns(&format!("relay{i}"))?;
            let port = format!("r{i}");
            Self::veth(&ns, "eth0", &public, &port)?;
            public.ip(&["link", "set", &port, "master", "br0"])?;
            let addr = Ipv4Addr::new(10, 0, 0, 10 + i as u8);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            self.relays.push(Host { ns, addr });
        }
        for i in 0..sites {
            let router = self.ns(&format!("nat{i}"))?;
            let host = self.ns(&format!("host{i}"))?;
            let port = format!("s{i}");
            Self::veth(&router, "eth0", &public, &port)?;
            public.ip(&["link", "set", &port, "master", "br0"])?;
            let public_addr = Ipv4Addr::new(10, 0, 0, 100 + i as u8);
            router.ip(&["addr", "add", &format!("{public_addr}/24"), "dev", "eth0"])?;
            Self::veth(&router, "lan0", &host, "eth0")?;
            let lan = |h: u8| Ipv4Addr::new(192, 168, i as u8 + 1, h);
            router.ip(&["addr", "add", &format!("{}/24", lan(1)), "dev", "lan0"])?;
            host.ip(&["addr", "add", &format!("{}/24", lan(2)), "dev", "eth0"])?;
            host.ip(&["route", "add", "default", "via", &lan(1).to_string()])?;
            router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // Masquerade what leaves for the public segment; let in only
            // what answers a connection from inside (a home router).
            let rules = "table ip nat {\n\
                 \x20 chain post {\n\
                 \x20   type nat hook postrouting priority 100; policy accept;\n\
                 \x20   oifname \"eth0\" masquerade\n\
                 \x20 }\n\
                 }\n\
                 table ip filter {\n\
                 \x20 chain through {\n\
                 \x20   type filter hook forward priority 0; policy drop;\n\
                 \x20   iifname \"lan0\" accept\n\
                 \x20   ct state established,related accept\n\
                 \x20 }\n\
                 }\n";
            router.nft(rules)?;
            self.sites.push(Site {
                router: Host {
                    ns: router,
                    addr: public_addr,
                },
                host: Host {
                    ns: host,
                    addr: lan(2),
                },
            });
        }
        Ok(())
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            // Processes first (a namespace lives on while one is inside).
            if let Ok(out) = std::process::Command::new("ip")
                .args(["netns", "pids", &ns.name])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = std::process::Command::new("kill")
                        .args(["-9", pid])
                        .status();
                }
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns.name])
                .status();
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&ns.name));
        }
    }
}
