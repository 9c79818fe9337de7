//! Splitting a PostgreSQL script into its statements, so each can be run and logged on its own
//! (with the rows it affected) and so scripts that end their transaction themselves are refused
//! when they are registered rather than when they run.
//!
//! This is a lexer, not a parser: it knows where strings (`'...'`, `E'...'`), quoted identifiers,
//! dollar quotes (`$tag$...$tag$`) and comments (`--`, nested `/* */`) begin and end, and splits
//! at every other `;`. That is all PostgreSQL's own `psql` does to split input.

/// The statements of `script`, trimmed, without their `;`, comments-only pieces left out.
pub fn statements(script: &str) -> Vec<String> {
    let bytes = script.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut i = 0;
    // Whether the piece since `start` has anything but whitespace and comments.
    let mut has_code = false;
    while i < bytes.len() {
        match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = script[i..]
                    .find('\n')
                    .map_or(bytes.len(), |end| i + end + 1);
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(bytes, i);
                continue;
            }
            b'\'' => {
                let escapes =
                    i > 0 && matches!(bytes[i - 1], b'E' | b'e') && !is_ident(bytes, i - 1);
                i = skip_quoted(bytes, i, b'\'', escapes);
                has_code = true;
                continue;
            }
            b'"' => {
                i = skip_quoted(bytes, i, b'"', false);
                has_code = true;
                continue;
            }
            b'$' => {
                if let Some(end) = skip_dollar_quote(script, i) {
                    i = end;
                    has_code = true;
                    continue;
                }
            }
            b';' => {
                push(&mut statements, &script[start..i], has_code);
                start = i + 1;
                has_code = false;
            }
            byte if !byte.is_ascii_whitespace() => has_code = true,
            _ => {}
        }
        i += 1;
    }
    push(&mut statements, &script[start..], has_code);
    statements
}

fn push(statements: &mut Vec<String>, piece: &str, has_code: bool) {
    if has_code {
        statements.push(piece.trim().to_string());
    }
}

/// Whether the byte at `at` continues an identifier (so `E` in `TABLE'` is not an escape prefix).
fn is_ident(bytes: &[u8], at: usize) -> bool {
    at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_')
}

/// Index just past the closing quote (a doubled quote is part of the text), or the end.
fn skip_quoted(bytes: &[u8], open: usize, quote: u8, backslash_escapes: bool) -> usize {
    let mut i = open + 1;
    while i < bytes.len() {
        if backslash_escapes && bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    bytes.len()
}

/// Index just past a (nested) block comment, or the end.
fn skip_block_comment(bytes: &[u8], open: usize) -> usize {
    let mut depth = 0;
    let mut i = open;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Index just past `$tag$ ... $tag$` starting at `open`, or `None` when `$` does not open one
/// (a parameter like `$1`, or a `$` inside an identifier).
fn skip_dollar_quote(script: &str, open: usize) -> Option<usize> {
    if is_ident(script.as_bytes(), open) {
        return None;
    }
    let rest = &script[open + 1..];
    let tag_len = rest.find('$')?;
    let tag = &rest[..tag_len];
    let valid_tag = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_alphabetic() || (n > 0 && c.is_ascii_digit()));
    if !valid_tag {
        return None;
    }
    let delimiter = &script[open..open + tag_len + 2];
    let body = open + delimiter.len();
    Some(
        script[body..]
            .find(delimiter)
            .map_or(script.len(), |end| body + end + delimiter.len()),
    )
}

/// The first statement of `script` that ends or begins a transaction (`COMMIT`, `ROLLBACK`,
/// `BEGIN`, `END`, `ABORT`, `START TRANSACTION`, `PREPARE TRANSACTION`, `COMMIT PREPARED`...):
/// a migration runs inside rewind's transaction and must not. `SAVEPOINT` and `ROLLBACK TO` are
/// fine: they stay inside it.
pub fn transaction_control(script: &str) -> Option<String> {
    statements(script).into_iter().find(|statement| {
        let words: Vec<String> = statement
            .split_whitespace()
            .take(2)
            .map(|word| word.trim_end_matches(';').to_ascii_uppercase())
            .collect();
        let first = words.first().map(String::as_str).unwrap_or_default();
        let second = words.get(1).map(String::as_str).unwrap_or_default();
        match first {
            "BEGIN" | "COMMIT" | "END" | "ABORT" => true,
            "START" | "PREPARE" => second == "TRANSACTION",
            "ROLLBACK" => !matches!(second, "TO"),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_semicolons_outside_strings_comments_and_dollar_quotes() {
        let script = "CREATE TABLE t (a text DEFAULT 'x;y');\n\
            -- a comment; with a semicolon\n\
            INSERT INTO \"we;ird\" VALUES (E'it\\'s; fine', 'o''k;');\n\
            /* outer /* nested; */ still; */\n\
            CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n\
            DO $$ BEGIN PERFORM 1; END $$;\n\
            SELECT $1;   \n\
            ;;  -- only a comment\n";
        assert_eq!(
            statements(script),
            vec![
                "CREATE TABLE t (a text DEFAULT 'x;y')",
                "-- a comment; with a semicolon\nINSERT INTO \"we;ird\" VALUES (E'it\\'s; fine', 'o''k;')",
                "/* outer /* nested; */ still; */\nCREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql",
                "DO $$ BEGIN PERFORM 1; END $$",
                "SELECT $1",
            ]
        );
        assert!(statements("  -- nothing\n/* at all */ ").is_empty());
        // An unterminated string runs to the end rather than being split inside.
        assert_eq!(statements("SELECT 'a;b"), vec!["SELECT 'a;b"]);
    }

    #[test]
    fn finds_statements_that_end_the_transaction() {
        for script in [
            "ALTER TABLE t ADD c int; COMMIT;",
            "begin; select 1",
            "SELECT 1; rollback",
            "END",
            "start transaction isolation level serializable",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
        ] {
            assert!(transaction_control(script).is_some(), "{script}");
        }
        for script in [
            "SAVEPOINT s; ROLLBACK TO s; RELEASE s",
            "ROLLBACK TO SAVEPOINT s",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT 'COMMIT'; -- COMMIT\n",
            "PREPARE q AS SELECT 1",
            "CREATE TABLE begin_times (begin int)",
        ] {
            assert_eq!(transaction_control(script), None, "{script}");
        }
    }
}
