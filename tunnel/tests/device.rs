//! The TUN interface against the real kernel, inside a network namespace
//! of this test: the kernel answers a ping we write into the interface, and
//! a datagram a program sends to a peer's address comes out of it. Needs root;
//! skips with a notice elsewhere, fails in CI (`SWB_REQUIRE_NETNS=1`).

use anyhow::{Context, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use swb_tunnel::build;
use swb_tunnel::device::{Tun, TunConfig};
use swb_tunnel::packet::{Packet, Transport};

/// Runs `f` on a thread that has entered a fresh network namespace (so the
/// interface and the kernel's answers stay inside it), with its own tokio
/// runtime; the namespace is deleted afterwards.
fn in_netns(test: &str, f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    let Some(net) = swb_netns::Internet::new(test, 0, 0)? else {
        return Ok(());
    };
    let ns = net.public.name.clone();
    let r = std::thread::spawn(move || -> Result<()> {
        let fd = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        f()
    })
    .join();
    drop(net);
    r.map_err(|_| anyhow::anyhow!("test thread panicked"))?
}

#[test]
fn the_kernel_answers_a_ping_written_into_the_interface_and_its_packets_come_out() -> Result<()> {
    in_netns("tun_device", || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let me = Ipv4Addr::new(100, 64, 0, 1);
            let tun = Tun::create(&TunConfig {
                name: "swbtest0".into(),
                v4: (me, 10),
                v6: None,
                mtu: 1280,
            })?;
            assert_eq!(tun.name(), "swbtest0");
            // A peer at 100.64.0.2 pings us: the kernel answers into the
            // interface.
            let peer = IpAddr::from([100, 64, 0, 2]);
            let ping = build::echo_request(peer, me.into(), 0x5b, 1, b"swb").context("ping")?;
            tun.send(&ping).await?;
            let mut buf = vec![0u8; 2048];
            let reply = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let n = tun.recv(&mut buf).await?;
                    let p = Packet::parse(&buf[..n])?;
                    if let Transport::Icmp { ty: 0, ident, .. } = p.transport {
                        return anyhow::Ok((p.src, p.dst, ident));
                    }
                }
            })
            .await
            .context("no echo reply from the kernel")??;
            assert_eq!(reply, (IpAddr::from(me), peer, 0x5b));
            // A program here sends to the peer: the datagram comes out of
            // the interface.
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.send_to(b"to the peer", "100.64.0.2:9")?;
            let out = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let n = tun.recv(&mut buf).await?;
                    let p = Packet::parse(&buf[..n])?;
                    if let Transport::Udp { dst: 9, .. } = p.transport {
                        return anyhow::Ok((p.src, p.dst));
                    }
                }
            })
            .await
            .context("the datagram never came out")??;
            assert_eq!(out, (IpAddr::from(me), peer));
            Ok(())
        })
    })
}
