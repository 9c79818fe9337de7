//! Connected agents: one session per host, each with a bounded channel of messages to send.
//!
//! A reconnecting agent replaces its old session; the generation number tells the engine that
//! steps sent on the old session must be sent again (the agent's journal makes that harmless).

use std::collections::HashMap;
use std::sync::Mutex;

use rewind_proto::v1::CoordinatorMessage;
use tokio::sync::mpsc;

/// Messages queued to one agent before sends fail as "busy".
pub const SESSION_QUEUE: usize = 256;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0} is not keeping up: {SESSION_QUEUE} messages are queued")]
    Busy(String),
}

struct Session {
    generation: u64,
    sender: mpsc::Sender<CoordinatorMessage>,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<SessionsInner>,
}

#[derive(Default)]
struct SessionsInner {
    by_host: HashMap<String, Session>,
    next_generation: u64,
}

impl Sessions {
    /// Opens a session for `host_id`, replacing any earlier one.
    pub fn open(&self, host_id: &str) -> (u64, mpsc::Receiver<CoordinatorMessage>) {
        let (sender, receiver) = mpsc::channel(SESSION_QUEUE);
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner
            .by_host
            .insert(host_id.to_string(), Session { generation, sender });
        (generation, receiver)
    }

    /// Closes the session if it is still the current one for the host.
    pub fn close(&self, host_id: &str, generation: u64) {
        let mut inner = self.lock();
        if inner
            .by_host
            .get(host_id)
            .is_some_and(|session| session.generation == generation)
        {
            inner.by_host.remove(host_id);
        }
    }

    /// Ends the host's session, whatever its generation (its agent reconnects).
    pub fn drop_host(&self, host_id: &str) {
        self.lock().by_host.remove(host_id);
    }

    /// Ends every session (their agents reconnect).
    pub fn close_all(&self) {
        self.lock().by_host.clear();
    }

    /// How many agents have a session.
    pub fn connected(&self) -> usize {
        self.lock().by_host.len()
    }

    pub fn generation(&self, host_id: &str) -> Option<u64> {
        self.lock()
            .by_host
            .get(host_id)
            .map(|session| session.generation)
    }

    /// Queues a message; returns the generation of the session it went to.
    pub fn send(&self, host_id: &str, message: CoordinatorMessage) -> Result<u64, SendError> {
        let inner = self.lock();
        let session = inner
            .by_host
            .get(host_id)
            .ok_or_else(|| SendError::NotConnected(host_id.to_string()))?;
        session
            .sender
            .try_send(message)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => SendError::Busy(host_id.to_string()),
                mpsc::error::TrySendError::Closed(_) => {
                    SendError::NotConnected(host_id.to_string())
                }
            })?;
        Ok(session.generation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
