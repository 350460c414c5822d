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
    let r = spawn_in(net.public.name.clone(), f).join();
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
            let mut r = tun.reader();
            let reply = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    tun.recv_batch(&mut r).await?;
                    for pkt in r.packets() {
                        let p = Packet::parse(pkt)?;
                        if let Transport::Icmp { ty: 0, ident, .. } = p.transport {
                            return anyhow::Ok((p.src, p.dst, ident));
                        }
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
                    tun.recv_batch(&mut r).await?;
                    for pkt in r.packets() {
                        let p = Packet::parse(pkt)?;
                        if let Transport::Udp { dst: 9, .. } = p.transport {
                            return anyhow::Ok((p.src, p.dst));
                        }
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

#[test]
fn a_readdressed_interface_answers_and_sends_as_its_new_addresses() -> Result<()> {
    in_netns("tun_readdress", || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (old4, old6) = (Ipv4Addr::new(100, 64, 0, 1), "fd00:5b::1".parse()?);
            let tun = Tun::create(&TunConfig {
                name: "swbtest1".into(),
                v4: (old4, 10),
                v6: Some((old6, 64)),
                mtu: 1280,
            })?;
            let (new4, new6): (Ipv4Addr, std::net::Ipv6Addr) =
                (Ipv4Addr::new(100, 64, 0, 7), "fd00:5b::7".parse()?);
            tun.readdress((new4, 10), Some((new6, 64)), Some((old6, 64)))?;
            let mut r = tun.reader();
            // The kernel answers a ping to the new IPv4 address.
            let peer = IpAddr::from([100, 64, 0, 2]);
            let ping = build::echo_request(peer, new4.into(), 0x5c, 1, b"swb").context("ping")?;
            tun.send(&ping).await?;
            // Programs here send as the new addresses, both families.
            let s4 = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s4.send_to(b"v4", "100.64.0.2:9")?;
            let s6 = std::net::UdpSocket::bind("[::]:0")?;
            s6.send_to(b"v6", "[fd00:5b::2]:9")?;
            let seen = tokio::time::timeout(Duration::from_secs(5), async {
                let (mut reply, mut out4, mut out6) = (None, None, None);
                while reply.is_none() || out4.is_none() || out6.is_none() {
                    tun.recv_batch(&mut r).await?;
                    for pkt in r.packets() {
                        let p = Packet::parse(pkt)?;
                        match p.transport {
                            Transport::Icmp { ty: 0, .. } => reply = Some(p.src),
                            Transport::Udp { dst: 9, .. } if p.src.is_ipv4() => out4 = Some(p.src),
                            Transport::Udp { dst: 9, .. } if p.src == IpAddr::from(new6) => {
                                out6 = Some(p.src)
                            }
                            // Sent before the new address was usable (a
                            // link-local source): again.
                            Transport::Udp { dst: 9, .. } => {
                                s6.send_to(b"v6", "[fd00:5b::2]:9")?;
                            }
                            _ => {}
                        }
                    }
                }
                anyhow::Ok((reply, out4, out6))
            })
            .await
            .context("the interface did not answer / send as its new addresses")??;
            let want = (
                Some(IpAddr::from(new4)),
                Some(IpAddr::from(new4)),
                Some(IpAddr::from(new6)),
            );
            assert_eq!(seen, want);
            Ok(())
        })
    })
}

/// Runs `f` on a new thread that has entered network namespace `ns`
/// (threads it starts are in it too).
fn spawn_in(
    ns: String,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        let fd = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        f()
    })
}

type Packets = tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>;

/// One side of the wire: an interface at `me`, its packets out to `tx`,
/// packets from `rx` in, in batches, until `done`. Returns the largest
/// batch one read gave.
async fn side(
    me: Ipv4Addr,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    mut rx: Packets,
    up: std::sync::mpsc::Sender<bool>,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> Result<usize> {
    let tun = Tun::create(&TunConfig {
        name: "swbt0".into(),
        v4: (me, 10),
        v6: None,
        mtu: 1280,
    })?;
    up.send(tun.offload())?;
    let (mut r, mut w) = (tun.reader(), tun.writer());
    let mut largest = 0;
    loop {
        tokio::select! {
            n = tun.recv_batch(&mut r) => {
                largest = largest.max(n?);
                for p in r.packets() {
                    let _ = tx.send(p.to_vec());
                }
            }
            Some(p) = rx.recv() => {
                w.push(&p);
                while !w.is_full() {
                    match rx.try_recv() {
                        Ok(p) => {
                            w.push(&p);
                        }
                        Err(_) => break,
                    }
                }
                tun.send_batch(&mut w).await?;
            }
            _ = done.changed() => return Ok(largest),
        }
    }
}

/// Two interfaces in two namespaces joined by a user-space wire that moves
/// whole batches (as the daemon does): a 32 MiB TCP transfer between them
/// arrives whole, and with segmentation offload one read of the interface
/// gave a burst of many packets.
#[test]
fn a_tcp_transfer_across_two_interfaces_arrives_whole_and_reads_come_in_bursts() -> Result<()> {
    const TOTAL: usize = 32 << 20;
    let Some(net) = swb_netns::Internet::new("tun_offload", 2, 0)? else {
        return Ok(());
    };
    let (a_ip, b_ip) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
    let (a_tx, b_rx) = tokio::sync::mpsc::unbounded_channel();
    let (b_tx, a_rx) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let (up_tx, up) = std::sync::mpsc::channel();
    let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
    let largest = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = |me, tx, rx, done: tokio::sync::watch::Receiver<bool>, up| {
        let largest = largest.clone();
        move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let n = rt.block_on(side(me, tx, rx, up, done))?;
            largest.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    };
    let a = spawn_in(
        net.relays[0].ns.name.clone(),
        run(a_ip, a_tx, a_rx, done.clone(), up_tx.clone()),
    );
    let b = spawn_in(
        net.relays[1].ns.name.clone(),
        run(b_ip, b_tx, b_rx, done.clone(), up_tx),
    );
    let offload =
        up.recv_timeout(Duration::from_secs(10))? & up.recv_timeout(Duration::from_secs(10))?;
    // The receiver, in b's namespace: counts and hashes what arrives.
    let receiver = spawn_in(net.relays[1].ns.name.clone(), move || {
        use std::io::Read;
        let l = std::net::TcpListener::bind((b_ip, 0))?;
        port_tx.send(l.local_addr()?.port())?;
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0usize;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
        }
        anyhow::ensure!(n == TOTAL, "{n} of {TOTAL} bytes arrived");
        let want = ring::digest::digest(&ring::digest::SHA256, &pattern(TOTAL));
        anyhow::ensure!(h.finish().as_ref() == want.as_ref(), "the bytes differ");
        Ok(())
    });
    let port = port_rx.recv_timeout(Duration::from_secs(10))?;
    let sender = spawn_in(net.relays[0].ns.name.clone(), move || {
        use std::io::Write;
        let mut s =
            std::net::TcpStream::connect_timeout(&(b_ip, port).into(), Duration::from_secs(10))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&pattern(TOTAL))?;
        Ok(())
    });
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    done_tx.send(true)?;
    let ends = [a.join(), b.join()];
    drop(net);
    sent.context("sending")?;
    got.context("receiving")?;
    for e in ends {
        e.map_err(|_| anyhow::anyhow!("a side panicked"))??;
    }
    let largest = largest.load(std::sync::atomic::Ordering::Relaxed);
    if offload {
        assert!(
            largest > 8,
            "with offload one read should split a TCP burst into many packets; the largest was {largest}"
        );
    } else {
        eprintln!("NOTICE: this kernel took no TUN offload; one packet per read");
    }
    Ok(())
}

/// `n` bytes that are not all alike.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}
