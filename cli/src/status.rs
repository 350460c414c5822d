//! `set-status`, `get-status`, `watch`, `peers`.

use crate::{parse_duration, Output};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::time::Duration;
use swb_daemon::control::StatusView;
use swb_daemon::Client;

#[derive(Debug, Args)]
pub(crate) struct SetStatusArgs {
    /// `KEY=VALUE` pairs to merge into this peer's status.
    #[arg(value_name = "KEY=VALUE")]
    pairs: Vec<String>,
    /// Remove this key (repeat for more).
    #[arg(long, value_name = "KEY")]
    clear: Vec<String>,
    /// How long to wait for the relay connection before keeping the change
    /// locally (it is published on reconnect).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct NamesArgs {
    /// Peer names (`london` or `london.switchboard`).
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// How long to wait for the daemon's relay connection.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct PeersArgs {
    /// How long to wait for the daemon's relay connection.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

fn summary(s: &StatusView) -> String {
    s.status
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn presence(s: &StatusView) -> String {
    let state = if s.online {
        "online"
    } else if s.version == 0 {
        "unknown"
    } else {
        "offline"
    };
    match &s.since {
        Some(t) => format!("{state} since {t}"),
        None => state.to_string(),
    }
}

fn print(out: &Output, s: &StatusView) -> Result<()> {
    if out.json {
        outln!("{}", serde_json::to_string(s)?);
    } else {
        let lag = if s.lagged {
            " (lagged: newest value shown)"
        } else {
            ""
        };
        outln!(
            "{}\t{}\tv{}\t{}{lag}",
            s.name,
            presence(s),
            s.version,
            summary(s)
        );
    }
    Ok(())
}

pub(crate) async fn set_status(a: SetStatusArgs, out: &Output) -> Result<()> {
    let mut set = BTreeMap::new();
    for p in &a.pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("{p:?} is not KEY=VALUE");
        };
        set.insert(k.to_string(), v.to_string());
    }
    if set.is_empty() && a.clear.is_empty() {
        bail!("nothing to do: give KEY=VALUE pairs and/or --clear KEY");
    }
    let mut c = Client::connect(&out.control).await?;
    let (view, published) = c
        .set_status(set, a.clear, a.timeout)
        .await
        .context("status not set")?;
    print(out, &view)?;
    if !published {
        eprintln!("swbd: the daemon is not connected to its relay; the status is kept and published when it reconnects");
    }
    Ok(())
}

pub(crate) async fn get_status(a: NamesArgs, out: &Output) -> Result<()> {
    let mut c = Client::connect(&out.control).await?;
    for s in c.get_status(a.names, a.timeout).await? {
        print(out, &s)?;
    }
    Ok(())
}

pub(crate) async fn watch(a: NamesArgs, out: &Output) -> Result<()> {
    let mut c = Client::connect(&out.control).await?;
    c.watch(a.names, a.timeout).await?;
    loop {
        tokio::select! {
            u = c.next_update() => match u? {
                Some(s) => print(out, &s)?,
                None => bail!("the watch ended: the daemon or its relay connection went away"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub(crate) async fn peers(a: PeersArgs, out: &Output) -> Result<()> {
    let mut c = Client::connect(&out.control).await?;
    let list = c.peers(a.timeout).await?;
    if out.json {
        for s in &list {
            print(out, s)?;
        }
        return Ok(());
    }
    // With TUN, a column of virtual addresses (IPv4) before the status.
    let tun = list.iter().any(|s| s.tun.is_some());
    let tun_col = |s: Option<&str>| {
        if tun {
            format!("{:<16} ", s.unwrap_or("-"))
        } else {
            String::new()
        }
    };
    outln!(
        "{:<20} {:<8} {:<26} {}STATUS",
        "NAME",
        "STATE",
        "SINCE",
        tun_col(Some("TUN"))
    );
    for s in &list {
        let state = if s.online { "online" } else { "offline" };
        outln!(
            "{:<20} {:<8} {:<26} {}{}",
            s.name,
            state,
            s.since.as_deref().unwrap_or("-"),
            tun_col(s.tun.as_ref().map(|t| t.ipv4.as_str())),
            summary(s)
        );
    }
    Ok(())
}
