//! The measurement behind the mail store's design: the same delete-on-ack
//! workload on our segment log and on redb (a maintained embedded B-tree
//! store), each commit synced. Built only with the `store-compare` feature:
//!
//! ```text
//! cargo run --release -p swb-relay --features store-compare --example store_compare
//! ```
//!
//! Workload: a mailbox that stays `backlog` messages deep. Every commit puts
//! `batch` new messages and, once the backlog is reached, removes the
//! `batch` oldest (their acknowledgements) — one synced commit per batch,
//! as group commit does under load. Figures: messages put and removed per
//! second, and the disk space at the peak and at the end.

use super::persist::Saved;
use super::store::{key_of, Durability, Record, Store};
use bytes::Bytes;
use std::path::Path;
use std::time::Instant;
use swb_wire::MessageId;

/// One store's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The store.
    pub name: &'static str,
    /// Messages put (and later removed) per second.
    pub per_sec: f64,
    /// Most bytes on disk at any commit.
    pub peak_bytes: u64,
    /// Bytes on disk at the end (with `backlog` messages live).
    pub end_bytes: u64,
}

/// Errors of a comparison run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// Our store.
    #[error("segment log: {0}")]
    Log(String),
    /// redb.
    #[error("redb: {0}")]
    Redb(String),
    /// Files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn message(seq: u64, body: &Bytes) -> Saved {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&seq.to_be_bytes());
    Saved {
        ns: "acme".into(),
        to: "london".into(),
        from: "paris".into(),
        id: MessageId(id),
        body: body.clone(),
        sent_at_ms: seq,
        expires_at_ms: u64::MAX,
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs the workload on both stores in `dir`: `total` messages of `body`
/// bytes, `batch` per commit, the mailbox `backlog` deep.
pub fn run(
    dir: &Path,
    total: u64,
    backlog: u64,
    batch: u64,
    body: usize,
) -> Result<Vec<Figures>, CompareError> {
    let body = Bytes::from(vec![0x42u8; body]);
    Ok(vec![
        log(&dir.join("log"), total, backlog, batch, &body)?,
        redb(&dir.join("redb"), total, backlog, batch, &body)?,
    ])
}

fn log(
    dir: &Path,
    total: u64,
    backlog: u64,
    batch: u64,
    body: &Bytes,
) -> Result<Figures, CompareError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(CompareError::Io)?;
    let (store, _) = Store::open(dir, Durability::Sync)?;
    let (mut peak, mut next, mut oldest) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    while next < total {
        let mut records = Vec::with_capacity(2 * batch as usize);
        for _ in 0..batch {
            records.push(Record::put(message(next, body)));
            next += 1;
        }
        while next - oldest > backlog {
            records.push(Record::Del(key_of(&message(oldest, body))));
            oldest += 1;
        }
        rt.block_on(store.append(records).wait())
            .map_err(|e| CompareError::Log(e.to_string()))?;
        peak = peak.max(dir_bytes(dir));
    }
    let per_sec = total as f64 / t.elapsed().as_secs_f64();
    drop(store);
    Ok(Figures {
        name: "segment log (ours)",
        per_sec,
        peak_bytes: peak,
        end_bytes: dir_bytes(dir),
    })
}

fn redb(
    dir: &Path,
    total: u64,
    backlog: u64,
    batch: u64,
    body: &Bytes,
) -> Result<Figures, CompareError> {
    const MAIL: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("mail");
    let e = |e: &dyn std::fmt::Display| CompareError::Redb(e.to_string());
    std::fs::create_dir_all(dir)?;
    let db = redb::Database::create(dir.join("mail.redb")).map_err(|x| e(&x))?;
    let (mut peak, mut next, mut oldest) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    while next < total {
        // The same bytes per message as the log stores.
        let tx = db.begin_write().map_err(|x| e(&x))?;
        {
            let mut table = tx.open_table(MAIL).map_err(|x| e(&x))?;
            for _ in 0..batch {
                let v = postcard::to_stdvec(&message(next, body)).map_err(|x| e(&x))?;
                table.insert(next, v.as_slice()).map_err(|x| e(&x))?;
                next += 1;
            }
            while next - oldest > backlog {
                table.remove(oldest).map_err(|x| e(&x))?;
                oldest += 1;
            }
        }
        // Durability::Immediate, redb's default: synced at commit.
        tx.commit().map_err(|x| e(&x))?;
        peak = peak.max(dir_bytes(dir));
    }
    let per_sec = total as f64 / t.elapsed().as_secs_f64();
    drop(db);
    Ok(Figures {
        name: "redb",
        per_sec,
        peak_bytes: peak,
        end_bytes: dir_bytes(dir),
    })
}
