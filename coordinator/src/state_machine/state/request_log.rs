//! The request log: outcomes of recent client requests, so a retry acts once.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::*;

/// Outcomes of recent client requests, so a retried request answers the same and acts once.
/// Bounded: when full, the oldest id of the identity holding the most is forgotten, so one
/// identity sending many requests (a webhook sender, a script) forgets its own, not others'.
/// Keys are `identity/request_id`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredRequestLog", into = "StoredRequestLog")]
pub struct RequestLog {
    outcomes: BTreeMap<String, Outcome>,
    order: VecDeque<String>,
    /// Derived from `order` (never stored): identity -> its keys, oldest first.
    by_identity: BTreeMap<String, VecDeque<String>>,
}
/// How a request log is stored in snapshots (the same as before it kept identities apart).
#[derive(Clone, Default, Serialize, Deserialize)]
struct StoredRequestLog {
    outcomes: BTreeMap<String, Outcome>,
    order: VecDeque<String>,
}
impl From<StoredRequestLog> for RequestLog {
    fn from(stored: StoredRequestLog) -> Self {
        let mut by_identity: BTreeMap<String, VecDeque<String>> = BTreeMap::new();
        for key in &stored.order {
            by_identity
                .entry(RequestLog::identity_of(key).to_string())
                .or_default()
                .push_back(key.clone());
        }
        Self {
            outcomes: stored.outcomes,
            order: stored.order,
            by_identity,
        }
    }
}
impl From<RequestLog> for StoredRequestLog {
    fn from(log: RequestLog) -> Self {
        Self {
            outcomes: log.outcomes,
            order: log.order,
        }
    }
}
impl RequestLog {
    pub const CAPACITY: usize = 10_000;

    pub fn get(&self, request_id: &str) -> Option<&Outcome> {
        self.outcomes.get(request_id)
    }

    /// The identity part of a key (`identity/request_id`).
    fn identity_of(key: &str) -> &str {
        key.split_once('/').map_or(key, |(identity, _)| identity)
    }

    /// Remembers an outcome. `fair` (cluster version 2 on): when full, forget the busiest
    /// identity's oldest id; else the oldest id of all, as version 1 did.
    pub fn remember(&mut self, request_id: &str, outcome: Outcome, fair: bool) {
        if request_id.is_empty() || self.outcomes.contains_key(request_id) {
            return;
        }
        if self.order.len() >= Self::CAPACITY {
            if fair {
                self.forget_busiest();
            } else {
                self.forget_oldest();
            }
        }
        self.order.push_back(request_id.to_string());
        self.by_identity
            .entry(Self::identity_of(request_id).to_string())
            .or_default()
            .push_back(request_id.to_string());
        self.outcomes.insert(request_id.to_string(), outcome);
    }

    fn forget_oldest(&mut self) {
        let Some(oldest) = self.order.pop_front() else {
            return;
        };
        self.outcomes.remove(&oldest);
        let identity = Self::identity_of(&oldest).to_string();
        if let Some(keys) = self.by_identity.get_mut(&identity) {
            keys.pop_front();
            if keys.is_empty() {
                self.by_identity.remove(&identity);
            }
        }
    }

    /// Forgets the oldest key of the identity holding the most (the first such identity by
    /// name on a tie, so every member forgets the same).
    fn forget_busiest(&mut self) {
        let Some(identity) = self
            .by_identity
            .iter()
            .max_by(|(a_name, a), (b_name, b)| a.len().cmp(&b.len()).then(b_name.cmp(a_name)))
            .map(|(identity, _)| identity.clone())
        else {
            return;
        };
        let keys = self.by_identity.get_mut(&identity).expect("just found");
        let oldest = keys.pop_front().expect("identities hold at least one key");
        if keys.is_empty() {
            self.by_identity.remove(&identity);
        }
        self.outcomes.remove(&oldest);
        if let Some(position) = self.order.iter().position(|key| *key == oldest) {
            self.order.remove(position);
        }
    }
}
#[cfg(test)]
mod request_log_tests {
    use super::*;

    #[test]
    fn one_identity_flooding_the_request_log_forgets_only_its_own_ids() {
        let mut log = RequestLog::default();
        log.remember("user:alice/r-1", Outcome::Done, true);
        log.remember("automation:pager/r-1", Outcome::Done, true);
        for n in 0..RequestLog::CAPACITY * 2 {
            log.remember(&format!("agent:web-1/flood-{n}"), Outcome::Done, true);
        }
        assert_eq!(log.order.len(), RequestLog::CAPACITY);
        assert!(
            log.get("user:alice/r-1").is_some(),
            "alice's id was evicted"
        );
        assert!(log.get("automation:pager/r-1").is_some());
        assert!(
            log.get("agent:web-1/flood-0").is_none(),
            "the flood's oldest stays"
        );
        let last = format!("agent:web-1/flood-{}", RequestLog::CAPACITY * 2 - 1);
        assert!(log.get(&last).is_some());

        // Cluster version 1 forgets the oldest of all, as its release did.
        let mut legacy = RequestLog::default();
        legacy.remember("user:alice/r-1", Outcome::Done, false);
        for n in 0..RequestLog::CAPACITY {
            legacy.remember(&format!("agent:web-1/flood-{n}"), Outcome::Done, false);
        }
        assert!(legacy.get("user:alice/r-1").is_none());
        assert!(legacy.get("agent:web-1/flood-0").is_some());
        assert_eq!(legacy.by_identity.len(), 1, "the index follows");
    }

    #[test]
    fn a_request_log_reads_back_the_same_from_its_stored_form() {
        let mut log = RequestLog::default();
        for n in 0..50 {
            log.remember(&format!("user:u{}/r-{n}", n % 3), Outcome::Done, true);
        }
        let bytes = serde_json::to_vec(&log).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            stored.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["order", "outcomes"],
            "the stored form is the one older members read"
        );
        let mut read: RequestLog = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(read, log);
        // Both forget the same ids from here on.
        for n in 0..RequestLog::CAPACITY {
            log.remember(&format!("user:u9/x-{n}"), Outcome::Done, true);
            read.remember(&format!("user:u9/x-{n}"), Outcome::Done, true);
        }
        assert_eq!(read, log);
    }
}
