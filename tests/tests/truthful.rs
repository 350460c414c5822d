//! Streams end truthfully: a stream that was cut is an error with its
//! cause at every door (the framed control stream and the Rust API, SOCKS,
//! the exposed service), and a clean end means every byte arrived.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::time::Duration;
use swb_daemon::{Exposure, SocksConfig};
use swb_tests::{pattern, sha256, TestDaemon, TestRelay, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A service that reads `after` bytes of each connection, then resets it.
async fn resetting_service(after: usize) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; after];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    Ok((addr, task))
}

/// A service that reports how each connection's incoming side ended:
/// `Ok(bytes)` at a clean EOF, `Err(kind)` when it was reset.
async fn watching_service() -> Result<(
    SocketAddr,
    tokio::sync::mpsc::Receiver<Result<u64, std::io::ErrorKind>>,
    tokio::task::JoinHandle<()>,
)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            let end = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => break Err(e.kind()),
                }
            };
            let _ = tx.send(end).await;
        }
    });
    Ok((addr, rx, task))
}

async fn london_and_laptop(
    relay: &TestRelay,
    key: &str,
    target: SocketAddr,
) -> Result<(TestDaemon, TestDaemon)> {
    let london = TestDaemon::start_with(relay, key, "london", |c| {
        c.expose = vec![Exposure {
            port: 9000,
            target: target.to_string(),
        }]
    })
    .await?;
    let laptop = TestDaemon::start_with(relay, key, "laptop", |c| {
        c.socks = Some(SocksConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            auth: None,
            required: true,
        })
    })
    .await?;
    Ok((london, laptop))
}

#[tokio::test]
async fn a_target_reset_mid_stream_is_an_error_with_its_cause_not_an_end() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (addr, _svc) = resetting_service(100_000).await?;
    let (_london, laptop) = london_and_laptop(&relay, &key, addr).await?;
    let c = laptop.client().await?;
    let s = c
        .connect_framed("london", 9000, Duration::from_secs(5))
        .await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    // Keep sending; the service resets after 100 000 bytes.
    let writer = async {
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..160 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await
    };
    let ((), read) = tokio::time::timeout(WAIT, async { tokio::join!(writer, reader) }).await?;
    let e = read.expect_err("a reset must not read as a clean end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(e.to_string().contains("reset by london's target"), "{e}");
    Ok(())
}

#[tokio::test]
async fn a_clean_framed_stream_delivers_every_byte_then_ends() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let hs = swb_tests::HashServer::start().await?;
    let (_london, laptop) = london_and_laptop(&relay, &key, hs.addr).await?;
    let s = laptop
        .client()
        .await?
        .connect_framed("london", 9000, Duration::from_secs(5))
        .await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let data = pattern(5, 3 << 20);
    let send = async {
        wr.write_all(&data).await?;
        wr.shutdown().await
    };
    let recv = async {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.map(|_| back)
    };
    let (s, back) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) }).await?;
    s?;
    assert_eq!(
        back?,
        sha256(&data),
        "the hash of every byte, then a clean end"
    );
    Ok(())
}

#[tokio::test]
async fn a_caller_that_goes_away_reaches_the_service_as_a_reset_not_an_eof() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (addr, mut ends, _svc) = watching_service().await?;
    let (_london, laptop) = london_and_laptop(&relay, &key, addr).await?;

    // A framed caller that sends some bytes and vanishes without `end`.
    let s = laptop
        .client()
        .await?
        .connect_framed("london", 9000, Duration::from_secs(5))
        .await?;
    let (_rd, mut wr) = tokio::io::split(s);
    wr.write_all(&[7u8; 10_000]).await?;
    wr.flush().await?;
    drop(wr);
    drop(_rd);
    let end = tokio::time::timeout(WAIT, ends.recv())
        .await?
        .context("an end")?;
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));

    // The same through SOCKS: the client resets its connection.
    let proxy = laptop.handle.socks_addr().context("socks")?;
    let mut s = socks_connect(proxy, "london.switchboard", 9000).await?;
    s.write_all(&[7u8; 10_000]).await?;
    s.flush().await?;
    s.set_zero_linger()?;
    drop(s);
    let end = tokio::time::timeout(WAIT, ends.recv())
        .await?
        .context("an end")?;
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));

    // And a caller that finishes cleanly is a clean end with every byte.
    let mut s = socks_connect(proxy, "london.switchboard", 9000).await?;
    s.write_all(&[7u8; 10_000]).await?;
    s.shutdown().await?;
    let end = tokio::time::timeout(WAIT, ends.recv())
        .await?
        .context("an end")?;
    assert_eq!(end, Ok(10_000));
    Ok(())
}

#[tokio::test]
async fn a_socks_client_sees_a_target_reset_as_a_reset() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (addr, _svc) = resetting_service(1000).await?;
    let (_london, laptop) = london_and_laptop(&relay, &key, addr).await?;
    let proxy = laptop.handle.socks_addr().context("socks")?;
    let mut s = socks_connect(proxy, "london.switchboard", 9000).await?;
    let _ = s.write_all(&[1u8; 200_000]).await;
    let mut buf = vec![0u8; 1024];
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await?;
    let e = r.expect_err("a reset must not reach the SOCKS client as a FIN");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    Ok(())
}

/// SOCKS5 CONNECT to a domain without authentication; the connected socket.
async fn socks_connect(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    anyhow::ensure!(rep[1] == 0, "SOCKS reply {}", rep[1]);
    Ok(s)
}
