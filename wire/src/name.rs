//! Peer names: DNS labels, case-folded.

use std::borrow::Cow;

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
    normalized(raw).map(Cow::into_owned)
}

/// [`normalize_name`] without a copy when `raw` is already a bare,
/// lower-case label (as every name a daemon sends on is).
pub fn normalized(raw: &str) -> Result<Cow<'_, str>, NameError> {
    let label = raw
        .strip_suffix(".switchboard.")
        .or_else(|| raw.strip_suffix(".switchboard"))
        .unwrap_or(raw);
    if check_label(label).is_ok() {
        return Ok(Cow::Borrowed(label));
    }
    let lower = raw.to_ascii_lowercase();
    let label = lower
        .strip_suffix(".switchboard.")
        .or_else(|| lower.strip_suffix(".switchboard"))
        .unwrap_or(&lower);
    check_label(label)?;
    Ok(Cow::Owned(label.to_string()))
}

/// Whether `label` is a valid lower-case peer name as it is.
fn check_label(label: &str) -> Result<(), NameError> {
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
    Ok(())
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

    #[test]
    fn a_name_already_normal_is_borrowed_and_the_rest_folded() {
        for raw in ["london", "a-1", "london.switchboard", "london.switchboard."] {
            assert!(
                matches!(normalized(raw), Ok(Cow::Borrowed("london" | "a-1"))),
                "{raw}"
            );
        }
        for raw in ["London", "LONDON.Switchboard", "london.SWITCHBOARD."] {
            assert!(
                matches!(normalized(raw), Ok(Cow::Owned(ref n)) if n == "london"),
                "{raw}"
            );
        }
        // Errors name the folded label, whichever way it went.
        assert_eq!(normalized("A B"), Err(NameError::BadChar(' ')));
        assert_eq!(normalized("-A.switchboard"), Err(NameError::Hyphen));
        assert_eq!(normalized(".switchboard"), Err(NameError::Empty));
    }
}
