//! A held message as stored ([`Saved`]), and the single file in which
//! earlier versions saved held mail at a graceful stop
//! (`<state-dir>/mailboxes.postcard`): read once at start, taken into the
//! mail store (see [`super::store`]), and removed. Expiry is kept in
//! wall-clock time, so time spent down counts against the TTL.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use swb_wire::MessageId;

/// File name inside the state dir.
pub(crate) const FILE: &str = "mailboxes.postcard";
const VERSION: u32 = 1;

/// One held message as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Saved {
    /// The names are shared with the registry's (and the store index's)
    /// copies: storing a message copies none of them.
    pub(crate) ns: Arc<str>,
    pub(crate) to: Arc<str>,
    pub(crate) from: Arc<str>,
    pub(crate) id: MessageId,
    pub(crate) body: Bytes,
    pub(crate) sent_at_ms: u64,
    /// Expiry, ms since the Unix epoch.
    pub(crate) expires_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    messages: Vec<Saved>,
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes `messages` atomically (temp file, fsync, rename), as earlier
/// versions did at a graceful stop.
#[cfg(test)]
pub(crate) fn save(dir: &Path, messages: Vec<Saved>) -> std::io::Result<()> {
    use std::io::Write;
    let bytes = postcard::to_stdvec(&FileV1 {
        version: VERSION,
        messages,
    })
    .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{FILE}.tmp{}", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path(dir))
}

/// Reads and removes the saved mail, if any.
pub(crate) fn take(dir: &Path) -> std::io::Result<Vec<Saved>> {
    let p = path(dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let f: FileV1 = postcard::from_bytes(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a saved mailbox file: {e}", p.display()),
        )
    })?;
    if f.version != VERSION {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} has version {}, this relay reads {VERSION}",
                p.display(),
                f.version
            ),
        ));
    }
    std::fs::remove_file(&p)?;
    Ok(f.messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_take_round_trips_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = Saved {
            ns: "acme".into(),
            to: "london".into(),
            from: "laptop".into(),
            id: MessageId([7; 16]),
            body: Bytes::from_static(b"hi"),
            sent_at_ms: 1,
            expires_at_ms: 2,
        };
        save(dir.path(), vec![m.clone()]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(take(dir.path()).unwrap(), vec![m]);
        assert!(take(dir.path()).unwrap().is_empty(), "taken once");
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_mailbox() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"\xff\xff\xff garbage").unwrap();
        let e = take(dir.path()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(path(dir.path()).exists(), "left in place for the operator");
    }
}
