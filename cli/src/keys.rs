//! `swbd keys create|revoke|list`: the relay's keys file. The file holds
//! only hashes; a new key is printed once, alone on stdout.

use crate::Output;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use swb_relay::keys::{self, KeysFile};

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key for a namespace. Prints the key alone on stdout (shown
    /// only this once); the file keeps only its hash. Running relays pick it up.
    Create {
        /// The relay's keys file (created if missing).
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        /// Namespace the key belongs to: peers see only peers of their namespace.
        #[arg(long, value_name = "NS")]
        namespace: String,
        /// A note to recognise the key by in `swbd keys list`.
        #[arg(long, default_value = "")]
        label: String,
        /// Limit the key to these names (comma-separated; `*` matches any
        /// run of characters, e.g. 'ci-*,london'): it may attach as, send
        /// from, receive and acknowledge as, and set the status of those
        /// names only. Without it, every name of the namespace.
        #[arg(long, value_name = "PATTERNS")]
        names: Option<String>,
    },
    /// Revoke a key by id (or by the full key). Running relays close its
    /// connections and refuse it from then on.
    Revoke {
        /// The relay's keys file.
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        /// Key id as `swbd keys list` shows it, or the whole key.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// List the keys in the file (ids, namespaces, labels; never the keys).
    List {
        /// The relay's keys file.
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
    },
}

pub(crate) fn run(cmd: KeysCommand, out: &Output) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            keys: path,
            namespace,
            label,
            names,
        } => {
            let mut new = keys::generate(&namespace, &label)?;
            if let Some(list) = &names {
                new.entry.names = keys::parse_name_patterns(list)?;
            }
            let id = new.entry.id.clone();
            let entry = new.entry.clone();
            KeysFile::update(&path, |file| {
                file.keys.push(entry);
                Ok(())
            })?;
            if out.json {
                outln!(
                    "{}",
                    serde_json::json!({"key": new.key, "id": id, "namespace": namespace})
                );
            } else {
                outln!("{}", new.key);
            }
            eprintln!(
                "swbd: created key {id} for namespace {namespace} in {}; this is the only time the key is shown",
                path.display()
            );
            Ok(())
        }
        KeysCommand::Revoke { keys: path, id } => {
            if !path.exists() {
                anyhow::bail!("keys file {} does not exist", path.display());
            }
            let (id, ns) = KeysFile::update(&path, |file| {
                let e = file.revoke(&id)?;
                Ok((e.id.clone(), e.namespace.clone()))
            })?;
            if out.json {
                outln!("{}", serde_json::json!({"revoked": id, "namespace": ns}));
            } else {
                outln!("revoked key {id} (namespace {ns}); running relays close its connections");
            }
            Ok(())
        }
        KeysCommand::List { keys: path } => {
            let file = KeysFile::load(&path)
                .with_context(|| format!("cannot list keys of {}", path.display()))?;
            if out.json {
                for k in &file.keys {
                    outln!(
                        "{}",
                        serde_json::json!({
                            "id": k.id, "namespace": k.namespace, "label": k.label,
                            "created_unix": k.created_unix, "revoked": k.revoked,
                            "names": k.names,
                        })
                    );
                }
            } else {
                outln!(
                    "{:<14} {:<20} {:<8} {:<22} LABEL",
                    "ID",
                    "NAMESPACE",
                    "STATE",
                    "CREATED"
                );
                for k in &file.keys {
                    let created = humantime::format_rfc3339_seconds(
                        // Clamped: the file is input, and past year 9999 would panic.
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(k.created_unix.min(253_402_300_799)),
                    );
                    let state = if k.revoked { "revoked" } else { "active" };
                    let scope = if k.names.is_empty() {
                        String::new()
                    } else {
                        format!("  (names {})", k.names.join(","))
                    };
                    outln!(
                        "{:<14} {:<20} {:<8} {:<22} {}{scope}",
                        k.id,
                        k.namespace,
                        state,
                        created,
                        k.label
                    );
                }
            }
            Ok(())
        }
    }
}
