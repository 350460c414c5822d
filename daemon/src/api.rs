//! Sending and receiving from Rust, in the daemon's own process: what the
//! control socket offers (and what it is built on), without the socket,
//! JSON or base64. See [`crate::DaemonHandle::send`] and
//! [`crate::DaemonHandle::receiver`].
//!
//! ```no_run
//! # use std::time::Duration;
//! # use swb_daemon::{ApiKey, Daemon, DaemonConfig, Trust};
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! # let config = DaemonConfig::new("127.0.0.1:7443", Trust::System, "laptop",
//! #     ApiKey::new("key"), "/tmp/laptop.sock".into());
//! # let bytes = bytes::Bytes::from_static(b"x");
//! let daemon = Daemon::spawn(config).await?;
//! let accepted = daemon.send("london", "deploy done", Duration::from_secs(10)).await?;
//! // Pipelining: submit in order, collect the relay's answers later.
//! let tx = daemon.sender();
//! let mut pending = tx.submit("london", bytes, Duration::from_secs(10)).await?;
//! let accepted = pending.answer().await?;
//! // Batches: handed over together, each send answered for itself.
//! let msgs = [("london", "a"), ("paris", "b")];
//! let mut batch = tx.submit_batch(msgs, Duration::from_secs(10)).await?;
//! for answer in batch.answer().await? {
//!     let accepted = answer?;
//! }
//! // Receiving: messages are leased to the receiver until acknowledged;
//! // dropping it gives the unacknowledged ones back.
//! let mut rx = daemon.receiver();
//! for m in rx.recv(100, Duration::from_secs(30)).await? {
//!     println!("{}: {:?}", m.from, m.body);
//!     rx.ack(&[m.id]).await?;
//! }
//! # Ok(()) }
//! ```

use crate::inbox::Identity;
use crate::session::{BatchItem, SendResult};
use crate::{ConnState, Shared};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Deliver, MessageId, MAX_MESSAGE_BODY};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Longest wait (`recv`, send timeout) the daemon honours.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Most messages one `recv` returns.
pub const MAX_RECV_BATCH: usize = 10_000;

/// Most messages one [`Sender::submit_batch`] takes.
pub const MAX_SEND_BATCH: usize = 1024;

/// Why a send, receive or acknowledgement did not happen. `code` is the
/// same stable code the control socket reports (`mailbox_full`,
/// `not_connected`, `bad_name`, `timeout`, `stopped`, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// A message the relay accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Its id (the recipient sees the same).
    pub id: MessageId,
    /// Whether the recipient was attached when the relay took it.
    pub online: bool,
}

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id (acknowledge with it).
    pub id: MessageId,
    /// Sender name.
    pub from: String,
    /// Body.
    pub body: Bytes,
    /// When the relay accepted it, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

impl From<&Deliver> for Message {
    fn from(d: &Deliver) -> Self {
        Self {
            id: d.id,
            from: d.from.clone(),
            body: d.body.clone(),
            sent_at_ms: d.sent_at_ms,
        }
    }
}

/// A send the connection actor has taken, in order with the sends before
/// it; await it for the relay's answer.
#[derive(Debug)]
pub struct PendingSend {
    id: MessageId,
    rx: oneshot::Receiver<SendResult>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl PendingSend {
    /// The message id (known before the relay answers).
    pub fn id(&self) -> MessageId {
        self.id
    }

    fn outcome(&self, r: Option<Result<SendResult, ()>>) -> Result<Accepted, ApiError> {
        match r {
            Some(Ok(Ok(online))) => Ok(Accepted {
                id: self.id,
                online,
            }),
            Some(Ok(Err(r))) => Err(ApiError::new(r.code.as_str(), r.message)),
            Some(Err(())) => Err(ApiError::new(
                "stopped",
                "the daemon stopped before the relay answered",
            )),
            None => Err(ApiError::new(
                "timeout",
                format!(
                    "the relay did not answer within {:?}; the message may not have been accepted",
                    self.timeout
                ),
            )),
        }
    }

    /// The answer if it is already known.
    pub(crate) fn try_answer(&mut self) -> Option<Result<Accepted, ApiError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(self.outcome(Some(Ok(r)))),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(self.outcome(Some(Err(())))),
        }
    }

    /// Waits for the relay's answer (until the send's timeout).
    pub async fn answer(&mut self) -> Result<Accepted, ApiError> {
        // An answer already here needs no timer: arming one takes the
        // runtime's handle (a reference count every worker shares).
        if let Some(r) = self.try_answer() {
            return r;
        }
        let r = match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(r) => Some(r.map_err(|_| ())),
            Err(_) => None,
        };
        self.outcome(r)
    }
}

/// Sends handed to the relay connection together (from
/// [`Sender::submit_batch`]); await [`PendingBatch::answer`] for the
/// relay's answers, all at once.
#[derive(Debug)]
pub struct PendingBatch {
    ids: Vec<MessageId>,
    rx: oneshot::Receiver<Vec<SendResult>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl PendingBatch {
    /// The messages' ids, in the batch's order (known before the relay
    /// answers).
    pub fn ids(&self) -> &[MessageId] {
        &self.ids
    }

    /// Waits (until the batch's timeout) for the relay to answer every
    /// send: one result per message, in the batch's order — accepted, or
    /// refused with the relay's code (`mailbox_full`, …), as
    /// [`PendingSend::answer`] gives it. The error is for the whole batch:
    /// the daemon stopped, or the relay did not answer them all in time
    /// (and those it did not answer may not have been accepted).
    pub async fn answer(&mut self) -> Result<Vec<Result<Accepted, ApiError>>, ApiError> {
        if let Some(r) = self.try_answer() {
            return r;
        }
        let r = match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(r) => r.map_err(|_| true),
            Err(_) => Err(false),
        };
        self.outcome(r)
    }

    /// The answers if they are already known.
    pub(crate) fn try_answer(
        &mut self,
    ) -> Option<Result<Vec<Result<Accepted, ApiError>>, ApiError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(self.outcome(Ok(r))),
            Err(oneshot::error::TryRecvError::Closed) => Some(self.outcome(Err(true))),
            Err(oneshot::error::TryRecvError::Empty) => None,
        }
    }

    /// The answers, from the actor's (`Err(true)`: the daemon stopped;
    /// `Err(false)`: the timeout passed).
    fn outcome(
        &self,
        r: Result<Vec<SendResult>, bool>,
    ) -> Result<Vec<Result<Accepted, ApiError>>, ApiError> {
        match r {
            Ok(results) if results.len() == self.ids.len() => Ok((self.ids.iter())
                .zip(results)
                .map(|(&id, r)| match r {
                    Ok(online) => Ok(Accepted { id, online }),
                    Err(r) => Err(ApiError::new(r.code.as_str(), r.message)),
                })
                .collect()),
            Ok(results) => Err(ApiError::new(
                "internal",
                format!("{} answers for a batch of {}", results.len(), self.ids.len()),
            )),
            Err(true) => Err(ApiError::new(
                "stopped",
                "the daemon stopped before the relay answered",
            )),
            Err(false) => Err(ApiError::new(
                "timeout",
                format!(
                    "the relay did not answer every send of the batch within {:?}; those it did not answer may not have been accepted",
                    self.timeout
                ),
            )),
        }
    }
}

/// Checks a send and hands it to the connection actor, waiting up to
/// `timeout` for a relay connection first; the relay answers later.
pub(crate) async fn submit(
    shared: &Arc<Shared>,
    to: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<PendingSend, ApiError> {
    let timeout = timeout.min(MAX_WAIT);
    check_body(&body)?;
    let to = checked_name(to)?;
    let deadline = tokio::time::Instant::now() + timeout;
    connected(shared, deadline, timeout).await?;
    let id = random_id()?;
    let (tx, rx) = oneshot::channel();
    if shared
        .out
        .send(&shared.cmd_tx, &shared.tasks, to, id, body, tx)
        .await
        .is_err()
    {
        return Err(stopping());
    }
    Ok(PendingSend {
        id,
        rx,
        deadline,
        timeout,
    })
}

/// Returns once the daemon is connected to its relay (at once, as a rule);
/// an error if it stopped or `deadline` passed first.
async fn connected(
    shared: &Shared,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<(), ApiError> {
    if shared.connected.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    wait_connected(shared, deadline, timeout).await
}

/// The daemon stopped taking sends.
fn stopping() -> ApiError {
    ApiError::new("stopped", "the daemon is stopping")
}

/// A body within [`MAX_MESSAGE_BODY`], or why not.
fn check_body(body: &Bytes) -> Result<(), ApiError> {
    if body.len() > MAX_MESSAGE_BODY {
        return Err(ApiError::new(
            "body_too_large",
            format!(
                "the message body has {} bytes; the limit is {MAX_MESSAGE_BODY}. Send large data over a stream instead",
                body.len()
            ),
        ));
    }
    Ok(())
}

/// A recipient's name as the relay knows it, or why it is none.
///
/// The last name checked on this thread is remembered, as given and as the
/// relay knows it: a program sending to one peer after another has it
/// checked and copied once, and each send shares the copy.
fn checked_name(to: &str) -> Result<Arc<str>, ApiError> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Box<str>, Arc<str>)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((given, name)) = &*last {
            if **given == *to {
                return Ok(name.clone());
            }
        }
        let name: Arc<str> = swb_wire::normalized(to)
            .map(|n| Arc::from(&*n))
            .map_err(|e| ApiError::new("bad_name", format!("{e}: {to:?}")))?;
        // Names are short (`MAX_NAME_LEN`); a longer string is not a name
        // and was refused above.
        *last = Some((Box::from(to), name.clone()));
        Ok(name)
    })
}

/// Checks every send of a batch, then hands them to the connection actor
/// together (see [`Sender::submit_batch`]).
pub(crate) async fn submit_batch<'a, B: Into<Bytes>>(
    shared: &Arc<Shared>,
    msgs: impl IntoIterator<Item = (&'a str, B)>,
    timeout: Duration,
) -> Result<PendingBatch, ApiError> {
    let timeout = timeout.min(MAX_WAIT);
    let msgs = msgs.into_iter();
    let mut items = Vec::with_capacity(msgs.size_hint().0.min(MAX_SEND_BATCH));
    for (i, (to, body)) in msgs.enumerate() {
        if i == MAX_SEND_BATCH {
            return Err(ApiError::new(
                "batch_too_large",
                format!(
                    "a batch holds at most {MAX_SEND_BATCH} messages; submit the rest in another"
                ),
            ));
        }
        let body = body.into();
        let in_batch = |e: ApiError| {
            ApiError::new(&e.code, format!("message {i} of the batch: {}", e.message))
        };
        check_body(&body).map_err(in_batch)?;
        // A batch to one peer has its name checked and copied once
        // (`checked_name` remembers it).
        let name = checked_name(to).map_err(in_batch)?;
        let id = random_id()?;
        items.push(BatchItem { to: name, id, body });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, rx) = oneshot::channel();
    if items.is_empty() {
        let _ = tx.send(Vec::new());
        return Ok(PendingBatch {
            ids: Vec::new(),
            rx,
            deadline,
            timeout,
        });
    }
    connected(shared, deadline, timeout).await?;
    let ids = items.iter().map(|i| i.id).collect();
    if shared
        .out
        .send_batch(&shared.cmd_tx, &shared.tasks, items, tx)
        .await
        .is_err()
    {
        return Err(stopping());
    }
    Ok(PendingBatch {
        ids,
        rx,
        deadline,
        timeout,
    })
}

/// Waits until the daemon is connected to its relay; an error if it
/// stopped or `deadline` passed first.
async fn wait_connected(
    shared: &Shared,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<(), ApiError> {
    let mut state = shared.watch_state();
    let ready = tokio::time::timeout_at(
        deadline,
        state.wait_for(|s| matches!(s, ConnState::Connected { .. } | ConnState::Stopped { .. })),
    )
    .await
    .map(|r| r.map(|s| s.clone()));
    match ready {
        Err(_) => {
            let why = match &*shared.state() {
                ConnState::Connecting {
                    last_error: Some(e),
                    ..
                } => format!(" (last error: {e})"),
                _ => String::new(),
            };
            Err(ApiError::new(
                "not_connected",
                format!("the daemon could not reach its relay within {timeout:?}{why}; the message was not sent"),
            ))
        }
        Ok(Err(_)) => Err(ApiError::new("stopped", "the daemon is stopping")),
        Ok(Ok(ConnState::Stopped { error })) => Err(ApiError::new(
            "stopped",
            format!(
                "the daemon stopped: {}",
                error.as_deref().unwrap_or("asked to")
            ),
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Sends messages in the daemon's process (from
/// [`crate::DaemonHandle::sender`]): `swbd send` from Rust, without the
/// control socket, JSON or base64. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("name", &self.shared.config.name)
            .finish()
    }
}

impl Sender {
    /// Sends `body` to `to` and waits for the relay's answer. Waits up to
    /// `timeout` for a relay connection and for the answer.
    pub async fn send(
        &self,
        to: &str,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Accepted, ApiError> {
        submit(&self.shared, to, body.into(), timeout)
            .await?
            .answer()
            .await
    }

    /// Hands a send to the relay connection without waiting for the
    /// relay's answer — how to pipeline: sends submitted one after another
    /// (from one task) reach the relay, and the recipient, in that order;
    /// await [`PendingSend::answer`] for each later. When 1024 submitted
    /// sends wait to be written, `submit` waits.
    pub async fn submit(
        &self,
        to: &str,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<PendingSend, ApiError> {
        submit(&self.shared, to, body.into(), timeout).await
    }

    /// Hands up to [`MAX_SEND_BATCH`] sends to the relay connection
    /// together, as [`Self::submit`] would one after another (in order,
    /// each with its own id and answer), for less work per message: the
    /// sends are checked, registered and written at once, and answered
    /// together. Every send is checked before any is handed over: a bad
    /// name or a body over [`MAX_MESSAGE_BODY`] fails the whole batch and
    /// says which message. Waits up to `timeout` for a relay connection
    /// and for the answers. A batch counts as one of the 1024 submissions
    /// that may wait to be written.
    pub async fn submit_batch<'a, B: Into<Bytes>>(
        &self,
        msgs: impl IntoIterator<Item = (&'a str, B)>,
        timeout: Duration,
    ) -> Result<PendingBatch, ApiError> {
        submit_batch(&self.shared, msgs, timeout).await
    }

    /// [`Self::submit_batch`], then waits for every answer.
    pub async fn send_batch<'a, B: Into<Bytes>>(
        &self,
        msgs: impl IntoIterator<Item = (&'a str, B)>,
        timeout: Duration,
    ) -> Result<Vec<Result<Accepted, ApiError>>, ApiError> {
        submit_batch(&self.shared, msgs, timeout)
            .await?
            .answer()
            .await
    }
}

/// Message ids made from one seed, then a new seed.
const ID_POOL: usize = 4096;

/// A new message id. Ids must not be guessable by other peers (the relay
/// takes an id it already holds as a retry of that message), so they come
/// from ChaCha12 keyed with 32 bytes from the OS's secure random source, a
/// fresh key for every 256 ids. Reading all 4 KiB from the OS was one
/// system call per 256 messages, but the kernel's ChaCha20 took about 2 %
/// of the message path's CPU (`swbd-bench rate`, one CPU); the user-space
/// cipher makes the same bytes in a fraction of that.
fn random_id() -> Result<MessageId, ApiError> {
    use rand::{Rng, SeedableRng};
    thread_local! {
        static POOL: std::cell::RefCell<(Box<[u8; ID_POOL]>, usize)> =
            std::cell::RefCell::new((Box::new([0; ID_POOL]), ID_POOL));
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (bytes, used) = &mut *pool;
        if *used + 16 > ID_POOL {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| ApiError::new("internal", "no randomness for a message id"))?;
            let mut cipher = rand::rngs::StdRng::from_seed(seed);
            seed.fill(0);
            cipher.fill_bytes(&mut bytes[..]);
            *used = 0;
        }
        let taken = &mut bytes[*used..*used + 16];
        let mut raw = [0u8; 16];
        raw.copy_from_slice(taken);
        // An id handed out is not kept here.
        taken.fill(0);
        *used += 16;
        Ok(MessageId(raw))
    })
}

/// Messages leased to one reader (a control connection or a [`Receiver`]):
/// taken from the inbox, not yet acknowledged. What is left when the reader
/// goes away returns to the inbox.
#[derive(Default)]
pub(crate) struct Leased(Vec<Deliver>);

impl Leased {
    /// Takes up to `max` messages, waiting up to `wait` for the first.
    pub(crate) async fn take(
        &mut self,
        shared: &Shared,
        max: usize,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<&[Deliver], ApiError> {
        let max = max.clamp(1, MAX_RECV_BATCH);
        let mut gen = shared.inbox_gen.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            gen.borrow_and_update();
            let start = self.0.len();
            if shared.inbox().take_into(&mut self.0, max) > 0 {
                return Ok(&self.0[start..]);
            }
            if let ConnState::Stopped { error } = &*shared.state() {
                return Err(ApiError::new(
                    "stopped",
                    format!(
                        "the daemon stopped: {}",
                        error.as_deref().unwrap_or("asked to")
                    ),
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(ApiError::new("stopped", "the daemon is stopping")),
                _ = tokio::time::sleep_until(deadline) => return Ok(&[]),
                r = gen.changed() => if r.is_err() {
                    return Err(ApiError::new("stopped", "the daemon is stopping"));
                },
            }
        }
    }

    /// Acknowledges those of `ids` leased here; returns how many.
    pub(crate) async fn ack(
        &mut self,
        shared: &Shared,
        ids: &[MessageId],
    ) -> Result<usize, ApiError> {
        let mut acked: Vec<Identity> = Vec::with_capacity(ids.len().min(self.0.len()));
        // As a rule a program acknowledges everything it took, in the order
        // taken: then every leased message goes, with no set to look in.
        if ids.len() == self.0.len() && self.0.iter().zip(ids).all(|(d, id)| d.id == *id) {
            acked.extend(self.0.drain(..).map(|d| Identity::of(&d)));
        } else {
            let wanted: HashSet<&MessageId, ahash::RandomState> = ids.iter().collect();
            acked.extend(
                self.0
                    .extract_if(.., |d| wanted.contains(&d.id))
                    .map(|d| Identity::of(&d)),
            );
        }
        let n = acked.len();
        if n > 0 {
            // The connection actor marks them in the inbox.
            if (shared.out)
                .ack(&shared.cmd_tx, &shared.tasks, acked)
                .await
                .is_err()
            {
                return Err(ApiError::new(
                    "stopped",
                    "the daemon is stopping; the relay will deliver these again",
                ));
            }
        }
        Ok(n)
    }

    /// Returns what is still leased to the inbox.
    pub(crate) fn give_back(&mut self, shared: &Shared) {
        if !self.0.is_empty() {
            shared.inbox().give_back(std::mem::take(&mut self.0));
            shared.inbox_gen.send_modify(|g| *g += 1);
        }
    }
}

/// Receives messages in the daemon's process (see
/// [`crate::DaemonHandle::receiver`]). Messages it returns are leased to it
/// until acknowledged with [`Receiver::ack`]; dropping the receiver returns
/// the unacknowledged ones to the inbox, as closing a control connection does.
pub struct Receiver {
    pub(crate) shared: Arc<Shared>,
    pub(crate) leased: Leased,
    pub(crate) cancel: CancellationToken,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("leased", &self.leased.0.len())
            .finish()
    }
}

impl Receiver {
    /// Takes up to `max` messages (at most [`MAX_RECV_BATCH`]), waiting up
    /// to `wait` for the first; empty if none came.
    pub async fn recv(&mut self, max: usize, wait: Duration) -> Result<Vec<Message>, ApiError> {
        let got = self
            .leased
            .take(&self.shared, max, wait, &self.cancel)
            .await?;
        Ok(got.iter().map(Message::from).collect())
    }

    /// Acknowledges messages this receiver took: the relay forgets them.
    /// Returns how many of `ids` were leased here.
    pub async fn ack(&mut self, ids: &[MessageId]) -> Result<usize, ApiError> {
        self.leased.ack(&self.shared, ids).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.leased.give_back(&self.shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_name_is_never_given_for_another() {
        // Each answer is the name given, as the relay knows it, whatever
        // was checked just before on this thread.
        let ok = |given: &str, want: &str| {
            let got = checked_name(given).expect("a name");
            assert_eq!(&*got, want, "{given:?}");
        };
        ok("London", "london");
        ok("London", "london");
        ok("paris", "paris");
        ok("LONDON", "london");
        ok("London.switchboard", "london");
        assert_eq!(checked_name("not a name!").unwrap_err().code, "bad_name");
        // A refused name leaves the one remembered as it was.
        ok("LONDON", "london");
        assert_eq!(checked_name("not a name!").unwrap_err().code, "bad_name");
        ok("paris", "paris");
        // Two sends to one name share one copy of it.
        let (a, b) = (checked_name("oslo").unwrap(), checked_name("oslo").unwrap());
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn message_ids_stay_distinct_across_pool_refills() {
        // Three pools' worth: every id new, none left zeroed by a refill.
        let n = 3 * ID_POOL / 16 + 5;
        let ids: std::collections::HashSet<[u8; 16]> = (0..n)
            .map(|_| random_id().map(|id| id.0))
            .collect::<Result<_, _>>()
            .expect("ids");
        assert_eq!(ids.len(), n);
        assert!(!ids.contains(&[0u8; 16]));
    }
}
