//! The schema version of a database a service owns (a shard of it, say), read from the schema
//! history table on that database and recorded in snapshots as a fact: a restore never changes a
//! schema (migrations do), but a snapshot diff or `rewindctl host drift` shows when one changed.
//!
//! ```toml
//! [service.database]
//! postgres = "host=127.0.0.1 port=5432 user=rewind dbname=orders"   # credentials stay here
//! history-table = "rewind_schema_history"                           # the default
//! ```
//!
//! The version is the latest applied and not reverted migration: `version (checksum)`.

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bound on the TCP connect and on the query that reads the version.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the whole connection: TCP, then the startup and authentication exchange, which the
/// client's own `connect_timeout` does not cover (a server that accepts and then never answers).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Connection attempts may outlive their [`HANDSHAKE_TIMEOUT`] (the blocking client cannot be
/// interrupted); beyond this many at once to one server the agent stops trying instead of
/// piling up threads.
const MAX_CONNECTING: usize = 4;
pub const DEFAULT_HISTORY_TABLE: &str = "rewind_schema_history";

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub engine: Engine,
    pub history_table: String,
}

/// Where the database is and what it runs.
#[derive(Clone, Debug)]
pub enum Engine {
    Postgres(Box<postgres::Config>),
    /// A database file, for small setups and the demo (see `shard::sqlite`).
    Sqlite(std::path::PathBuf),
}

impl DatabaseConfig {
    /// The PostgreSQL connection settings; `None` for SQLite.
    pub fn postgres(&self) -> Option<&postgres::Config> {
        match &self.engine {
            Engine::Postgres(config) => Some(config),
            Engine::Sqlite(_) => None,
        }
    }
}

/// Checks a `[service.database]` section with `sqlite = "/path/to/file.db"`.
pub fn validate_sqlite(path: &str, history_table: Option<&str>) -> Result<DatabaseConfig, String> {
    let file = std::path::PathBuf::from(path);
    if !file.is_absolute() {
        return Err(format!(
            "sqlite: {path:?} must be an absolute path to the database file"
        ));
    }
    let history_table = checked_table(history_table)?;
    if history_table.contains('.') {
        return Err(format!(
            "history-table: {history_table:?}: SQLite has no schemas, name a table alone"
        ));
    }
    Ok(DatabaseConfig {
        engine: Engine::Sqlite(file),
        history_table,
    })
}

fn checked_table(history_table: Option<&str>) -> Result<String, String> {
    let history_table = history_table.unwrap_or(DEFAULT_HISTORY_TABLE).to_string();
    if !is_table_name(&history_table) {
        return Err(format!(
            "history-table: {history_table:?} must be a table name (lower-case letters, digits, _; \
             optionally schema.table)"
        ));
    }
    Ok(history_table)
}

/// Checks a `[service.database]` section with `postgres = "<libpq string>"`; the problem when
/// it is wrong.
pub fn validate(connection: &str, history_table: Option<&str>) -> Result<DatabaseConfig, String> {
    let mut postgres: postgres::Config = connection
        .parse()
        .map_err(|error| format!("postgres: not a libpq connection string: {error}"))?;
    postgres.connect_timeout(TIMEOUT);
    // A peer that stops answering mid-session fails the session instead of hanging it.
    postgres.tcp_user_timeout(TIMEOUT * 6);
    postgres.keepalives_idle(TIMEOUT * 6);
    Ok(DatabaseConfig {
        engine: Engine::Postgres(Box::new(postgres)),
        history_table: checked_table(history_table)?,
    })
}

/// Connection attempts to one server still running (see [`connect_within`]), by server.
static CONNECTING: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts one attempt against its server for as long as it lives, panics included.
struct Attempt(String);

impl Attempt {
    fn begin(server: String) -> Result<Self, String> {
        let mut connecting = CONNECTING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let running = connecting.entry(server.clone()).or_default();
        if *running >= MAX_CONNECTING {
            return Err(format!(
                "cannot connect: {MAX_CONNECTING} earlier connection attempts to {server} are \
                 still waiting for it to answer; not starting another"
            ));
        }
        *running += 1;
        Ok(Self(server))
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut connecting = CONNECTING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = connecting.get_mut(&self.0) {
            *running -= 1;
            if *running == 0 {
                connecting.remove(&self.0);
            }
        }
    }
}

/// Connects to a PostgreSQL database within `within`, handshake included. The blocking client
/// cannot be interrupted, so it runs on a thread of its own, and the caller gives up at the
/// deadline. The thread ends when the server answers or closes the connection: a server that
/// accepted and then stopped (a frozen postmaster, whose kernel still acknowledges) may hold it
/// for ever, so at most [`MAX_CONNECTING`] attempts per server run at once, and more are refused
/// at once; other databases are not affected.
pub fn connect_within(
    postgres: &postgres::Config,
    within: Duration,
) -> Result<postgres::Client, String> {
    let server = format!(
        "{:?} port {:?} database {}",
        postgres.get_hosts(),
        postgres.get_ports(),
        postgres.get_dbname().unwrap_or("(default)")
    );
    let attempt = Attempt::begin(server)?;
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    let config = postgres.clone();
    std::thread::Builder::new()
        .name("postgres-connect".into())
        .spawn(move || {
            let _attempt = attempt;
            let connected = config.connect(postgres::NoTls);
            // Nobody listening means the caller gave up: dropping the client disconnects.
            let _ = sender.send(connected);
        })
        .map_err(|error| format!("cannot connect: no thread to connect on: {error}"))?;
    match receiver.recv_timeout(within) {
        Ok(connected) => connected.map_err(|error| format!("cannot connect: {error}")),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "cannot connect: the database did not complete the connection handshake within {} ms",
            within.as_millis()
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err("cannot connect: the connecting thread failed".into())
        }
    }
}

/// The history table as SQL: each part quoted, so a name that is also a keyword (`order`)
/// still works. The parts were checked to be plain lower-case identifiers.
pub fn quoted_table(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

fn is_table_name(name: &str) -> bool {
    let part = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|name| part(name))
}

/// `version (checksum)` of the latest applied, not reverted migration; or why there is none.
/// Blocking (the `postgres` client runs its own small runtime): call from blocking code.
pub fn schema_version(database: &DatabaseConfig) -> String {
    read(database).unwrap_or_else(|why| why)
}

fn read(database: &DatabaseConfig) -> Result<String, String> {
    let postgres = match &database.engine {
        Engine::Postgres(postgres) => postgres,
        Engine::Sqlite(path) => {
            return crate::shard::sqlite_schema_version(path, &database.history_table);
        }
    };
    let mut client = connect_within(postgres, HANDSHAKE_TIMEOUT)?;
    let query = |error: postgres::Error| format!("cannot read the schema history: {error}");
    client
        .batch_execute(&format!("SET statement_timeout = {}", TIMEOUT.as_millis()))
        .map_err(query)?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&database.history_table],
        )
        .map_err(query)?
        .get(0);
    if !exists {
        return Err(format!(
            "no schema history table {}",
            database.history_table
        ));
    }
    // The table name was checked to be a plain identifier when the config was loaded.
    let latest = client
        .query_opt(
            &format!(
                "SELECT version, checksum FROM {} WHERE reverted_at IS NULL \
                 ORDER BY applied_at DESC, version DESC LIMIT 1",
                quoted_table(&database.history_table)
            ),
            &[],
        )
        .map_err(query)?;
    Ok(match latest {
        Some(row) => format!("{} ({})", row.get::<_, String>(0), row.get::<_, String>(1)),
        None => "no migration applied".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_database_sections_say_what_is_wrong() {
        assert!(
            validate("host=db port=notaport", None)
                .unwrap_err()
                .contains("not a libpq connection string")
        );
        for table in ["history; DROP TABLE x", "A", "a.b.c", ""] {
            assert!(
                validate("host=db", Some(table))
                    .unwrap_err()
                    .contains("must be a table name"),
                "{table}"
            );
        }
        let ok = validate("host=db user=rewind dbname=orders", Some("ops.history")).unwrap();
        assert_eq!(ok.history_table, "ops.history");
        assert!(
            validate_sqlite("orders.db", None)
                .unwrap_err()
                .contains("sqlite: \"orders.db\" must be an absolute path")
        );
        let sqlite = validate_sqlite("/var/lib/app/orders.db", None).unwrap();
        assert!(sqlite.postgres().is_none());
    }

    #[test]
    fn a_server_that_accepts_and_never_answers_is_given_up_on() {
        // The kernel completes the TCP handshake from the listen backlog: the connection is
        // accepted, and the startup message is never answered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let database = validate(&format!("host=127.0.0.1 port={port} user=rewind"), None).unwrap();
        let error = connect_within(database.postgres().unwrap(), Duration::from_millis(300))
            .err()
            .expect("nothing answered");
        assert_eq!(
            error,
            "cannot connect: the database did not complete the connection handshake within 300 ms"
        );
        // Each attempt's thread still waits; beyond four, no more are started for this server.
        for _ in 0..3 {
            assert!(
                connect_within(database.postgres().unwrap(), Duration::from_millis(50)).is_err()
            );
        }
        let refused = connect_within(database.postgres().unwrap(), Duration::from_millis(50))
            .err()
            .expect("refused");
        assert!(
            refused.starts_with("cannot connect: 4 earlier connection attempts to"),
            "{refused}"
        );
        // Closing the listener resets the connections, which ends the connecting threads and
        // frees their places.
        drop(silent);
        let ours = |server: &String| server.contains(&format!("port [{port}]"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while CONNECTING.lock().unwrap().keys().any(ours) {
            assert!(
                std::time::Instant::now() < deadline,
                "the attempts did not end"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
