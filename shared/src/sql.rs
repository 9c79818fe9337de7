//! Splitting a PostgreSQL script into its statements, so each can be run and logged on its own
//! (with the rows it affected) and so scripts that end their transaction themselves are refused
//! when they are registered rather than when they run.
//!
//! This is a lexer, not a parser: it knows where strings (`'...'`, `E'...'`), quoted identifiers,
//! dollar quotes (`$tag$...$tag$`) and comments (`--`, nested `/* */`) begin and end, and splits
//! at every other `;` outside parentheses and `BEGIN ATOMIC ... END` bodies, as `psql` does.

/// The statements of `script`, without their `;` and without the comments and whitespace
/// before them; pieces holding only comments are left out.
pub fn statements(script: &str) -> Vec<String> {
    let bytes = script.as_bytes();
    let mut statements = Vec::new();
    // Where the current statement's first code byte is, once it has one.
    let mut code_start: Option<usize> = None;
    let mut i = 0;
    // `;` inside parentheses (a rule's `DO (a; b)`) or a `BEGIN ATOMIC ... END` body does not
    // end the statement.
    let mut parens = 0usize;
    let mut atomic = 0usize;
    // The statement's first words, upper-cased: SQLite's `CREATE TRIGGER ... BEGIN ...; END`
    // has a body like `BEGIN ATOMIC`'s.
    let mut leading: Vec<String> = Vec::new();
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
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
            _ if byte.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b';' if code_start.is_none() => {
                i += 1;
                continue;
            }
            _ => {}
        }
        code_start.get_or_insert(i);
        match byte {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(bytes[i - 1], b'E' | b'e') && !is_ident(bytes, i - 1);
                i = skip_quoted(bytes, i, b'\'', escapes);
            }
            b'"' => i = skip_quoted(bytes, i, b'"', false),
            b'$' => i = skip_dollar_quote(script, i).unwrap_or(i + 1),
            b'(' => {
                parens += 1;
                i += 1;
            }
            b')' => {
                parens = parens.saturating_sub(1);
                i += 1;
            }
            b';' if parens == 0 && atomic == 0 => {
                if let Some(start) = code_start.take() {
                    statements.push(script[start..i].trim_end().to_string());
                }
                leading.clear();
                i += 1;
            }
            _ if is_word_start(bytes, i) => {
                let end = i + bytes[i..]
                    .iter()
                    .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80))
                    .unwrap_or(bytes.len() - i);
                let word = &script[i..end];
                let trigger_body = word.eq_ignore_ascii_case("begin")
                    && leading.first().is_some_and(|first| first == "CREATE")
                    && leading.iter().any(|word| word == "TRIGGER");
                let opens = trigger_body
                    || (word.eq_ignore_ascii_case("atomic") && previous_word_is_begin(script, i))
                    || (atomic > 0 && word.eq_ignore_ascii_case("case"));
                if leading.len() < 4 {
                    leading.push(word.to_ascii_uppercase());
                }
                if opens {
                    atomic += 1;
                } else if atomic > 0 && word.eq_ignore_ascii_case("end") {
                    atomic -= 1;
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    if let Some(start) = code_start {
        let rest = script[start..].trim_end();
        if !rest.is_empty() {
            statements.push(rest.to_string());
        }
    }
    statements
}

/// Whether a word (identifier or keyword) starts at `at`.
fn is_word_start(bytes: &[u8], at: usize) -> bool {
    let byte = bytes[at];
    (byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80) && !is_ident(bytes, at)
}

/// Whether the word before the one at `at` is `BEGIN` (so this one opens `BEGIN ATOMIC`).
fn previous_word_is_begin(script: &str, at: usize) -> bool {
    // Bytes, not a str slice: the text before may end in a multi-byte character.
    let before = script[..at].trim_end().as_bytes();
    before.len() >= 5
        && before[before.len() - 5..].eq_ignore_ascii_case(b"begin")
        && !is_ident(before, before.len() - 5)
}

/// Whether the byte before `at` is part of an identifier (so `E` in `TABLE'` is not an escape
/// prefix, and `$` in `a$b` opens no dollar quote). Non-ASCII bytes count: identifiers may
/// hold any letter.
fn is_ident(bytes: &[u8], at: usize) -> bool {
    at > 0 && {
        let byte = bytes[at - 1];
        byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' || byte >= 0x80
    }
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
        let words = first_words(statement, 3);
        let word = |n: usize| words.get(n).map(String::as_str).unwrap_or_default();
        match word(0) {
            "BEGIN" | "COMMIT" | "END" | "ABORT" => true,
            "START" | "PREPARE" => word(1) == "TRANSACTION",
            // `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] s` stays inside the transaction.
            "ROLLBACK" => {
                !(word(1) == "TO" || (matches!(word(1), "WORK" | "TRANSACTION") && word(2) == "TO"))
            }
            _ => false,
        }
    })
}

/// A statement's first `count` words, upper-cased, comments skipped (`COMMIT/*x*/` is COMMIT).
fn first_words(statement: &str, count: usize) -> Vec<String> {
    let bytes = statement.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < bytes.len() && words.len() < count {
        if bytes[i] == b'-' && bytes.get(i + 1) == Some(&b'-') {
            i = statement[i..]
                .find('\n')
                .map_or(bytes.len(), |end| i + end + 1);
        } else if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(bytes, i);
        } else if bytes[i].is_ascii_alphabetic() {
            let end = i + bytes[i..]
                .iter()
                .position(|b| !b.is_ascii_alphanumeric() && *b != b'_')
                .unwrap_or(bytes.len() - i);
            words.push(statement[i..end].to_ascii_uppercase());
            i = end;
        } else if bytes[i].is_ascii_whitespace() || bytes[i] == b';' {
            i += 1;
        } else {
            // Anything else (a quote, a parenthesis) ends the keywords that matter here.
            break;
        }
    }
    words
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
                "INSERT INTO \"we;ird\" VALUES (E'it\\'s; fine', 'o''k;')",
                "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql",
                "DO $$ BEGIN PERFORM 1; END $$",
                "SELECT $1",
            ]
        );
        assert!(statements("  -- nothing\n/* at all */ ").is_empty());
        assert_eq!(
            statements(
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2));\n\
                 CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                 SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END;\n\
                 SELECT é$x$; SELECT 3"
            ),
            vec![
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2))",
                "CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END",
                "SELECT é$x$",
                "SELECT 3",
            ]
        );
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
            "-- done\nCOMMIT",
            "/* sneaky */ ROLLBACK",
            "COMMIT/*x*/",
            "END--x",
        ] {
            assert!(transaction_control(script).is_some(), "{script}");
        }
        for script in [
            "SAVEPOINT s; ROLLBACK TO s; RELEASE s",
            "ROLLBACK TO SAVEPOINT s",
            "ROLLBACK WORK TO s",
            "ROLLBACK TRANSACTION TO SAVEPOINT s",
            "ROLLBACK /*c*/ TO s",
            "CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); UPDATE c SET d = 1; END",
            "-- 識別子\nSELECT 1 AS atomic",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT 'COMMIT'; -- COMMIT\n",
            "PREPARE q AS SELECT 1",
            "CREATE TABLE begin_times (begin int)",
        ] {
            assert_eq!(transaction_control(script), None, "{script}");
        }
    }
}
