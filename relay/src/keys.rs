//! API keys: generation, the keys file, and verification.
//!
//! A key looks like `swbk_<id>_<secret>`: `id` is 12 hex digits and public
//! (it names the key in the file and in logs), `secret` is 32 random bytes in
//! hex. The keys file stores only `sha256(key)`, the namespace and whether the
//! key is revoked, so a relay can verify any key locally, with no round trip,
//! and every relay sharing the file accepts the same keys. Keys are high-entropy
//! random strings, so a plain SHA-256 (not a password hash) is the right tool.
//! The comparison of hashes is constant-time.

use ring::digest;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

const PREFIX: &str = "swbk_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// Errors of the keys file.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Reading or writing the file failed.
    #[error("keys file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("keys file {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A namespace name is not acceptable.
    #[error("namespace {0:?} is not valid: use 1-63 letters, digits or '-'")]
    BadNamespace(String),
    /// A name pattern is not acceptable.
    #[error("name pattern {0:?} is not valid: use peer-name characters (a-z, 0-9, -) and * for any run of them, separated by commas")]
    BadNames(String),
    /// No key with that id in the file.
    #[error("no key with id {0} in the keys file (see `swbd keys list`)")]
    NoSuchKey(String),
}

/// Why a presented key is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Malformed, unknown, or wrong secret.
    #[error("the API key is not valid")]
    Unauthorized,
    /// The key exists but was revoked.
    #[error("the API key was revoked")]
    Revoked,
}

/// One entry of the keys file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Public id (the `<id>` part of the key).
    pub id: String,
    /// Namespace the key belongs to.
    pub namespace: String,
    /// `sha256:<hex>` of the whole key string.
    pub hash: String,
    /// Free-form label.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub created_unix: u64,
    /// A revoked key is refused with `key_revoked`.
    #[serde(default)]
    pub revoked: bool,
    /// The names the key may use (attach as, send from, receive and
    /// acknowledge as, set the status of): patterns like `ci-*` or
    /// `london`. Empty: every name of its namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// The keys file (TOML): a list of `[[key]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// The keys.
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyEntry>,
}

/// A verified key: which one, which namespace, which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Public key id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Name patterns it is limited to (empty: every name).
    pub names: Vec<String>,
}

impl KeyInfo {
    /// Whether this key may use `name` (a normalized peer name).
    pub fn may_use(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|p| glob_match(p, name))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (including none).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Iterative matching with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Checks and normalizes name patterns (`ci-*,london`): peer-name
/// characters and `*`, lower case, 1–63 characters each.
pub fn parse_name_patterns(list: &str) -> Result<Vec<String>, KeysError> {
    let mut out = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = p.to_ascii_lowercase();
        let ok = !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'*');
        if !ok {
            return Err(KeysError::BadNames(p));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(KeysError::BadNames(list.to_string()));
    }
    Ok(out)
}

/// A freshly created key: the plain key (shown once) and its file entry.
pub struct NewKey {
    /// The plain API key. Show it once; it is stored nowhere.
    pub key: String,
    /// The entry to store.
    pub entry: KeyEntry,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn hash_key(key: &str) -> String {
    format!(
        "sha256:{}",
        hex(digest::digest(&digest::SHA256, key.as_bytes()).as_ref())
    )
}

/// Constant-time equality of two byte strings of possibly different length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Checks that a namespace is a DNS-label-like string.
pub fn validate_namespace(ns: &str) -> Result<(), KeysError> {
    match swb_wire::normalize_name(ns) {
        Ok(n) if n == ns => Ok(()),
        _ => Err(KeysError::BadNamespace(ns.to_string())),
    }
}

/// Creates a new random key for `namespace`.
pub fn generate(namespace: &str, label: &str) -> Result<NewKey, KeysError> {
    validate_namespace(namespace)?;
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut raw = [0u8; ID_HEX / 2 + SECRET_HEX / 2];
    rng.fill(&mut raw).map_err(|_| KeysError::Io {
        path: String::new(),
        source: std::io::Error::other("system random number generator failed"),
    })?;
    let id = hex(&raw[..ID_HEX / 2]);
    let key = format!("{PREFIX}{id}_{}", hex(&raw[ID_HEX / 2..]));
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(NewKey {
        entry: KeyEntry {
            id,
            namespace: namespace.to_string(),
            hash: hash_key(&key),
            label: label.to_string(),
            created_unix,
            revoked: false,
            names: Vec::new(),
        },
        key,
    })
}

/// The public id of a key string, if it has the right shape.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = id.len() == ID_HEX
        && secret.len() == SECRET_HEX
        && id
            .bytes()
            .chain(secret.bytes())
            .all(|b| b.is_ascii_hexdigit());
    ok.then_some(id)
}

impl KeysFile {
    /// Parses TOML text.
    pub fn parse(text: &str, path: &str) -> Result<Self, KeysError> {
        let f: KeysFile = toml::from_str(text).map_err(|e| KeysError::Parse {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let mut seen = std::collections::HashSet::new();
        for k in &f.keys {
            if !seen.insert(k.id.as_str()) {
                return Err(KeysError::Parse {
                    path: path.to_string(),
                    reason: format!("key id {} appears twice", k.id),
                });
            }
            validate_namespace(&k.namespace).map_err(|e| KeysError::Parse {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
            if !k.names.is_empty() {
                parse_name_patterns(&k.names.join(",")).map_err(|e| KeysError::Parse {
                    path: path.to_string(),
                    reason: format!("key {}: {e}", k.id),
                })?;
            }
        }
        Ok(f)
    }

    /// Reads the file; a missing file is an empty key set.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(KeysError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// The file's text (what [`KeysFile::save`] writes after its comment).
    pub fn to_toml(&self, path: &str) -> Result<String, KeysError> {
        toml::to_string_pretty(self).map_err(|e| KeysError::Parse {
            path: path.to_string(),
            reason: e.to_string(),
        })
    }

    /// Writes the file atomically (temp file + rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeysError> {
        let io = |source| KeysError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = self.to_toml(&path.display().to_string())?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("keys"),
            std::process::id()
        ));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(b"# Switchboard API keys. Holds only hashes; managed by `swbd keys`.\n")
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads the file, changes it with `f` and writes it back, holding an
    /// exclusive lock (`flock` on `.<name>.lock` beside it) throughout, so
    /// two `swbd keys` at once cannot lose each other's change. The write
    /// is atomic (temp file + rename): a relay never reads half a file.
    pub fn update<T>(
        path: &Path,
        f: impl FnOnce(&mut KeysFile) -> Result<T, KeysError>,
    ) -> Result<T, KeysError> {
        let io = |source| KeysError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let lock_path = dir.join(format!(
            ".{}.lock",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("keys")
        ));
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io)?
        };
        lock.lock().map_err(io)?;
        let mut file = Self::load(path)?;
        let out = f(&mut file)?;
        file.save(path)?;
        // Dropping the file releases the lock.
        drop(lock);
        Ok(out)
    }

    /// Marks the key with this id (or the id of this full key) revoked.
    /// Returns the entry.
    pub fn revoke(&mut self, id_or_key: &str) -> Result<&KeyEntry, KeysError> {
        let id = key_id(id_or_key).unwrap_or(id_or_key);
        let e = self
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| KeysError::NoSuchKey(id.to_string()))?;
        e.revoked = true;
        Ok(e)
    }
}

/// In-memory index of a keys file, for verification.
#[derive(Debug, Default, Clone)]
pub struct KeyStore {
    by_id: HashMap<String, KeyEntry>,
}

impl KeyStore {
    /// Indexes a parsed file.
    pub fn new(file: &KeysFile) -> Self {
        Self {
            by_id: file
                .keys
                .iter()
                .map(|k| (k.id.clone(), k.clone()))
                .collect(),
        }
    }

    /// Verifies a presented key: shape, known id, constant-time hash match,
    /// not revoked.
    pub fn verify(&self, key: &str) -> Result<KeyInfo, AuthError> {
        let id = key_id(key).ok_or(AuthError::Unauthorized)?;
        let entry = self.by_id.get(id).ok_or(AuthError::Unauthorized)?;
        if !ct_eq(hash_key(key).as_bytes(), entry.hash.as_bytes()) {
            return Err(AuthError::Unauthorized);
        }
        if entry.revoked {
            return Err(AuthError::Revoked);
        }
        Ok(KeyInfo {
            id: entry.id.clone(),
            namespace: entry.namespace.clone(),
            names: entry.names.clone(),
        })
    }

    /// Whether the key with this id is still usable.
    pub fn is_active(&self, id: &str) -> bool {
        self.by_id.get(id).is_some_and(|e| !e.revoked)
    }

    /// Whether the key with this id may (still) use `name`.
    pub fn allows(&self, id: &str, name: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|e| e.names.is_empty() || e.names.iter().any(|p| glob_match(p, name)))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Where a relay's API keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A keys file, re-read when it changes and on `RelayHandle::reload_keys`.
    File(std::path::PathBuf),
    /// A fixed set (tests, demo).
    Static(KeysFile),
}

/// Reads a key source: the store and, for a file, the bytes it was read from.
/// A missing file is an empty set.
pub fn read_source(source: &KeySource) -> Result<(KeyStore, Option<Vec<u8>>), KeysError> {
    match source {
        KeySource::Static(f) => Ok((KeyStore::new(f), None)),
        KeySource::File(p) => {
            let bytes = match std::fs::read(p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(KeysError::Io {
                        path: p.display().to_string(),
                        source,
                    })
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            let file = KeysFile::parse(&text, &p.display().to_string())?;
            Ok((KeyStore::new(&file), Some(bytes)))
        }
    }
}

/// How often a keys file that cannot be used is complained about.
pub(crate) const KEYS_PROBLEM_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// What the follower last saw of its file.
#[derive(Debug, Default)]
struct Seen {
    /// Contents last read (installed, or found invalid).
    bytes: Option<Vec<u8>>,
    /// When the file was last read.
    read_at: Option<std::time::Instant>,
    /// Why the file cannot be used now, and when that was last logged.
    problem: Option<(String, std::time::Instant)>,
}

/// The key set a relay verifies against, and how it follows its file: a
/// changed file is re-read (by poll, SIGHUP, or when an unknown key shows
/// up, rate-limited). A file that is missing, unreadable or not valid
/// never replaces the keys in memory — a deploy that moves the file for a
/// moment must not revoke the fleet — it is logged as an error once a
/// minute until it is fixed ([`Keys::file_ok`]). Pure bookkeeping: whoever
/// installs a new set also ends the sessions of keys that are gone.
#[derive(Debug)]
pub(crate) struct Keys {
    source: KeySource,
    store: std::sync::RwLock<std::sync::Arc<KeyStore>>,
    seen: std::sync::Mutex<Seen>,
}

/// Reads a keys file; a missing one is an error here (a follower keeps
/// what it has).
fn read_file(path: &Path) -> Result<Vec<u8>, KeysError> {
    std::fs::read(path).map_err(|source| KeysError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl Keys {
    /// Reads the source once (a missing file at start is an empty set).
    pub(crate) fn load(source: KeySource) -> Result<Self, KeysError> {
        let (store, bytes) = read_source(&source)?;
        Ok(Self {
            source,
            store: std::sync::RwLock::new(std::sync::Arc::new(store)),
            seen: std::sync::Mutex::new(Seen {
                bytes,
                read_at: Some(std::time::Instant::now()),
                problem: None,
            }),
        })
    }

    /// The key set now.
    pub(crate) fn store(&self) -> std::sync::Arc<KeyStore> {
        match self.store.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether the keys file could be read and used the last time it was
    /// read (false: the keys in memory are older than the file).
    pub(crate) fn file_ok(&self) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .problem
            .is_none()
    }

    fn install(&self, store: KeyStore) -> std::sync::Arc<KeyStore> {
        let store = std::sync::Arc::new(store);
        match self.store.write() {
            Ok(mut k) => *k = store.clone(),
            Err(p) => *p.into_inner() = store.clone(),
        }
        store
    }

    /// Notes that the file cannot be used; logs it when it is new or was
    /// last logged a minute ago.
    fn trouble(&self, seen: &mut Seen, why: String) {
        let now = std::time::Instant::now();
        let due = match &seen.problem {
            Some((w, at)) => *w != why || now.duration_since(*at) >= KEYS_PROBLEM_LOG_EVERY,
            None => true,
        };
        if due {
            tracing::error!(
                keys = self.store().len(),
                "{why}; keeping the keys in memory until the file is readable and valid again"
            );
            seen.problem = Some((why, now));
        }
    }

    fn fine(&self, seen: &mut Seen) {
        if seen.problem.take().is_some() {
            tracing::info!("keys file readable and valid again");
        }
    }

    /// Reads and parses the file: the new set, or `None` if its bytes are
    /// the ones last seen.
    fn read_new(
        &self,
        path: &Path,
        seen: &mut Seen,
        force: bool,
    ) -> Result<Option<KeyStore>, KeysError> {
        let bytes = read_file(path)?;
        if !force && seen.bytes.as_deref() == Some(&bytes[..]) {
            return Ok(None);
        }
        seen.bytes = Some(bytes.clone());
        let file = KeysFile::parse(
            &String::from_utf8_lossy(&bytes),
            &path.display().to_string(),
        )?;
        Ok(Some(KeyStore::new(&file)))
    }

    /// Re-reads the source now (SIGHUP); the new set. A file that cannot
    /// be used is an error and changes nothing.
    pub(crate) fn reload(&self) -> Result<std::sync::Arc<KeyStore>, KeysError> {
        let KeySource::File(path) = &self.source else {
            return Ok(self.store());
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.read_at = Some(std::time::Instant::now());
        match self.read_new(path, &mut seen, true) {
            Ok(Some(store)) => {
                self.fine(&mut seen);
                Ok(self.install(store))
            }
            Ok(None) => Ok(self.store()),
            Err(e) => {
                self.trouble(&mut seen, e.to_string());
                Err(e)
            }
        }
    }

    /// Re-reads the keys file if it changed (file source only). `min_gap`
    /// rate-limits reads: a flood of bad keys costs at most one read per
    /// gap. The new set, if one was installed.
    pub(crate) fn refresh(&self, min_gap: std::time::Duration) -> Option<std::sync::Arc<KeyStore>> {
        let KeySource::File(path) = &self.source else {
            return None;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if seen
            .read_at
            .is_some_and(|t| now.duration_since(t) < min_gap)
        {
            return None;
        }
        seen.read_at = Some(now);
        // A relay that started without a file has nothing to keep: the
        // file not being there yet is no trouble.
        if seen.bytes.is_none() && !path.exists() {
            return None;
        }
        match self.read_new(path, &mut seen, false) {
            Ok(Some(store)) => {
                self.fine(&mut seen);
                let store = self.install(store);
                tracing::info!(keys = store.len(), "keys file changed; reloaded");
                Some(store)
            }
            Ok(None) => {
                // Unchanged: still fine, or still the same trouble.
                match seen.problem.as_ref().map(|(w, _)| w.clone()) {
                    Some(why) => self.trouble(&mut seen, why),
                    None => self.fine(&mut seen),
                }
                None
            }
            Err(e) => {
                self.trouble(&mut seen, e.to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_verifies_and_file_holds_no_plain_key() {
        let k = generate("acme", "ci").unwrap();
        let file = KeysFile {
            keys: vec![k.entry.clone()],
        };
        let text = toml::to_string(&file).unwrap();
        let secret = k.key.rsplit('_').next().unwrap();
        assert!(!text.contains(secret));
        let store = KeyStore::new(&file);
        assert_eq!(store.verify(&k.key).unwrap().namespace, "acme");
    }

    #[test]
    fn wrong_secret_unknown_id_and_garbage_are_unauthorized() {
        let k = generate("acme", "").unwrap();
        let store = KeyStore::new(&KeysFile {
            keys: vec![k.entry.clone()],
        });
        let mut wrong = k.key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(store.verify(&wrong), Err(AuthError::Unauthorized));
        let other = generate("acme", "").unwrap();
        assert_eq!(store.verify(&other.key), Err(AuthError::Unauthorized));
        assert_eq!(store.verify("hello"), Err(AuthError::Unauthorized));
        assert_eq!(store.verify(""), Err(AuthError::Unauthorized));
    }

    #[test]
    fn revoked_key_is_refused_as_revoked() {
        let k = generate("acme", "").unwrap();
        let mut file = KeysFile {
            keys: vec![k.entry.clone()],
        };
        file.revoke(&k.key).unwrap();
        assert_eq!(KeyStore::new(&file).verify(&k.key), Err(AuthError::Revoked));
        assert!(matches!(file.revoke("nope"), Err(KeysError::NoSuchKey(_))));
    }

    #[test]
    fn file_round_trips_and_refuses_unknown_fields_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let k = generate("acme", "x").unwrap();
        let file = KeysFile {
            keys: vec![k.entry.clone()],
        };
        file.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(KeysFile::load(&path).unwrap(), file);
        assert!(
            KeysFile::parse("[[key]]\nid='a'\nnamespace='b'\nhash='c'\nbogus=1\n", "t").is_err()
        );
        let dup =
            "[[key]]\nid='a'\nnamespace='b'\nhash='c'\n[[key]]\nid='a'\nnamespace='b'\nhash='c'\n";
        assert!(KeysFile::parse(dup, "t").is_err());
        assert!(generate("Bad NS", "").is_err());
    }

    #[test]
    fn name_patterns_match_as_globs() {
        let k = KeyInfo {
            id: "x".into(),
            namespace: "acme".into(),
            names: parse_name_patterns("ci-*, London,*-db-*").expect("patterns"),
        };
        for ok in ["ci-1", "ci-", "london", "eu-db-2"] {
            assert!(k.may_use(ok), "{ok}");
        }
        for no in ["ci", "london2", "paris", "db-1", "xci-1"] {
            assert!(!k.may_use(no), "{no}");
        }
        let all = KeyInfo {
            names: Vec::new(),
            ..k
        };
        assert!(all.may_use("anyone"), "an unscoped key may use every name");
        assert!(parse_name_patterns("ok,not ok").is_err());
        assert!(parse_name_patterns(" , ").is_err());
    }

    #[test]
    fn debug_of_new_key_hides_the_key() {
        let k = generate("acme", "").unwrap();
        assert!(!format!("{k:?}").contains(&k.key));
    }
}
