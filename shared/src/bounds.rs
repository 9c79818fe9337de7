//! Bounds on what a host's agent sends the coordinator, in one place.
//!
//! The coordinator holds every host's reports in memory and writes what a host registers into
//! the replicated log, so a hostile or broken agent must not be able to grow either: every
//! field has a size, a count or a charset here. The coordinator checks each message against
//! them ([`check_register`], [`check_health_report`]) and refuses, by field name, what does not
//! fit; an honest agent cuts what it sends to fit first ([`fit_health_report`]), so it is never
//! refused. The README's "Bounds on what hosts send" lists these numbers.

use rewind_proto::v1 as pb;

use crate::names::{self, truncate};

/// Most services one host may declare.
pub const MAX_SERVICES_PER_HOST: usize = 256;
/// Longest agent version string (`1.4.2`, `2026.12.1-rc1+build.7`).
pub const MAX_AGENT_VERSION_BYTES: usize = 64;
/// Longest region or zone label (a name: lower-case letters, digits, `-`, `_`, `.`).
pub const MAX_LABEL_BYTES: usize = 63;
/// Most probe results in one health report.
pub const MAX_PROBES_PER_REPORT: usize = 256;
/// Longest probe name.
pub const MAX_PROBE_NAME_BYTES: usize = 128;
/// Longest text saying why a probe failed.
pub const MAX_PROBE_DETAIL_BYTES: usize = 512;
/// Longest text saying why a scrape of a service's metrics failed.
pub const MAX_SCRAPE_ERROR_BYTES: usize = 512;
/// Most latency buckets of one service's metrics.
pub const MAX_LATENCY_BUCKETS: usize = 64;
/// Most release versions reported retained for one service.
pub const MAX_RETAINED_PER_SERVICE: usize = 256;
/// Most drift lines reported for one service (the rest are counted).
pub const MAX_DRIFT_LINES_PER_SERVICE: usize = 32;
/// Longest drift line (and text saying what drift was measured against, or why it could not be).
pub const MAX_DRIFT_LINE_BYTES: usize = 512;
/// Largest health report, encoded. Whatever its fields hold, no report is larger.
pub const MAX_HEALTH_REPORT_BYTES: usize = 1 << 20;
/// Most bytes of health history the coordinator keeps per host (encoded); the oldest reports
/// go first, the latest is always kept.
pub const MAX_HEALTH_HISTORY_BYTES_PER_HOST: usize = 2 << 20;
/// Longest step result detail, self-revert detail or evidence, or offline summary kept.
pub const MAX_DETAIL_BYTES: usize = 4096;
/// Most probes named in an offline health summary.
pub const MAX_OFFLINE_PROBES: usize = 64;
/// Longest text in an answer to an inspection (an error); longer ones are cut.
pub const MAX_INSPECT_ERROR_BYTES: usize = 4096;
/// Most requests (and errors, and observations in one latency bucket) one report may count: a
/// busy service does thousands a second, and a larger number could only drown the other
/// hosts' figures.
pub const MAX_REQUESTS_PER_REPORT: f64 = 1e9;
/// Most offline summaries one session may send (an agent sends one as it reconnects).
pub const MAX_OFFLINE_SUMMARIES_PER_SESSION: u32 = 4;
/// Most self-revert reports one session may send: each goes into the replicated log.
pub const MAX_SELF_REVERTS_PER_SESSION: u32 = 64;
/// Most sessions one host may open in a minute (an agent reconnects after a leader change or a
/// network blip, a few times at most): more is refused until the minute has passed.
pub const MAX_SESSIONS_PER_HOST_PER_MINUTE: u32 = 12;

/// A field that does not fit its bound: which one, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBounds {
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for OutOfBounds {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.field, self.problem)
    }
}

fn out_of_bounds(field: impl Into<String>, problem: impl Into<String>) -> OutOfBounds {
    OutOfBounds {
        field: field.into(),
        problem: problem.into(),
    }
}

fn at_most(field: &str, count: usize, max: usize, what: &str) -> Result<(), OutOfBounds> {
    if count > max {
        return Err(out_of_bounds(
            field,
            format!("{count} {what}, at most {max}"),
        ));
    }
    Ok(())
}

fn text_at_most(field: &str, text: &str, max: usize) -> Result<(), OutOfBounds> {
    if text.len() > max {
        return Err(out_of_bounds(
            field,
            format!("{} bytes, at most {max}", text.len()),
        ));
    }
    Ok(())
}

fn name(field: &str, value: &str) -> Result<(), OutOfBounds> {
    names::validate_name(field, value).map_err(|error| out_of_bounds(field, error.to_string()))
}

/// A `Register` message: names, labels and version within their bounds and charsets. Which
/// host it may register (its certificate's) is the caller's to check.
pub fn check_register(register: &pb::Register) -> Result<(), OutOfBounds> {
    name("register.host_id", &register.host_id)?;
    if let Some(labels) = &register.labels {
        for (field, value) in [
            ("register.labels.environment", &labels.environment),
            ("register.labels.region", &labels.region),
            ("register.labels.zone", &labels.zone),
        ] {
            if !value.is_empty() {
                text_at_most(field, value, MAX_LABEL_BYTES)?;
                name(field, value)?;
            }
        }
    }
    text_at_most(
        "register.agent_version",
        &register.agent_version,
        MAX_AGENT_VERSION_BYTES,
    )?;
    if !register.agent_version.is_empty() {
        names::validate_version("register.agent_version", &register.agent_version)
            .map_err(|error| out_of_bounds("register.agent_version", error.to_string()))?;
    }
    at_most(
        "register.services",
        register.services.len(),
        MAX_SERVICES_PER_HOST,
        "services",
    )?;
    for service in &register.services {
        name("register.services", service)?;
    }
    Ok(())
}

/// A health report from a host that declared `services`: every count, text and name within
/// bounds, and every service one of the host's own.
pub fn check_health_report(
    report: &pb::HealthReport,
    services: &[String],
) -> Result<(), OutOfBounds> {
    use prost::Message;
    let encoded = report.encoded_len();
    if encoded > MAX_HEALTH_REPORT_BYTES {
        return Err(out_of_bounds(
            "health",
            format!("{encoded} bytes encoded, at most {MAX_HEALTH_REPORT_BYTES}"),
        ));
    }
    let own = |field: &str, service: &str| -> Result<(), OutOfBounds> {
        if services.iter().any(|declared| declared == service) {
            Ok(())
        } else {
            Err(out_of_bounds(
                field,
                format!(
                    "{:?} is not one of this host's services (registered, and assigned by the policy)",
                    truncate(service, 64)
                ),
            ))
        }
    };
    at_most(
        "health.probes",
        report.probes.len(),
        MAX_PROBES_PER_REPORT,
        "probe results",
    )?;
    for probe in &report.probes {
        own("health.probes.service", &probe.service)?;
        text_at_most("health.probes.probe", &probe.probe, MAX_PROBE_NAME_BYTES)?;
        name("health.probes.probe", &probe.probe)?;
        text_at_most(
            "health.probes.detail",
            &probe.detail,
            MAX_PROBE_DETAIL_BYTES,
        )?;
    }
    at_most(
        "health.app",
        report.app.len(),
        MAX_SERVICES_PER_HOST,
        "services' metrics",
    )?;
    for app in &report.app {
        own("health.app.service", &app.service)?;
        text_at_most("health.app.error", &app.error, MAX_SCRAPE_ERROR_BYTES)?;
        let counts = [
            ("health.app.requests", app.requests),
            ("health.app.errors", app.errors),
        ]
        .into_iter()
        .chain(
            app.latency
                .iter()
                .map(|bucket| ("health.app.latency.count", bucket.count)),
        );
        for (field, count) in counts {
            if !(0.0..=MAX_REQUESTS_PER_REPORT).contains(&count) {
                return Err(out_of_bounds(
                    field,
                    format!("{count:e}, must be within 0 to {MAX_REQUESTS_PER_REPORT:e}"),
                ));
            }
        }
        if app.errors > app.requests {
            return Err(out_of_bounds(
                "health.app.errors",
                format!("{} errors among {} requests", app.errors, app.requests),
            ));
        }
        at_most(
            "health.app.latency",
            app.latency.len(),
            MAX_LATENCY_BUCKETS,
            "latency buckets",
        )?;
    }
    at_most(
        "health.retained",
        report.retained.len(),
        MAX_SERVICES_PER_HOST,
        "services' releases",
    )?;
    for retained in &report.retained {
        own("health.retained.service", &retained.service)?;
        at_most(
            "health.retained.versions",
            retained.versions.len(),
            MAX_RETAINED_PER_SERVICE,
            "versions",
        )?;
        for version in &retained.versions {
            names::validate_version("health.retained.versions", version)
                .map_err(|error| out_of_bounds("health.retained.versions", error.to_string()))?;
        }
    }
    at_most(
        "health.drift",
        report.drift.len(),
        MAX_SERVICES_PER_HOST,
        "services' drift",
    )?;
    for drift in &report.drift {
        own("health.drift.service", &drift.service)?;
        at_most(
            "health.drift.changes",
            drift.changes.len(),
            MAX_DRIFT_LINES_PER_SERVICE,
            "lines",
        )?;
        for line in &drift.changes {
            text_at_most("health.drift.changes", line, MAX_DRIFT_LINE_BYTES)?;
        }
        at_most(
            "health.drift.wiped_by_restore",
            drift.wiped_by_restore.len(),
            MAX_DRIFT_LINES_PER_SERVICE,
            "lines",
        )?;
        for line in &drift.wiped_by_restore {
            text_at_most("health.drift.wiped_by_restore", line, MAX_DRIFT_LINE_BYTES)?;
        }
        text_at_most("health.drift.against", &drift.against, MAX_DRIFT_LINE_BYTES)?;
        text_at_most("health.drift.error", &drift.error, MAX_DRIFT_LINE_BYTES)?;
    }
    Ok(())
}

/// Cuts what an honest agent's report may carry to the bounds the coordinator checks: texts
/// cut (on a character boundary), lists shortened, and if the whole is still too large, the
/// drift lines left out (counted in `more` instead), then the retained releases (the largest
/// part, and less urgent than probes and metrics).
pub fn fit_health_report(report: &mut pb::HealthReport) {
    use prost::Message;
    report.probes.truncate(MAX_PROBES_PER_REPORT);
    for probe in &mut report.probes {
        cut(&mut probe.detail, MAX_PROBE_DETAIL_BYTES);
    }
    report.app.truncate(MAX_SERVICES_PER_HOST);
    for app in &mut report.app {
        cut(&mut app.error, MAX_SCRAPE_ERROR_BYTES);
        app.latency.truncate(MAX_LATENCY_BUCKETS);
    }
    report.retained.truncate(MAX_SERVICES_PER_HOST);
    for retained in &mut report.retained {
        // A stray directory under releases/ (`old copy`) is no release: left out, so it cannot
        // cost the host its whole report.
        retained
            .versions
            .retain(|version| names::validate_version("version", version).is_ok());
        retained.versions.truncate(MAX_RETAINED_PER_SERVICE);
    }
    report.drift.truncate(MAX_SERVICES_PER_HOST);
    for drift in &mut report.drift {
        let beyond = drift
            .changes
            .len()
            .saturating_sub(MAX_DRIFT_LINES_PER_SERVICE);
        drift.more = drift.more.saturating_add(beyond as u32);
        drift.changes.truncate(MAX_DRIFT_LINES_PER_SERVICE);
        for line in &mut drift.changes {
            cut(line, MAX_DRIFT_LINE_BYTES);
        }
        drift.wiped_by_restore.truncate(MAX_DRIFT_LINES_PER_SERVICE);
        for line in &mut drift.wiped_by_restore {
            cut(line, MAX_DRIFT_LINE_BYTES);
        }
        cut(&mut drift.against, MAX_DRIFT_LINE_BYTES);
        cut(&mut drift.error, MAX_DRIFT_LINE_BYTES);
    }
    // Drift lines first, counted instead of named: they only inform, while readiness reads
    // the retained releases.
    if report.encoded_len() > MAX_HEALTH_REPORT_BYTES {
        for drift in &mut report.drift {
            drift.more = drift.more.saturating_add(drift.changes.len() as u32);
            drift.changes.clear();
        }
    }
    // What a restore would wipe holds rollbacks up: kept, but shortened to the file's name.
    if report.encoded_len() > MAX_HEALTH_REPORT_BYTES {
        for drift in &mut report.drift {
            for line in &mut drift.wiped_by_restore {
                cut(line, SHORT_DRIFT_LINE_BYTES);
            }
        }
    }
    if report.encoded_len() > MAX_HEALTH_REPORT_BYTES {
        report.retained.clear();
    }
}

/// How much of a line a restore would wipe survives in a report that is still too large.
const SHORT_DRIFT_LINE_BYTES: usize = 64;

/// What is kept of a text from outside: its control characters escaped (it may reach a
/// terminal from the audit log) and cut to `max_bytes`.
pub fn kept(text: &str, max_bytes: usize) -> String {
    let mut kept = names::printable(text, max_bytes);
    cut(&mut kept, max_bytes);
    kept
}

fn cut(text: &mut String, max_bytes: usize) {
    let kept = truncate(text, max_bytes).len();
    text.truncate(kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change to a valid message, and the start of the refusal it must draw.
    type Case<M> = (Box<dyn Fn(&mut M)>, &'static str);

    fn register() -> pb::Register {
        pb::Register {
            host_id: "web-1".into(),
            labels: Some(pb::HostLabels {
                region: "eu-west".into(),
                zone: "a".into(),
                environment: "prod".into(),
            }),
            services: vec!["web".into()],
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn register_fields_are_bounded_and_named() {
        assert_eq!(check_register(&register()), Ok(()));
        let cases: Vec<Case<pb::Register>> = vec![
            (
                Box::new(|r| r.agent_version = "1".repeat(3 << 20)),
                "register.agent_version: 3145728 bytes, at most 64",
            ),
            (
                Box::new(|r| r.agent_version = "1.0\u{1b}[2J".into()),
                "register.agent_version",
            ),
            (
                Box::new(|r| r.labels.as_mut().unwrap().region = "\u{1b}]52;c;x\u{7}".into()),
                "register.labels.region",
            ),
            (
                Box::new(|r| r.labels.as_mut().unwrap().zone = "z".repeat(64)),
                "register.labels.zone: 64 bytes, at most 63",
            ),
            (
                Box::new(|r| r.services = vec!["s".into(); MAX_SERVICES_PER_HOST + 1]),
                "register.services: 257 services, at most 256",
            ),
        ];
        for (change, expected) in cases {
            let mut message = register();
            change(&mut message);
            let refused = check_register(&message).unwrap_err().to_string();
            assert!(refused.starts_with(expected), "{refused}");
        }
    }

    fn report() -> pb::HealthReport {
        pb::HealthReport {
            probes: vec![pb::ProbeResult {
                service: "web".into(),
                probe: "http".into(),
                detail: "connection refused".into(),
                ..Default::default()
            }],
            app: vec![pb::AppMetrics {
                service: "web".into(),
                ..Default::default()
            }],
            retained: vec![pb::RetainedReleases {
                service: "web".into(),
                versions: vec!["v1".into(), "v2".into()],
            }],
            drift: vec![pb::ServiceDrift {
                service: "web".into(),
                changes: vec!["config/app.toml: 4 bytes -> 5 bytes".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn health_reports_are_bounded_and_speak_only_for_the_hosts_services() {
        let services = vec!["web".to_string()];
        assert_eq!(check_health_report(&report(), &services), Ok(()));
        let cases: Vec<Case<pb::HealthReport>> = vec![
            (
                Box::new(|r| r.app[0].error = "e".repeat(3_900_000)),
                "health: 3900",
            ),
            (
                Box::new(|r| r.app[0].error = "e".repeat(513)),
                "health.app.error: 513 bytes, at most 512",
            ),
            (
                Box::new(|r| r.probes[0].service = "payments".into()),
                "health.probes.service: \"payments\" is not one of this host's services",
            ),
            (
                Box::new(|r| r.app[0].service = "payments".into()),
                "health.app.service",
            ),
            (
                Box::new(|r| r.retained[0].versions = vec!["v1".into(); 257]),
                "health.retained.versions: 257 versions, at most 256",
            ),
            (
                Box::new(|r| r.drift[0].service = "payments".into()),
                "health.drift.service: \"payments\" is not one of this host's services",
            ),
            (
                Box::new(|r| r.drift[0].changes = vec!["x".into(); 33]),
                "health.drift.changes: 33 lines, at most 32",
            ),
            (
                Box::new(|r| r.drift[0].changes[0] = "x".repeat(513)),
                "health.drift.changes: 513 bytes, at most 512",
            ),
            (
                Box::new(|r| r.drift[0].wiped_by_restore = vec!["x".into(); 33]),
                "health.drift.wiped_by_restore: 33 lines, at most 32",
            ),
            (
                Box::new(|r| r.drift[0].against = "x".repeat(513)),
                "health.drift.against: 513 bytes, at most 512",
            ),
            (
                Box::new(|r| r.app = vec![pb::AppMetrics::default(); 300]),
                "health.app: 300",
            ),
            (
                Box::new(|r| r.app[0].latency = vec![pb::LatencyBucket::default(); 65]),
                "health.app.latency: 65 latency buckets, at most 64",
            ),
            (
                Box::new(|r| r.app[0].requests = 1e300),
                "health.app.requests: 1e300, must be within",
            ),
            (
                Box::new(|r| r.app[0].errors = f64::NAN),
                "health.app.errors: NaN",
            ),
        ];
        for (change, expected) in cases {
            let mut message = report();
            change(&mut message);
            let refused = check_health_report(&message, &services)
                .unwrap_err()
                .to_string();
            assert!(refused.starts_with(expected), "{refused}");
        }
    }

    #[test]
    fn an_honest_agent_cuts_its_report_to_fit() {
        let services = vec!["web".to_string()];
        let mut big = report();
        big.probes[0].detail = "é".repeat(1000);
        big.app[0].error = "x".repeat(10_000);
        let mut with_stray = report();
        with_stray.retained[0].versions.push("old copy".into());
        fit_health_report(&mut with_stray);
        assert_eq!(check_health_report(&with_stray, &services), Ok(()));
        big.retained = (0..MAX_SERVICES_PER_HOST)
            .map(|_| pb::RetainedReleases {
                service: "web".into(),
                versions: vec!["v".repeat(100); 300],
            })
            .collect();
        fit_health_report(&mut big);
        assert_eq!(check_health_report(&big, &services), Ok(()));
        assert!(big.probes[0].detail.len() <= MAX_PROBE_DETAIL_BYTES);
        // Drift lines beyond the bounds are counted, and when the report would still be too
        // large, all of them are.
        let mut drifted = report();
        drifted.drift[0].changes = vec!["é".repeat(400); 40];
        fit_health_report(&mut drifted);
        assert_eq!(check_health_report(&drifted, &services), Ok(()));
        assert_eq!(
            (drifted.drift[0].changes.len(), drifted.drift[0].more),
            (MAX_DRIFT_LINES_PER_SERVICE, 8)
        );
        drifted.drift = (0..MAX_SERVICES_PER_HOST)
            .map(|_| pb::ServiceDrift {
                service: "web".into(),
                changes: vec!["x".repeat(MAX_DRIFT_LINE_BYTES); MAX_DRIFT_LINES_PER_SERVICE],
                ..Default::default()
            })
            .collect();
        fit_health_report(&mut drifted);
        assert_eq!(check_health_report(&drifted, &services), Ok(()));
        assert!(
            drifted.drift.iter().all(|drift| drift.changes.is_empty()
                && drift.more == MAX_DRIFT_LINES_PER_SERVICE as u32)
        );
        assert!(
            !drifted.retained.is_empty(),
            "drift goes before retained releases"
        );
        // What a restore would wipe stays, shortened, when the report is still too large.
        for drift in &mut drifted.drift {
            drift.changes = vec!["x".repeat(MAX_DRIFT_LINE_BYTES); MAX_DRIFT_LINES_PER_SERVICE];
            drift.wiped_by_restore = drift.changes.clone();
        }
        fit_health_report(&mut drifted);
        assert_eq!(check_health_report(&drifted, &services), Ok(()));
        assert!(drifted.drift.iter().all(|drift| {
            drift.wiped_by_restore.len() == MAX_DRIFT_LINES_PER_SERVICE
                && drift
                    .wiped_by_restore
                    .iter()
                    .all(|line| line.len() <= SHORT_DRIFT_LINE_BYTES)
        }));
    }
}
