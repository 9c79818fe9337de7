//! Release retention: with `keep-releases = N`, a service root keeps the N releases that were
//! live most recently, and always the one live now, the one its latest snapshot points at (the
//! last known good, which a rollback of the latest change restores) and every release that was
//! never live (unpacked ahead of a deploy). The rest are removed after each activation, or by
//! `rewind-agent releases prune`. Only rollbacks of a service's latest change exist, so nothing
//! older can be needed by a pending one.

use std::collections::BTreeMap;

use crate::AgentError;
use crate::config::ServiceConfig;

use crate::snapshot::{CURRENT_LINK, RELEASES_DIR, retained_releases};
use crate::store::Store;

/// Why a release stays, or that it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Current,
    LastKnownGood,
    NeverLive,
    Recent,
    Remove,
}

impl Verdict {
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Current => "kept: live now",
            Self::LastKnownGood => "kept: last known good (the latest snapshot points at it)",
            Self::NeverLive => "kept: never live yet",
            Self::Recent => "kept: among the most recently live",
            Self::Remove => "removed",
        }
    }
}

/// Each release directory of the service and what retention does with it, by version. `None`
/// when the service keeps every release (no `keep-releases`).
pub fn plan(
    service: &ServiceConfig,
    store: &Store,
) -> Result<Option<BTreeMap<String, Verdict>>, AgentError> {
    let Some(keep) = service.keep_releases else {
        return Ok(None);
    };
    let versions = retained_releases(&service.root).ok_or_else(|| {
        AgentError::invalid(
            "keep-releases",
            format!(
                "cannot list {}/{RELEASES_DIR} (or it holds more than 256 entries): nothing pruned",
                service.root.display()
            ),
        )
    })?;
    let version_of = |link: &str| {
        link.strip_prefix(RELEASES_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(str::to_string)
    };
    let current = std::fs::read_link(service.root.join(CURRENT_LINK))
        .ok()
        .and_then(|target| version_of(&target.to_string_lossy()));
    // When each release was last seen live: the latest capture that found `current` on it.
    let mut last_live: BTreeMap<String, u64> = BTreeMap::new();
    let mut latest_snapshot: Option<(u64, String)> = None;
    for record in store.snapshots()? {
        if record.manifest.service != service.name {
            continue;
        }
        let Some(version) = record.manifest.release_link.as_deref().and_then(version_of) else {
            continue;
        };
        let seen = last_live.entry(version.clone()).or_default();
        *seen = (*seen).max(record.captured_at_ms);
        if latest_snapshot
            .as_ref()
            .is_none_or(|(at, _)| record.captured_at_ms >= *at)
        {
            latest_snapshot = Some((record.captured_at_ms, version));
        }
    }
    if let Some(current) = &current {
        last_live.insert(current.clone(), u64::MAX);
    }
    let mut by_recency: Vec<(&String, &u64)> = last_live.iter().collect();
    by_recency.sort_by(|a, b| b.1.cmp(a.1));
    let recent: Vec<&String> = by_recency
        .iter()
        .take(keep as usize)
        .map(|(version, _)| *version)
        .collect();
    let last_known_good = latest_snapshot.map(|(_, version)| version);
    Ok(Some(
        versions
            .into_iter()
            .map(|version| {
                let verdict = if current.as_ref() == Some(&version) {
                    Verdict::Current
                } else if last_known_good.as_ref() == Some(&version) {
                    Verdict::LastKnownGood
                } else if !last_live.contains_key(&version) {
                    Verdict::NeverLive
                } else if recent.contains(&&version) {
                    Verdict::Recent
                } else {
                    Verdict::Remove
                };
                (version, verdict)
            })
            .collect(),
    ))
}

/// Removes what [`plan`] says goes; returns the versions removed.
pub fn prune(service: &ServiceConfig, store: &Store) -> Result<Vec<String>, AgentError> {
    let Some(plan) = plan(service, store)? else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    let root = crate::paths::ServiceRoot::open(service)?;
    for (version, verdict) in plan {
        if verdict != Verdict::Remove {
            continue;
        }
        // Never through a link: a `releases` swapped for one cannot make this delete elsewhere.
        root.remove_tree(&format!("{RELEASES_DIR}/{version}"))?;
        removed.push(version);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::snapshot::{capture, switch_link};

    #[test]
    fn retention_keeps_recent_current_last_good_and_never_live_releases() {
        let root = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open(&store_dir.path().join("store")).unwrap();
        for version in ["v1", "v2", "v3", "v4", "v5"] {
            let dir = root.path().join(RELEASES_DIR).join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("VERSION"), version).unwrap();
        }
        let mut service = ServiceConfig {
            restart_timeout: Duration::from_secs(1),
            ..ServiceConfig::bare("web", root.path())
        };
        // v1, v2, v3 were each live at a capture (a change's "before"); v4 is live now; v5 was
        // unpacked for a deploy that has not happened.
        for (at, version) in [(1, "v1"), (2, "v2"), (3, "v3")] {
            switch_link(root.path(), &format!("{RELEASES_DIR}/{version}")).unwrap();
            capture(&store, &service, vec![], at).unwrap();
        }
        switch_link(root.path(), &format!("{RELEASES_DIR}/v4")).unwrap();
        assert_eq!(
            plan(&service, &store).unwrap(),
            None,
            "no keep-releases: keep all"
        );

        service.keep_releases = Some(3);
        let verdicts = plan(&service, &store).unwrap().unwrap();
        assert_eq!(verdicts["v1"], Verdict::Remove);
        assert_eq!(verdicts["v2"], Verdict::Recent);
        service.keep_releases = Some(1);
        let verdicts = plan(&service, &store).unwrap().unwrap();
        let expected = [
            ("v1", Verdict::Remove),
            ("v2", Verdict::Remove),
            ("v3", Verdict::LastKnownGood),
            ("v4", Verdict::Current),
            ("v5", Verdict::NeverLive),
        ];
        for (version, verdict) in expected {
            assert_eq!(verdicts[version], verdict, "{version}");
        }
        assert_eq!(prune(&service, &store).unwrap(), vec!["v1", "v2"]);
        assert_eq!(
            retained_releases(root.path()).unwrap(),
            vec!["v3", "v4", "v5"]
        );
        assert!(prune(&service, &store).unwrap().is_empty(), "idempotent");
    }
}
