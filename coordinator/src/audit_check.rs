//! Each member re-verifies its audit chain in the background (`audit.verify-every-s`), so a
//! broken chain (a disk that rotted, an entry edited in the store) raises an alert
//! (`rewind_audit_chain_ok`, deploy/prometheus) without anyone running `audit verify`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use crate::node::NodeHandle;

/// The latest verification, for `/metrics`.
#[derive(Debug)]
pub struct AuditCheck {
    /// 1 intact, 0 broken, -1 not verified yet.
    ok: AtomicI64,
    entries: AtomicU64,
    /// When it ended, in milliseconds since the epoch (0: never).
    at_ms: AtomicU64,
}

impl Default for AuditCheck {
    fn default() -> Self {
        Self {
            ok: AtomicI64::new(-1),
            entries: AtomicU64::new(0),
            at_ms: AtomicU64::new(0),
        }
    }
}

impl AuditCheck {
    /// `Some(intact)` once a verification ended.
    pub fn intact(&self) -> Option<bool> {
        match self.ok.load(Ordering::Relaxed) {
            -1 => None,
            ok => Some(ok == 1),
        }
    }

    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn at_ms(&self) -> u64 {
        self.at_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, intact: bool, entries: u64, at_ms: u64) {
        self.entries.store(entries, Ordering::Relaxed);
        self.at_ms.store(at_ms, Ordering::Relaxed);
        self.ok.store(i64::from(intact), Ordering::Relaxed);
    }
}

/// Most verifications one check runs while the chain's first entry keeps moving under it.
const MAX_ATTEMPTS: usize = 3;

/// Verifies a copy of the chain; a break found while retention dropped entries from the store
/// meanwhile (the copy's first entry is gone) is not a break: it verifies again, a few times.
async fn verify_settled(node: &NodeHandle) -> Option<crate::state_machine::AuditVerification> {
    let mut verification = None;
    for _ in 0..MAX_ATTEMPTS {
        let audit = node.read(|state| state.audit.clone());
        let first_index = audit.first_index();
        let verified = tokio::task::spawn_blocking(move || audit.verify())
            .await
            .ok()?;
        let moved = node.read(|state| state.audit.first_index()) != first_index;
        let settled = verified.first_broken.is_none() || !moved;
        verification = Some(verified);
        if settled {
            break;
        }
    }
    verification
}

/// Verifies the chain this member holds now, then every `every`, until `stop` turns true.
/// The work runs on a blocking thread over a copy of the audit head (the entries are read
/// from the store), so it never holds up applying.
pub async fn run(
    node: NodeHandle,
    check: Arc<AuditCheck>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut was_intact = None;
    loop {
        let Some(verification) = verify_settled(&node).await else {
            return;
        };
        let intact = verification.first_broken.is_none();
        check.record(intact, verification.entries, rewind_shared::time::now_ms());
        match (was_intact, intact) {
            (Some(true) | None, false) => error!(
                first_broken = verification.first_broken,
                detail = verification.detail,
                "The audit chain this member holds does not verify."
            ),
            (Some(false), true) => info!("The audit chain verifies again."),
            _ => {}
        }
        was_intact = Some(intact);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}
