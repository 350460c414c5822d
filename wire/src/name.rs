//! Peer names: DNS labels, case-folded.

/// The pseudo top-level domain applications use: `london.switchboard`.
pub const DNS_SUFFIX: &str = "switchboard";

/// Why a name is not a valid peer name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty string.
    #[error("a peer name cannot be empty")]
    Empty,
    /// Longer than [`crate::MAX_NAME_LEN`].
    #[error("peer name is {0} bytes long; the limit is 63 (a DNS label)")]
    TooLong(usize),
    /// A character outside `[a-z0-9-]`.
    #[error("peer name contains {0:?}; use only letters, digits and '-' (a DNS label)")]
    BadChar(char),
    /// Starts or ends with a hyphen.
    #[error("peer name cannot start or end with '-'")]
    Hyphen,
}

/// Validates a peer name and folds it to lower case. Accepts `NAME` and
/// `NAME.switchboard` (any case); returns the bare label.
pub fn normalize_name(raw: &str) -> Result<String, NameError> {
    let lower = raw.to_ascii_lowercase();
    let label = lower
        .strip_suffix(".switchboard.")
        .or_else(|| lower.strip_suffix(".switchboard"))
        .unwrap_or(&lower);
    if label.is_empty() {
        return Err(NameError::Empty);
    }
    if label.len() > crate::MAX_NAME_LEN {
        return Err(NameError::TooLong(label.len()));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::Hyphen);
    }
    Ok(label.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_strips_suffix() {
        assert_eq!(normalize_name("London").as_deref(), Ok("london"));
        assert_eq!(
            normalize_name("LONDON.Switchboard").as_deref(),
            Ok("london")
        );
        assert_eq!(normalize_name("a-1").as_deref(), Ok("a-1"));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(normalize_name(""), Err(NameError::Empty));
        assert_eq!(normalize_name("-a"), Err(NameError::Hyphen));
        assert_eq!(normalize_name("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(normalize_name("a.b"), Err(NameError::BadChar('.')));
        assert_eq!(normalize_name(&"a".repeat(64)), Err(NameError::TooLong(64)));
        assert!(normalize_name(&"a".repeat(63)).is_ok());
        assert_eq!(normalize_name("é"), Err(NameError::BadChar('é')));
    }
}
