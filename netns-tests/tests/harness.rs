//! The emulated internet itself: hosts behind NAT reach the public
//! segment, nothing reaches them, sites do not reach each other, and every
//! namespace is gone once the `Internet` is dropped.

use anyhow::{ensure, Result};
use std::process::Stdio;
use std::time::Duration;
use swb_netns::{Host, Internet};

/// Whether `from` can open a TCP connection to `to`:`port`.
async fn connects(from: &Host, to: std::net::Ipv4Addr, port: u16) -> Result<bool> {
    let out = from
        .command("timeout")
        .args(["2", "bash", "-c", &format!("exec 3<>/dev/tcp/{to}/{port}")])
        .stderr(Stdio::null())
        .output()
        .await?;
    Ok(out.status.success())
}

/// A TCP listener on `host`:`port` (ncat, killed when dropped).
async fn listen(host: &Host, port: u16) -> Result<tokio::process::Child> {
    let child = host
        .command("ncat")
        .args(["-l", "-k", &host.addr.to_string(), &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Listening once the host itself can connect.
    for _ in 0..100 {
        if connects(host, host.addr, port).await? {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("ncat did not listen")
}

fn namespaces() -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn nat_lets_hosts_out_and_nothing_in_and_cleans_up() -> Result<()> {
    let Some(net) = Internet::new("nat_lets_hosts_out", 1, 2)? else {
        return Ok(());
    };
    let names: Vec<String> = std::iter::once(net.public.name.clone())
        .chain(net.relays.iter().map(|h| h.ns.name.clone()))
        .chain(
            net.sites
                .iter()
                .flat_map(|s| [s.router.ns.name.clone(), s.host.ns.name.clone()]),
        )
        .collect();
    let (relay, a, b) = (&net.relays[0], &net.sites[0].host, &net.sites[1].host);
    let _l = listen(relay, 5000).await?;
    let _la = listen(a, 5001).await?;
    ensure!(
        connects(a, relay.addr, 5000).await?,
        "a host reaches the relay"
    );
    ensure!(
        connects(b, relay.addr, 5000).await?,
        "both sites reach the relay"
    );
    ensure!(
        !connects(relay, a.addr, 5001).await?,
        "the relay cannot reach into a site"
    );
    ensure!(
        !connects(b, a.addr, 5001).await?,
        "sites do not reach each other"
    );
    let router_a = &net.sites[0].router;
    ensure!(
        !connects(relay, router_a.addr, 5001).await?,
        "nothing is forwarded in from the public side"
    );
    // A fully lossy uplink cuts the site off; removing the loss restores it.
    net.sites[0].loss(100)?;
    ensure!(
        !connects(a, relay.addr, 5000).await?,
        "100 % loss lets nothing through"
    );
    net.sites[0].loss(0)?;
    ensure!(connects(a, relay.addr, 5000).await?, "loss removed");
    net.sites[0].rate(50)?;
    ensure!(
        connects(a, relay.addr, 5000).await?,
        "a rate limit still passes traffic"
    );
    drop(_l);
    drop(_la);
    drop(net);
    let left = namespaces()?;
    for n in names {
        ensure!(!left.contains(&n), "{n} was not removed");
    }
    Ok(())
}
