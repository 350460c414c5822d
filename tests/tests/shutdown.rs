//! One cancellation tree per process: stopping relays and daemons ends
//! every task they started — sessions, streams mid-transfer, watches, mesh
//! links, upstream status mirrors, HTTP long polls — and `join` returns.

use anyhow::{Context, Result};
use std::time::Duration;
use swb_tests::{eventually, mesh3, name_homed_on, HashServer, TestDaemon, WAIT};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_outlives_the_shutdown_of_relays_and_daemons() -> Result<()> {
    let runtime = tokio::runtime::Handle::current();
    let baseline = runtime.metrics().num_alive_tasks();
    let hs = HashServer::start().await?;
    {
        let (mut relays, api) = mesh3('s').await?;
        let ids = ["r1", "r2", "r3"];
        let a_name = name_homed_on(&ids, "acme", "r2");
        let b_name = name_homed_on(&ids, "acme", "r3");
        let target = hs.addr.to_string();
        let a = TestDaemon::start(&relays[0], &api, &a_name).await?;
        let b = TestDaemon::start_with(&relays[0], &api, &b_name, |c| {
            c.expose = vec![swb_daemon::Exposure { port: 9000, target }];
        })
        .await?;
        let relay_tasks: Vec<_> = relays.iter().map(|r| r.handle().task_tracker()).collect();
        let daemon_tasks = [a.handle.task_tracker(), b.handle.task_tracker()];

        // Work in flight everywhere: mail held, a stream half-way, a status
        // watch across the mesh (an upstream mirror), an HTTP long poll for
        // a peer homed on another relay, a ping stream.
        a.send(&b_name, b"held").await?;
        let mut stream = a.open_stream(&b_name, 9000).await?;
        stream.write_all(&[7u8; 100_000]).await?;
        let mut watch = a.client().await?;
        watch
            .call(&swb_daemon::control::Request::Watch {
                names: vec![b_name.clone()],
                timeout_ms: 5000,
            })
            .await?;
        let _pinger = a.handle.pinger(&b_name, Duration::from_secs(5)).await?;
        let ring = swb_ring::Ring::new(ids);
        let poller = (0..1000)
            .map(|i| format!("poller{i}"))
            .find(|n| ring.home("acme", n) == Some("r3"))
            .context("a name homed on r3")?;
        let http = relays[0].http(Some(&api))?;
        let poll_path = format!("/v1/messages?as={poller}&wait=30");
        let poll = tokio::spawn(async move { http.get(&poll_path).await });
        eventually("the long poll reached b's home", WAIT, || async {
            Ok(relays[2]
                .handle()
                .peers("acme")
                .iter()
                .any(|p| p.name == poller && p.via == swb_relay::Via::Http)
                .then_some(()))
        })
        .await?;

        // Stop everything; each join returns only when all its tasks ended.
        a.handle.shutdown();
        b.handle.shutdown();
        tokio::time::timeout(WAIT, a.handle.join())
            .await
            .context("daemon a did not stop")??;
        tokio::time::timeout(WAIT, b.handle.join())
            .await
            .context("daemon b did not stop")??;
        for r in &mut relays {
            tokio::time::timeout(WAIT, r.stop())
                .await
                .context("a relay did not stop")?;
        }
        for t in relay_tasks.iter().chain(daemon_tasks.iter()) {
            assert!(t.is_closed() && t.is_empty(), "tasks left: {}", t.len());
        }
        // The long poll ended when its relays stopped (answered or cut).
        tokio::time::timeout(WAIT, poll)
            .await
            .context("the long poll outlived its relays")??
            .ok();
        drop((stream, watch));
    }
    drop(hs);
    // Nothing else of theirs is left on the runtime either (QUIC drivers
    // included) once their last handles are gone.
    eventually(
        "the runtime back to its tasks before the test",
        WAIT,
        || {
            let alive = runtime.metrics().num_alive_tasks();
            async move { Ok((alive <= baseline).then_some(())) }
        },
    )
    .await
    .with_context(|| {
        format!(
            "{} tasks alive, {baseline} before",
            runtime.metrics().num_alive_tasks()
        )
    })?;
    Ok(())
}
