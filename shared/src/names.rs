//! Validation of the identifiers people and agents send: every error names the field.

use crate::SharedError;

/// Longest id, name or version accepted anywhere.
pub const MAX_NAME_LEN: usize = 128;

/// The longest prefix of `text` of at most `max_bytes` that ends on a character boundary: for
/// quoting untrusted input in errors and bounding what is kept.
pub fn truncate(text: &str, max_bytes: usize) -> &str {
    let cut = (0..=max_bytes.min(text.len()))
        .rev()
        .find(|&index| text.is_char_boundary(index))
        .unwrap_or(0);
    &text[..cut]
}

/// `text` as it may reach a terminal: control characters (escape sequences, newlines) and
/// bidirectional overrides shown as `\u{..}`, and at most `max_bytes` of it.
pub fn printable(text: &str, max_bytes: usize) -> String {
    escape(truncate(text, max_bytes), |_| false).into_owned()
}

/// A whole message as it may reach a terminal: like [`printable`], but its own line breaks and
/// tabs kept, so what a program meant to print prints as meant and what came from outside
/// cannot move the cursor, recolour, retitle or reorder anything.
pub fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    escape(text, |c| matches!(c, '\n' | '\t'))
}

/// Characters that change how a terminal shows what follows: C0 and C1 controls (ESC starts
/// every escape sequence) and the Unicode bidirectional controls (which can show text in
/// another order than it is).
pub fn unsafe_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| unsafe_on_terminal(c) && !keep(c);
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Service names, host ids, flag names: lower-case letters, digits, `-`, `_`, `.`;
/// starting with a letter or digit.
pub fn validate_name(field: &str, value: &str) -> Result<(), SharedError> {
    validate_chars(field, value, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
    })
}

/// Whether `name` matches `pattern`: a name, or a prefix ending in `*` (`web-*`; `*` alone
/// matches every name).
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// A name pattern (see [`matches_pattern`]): its name or prefix a valid name, or `*`.
pub fn validate_pattern(field: &str, pattern: &str) -> Result<(), SharedError> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => validate_name(field, prefix),
        None => validate_name(field, pattern),
    }
}

/// Release versions such as `1.4.2`, `v2`, `2026.11.26-rc1+build.7`.
pub fn validate_version(field: &str, value: &str) -> Result<(), SharedError> {
    validate_chars(field, value, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
    })
}

/// Client-chosen request ids: any printable ASCII without spaces, at most 128 bytes.
/// Empty is allowed and means "no de-duplication".
pub fn validate_request_id(value: &str) -> Result<(), SharedError> {
    if value.is_empty() {
        return Ok(());
    }
    validate_chars("request_id", value, |c| c.is_ascii_graphic())
}

/// A digest as `sha256:<64 lower-case hex digits>`.
pub fn validate_digest(field: &str, value: &str) -> Result<(), SharedError> {
    let hex = value
        .strip_prefix("sha256:")
        .ok_or_else(|| invalid(field, format!("{value:?} must start with \"sha256:\"")))?;
    if hex.len() != 64
        || !hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(invalid(
            field,
            format!("{value:?} must be sha256: followed by 64 lower-case hex digits"),
        ));
    }
    Ok(())
}

fn validate_chars(
    field: &str,
    value: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<(), SharedError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty".into()));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!(
                "is {} bytes, at most {MAX_NAME_LEN} are allowed",
                value.len()
            ),
        ));
    }
    if !value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(invalid(
            field,
            format!("{value:?} must start with a letter or digit"),
        ));
    }
    if let Some(bad) = value.chars().find(|&c| !allowed(c)) {
        return Err(invalid(
            field,
            format!("{value:?} contains {bad:?}, which is not allowed here"),
        ));
    }
    Ok(())
}

fn invalid(field: &str, message: String) -> SharedError {
    SharedError::Invalid {
        field: field.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_has_no_escapes_or_reordering() {
        let hostile = "eu\u{1b}]52;c;cm0gLXJm\u{7}\u{1b}[2J\u{202e}gnp.exe\nrow\tcell\u{9b}";
        assert_eq!(
            for_terminal(hostile),
            "eu\\u{1b}]52;c;cm0gLXJm\\u{7}\\u{1b}[2J\\u{202e}gnp.exe\nrow\tcell\\u{9b}"
        );
        assert_eq!(printable("a\nb\u{2066}", 64), "a\\u{a}b\\u{2066}");
        assert!(matches!(
            for_terminal("plain, ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn names_reject_empty_upper_case_and_path_characters() {
        assert!(validate_name("service", "web-api_2.eu").is_ok());
        for bad in ["", "Web", "-web", "a/b", "a b", "../x"] {
            let error = validate_name("service", bad).unwrap_err().to_string();
            assert!(error.starts_with("service: "), "{error}");
        }
        assert!(validate_name("service", &"a".repeat(129)).is_err());
    }

    #[test]
    fn versions_allow_semver_shapes_only() {
        for good in ["1.2.3", "v2", "2026.11.26-rc1+build.7"] {
            assert!(validate_version("version", good).is_ok(), "{good}");
        }
        for bad in ["", "1 2", "v2/..", "+1"] {
            assert!(validate_version("version", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_need_the_sha256_prefix_and_64_hex_digits() {
        assert!(validate_digest("artifact_digest", &format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(validate_digest("artifact_digest", "md5:abc").is_err());
        assert!(validate_digest("artifact_digest", &format!("sha256:{}", "A".repeat(64))).is_err());
    }
}
