//! Connected agents: one session per host, each with a bounded channel of messages to send.
//!
//! A reconnecting agent replaces its old session; the generation number tells the engine that
//! steps sent on the old session must be sent again (the agent's journal makes that harmless).

use std::collections::HashMap;
use std::sync::Mutex;

use rewind_proto::v1::{
    CoordinatorMessage, InspectAnswer, InspectMode, InspectRequest, coordinator_message,
};
use rewind_shared::bounds::MAX_SESSIONS_PER_HOST_PER_MINUTE;
use tokio::sync::{mpsc, oneshot};

/// Messages queued to one agent before sends fail as "busy".
pub const SESSION_QUEUE: usize = 256;
/// Inspect requests awaiting an answer, over all agents.
pub const MAX_PENDING_INSPECTS: usize = 64;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0} is not keeping up: {SESSION_QUEUE} messages are queued")]
    Busy(String),
    #[error("{MAX_PENDING_INSPECTS} inspections are already waiting for agents; try again")]
    TooManyInspections,
    #[error("agent {0} did not answer within {1} ms")]
    NoAnswer(String, u64),
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
    /// request id -> (host asked, where its answer goes).
    inspects: HashMap<u64, (String, oneshot::Sender<InspectAnswer>)>,
    next_inspect: u64,
    /// Sessions each host opened in its current minute, and when that minute began.
    opened: HashMap<String, (std::time::Instant, u32)>,
}

/// The window [`Sessions::may_open`] counts sessions in.
const OPEN_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Sessions {
    /// Counts a session `host_id` opens now; false once it has opened
    /// [`MAX_SESSIONS_PER_HOST_PER_MINUTE`] this minute (a hostile or broken agent reconnecting
    /// in a loop would otherwise write the log and the audit on every connection).
    pub fn may_open(&self, host_id: &str) -> bool {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        // Forget hosts whose minute is over, so the map holds only recent openers.
        inner
            .opened
            .retain(|_, (since, _)| now.duration_since(*since) < OPEN_WINDOW);
        let (_, count) = inner.opened.entry(host_id.to_string()).or_insert((now, 0));
        *count += 1;
        *count <= MAX_SESSIONS_PER_HOST_PER_MINUTE
    }

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

    /// Closes the session if it is still the current one for the host; inspections waiting on
    /// it end at once.
    pub fn close(&self, host_id: &str, generation: u64) {
        let mut inner = self.lock();
        if inner
            .by_host
            .get(host_id)
            .is_some_and(|session| session.generation == generation)
        {
            inner.by_host.remove(host_id);
            inner.inspects.retain(|_, (asked, _)| asked != host_id);
        }
    }

    /// Ends the host's session, whatever its generation (its agent reconnects); inspections
    /// waiting on it end at once.
    pub fn drop_host(&self, host_id: &str) {
        let mut inner = self.lock();
        inner.by_host.remove(host_id);
        inner.inspects.retain(|_, (asked, _)| asked != host_id);
    }

    /// Ends every session (their agents reconnect).
    pub fn close_all(&self) {
        self.lock().by_host.clear();
    }

    /// The hosts with a session now.
    pub fn hosts(&self) -> Vec<String> {
        self.lock().by_host.keys().cloned().collect()
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

    /// Asks a connected agent to describe its services and waits for its answer, at most
    /// `timeout`.
    pub async fn inspect(
        &self,
        host_id: &str,
        service: &str,
        mode: InspectMode,
        env_key: Vec<u8>,
        timeout: std::time::Duration,
    ) -> Result<InspectAnswer, SendError> {
        let (sender, receiver) = oneshot::channel();
        let request_id = {
            let mut inner = self.lock();
            if inner.inspects.len() >= MAX_PENDING_INSPECTS {
                return Err(SendError::TooManyInspections);
            }
            inner.next_inspect += 1;
            let request_id = inner.next_inspect;
            inner
                .inspects
                .insert(request_id, (host_id.to_string(), sender));
            request_id
        };
        // Whatever ends this call (an answer, the timeout, the caller going away), its entry
        // goes with it.
        let _forget = ForgetInspect {
            sessions: self,
            request_id,
        };
        let request = CoordinatorMessage {
            body: Some(coordinator_message::Body::Inspect(InspectRequest {
                request_id,
                service: service.to_string(),
                mode: mode.into(),
                env_key,
            })),
        };
        self.send(host_id, request)?;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => Ok(answer),
            // The session ended (`close` dropped the sender) or the time ran out.
            _ => Err(SendError::NoAnswer(
                host_id.to_string(),
                timeout.as_millis() as u64,
            )),
        }
    }

    /// Hands an agent's answer to the request waiting for it; answers to requests this member
    /// never sent that host (or that gave up) are dropped.
    pub fn answered(&self, host_id: &str, mut answer: InspectAnswer) {
        let kept = rewind_shared::names::truncate(
            &answer.error,
            rewind_shared::bounds::MAX_INSPECT_ERROR_BYTES,
        )
        .len();
        answer.error.truncate(kept);
        let mut inner = self.lock();
        let asked_this_host = inner
            .inspects
            .get(&answer.request_id)
            .is_some_and(|(asked, _)| asked == host_id);
        if asked_this_host && let Some((_, sender)) = inner.inspects.remove(&answer.request_id) {
            let _ = sender.send(answer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes an inspection's entry when the call that made it ends, however it ends.
struct ForgetInspect<'a> {
    sessions: &'a Sessions,
    request_id: u64,
}

impl Drop for ForgetInspect<'_> {
    fn drop(&mut self) {
        self.sessions.lock().inspects.remove(&self.request_id);
    }
}

/// Ends the session of every agent `policy`'s deny list names: a revoked host is cut off at
/// once, not at its next reconnect (which the gate then refuses). The gate calls it whenever
/// the policy changes.
pub fn close_revoked(sessions: &Sessions, policy: &crate::access::Policy) {
    for host_id in sessions.hosts() {
        let agent = crate::access::Principal::new(rewind_shared::identity::Kind::Agent, &host_id);
        if policy.is_denied(&agent) {
            tracing::warn!(
                host_id,
                "The access policy denies this agent now; closing its session."
            );
            sessions.drop_host(&host_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_opens_a_bounded_number_of_sessions_a_minute() {
        let sessions = Sessions::default();
        for _ in 0..MAX_SESSIONS_PER_HOST_PER_MINUTE {
            assert!(sessions.may_open("web-1"));
        }
        assert!(
            !sessions.may_open("web-1"),
            "one more this minute is refused"
        );
        assert!(sessions.may_open("web-2"), "other hosts are not");
    }
}
