//! The durable mail store: a log of segments in `<data-dir>/mail/`.
//!
//! A relay is where a message for an offline peer lives, so every message
//! it accepted must survive a crash. The store is an append-only log of
//! records — a message put, a message removed (acknowledged, expired,
//! handed to another relay), a peer's status — in numbered segment files.
//! It is purpose-built for a delete-on-ack queue: a delete is a small
//! appended record; a segment whose every message was removed is deleted
//! whole; a sealed segment that is mostly dead has its few live messages
//! copied forward and is deleted too. No tombstones pile up (an LSM
//! store's weakness on queues) and no pages are rewritten per message (a
//! B-tree's). See the README for the measurements behind the choice.
//!
//! # Records
//!
//! ```text
//! +-------------+-------------+------+--------------------+
//! | len u32 LE  | crc32 u32 LE| kind | postcard body      |   len = 1 + body
//! +-------------+-------------+------+--------------------+
//! ```
//!
//! A torn or corrupt record at the end of the last segment (a crash in the
//! middle of a write) is cut off at recovery and counted; corruption in an
//! earlier segment ends the reading of that segment (counted, logged
//! loudly). Neither stops the relay from starting.
//!
//! # Durability and group commit
//!
//! One writer thread owns the files. Appends from every session queue up;
//! the writer takes everything queued, writes it with one `write`, and
//! then — at [`Durability::Sync`] — one `fdatasync`, before it answers all
//! of them. Concurrent senders share one flush; a lone sender waits for
//! exactly one. At [`Durability::Process`] the answer comes once the bytes
//! are written to the OS (they survive a killed relay, not a power cut).

use super::persist::Saved;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use swb_wire::MessageId;
use tokio::sync::watch;
use tracing::{info, warn};

/// Longest record body: a message of the largest size with its envelope.
pub(crate) const MAX_RECORD: usize = swb_wire::MAX_FRAME_LEN + 4096;
/// A segment is sealed and a new one started past this size.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// A sealed segment with less than this fraction of live bytes is
/// compacted: its live records are copied forward and the file deleted —
/// once it is not the newest sealed one (see [`Writer::compactable`]).
const COMPACT_BELOW: f64 = 0.25;
/// Most records one group commit takes.
const BATCH_RECORDS: usize = 8192;
/// Record header: length + checksum.
const HEADER: usize = 8;

const KIND_PUT: u8 = 1;
const KIND_DEL: u8 = 2;
const KIND_STATUS: u8 = 3;

/// How durable an accepted message is when the sender hears `accepted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// On disk, `fdatasync`ed, before `accepted` is answered: survives a
    /// power loss. Concurrent sends share one flush (group commit).
    #[default]
    Sync,
    /// Written to the OS before `accepted` is answered: survives a killed
    /// relay process, not a power loss.
    Process,
    /// Memory only: lost with the relay process. For tests and benchmarks.
    Memory,
}

impl Durability {
    /// `sync`, `process` or `memory`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Process => "process",
            Durability::Memory => "memory",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Durability::Sync),
            "process" => Ok(Durability::Process),
            "memory" => Ok(Durability::Memory),
            other => Err(format!(
                "{other:?} is not a durability: use sync, process or memory"
            )),
        }
    }
}

/// Where a held message is in the mailbox space: its mailbox and identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct MsgKey {
    pub(crate) ns: Arc<str>,
    pub(crate) to: Arc<str>,
    pub(crate) from: Arc<str>,
    pub(crate) id: MessageId,
}

/// A status as stored (the fields a peer set; presence is not stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredStatus {
    pub(crate) ns: String,
    pub(crate) name: String,
    pub(crate) fields: Vec<(String, String)>,
    pub(crate) updated_ms: u64,
}

/// A message put: its place in accept order (assigned by the writer, kept
/// when compaction copies it forward) and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Put {
    pub(crate) seq: u64,
    pub(crate) msg: Saved,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Put(Put),
    Del(MsgKey),
    Status(StoredStatus),
}

impl Record {
    /// A message to put (the writer gives it its sequence number).
    pub(crate) fn put(msg: Saved) -> Self {
        Record::Put(Put { seq: 0, msg })
    }
}

impl Record {
    /// Appends the record (header, kind, postcard body) to `out`,
    /// serialized in place; on an error `out` is left as it was.
    fn encode(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        let written = match self {
            Record::Put(p) => {
                out.push(KIND_PUT);
                postcard::to_io(p, &mut *out).map(drop)
            }
            Record::Del(k) => {
                out.push(KIND_DEL);
                postcard::to_io(k, &mut *out).map(drop)
            }
            Record::Status(s) => {
                out.push(KIND_STATUS);
                postcard::to_io(s, &mut *out).map(drop)
            }
        };
        let len = out.len() - start - HEADER;
        let refused = match written {
            Err(e) => Some(std::io::Error::other(e)),
            Ok(()) if len > MAX_RECORD => Some(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a store record of {len} bytes exceeds {MAX_RECORD}"),
            )),
            Ok(()) => None,
        };
        if let Some(e) = refused {
            out.truncate(start);
            return Err(e);
        }
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    fn decode(kind: u8, body: &[u8]) -> Option<Record> {
        match kind {
            KIND_PUT => postcard::from_bytes(body).ok().map(Record::Put),
            KIND_DEL => postcard::from_bytes(body).ok().map(Record::Del),
            KIND_STATUS => postcard::from_bytes(body).ok().map(Record::Status),
            _ => None,
        }
    }
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Messages held, in the order they were accepted.
    pub(crate) messages: Vec<Saved>,
    /// The newest stored status of each peer.
    pub(crate) statuses: Vec<StoredStatus>,
    /// Segment files read.
    pub segments: usize,
    /// Bytes cut off the end of the last segment (a torn write).
    pub truncated_bytes: u64,
    /// Records that failed their checksum or did not decode.
    pub corrupt_records: u64,
}

/// A segment's bookkeeping: its size and what in it is still live.
#[derive(Debug, Default, Clone, Copy)]
struct SegInfo {
    bytes: u64,
    live: u64,
    live_bytes: u64,
}

/// A held message as the index knows it: its id and a 64-bit keyed hash
/// of its mailbox and sender — 24 bytes, copied and compared without
/// touching the three names (or their shared counts, which the sessions'
/// threads touch too). Two messages meet in it only with the same id and
/// colliding names, with probability 2⁻⁶⁴ per pair; no peer can aim at
/// another's (the hash key is random and secret). The log itself keeps
/// the names: this is the writer's memory, rebuilt at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MsgRef {
    who: u64,
    id: MessageId,
}

/// Where each live record is, and the live content of each segment.
#[derive(Debug, Default)]
struct Index {
    segs: BTreeMap<u64, SegInfo>,
    /// Names a [`MsgRef`] (keyed: names are chosen by peers).
    names: ahash::RandomState,
    /// Keyed hashes, and fast ones: every message is added and removed once.
    msgs: HashMap<MsgRef, (u64, u64), ahash::RandomState>,
    statuses: HashMap<(String, String), (u64, u64), ahash::RandomState>,
    /// Segment → the older segments holding messages it removes. A
    /// removal must outlive the put it cancels: a segment is deleted only
    /// once the segments it pins are gone (or go first, in the same pass).
    pins: BTreeMap<u64, std::collections::BTreeSet<u64>>,
}

impl Index {
    /// How the index knows the message `id` from `from` in `(ns, to)`.
    fn msg_ref(&self, ns: &str, to: &str, from: &str, id: MessageId) -> MsgRef {
        MsgRef {
            who: self.names.hash_one((ns, to, from)),
            id,
        }
    }

    fn put_ref(&self, m: &Saved) -> MsgRef {
        self.msg_ref(&m.ns, &m.to, &m.from, m.id)
    }

    /// Accounts a record written to `seg`; the segment that lost a live
    /// record by it, if any.
    fn add(&mut self, seg: u64, rec: &Record, size: u64) -> Option<u64> {
        let info = self.segs.entry(seg).or_default();
        info.bytes += size;
        let old = match rec {
            Record::Put(p) => {
                let old = self.msgs.insert(self.put_ref(&p.msg), (seg, size));
                let info = self.segs.entry(seg).or_default();
                info.live += 1;
                info.live_bytes += size;
                old
            }
            Record::Del(k) => {
                let old = self.msgs.remove(&self.msg_ref(&k.ns, &k.to, &k.from, k.id));
                if let Some((put_seg, _)) = old {
                    if put_seg != seg {
                        self.pins.entry(seg).or_default().insert(put_seg);
                    }
                }
                old
            }
            Record::Status(s) => {
                let old = self
                    .statuses
                    .insert((s.ns.clone(), s.name.clone()), (seg, size));
                let info = self.segs.entry(seg).or_default();
                info.live += 1;
                info.live_bytes += size;
                old
            }
        };
        let (s, sz) = old?;
        let i = self.segs.get_mut(&s)?;
        i.live = i.live.saturating_sub(1);
        i.live_bytes = i.live_bytes.saturating_sub(sz);
        Some(s)
    }
}

/// A request to the writer.
enum Job {
    /// Append these records; the number of this append (appends are
    /// numbered in the order the writer receives them).
    Append(Vec<Record>, u64),
    /// One record (a message's put: no vector of its own per message).
    One(Record, u64),
    /// Stop after everything before.
    Stop(std::sync::mpsc::Sender<()>),
}

/// What the writer has settled, published after every group commit: one
/// update wakes everyone waiting on that commit, however many appends it
/// held (a channel per append was an allocation and a wake-up per message).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settled {
    /// Every append numbered up to this is durable.
    through: u64,
    /// The store failed, for good: no append after `through` becomes
    /// durable. A failed write may have left part of a record in the log
    /// and a failed sync may have dropped written pages, so nothing
    /// appended after it could be promised (the fail-stop rule databases
    /// follow since fsync errors were understood).
    failed: Option<Arc<std::io::Error>>,
    /// The writer stopped.
    stopped: bool,
}

impl Settled {
    /// What became of append `n`, if it is settled.
    pub(crate) fn outcome(&self, n: u64) -> Option<Result<(), StoreError>> {
        if self.through >= n {
            Some(Ok(()))
        } else if let Some(e) = &self.failed {
            Some(Err(StoreError::Io(e.clone())))
        } else if self.stopped {
            Some(Err(StoreError::Stopped))
        } else {
            None
        }
    }
}

/// Awaits the durability of what was appended with it.
#[derive(Debug)]
pub(crate) struct Durable(Pending);

#[derive(Debug)]
enum Pending {
    /// Nothing to wait for.
    Done,
    /// Append `n`, settled as the writer publishes.
    Wait(u64, watch::Receiver<Settled>),
    /// Never to be durable (the writer is gone).
    Failed(StoreError),
}

/// Why a write did not become durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not write or sync.
    #[error("the mail store failed: {0}")]
    Io(Arc<std::io::Error>),
    /// The store stopped (the relay is shutting down).
    #[error("the mail store stopped")]
    Stopped,
}

impl Durable {
    /// Already durable (nothing was written, or memory durability).
    pub(crate) fn done() -> Self {
        Self(Pending::Done)
    }

    /// Without waiting: `Ok(None)` if durable already, `Ok(Some(n))` to
    /// wait for append `n` with the store's [`Settled`] updates
    /// ([`Store::settled`]: one receiver for many appends), or the error.
    pub(crate) fn number(&self) -> Result<Option<u64>, StoreError> {
        match &self.0 {
            Pending::Done => Ok(None),
            Pending::Wait(n, _) => Ok(Some(*n)),
            Pending::Failed(e) => Err(e.clone()),
        }
    }

    /// Waits until the records are as durable as the store promises.
    pub(crate) async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            Pending::Done => Ok(()),
            Pending::Failed(e) => Err(e),
            Pending::Wait(n, mut rx) => loop {
                if let Some(r) = rx.borrow_and_update().outcome(n) {
                    return r;
                }
                if rx.changed().await.is_err() {
                    // The writer is gone; its last word decides.
                    return rx.borrow().outcome(n).unwrap_or(Err(StoreError::Stopped));
                }
            },
        }
    }
}

/// The store's handle: appends go to the writer thread.
#[derive(Debug)]
pub(crate) struct Store {
    /// The last append's number and the writer's queue, together: numbers
    /// are given in the order the writer receives the appends.
    tx: Option<std::sync::Mutex<(u64, mpsc::Sender<Job>)>>,
    /// What the writer settled.
    settled: watch::Receiver<Settled>,
    durability: Durability,
    writer: Option<std::thread::JoinHandle<()>>,
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:012}.log"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads one segment's records; where its valid part ends, and whether a
/// damaged record was met there.
fn read_segment(path: &Path, mut f: impl FnMut(Record, u64)) -> std::io::Result<(u64, u64, bool)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut pos = 0u64;
    let corrupt = 0u64;
    let mut head = [0u8; HEADER];
    loop {
        if pos == len {
            return Ok((pos, corrupt, false));
        }
        if len - pos < HEADER as u64 || r.read_exact(&mut head).is_err() {
            return Ok((pos, corrupt, true));
        }
        let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if n == 0 || n > MAX_RECORD || (len - pos - HEADER as u64) < n as u64 {
            return Ok((pos, corrupt + 1, true));
        }
        let mut body = vec![0u8; n];
        if r.read_exact(&mut body).is_err() {
            return Ok((pos, corrupt + 1, true));
        }
        if crc32fast::hash(&body) != crc {
            return Ok((pos, corrupt + 1, true));
        }
        match Record::decode(body[0], &body[1..]) {
            Some(rec) => f(rec, (HEADER + n) as u64),
            None => return Ok((pos, corrupt + 1, true)),
        }
        pos += (HEADER + n) as u64;
    }
}

impl Store {
    /// A store that keeps nothing (memory durability).
    pub(crate) fn memory() -> Self {
        Self {
            tx: None,
            settled: watch::channel(Settled::default()).1,
            durability: Durability::Memory,
            writer: None,
        }
    }

    /// Opens (or creates) the store in `dir`, recovers what it holds, and
    /// starts the writer.
    pub(crate) fn open(dir: &Path, durability: Durability) -> std::io::Result<(Self, Recovered)> {
        if durability == Durability::Memory {
            return Ok((Self::memory(), Recovered::default()));
        }
        std::fs::create_dir_all(dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut index = Index::default();
        let mut order: Vec<Record> = Vec::new();
        let mut rec = Recovered {
            segments: numbers.len(),
            ..Recovered::default()
        };
        for (i, &n) in numbers.iter().enumerate() {
            let path = seg_path(dir, n);
            let mut sizes = Vec::new();
            let (valid, corrupt, damaged) = read_segment(&path, |r, size| {
                sizes.push(size);
                order.push(r);
            })?;
            let start = order.len() - sizes.len();
            for (r, size) in order[start..].iter().zip(sizes) {
                index.add(n, r, size);
            }
            index.segs.entry(n).or_default();
            rec.corrupt_records += corrupt;
            if damaged {
                let len = std::fs::metadata(&path)?.len();
                if i + 1 == numbers.len() {
                    // A torn tail: cut it off so appends continue cleanly.
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(valid)?;
                    f.sync_all()?;
                    rec.truncated_bytes += len - valid;
                    warn!(segment = %path.display(), cut = len - valid, "store: a torn record at the end of the log was cut off");
                } else {
                    warn!(segment = %path.display(), at = valid, "store: a damaged record in the middle of the log; the rest of this segment is skipped");
                }
            }
        }
        // What is live, in accept order (compaction may have copied a
        // message forward; its sequence number keeps its place).
        let mut next_seq = 0u64;
        let mut live: HashMap<MsgRef, Put, ahash::RandomState> = HashMap::default();
        let mut seen_status: HashMap<(String, String), StoredStatus> = HashMap::new();
        for r in order {
            match r {
                Record::Put(p) => {
                    next_seq = next_seq.max(p.seq + 1);
                    let key = index.put_ref(&p.msg);
                    if index.msgs.contains_key(&key) {
                        live.insert(key, p);
                    }
                }
                Record::Del(_) => {}
                Record::Status(s) => {
                    seen_status.insert((s.ns.clone(), s.name.clone()), s);
                }
            }
        }
        let mut puts: Vec<Put> = live.into_values().collect();
        puts.sort_by_key(|p| p.seq);
        rec.messages = puts.into_iter().map(|p| p.msg).collect();
        rec.statuses = seen_status.into_values().collect();
        let active = numbers.last().copied().unwrap_or(0) + 1;
        let writer = Writer::start(dir.to_path_buf(), active, index, durability, next_seq)?;
        let (tx, rx) = mpsc::channel();
        let (publish, settled) = watch::channel(Settled::default());
        let handle = std::thread::Builder::new()
            .name("swb-store".into())
            .spawn(move || writer.run(rx, publish))?;
        if rec.messages.len() + rec.statuses.len() > 0 || rec.truncated_bytes > 0 {
            info!(
                messages = rec.messages.len(),
                statuses = rec.statuses.len(),
                segments = rec.segments,
                truncated_bytes = rec.truncated_bytes,
                corrupt_records = rec.corrupt_records,
                "store: recovered"
            );
        }
        Ok((
            Self {
                tx: Some(std::sync::Mutex::new((0, tx))),
                settled,
                durability,
                writer: Some(handle),
            },
            rec,
        ))
    }

    /// Whether appended records are kept at all (not with memory
    /// durability): callers skip building records nobody writes.
    pub(crate) fn keeps_records(&self) -> bool {
        self.tx.is_some()
    }

    /// The durability this store gives.
    pub(crate) fn durability(&self) -> Durability {
        self.durability
    }

    /// Appends records; the returned [`Durable`] completes once they are as
    /// durable as the store's level promises.
    #[cfg(any(test, feature = "store-compare"))]
    pub(crate) fn append(&self, records: Vec<Record>) -> Durable {
        self.durable(self.send(|n| Job::Append(records, n)))
    }

    /// Appends one record (a message's put, a status; no vector per
    /// message); the returned [`Durable`] completes once it is as durable
    /// as the store's level promises.
    pub(crate) fn append_one(&self, record: Record) -> Durable {
        self.durable(self.send(|n| Job::One(record, n)))
    }

    fn durable(&self, sent: Option<Result<u64, StoreError>>) -> Durable {
        match sent {
            None => Durable::done(),
            Some(Ok(n)) => Durable(Pending::Wait(n, self.settled.clone())),
            Some(Err(e)) => Durable(Pending::Failed(e)),
        }
    }

    /// Appends records nobody waits for (removals: losing one redelivers a
    /// message under its id, never loses one).
    pub(crate) fn append_quiet(&self, records: Vec<Record>) {
        let _ = self.send(|n| Job::Append(records, n));
    }

    /// Numbers the append and queues it for the writer, under one lock so
    /// that numbers follow the queue's order; `None` without a writer.
    fn send(&self, job: impl FnOnce(u64) -> Job) -> Option<Result<u64, StoreError>> {
        let tx = self.tx.as_ref()?;
        let mut q = tx.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.0 + 1;
        Some(match q.1.send(job(n)) {
            Ok(()) => {
                q.0 = n;
                Ok(n)
            }
            Err(_) => Err(StoreError::Stopped),
        })
    }

    /// Completes once everything appended before is durable (nothing is
    /// queued for it).
    pub(crate) fn barrier(&self) -> Durable {
        let Some(tx) = &self.tx else {
            return Durable::done();
        };
        let n = tx.lock().unwrap_or_else(|p| p.into_inner()).0;
        if n == 0 {
            return Durable::done();
        }
        Durable(Pending::Wait(n, self.settled.clone()))
    }

    /// What the writer settled, to wait for appends by their numbers
    /// ([`Durable::number`]) with one receiver.
    pub(crate) fn settled(&self) -> watch::Receiver<Settled> {
        self.settled.clone()
    }

    /// The error the store failed with, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.settled.borrow().failed.as_ref().map(|e| e.to_string())
    }

    /// Stops the writer after everything queued; waits for it.
    pub(crate) fn close(&mut self) {
        if let Some(tx) = self.tx.take() {
            let tx = tx.into_inner().unwrap_or_else(|p| p.into_inner()).1;
            let (done, rx) = std::sync::mpsc::channel();
            if tx.send(Job::Stop(done)).is_ok() {
                let _ = rx.recv();
            }
        }
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's state: the active segment and the index.
struct Writer {
    dir: PathBuf,
    durability: Durability,
    active: u64,
    file: File,
    index: Index,
    /// The bytes of one batch; kept, as `sizes` is, from batch to batch.
    buf: Vec<u8>,
    /// Each record's size in `buf`.
    sizes: Vec<u64>,
    next_seq: u64,
}

impl Writer {
    fn start(
        dir: PathBuf,
        active: u64,
        index: Index,
        durability: Durability,
        next_seq: u64,
    ) -> std::io::Result<Self> {
        let file = Self::create(&dir, active)?;
        let mut w = Self {
            dir,
            durability,
            active,
            file,
            index,
            buf: Vec::new(),
            sizes: Vec::new(),
            next_seq,
        };
        w.index.segs.entry(active).or_default();
        // Segments recovery left with nothing live go now; mostly dead
        // ones are compacted.
        w.reclaim()?;
        Ok(w)
    }

    fn create(dir: &Path, n: u64) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(seg_path(dir, n))?;
        sync_dir(dir)?;
        Ok(f)
    }

    fn run(mut self, rx: mpsc::Receiver<Job>, publish: watch::Sender<Settled>) {
        let mut stop: Option<std::sync::mpsc::Sender<()>> = None;
        // Kept from batch to batch (a busy relay's batches hold thousands
        // of records; a new vector each time was fresh pages each time).
        let mut jobs: Vec<Job> = Vec::new();
        let mut batch: Vec<Record> = Vec::new();
        while stop.is_none() {
            let Ok(first) = rx.recv() else { break };
            jobs.push(first);
            let mut records = 0;
            while records < BATCH_RECORDS {
                match rx.try_recv() {
                    Ok(j) => {
                        records += match &j {
                            Job::Append(r, _) => r.len(),
                            Job::One(..) => 1,
                            Job::Stop(_) => 0,
                        };
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let mut last = None;
            for j in jobs.drain(..) {
                match j {
                    Job::Append(r, n) => {
                        batch.extend(r);
                        last = Some(n);
                    }
                    Job::One(r, n) => {
                        batch.push(r);
                        last = Some(n);
                    }
                    Job::Stop(done) => stop = Some(done),
                }
            }
            // Once failed, nothing more is written (see `Settled::failed`).
            let failed = || publish.borrow().failed.is_some();
            if !failed() {
                match self.commit(&mut batch) {
                    Ok(()) => {
                        if let Some(n) = last {
                            publish.send_modify(|s| s.through = s.through.max(n));
                        }
                    }
                    Err(e) => {
                        tracing::error!("store: cannot write the mail log ({e}); no more mail is accepted as durable until the relay is restarted");
                        publish.send_modify(|s| s.failed = Some(Arc::new(e)));
                    }
                }
            }
            batch.clear();
            let full = self
                .index
                .segs
                .get(&self.active)
                .is_some_and(|s| s.bytes >= SEGMENT_BYTES);
            if !failed() && full {
                if let Err(e) = self.rotate() {
                    tracing::error!("store: cannot start a new segment: {e}");
                }
            }
        }
        let _ = self.file.sync_data();
        publish.send_modify(|s| s.stopped = true);
        if let Some(done) = stop {
            let _ = done.send(());
        }
    }

    /// Writes records to the active segment (giving puts their sequence
    /// numbers) and accounts them; the segments that lost live records.
    fn write(&mut self, batch: &mut [Record]) -> std::io::Result<Vec<u64>> {
        self.buf.clear();
        self.sizes.clear();
        for r in batch.iter_mut() {
            if let Record::Put(p) = r {
                if p.seq == 0 {
                    self.next_seq += 1;
                    p.seq = self.next_seq;
                }
            }
            let before = self.buf.len();
            r.encode(&mut self.buf)?;
            self.sizes.push((self.buf.len() - before) as u64);
        }
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
        }
        let mut touched = Vec::new();
        for (r, size) in batch.iter().zip(&self.sizes) {
            if let Some(seg) = self.index.add(self.active, r, *size) {
                if seg != self.active && !touched.contains(&seg) {
                    touched.push(seg);
                }
            }
        }
        Ok(touched)
    }

    /// Writes a batch and makes it as durable as promised.
    fn commit(&mut self, batch: &mut [Record]) -> std::io::Result<()> {
        if batch.is_empty() {
            // Only a stop (or empty appends): nothing to write.
            return Ok(());
        }
        let touched = self.write(batch)?;
        if self.durability == Durability::Sync {
            self.file.sync_data()?;
        }
        let reclaimable = touched.iter().any(|n| {
            self.index
                .segs
                .get(n)
                .is_some_and(|i| i.live == 0 || self.compactable(*n, i))
        });
        if reclaimable {
            self.reclaim()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.active += 1;
        self.file = Self::create(&self.dir, self.active)?;
        self.index.segs.entry(self.active).or_default();
        self.reclaim()
    }

    /// Whether sealed segment `n` is to be compacted: mostly dead, and not
    /// the newest sealed segment. The newest one's live messages are
    /// mostly the ones still on their way (sent a moment before it was
    /// sealed, acknowledged a moment after); compacting it read 16 MiB
    /// back to copy forward mail that died a few milliseconds later (5–35 %
    /// of the writer's samples in four profiles of a steady stream). By the
    /// time a newer segment is sealed too, what is still live in it is
    /// mail that waits (a peer away), worth the copy. Costs at most one
    /// more segment of disk.
    fn compactable(&self, n: u64, info: &SegInfo) -> bool {
        n + 1 < self.active && (info.live_bytes as f64) < COMPACT_BELOW * info.bytes as f64
    }

    /// Deletes sealed segments with nothing live, and compacts sealed ones
    /// that are mostly dead ([`Self::compactable`]): their live records
    /// are read back from the file and copied forward (keeping their
    /// sequence numbers) first.
    fn reclaim(&mut self) -> std::io::Result<()> {
        let sealed: Vec<(u64, SegInfo)> = self
            .index
            .segs
            .iter()
            .filter(|(n, _)| **n != self.active)
            .map(|(n, i)| (*n, *i))
            .collect();
        let mut gone: Vec<u64> = Vec::new();
        let mut copy: Vec<Record> = Vec::new();
        // Oldest first, so a segment pinned only by older ones going in
        // this pass can go too (they are deleted first).
        for (n, info) in sealed {
            let pinned = self.index.pins.get(&n).is_some_and(|older| {
                older
                    .iter()
                    .any(|p| self.index.segs.contains_key(p) && !gone.contains(p))
            });
            if pinned {
                continue;
            }
            if info.live == 0 {
                gone.push(n);
            } else if self.compactable(n, &info) {
                let mut live = Vec::new();
                read_segment(&seg_path(&self.dir, n), |r, _| {
                    if self.still_live_in(n, &r) {
                        live.push(r);
                    }
                })?;
                copy.extend(live);
                gone.push(n);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        if !copy.is_empty() {
            self.write(&mut copy)?;
        }
        // Copies, and every removal before them, durable before a segment goes.
        self.file.sync_data()?;
        for n in &gone {
            match std::fs::remove_file(seg_path(&self.dir, *n)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.index.segs.remove(n);
            self.index.pins.remove(n);
        }
        sync_dir(&self.dir)
    }

    fn still_live_in(&self, seg: u64, r: &Record) -> bool {
        match r {
            Record::Put(p) => self
                .index
                .msgs
                .get(&self.index.put_ref(&p.msg))
                .is_some_and(|(s, _)| *s == seg),
            Record::Status(s) => self
                .index
                .statuses
                .get(&(s.ns.clone(), s.name.clone()))
                .is_some_and(|(x, _)| *x == seg),
            Record::Del(_) => false,
        }
    }
}

/// The key of a saved message.
pub(crate) fn key_of(m: &Saved) -> MsgKey {
    MsgKey {
        ns: m.ns.clone(),
        to: m.to.clone(),
        from: m.from.clone(),
        id: m.id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(i: u8, body: &[u8]) -> Saved {
        Saved {
            ns: "acme".into(),
            to: "london".into(),
            from: "paris".into(),
            id: MessageId([i; 16]),
            body: Bytes::copy_from_slice(body),
            sent_at_ms: u64::from(i),
            expires_at_ms: u64::MAX,
        }
    }

    #[test]
    fn records_are_encoded_in_place_and_a_refused_one_leaves_the_buffer_as_it_was() {
        let put = Put {
            seq: 7,
            msg: msg(3, b"hello"),
        };
        let mut buf = b"before".to_vec();
        Record::Put(put.clone()).encode(&mut buf).expect("encodes");
        let body = postcard::to_stdvec(&put).expect("postcard");
        let rec = &buf[6..];
        assert_eq!(rec.len(), HEADER + 1 + body.len());
        let len = u32::from_le_bytes(rec[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(rec[4..8].try_into().unwrap());
        assert_eq!(len, 1 + body.len());
        assert_eq!(crc, crc32fast::hash(&rec[HEADER..]));
        assert_eq!(rec[HEADER], KIND_PUT);
        assert_eq!(&rec[HEADER + 1..], &body[..]);
        assert_eq!(
            Record::decode(rec[HEADER], &rec[HEADER + 1..]),
            Some(Record::Put(put))
        );
        let before = buf.clone();
        let huge = Record::Status(StoredStatus {
            ns: "acme".into(),
            name: "london".into(),
            fields: vec![("k".into(), "v".repeat(MAX_RECORD))],
            updated_ms: 0,
        });
        let e = huge.encode(&mut buf).expect_err("over the record limit");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert_eq!(buf, before, "nothing of the refused record is left");
    }

    #[tokio::test]
    async fn appends_are_numbered_in_order_and_settle_together() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), Durability::Process).expect("open");
        assert_eq!(
            store.barrier().number().ok(),
            Some(None),
            "nothing to wait for yet"
        );
        // One record alone and in a vector: numbered alike.
        let appends: Vec<Durable> = (1..=3)
            .map(|i| match i {
                2 => store.append_one(Record::put(msg(i, b"x"))),
                _ => store.append(vec![Record::put(msg(i, b"x"))]),
            })
            .collect();
        let numbers: Vec<u64> = appends
            .iter()
            .map(|d| d.number().expect("no error").expect("a number"))
            .collect();
        assert_eq!(numbers, vec![1, 2, 3]);
        store.append_quiet(vec![Record::Del(key_of(&msg(1, b"x")))]);
        let barrier = store.barrier();
        assert_eq!(
            barrier.number().ok(),
            Some(Some(4)),
            "after the quiet append"
        );
        barrier.wait().await.expect("durable");
        let settled = store.settled();
        let s = settled.borrow();
        for n in 1..=4 {
            assert!(matches!(s.outcome(n), Some(Ok(()))), "append {n}");
        }
        assert!(s.outcome(5).is_none(), "not appended yet");
        drop(s);
        for d in appends {
            d.wait().await.expect("durable");
        }
    }

    #[tokio::test]
    async fn after_a_failed_commit_nothing_is_promised_durable_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), Durability::Process).expect("open");
        put(&store, msg(1, b"before")).await;
        // A record the writer cannot write fails its commit.
        let bad = store.append(vec![Record::Status(StoredStatus {
            ns: "acme".into(),
            name: "london".into(),
            fields: vec![("k".into(), "v".repeat(MAX_RECORD))],
            updated_ms: 0,
        })]);
        let e = bad.wait().await.expect_err("not written");
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert!(store.failure().is_some(), "said once failed");
        // And everything after it fails too, for good: the log's state
        // after a failed write or sync is not known.
        for i in 2..4 {
            let later = store.append(vec![Record::put(msg(i, b"after"))]);
            assert!(matches!(later.wait().await, Err(StoreError::Io(_))));
        }
        assert!(matches!(
            store.barrier().wait().await,
            Err(StoreError::Io(_))
        ));
        store.close();
        // What was durable before the failure stays so.
        let (_store, rec) = Store::open(dir.path(), Durability::Process).expect("reopen");
        assert_eq!(rec.messages, vec![msg(1, b"before")]);
    }

    #[tokio::test]
    async fn a_stopped_writer_leaves_its_last_word() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), Durability::Process).expect("open");
        let d = store.append(vec![Record::put(msg(1, b"x"))]);
        let settled = store.settled();
        store.close();
        let s = settled.borrow().clone();
        assert!(s.stopped);
        assert!(
            matches!(s.outcome(1), Some(Ok(()))),
            "queued before the stop: written"
        );
        assert!(matches!(s.outcome(2), Some(Err(StoreError::Stopped))));
        d.wait().await.expect("durable");
    }

    async fn put(store: &Store, m: Saved) {
        store
            .append(vec![Record::put(m)])
            .wait()
            .await
            .expect("durable");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn puts_survive_a_reopen_and_deletes_stay_deleted() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let (store, rec) = Store::open(dir.path(), Durability::Sync).expect("open");
            assert!(rec.messages.is_empty());
            for i in 0..5 {
                put(&store, msg(i, b"hello")).await;
            }
            store.append_quiet(vec![Record::Del(key_of(&msg(1, b"")))]);
            store
                .append(vec![Record::Status(StoredStatus {
                    ns: "acme".into(),
                    name: "ci".into(),
                    fields: vec![("stage".into(), "test".into())],
                    updated_ms: 7,
                })])
                .wait()
                .await
                .expect("durable");
        }
        let (_store, rec) = Store::open(dir.path(), Durability::Sync).expect("reopen");
        let ids: Vec<u8> = rec.messages.iter().map(|m| m.id.0[0]).collect();
        assert_eq!(ids, [0, 2, 3, 4], "in accept order, the deleted one gone");
        assert_eq!(rec.statuses.len(), 1);
        assert_eq!(rec.truncated_bytes, 0);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_counted_and_the_log_goes_on() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let (store, _) = Store::open(dir.path(), Durability::Sync).expect("open");
            for i in 0..3 {
                put(&store, msg(i, &[i; 100])).await;
            }
        }
        // Cut the last record in half (a crash in the middle of a write).
        let last = segments(dir.path()).pop().expect("a segment");
        let len = std::fs::metadata(&last).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&last).expect("open");
        f.set_len(len - 50).expect("cut");
        drop(f);
        let (store, rec) = Store::open(dir.path(), Durability::Sync).expect("reopen");
        let ids: Vec<u8> = rec.messages.iter().map(|m| m.id.0[0]).collect();
        assert_eq!(ids, [0, 1]);
        assert!(rec.truncated_bytes > 0);
        // Appends after recovery are read back after the next restart.
        put(&store, msg(9, b"after")).await;
        drop(store);
        let (_s, rec) = Store::open(dir.path(), Durability::Sync).expect("again");
        let ids: Vec<u8> = rec.messages.iter().map(|m| m.id.0[0]).collect();
        assert_eq!(ids, [0, 1, 9]);
        assert_eq!(rec.truncated_bytes, 0, "clean now");
    }

    #[tokio::test]
    async fn a_flipped_byte_in_the_tail_is_detected_by_its_checksum() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let (store, _) = Store::open(dir.path(), Durability::Process).expect("open");
            for i in 0..3 {
                put(&store, msg(i, &[i; 100])).await;
            }
        }
        let last = segments(dir.path()).pop().expect("a segment");
        let mut bytes = std::fs::read(&last).expect("read");
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        std::fs::write(&last, &bytes).expect("write");
        let (_store, rec) = Store::open(dir.path(), Durability::Process).expect("reopen");
        let ids: Vec<u8> = rec.messages.iter().map(|m| m.id.0[0]).collect();
        assert_eq!(ids, [0, 1], "the damaged record is dropped, the rest kept");
        assert_eq!(rec.corrupt_records, 1);
        assert!(rec.truncated_bytes > 0);
    }

    #[tokio::test]
    async fn space_is_reclaimed_when_segments_die_and_the_rest_is_compacted() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(dir.path(), Durability::Process).expect("open");
        // Enough to fill five segments; keep one message in 50 alive.
        let body = vec![7u8; 60 * 1024];
        let n = (5 * SEGMENT_BYTES / body.len() as u64) as usize;
        for i in 0..n {
            let mut m = msg(0, &body);
            m.id = MessageId((i as u128).to_le_bytes());
            let key = key_of(&m);
            put(&store, m).await;
            if i % 50 != 0 {
                store.append_quiet(vec![Record::Del(key)]);
            }
        }
        store.barrier().wait().await.expect("synced");
        let total: u64 = segments(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let live = (n as u64).div_ceil(50) * body.len() as u64;
        // The active segment and the newest sealed one (never compacted)
        // at most, beside the live mail: the older ones were compacted.
        assert!(
            total < live + 3 * SEGMENT_BYTES,
            "{total} bytes on disk for {live} live"
        );
        drop(store);
        let (_s, rec) = Store::open(dir.path(), Durability::Process).expect("reopen");
        assert_eq!(
            rec.messages.len(),
            n.div_ceil(50),
            "every live message kept"
        );
    }

    #[tokio::test]
    async fn the_newest_sealed_segment_is_not_read_back_for_mail_about_to_die() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(dir.path(), Durability::Process).expect("open");
        // Mail acknowledged at once, but for three messages still on their
        // way (a receiver a moment behind its sender), until a second
        // segment is begun: the first is sealed with those three live.
        let body = vec![7u8; 60 * 1024];
        let per_segment = (SEGMENT_BYTES / body.len() as u64) as usize;
        let mut tail = Vec::new();
        for i in 0..per_segment + 8 {
            let mut m = msg(0, &body);
            m.id = MessageId((i as u128).to_le_bytes());
            let key = key_of(&m);
            put(&store, m).await;
            if (200..203).contains(&i) {
                tail.push(key);
            } else {
                store.append_quiet(vec![Record::Del(key)]);
            }
        }
        store.barrier().wait().await.expect("synced");
        let (first, second) = (seg_path(dir.path(), 1), seg_path(dir.path(), 2));
        let before = std::fs::metadata(&second).expect("a second segment").len();
        assert!(
            first.exists(),
            "the newest sealed segment was compacted for {} live bytes of {}",
            3 * body.len(),
            SEGMENT_BYTES
        );
        // The three are acknowledged: the segment dies whole, not copied.
        store.append_quiet(tail.into_iter().map(Record::Del).collect());
        store.barrier().wait().await.expect("synced");
        assert!(!first.exists(), "a dead segment is deleted");
        let grown = std::fs::metadata(&second).expect("active").len() - before;
        assert!(
            grown < body.len() as u64,
            "the active segment took three removals, not copies: {grown} bytes"
        );
    }

    #[tokio::test]
    async fn a_removal_outlives_the_segment_of_its_message() {
        let dir = tempfile::tempdir().expect("dir");
        let acked = msg(200, b"acknowledged");
        let big = vec![7u8; 60 * 1024];
        let per_segment = (SEGMENT_BYTES / big.len() as u64) as usize + 1;
        {
            let (store, _) = Store::open(dir.path(), Durability::Process).expect("open");
            // Segment 1: the message, then enough mail that stays to keep
            // the segment mostly live (never compacted).
            put(&store, acked.clone()).await;
            for i in 0..per_segment {
                let mut m = msg(0, &big);
                m.id = MessageId((i as u128).to_le_bytes());
                put(&store, m).await;
            }
            // Segment 2: its removal, then mail that dies, so segment 2
            // has nothing live once it is sealed.
            store.append_quiet(vec![Record::Del(key_of(&acked))]);
            for i in 0..per_segment {
                let mut m = msg(1, &big);
                m.id = MessageId((1_000_000 + i as u128).to_le_bytes());
                let key = key_of(&m);
                put(&store, m).await;
                store.append_quiet(vec![Record::Del(key)]);
            }
            store.barrier().wait().await.expect("synced");
        }
        let (_s, rec) = Store::open(dir.path(), Durability::Process).expect("reopen");
        assert!(
            !rec.messages.iter().any(|m| m.id == acked.id),
            "an acknowledged message came back: its removal was deleted with a dead segment"
        );
        assert_eq!(
            rec.messages.len(),
            per_segment,
            "the mail that stays is all there"
        );
    }

    #[tokio::test]
    async fn memory_durability_keeps_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(dir.path(), Durability::Memory).expect("open");
        put(&store, msg(1, b"x")).await;
        assert!(segments(dir.path()).is_empty());
    }
}
