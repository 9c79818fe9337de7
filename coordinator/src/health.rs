//! Health as soft state: the latest reports from agents, kept in memory on the member the agents
//! talk to. Raw samples are never written to disk; what matters (a rollback's trigger evidence,
//! a change's baseline, a verified host) goes into commands.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use rewind_proto::v1::HealthReport;

use rewind_shared::bounds::MAX_HEALTH_HISTORY_BYTES_PER_HOST;

use crate::state_machine::{GateOptions, HealthAggregate, HealthFigure};

/// Reports kept per host; at one report a second that is more than any window we use.
const MAX_REPORTS_PER_HOST: usize = 256;
/// Fewest requests (and latency observations) an error ratio (a p99) is computed from: one
/// failure among three requests is noise, not a 33 % error ratio.
pub const MIN_REQUESTS: f64 = 20.0;

struct ReceivedReport {
    received_at_ms: u64,
    /// Its encoded size, counted against the host's history.
    bytes: usize,
    /// Kept only because it answered an ask (see `HealthBook::record_report`).
    quick: bool,
    report: HealthReport,
}

/// One host's recent reports, oldest first: at most [`MAX_REPORTS_PER_HOST`] and at most
/// [`MAX_HEALTH_HISTORY_BYTES_PER_HOST`] encoded bytes.
#[derive(Default)]
struct History {
    reports: VecDeque<ReceivedReport>,
    bytes: usize,
    /// The latest drift the host reported (agents send it when it changes, and now and then):
    /// kept apart, so it neither crowds the history out nor goes with it.
    drift: Vec<rewind_proto::v1::ServiceDrift>,
}

/// How long a host asked for a report stays awaited (the agent keeps its quick pace as long
/// at most): one that never answers healthy (an agent before the ask existed, or gone) is
/// forgotten, so the set stays bounded by the hosts asked lately.
const ASKED_REPORT_KEPT_MS: u64 = 60_000;

/// An open ask: a host was asked for a report on `service` (a verify began, a gate settled).
struct Ask {
    id: u64,
    service: String,
    at_ms: u64,
    /// The host's first report answering this ask was let through the gap already.
    first_answer_seen: bool,
}

#[derive(Default)]
struct Asks {
    open: HashMap<String, Ask>,
    last_id: u64,
    /// Hosts whose agent has answered an ask (agents before asks existed never do): only
    /// these are waited for.
    answering: HashSet<String>,
}

/// How the agent session treats a report against the gap it keeps between a host's reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskedReport {
    /// Not an answer: the usual gap applies.
    No,
    /// The first report answering an open ask: kept whatever the gap.
    FirstAnswer,
    /// A later answer to the same ask (the service is still coming up): a short gap.
    LaterAnswer,
}

#[derive(Default)]
pub struct HealthBook {
    hosts: Mutex<HashMap<String, History>>,
    /// Hosts asked for a report. The engine wakes when one reports its service healthy, rather
    /// than at its next tick; no other report wakes it (its work would grow with the fleet).
    asks: Mutex<Asks>,
    ask_closed: tokio::sync::Notify,
}

impl HealthBook {
    /// Opens an ask of `host_id` for a report on `service` (replacing any earlier one) and
    /// returns its id, which the agent's answers carry (`HealthReport.answers_ask`). Ids grow
    /// across restarts (they start from the clock), so an answer to an older member's ask does
    /// not match.
    pub fn ask(&self, host_id: &str, service: &str, now_ms: u64) -> u64 {
        let mut asks = self.lock_asks();
        asks.open
            .retain(|_, ask| now_ms.saturating_sub(ask.at_ms) <= ASKED_REPORT_KEPT_MS);
        let id = (asks.last_id + 1).max(now_ms.saturating_mul(1000));
        asks.last_id = id;
        asks.open.insert(
            host_id.to_string(),
            Ask {
                id,
                service: service.to_string(),
                at_ms: now_ms,
                first_answer_seen: false,
            },
        );
        id
    }

    /// Closes ask `id` of `host_id` unanswered (it could not be sent).
    pub fn forget_ask(&self, host_id: &str, id: u64) {
        let mut asks = self.lock_asks();
        if asks.open.get(host_id).is_some_and(|ask| ask.id == id) {
            asks.open.remove(host_id);
        }
    }

    /// Whether `host_id` has an open ask its agent is known to answer (it answered one before):
    /// a gate waits for such hosts, not for agents that ignore asks.
    pub fn awaiting_answer(&self, host_id: &str, now_ms: u64) -> bool {
        let asks = self.lock_asks();
        asks.answering.contains(host_id)
            && asks
                .open
                .get(host_id)
                .is_some_and(|ask| now_ms.saturating_sub(ask.at_ms) <= ASKED_REPORT_KEPT_MS)
    }

    /// Whether a report of `host_id` answering ask `answers_ask` (0: none) is an answer to its
    /// open ask, and the first one: the first is kept whatever the gap, later ones a short gap
    /// apart. Only the id of the ask open now counts, each first answer once.
    pub fn asked_report(&self, host_id: &str, answers_ask: u64, now_ms: u64) -> AskedReport {
        let mut asks = self.lock_asks();
        let Some(ask) = asks.open.get_mut(host_id) else {
            return AskedReport::No;
        };
        if answers_ask == 0
            || ask.id != answers_ask
            || now_ms.saturating_sub(ask.at_ms) > ASKED_REPORT_KEPT_MS
        {
            return AskedReport::No;
        }
        let first = !std::mem::replace(&mut ask.first_answer_seen, true);
        // It answers asks: from now on a gate waits for its answers.
        asks.answering.insert(host_id.to_string());
        if first {
            AskedReport::FirstAnswer
        } else {
            AskedReport::LaterAnswer
        }
    }

    /// Resolves once an ask has been closed by a healthy report since (at once if one was
    /// while nobody waited).
    pub async fn asked_report_arrived(&self) {
        self.ask_closed.notified().await;
    }

    fn lock_asks(&self) -> std::sync::MutexGuard<'_, Asks> {
        self.asks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a report that arrived at `received_at_ms`. `quick`: it was kept only because it
    /// answers an ask (inside the gap other reports keep), so it weighs no more in aggregates
    /// than the host's latest report does.
    pub fn record_report(
        &self,
        host_id: &str,
        report: HealthReport,
        received_at_ms: u64,
        quick: bool,
    ) {
        let healthy_for = |service: &str| {
            report
                .probes
                .iter()
                .filter(|probe| probe.service == service)
                .all(|probe| probe.ok)
        };
        // A healthy answer closes the ask; from an agent that does not answer asks, any healthy
        // report does. A periodic report racing the ask does not: the answer is still to come.
        let closes = {
            let asks = self.lock_asks();
            let answers = asks.answering.contains(host_id);
            asks.open
                .get(host_id)
                .filter(|ask| {
                    let answer = !answers || report.answers_ask == ask.id;
                    (answer && healthy_for(&ask.service))
                        || received_at_ms.saturating_sub(ask.at_ms) > ASKED_REPORT_KEPT_MS
                })
                .map(|ask| ask.id)
        };
        self.store(host_id, report, received_at_ms, quick);
        // After the report is in the book: whoever sees the ask closed sees the report too.
        let mut asks = self.lock_asks();
        // Unless another ask replaced it meanwhile.
        if let Some(id) = closes
            && asks.open.get(host_id).is_some_and(|ask| ask.id == id)
        {
            asks.open.remove(host_id);
            drop(asks);
            self.ask_closed.notify_one();
        }
    }

    pub fn record(&self, host_id: &str, report: HealthReport, received_at_ms: u64) {
        self.record_report(host_id, report, received_at_ms, false);
    }

    fn store(&self, host_id: &str, mut report: HealthReport, received_at_ms: u64, quick: bool) {
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let history = hosts.entry(host_id.to_string()).or_default();
        if !report.drift.is_empty() {
            history.drift = std::mem::take(&mut report.drift);
        }
        let bytes = prost::Message::encoded_len(&report);
        history.bytes += bytes;
        history.reports.push_back(ReceivedReport {
            received_at_ms,
            bytes,
            quick,
            report,
        });
        // The oldest go first; the latest always stays.
        while history.reports.len() > MAX_REPORTS_PER_HOST
            || (history.bytes > MAX_HEALTH_HISTORY_BYTES_PER_HOST && history.reports.len() > 1)
        {
            if let Some(oldest) = history.reports.pop_front() {
                history.bytes -= oldest.bytes;
            }
        }
    }

    /// What the host last reported a restore of `service` would wipe of a change made since
    /// rewind last put it there (files and the release link): empty when nothing changed, or
    /// the agent has not said (one that has not checked yet, or of a release before version
    /// 10, which neither reports nor refuses it).
    pub fn drift(&self, host_id: &str, service: &str) -> Vec<String> {
        let hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(drift) = hosts
            .get(host_id)
            .and_then(|history| history.drift.iter().find(|drift| drift.service == service))
        else {
            return Vec::new();
        };
        drift.wiped_by_restore.clone()
    }

    /// Forgets what the host last reported changed on `service`: rewind just put it there
    /// (an activation or a restore succeeded, or its state was adopted), so until the agent's
    /// next check says otherwise there is no drift to act on.
    pub fn clear_drift(&self, host_id: &str, service: &str) {
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(history) = hosts.get_mut(host_id) else {
            return;
        };
        for drift in history
            .drift
            .iter_mut()
            .filter(|drift| drift.service == service)
        {
            drift.changes.clear();
            drift.wiped_by_restore.clear();
            drift.more = 0;
        }
    }

    /// Forgets a host (it was removed from the fleet).
    pub fn forget(&self, host_id: &str) {
        {
            let mut asks = self.lock_asks();
            asks.open.remove(host_id);
            asks.answering.remove(host_id);
        }
        self.hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(host_id);
    }

    /// When the host's latest report arrived.
    pub fn last_heard_ms(&self, host_id: &str) -> Option<u64> {
        let hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(hosts.get(host_id)?.reports.back()?.received_at_ms)
    }

    /// The host's latest report, with the latest drift it reported.
    pub fn latest(&self, host_id: &str) -> Option<HealthReport> {
        let hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let history = hosts.get(host_id)?;
        let mut report = history.reports.back()?.report.clone();
        report.drift = history.drift.clone();
        Some(report)
    }

    /// `service`'s figures from the reports `hosts` sent at or after `since_ms`: failed probe
    /// results over all probe results, and from its own metrics, failed requests over requests
    /// and the p99 of the summed latency histograms (as `histogram_quantile(0.99, sum by (le))`).
    pub fn aggregate(&self, service: &str, hosts: &[String], since_ms: u64) -> HealthAggregate {
        let book = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut total, mut failed, mut hosts_reporting) = (0u32, 0u32, 0u32);
        let (mut requests, mut errors, mut scrape_failures) = (0.0f64, 0.0f64, 0u32);
        let mut histograms: Vec<&[(f64, f64)]> = Vec::new();
        let mut buckets_of_reports: Vec<Vec<(f64, f64)>> = Vec::new();
        for host_id in hosts {
            let Some(reports) = book.get(host_id).map(|history| &history.reports) else {
                continue;
            };
            let mut reported = false;
            // A host's quick answers (its service coming up) count as one report: its latest.
            let latest = reports.len().saturating_sub(1);
            for (_, received) in reports
                .iter()
                .enumerate()
                .filter(|(index, received)| !received.quick || *index == latest)
                .filter(|(_, received)| received.received_at_ms >= since_ms)
            {
                for probe in received
                    .report
                    .probes
                    .iter()
                    .filter(|probe| probe.service == service)
                {
                    total += 1;
                    failed += u32::from(!probe.ok);
                    reported = true;
                }
                for app in received
                    .report
                    .app
                    .iter()
                    .filter(|app| app.service == service)
                {
                    reported = true;
                    if !app.error.is_empty() {
                        scrape_failures += 1;
                        continue;
                    }
                    let buckets: Vec<(f64, f64)> = app
                        .latency
                        .iter()
                        .map(|bucket| (bucket.le_ms, bucket.count))
                        .collect();
                    // Figures no counter can produce come from a broken agent: not counted.
                    let counted = app.requests.is_finite()
                        && app.errors.is_finite()
                        && (0.0..=app.requests).contains(&app.errors)
                        && rewind_shared::histogram::is_valid(&buckets);
                    if !counted {
                        scrape_failures += 1;
                        continue;
                    }
                    requests += app.requests;
                    errors += app.errors;
                    if !buckets.is_empty() {
                        buckets_of_reports.push(buckets);
                    }
                }
            }
            hosts_reporting += u32::from(reported);
        }
        histograms.extend(buckets_of_reports.iter().map(Vec::as_slice));
        let latency = rewind_shared::histogram::merge(histograms);
        let observed = latency.last().map_or(0.0, |&(_, count)| count);
        HealthAggregate {
            probe_failure_ratio: if total == 0 {
                0.0
            } else {
                f64::from(failed) / f64::from(total)
            },
            samples: total,
            hosts_reporting,
            error_ratio: (requests >= MIN_REQUESTS).then(|| (errors / requests).clamp(0.0, 1.0)),
            p99_latency_ms: if observed >= MIN_REQUESTS {
                rewind_shared::histogram::quantile(0.99, &latency)
            } else {
                None
            },
            requests,
            scrape_failures,
        }
    }

    /// Whether the first report received after `since_ms` says every probe of `service` passes:
    /// `None` while no such report has arrived, else the verdict with a reason.
    pub fn verdict_since(
        &self,
        host_id: &str,
        service: &str,
        since_ms: u64,
    ) -> Option<(bool, String)> {
        let book = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let received = book
            .get(host_id)?
            .reports
            .iter()
            .rev()
            .find(|received| received.received_at_ms > since_ms)?;
        let probes: Vec<_> = received
            .report
            .probes
            .iter()
            .filter(|probe| probe.service == service)
            .collect();
        if probes.is_empty() {
            return Some((false, format!("the agent reports no probe for {service}")));
        }
        let failing: Vec<String> = probes
            .iter()
            .filter(|probe| !probe.ok)
            .map(|probe| format!("{}: {}", probe.probe, probe.detail))
            .collect();
        if failing.is_empty() {
            Some((true, format!("{} probes pass", probes.len())))
        } else {
            Some((false, failing.join("; ")))
        }
    }

    /// Latest report per host, for listing.
    pub fn latest_all(&self) -> BTreeMap<String, HealthReport> {
        let book = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        book.iter()
            .filter_map(|(host, history)| {
                Some((host.clone(), history.reports.back()?.report.clone()))
            })
            .collect()
    }
}

/// How a service's figures now compare with its baseline under a gate's tolerances: probe
/// failure and error ratios may exceed the baseline by `tolerance`, p99 latency by the fraction
/// `latency_tolerance`. A figure nothing measured now is not judged; one without a baseline is
/// judged against zero (ratios) or not at all (latency).
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Every figure, for evidence: `probe failure ratio 0.00 (baseline 0.00, 12 samples); ...`.
    pub figures: String,
    /// The figures outside their tolerance, with their limits; empty when within.
    pub outside: Vec<String>,
}

impl Comparison {
    pub fn within(&self) -> bool {
        self.outside.is_empty()
    }
}

pub fn compare(
    now: &HealthAggregate,
    baseline: &HealthAggregate,
    gate: &GateOptions,
) -> Comparison {
    let mut figures = Vec::new();
    let mut outside = Vec::new();
    let ratio = HealthFigure::ProbeFailureRatio;
    if now.samples > 0 {
        let limit = baseline.probe_failure_ratio + gate.tolerance;
        figures.push(format!(
            "probe failure ratio {} (baseline {}, {} samples)",
            ratio.format(now.probe_failure_ratio),
            ratio.format(baseline.probe_failure_ratio),
            now.samples
        ));
        if now.probe_failure_ratio > limit + f64::EPSILON {
            outside.push(format!(
                "probe failure ratio {} > {}",
                ratio.format(now.probe_failure_ratio),
                ratio.format(limit)
            ));
        }
    }
    let errors = HealthFigure::ErrorRatio;
    match (now.error_ratio, baseline.error_ratio) {
        (Some(value), before) => {
            let limit = before.unwrap_or(0.0) + gate.tolerance;
            figures.push(format!(
                "error ratio {} (baseline {}, {:.0} requests)",
                errors.format(value),
                errors.format_option(before),
                now.requests
            ));
            if value > limit + f64::EPSILON {
                outside.push(format!(
                    "error ratio {} > {}",
                    errors.format(value),
                    errors.format(limit)
                ));
            }
        }
        (None, Some(_)) => figures.push("error ratio unknown (no requests counted)".into()),
        (None, None) => {}
    }
    let latency = HealthFigure::P99LatencyMs;
    if let Some(value) = now.p99_latency_ms {
        figures.push(format!(
            "p99 latency {} (baseline {})",
            latency.format(value),
            latency.format_option(baseline.p99_latency_ms)
        ));
        if let Some(before) = baseline.p99_latency_ms {
            let limit = before * (1.0 + gate.latency_tolerance);
            if value > limit + f64::EPSILON {
                outside.push(format!(
                    "p99 latency {} > {}",
                    latency.format(value),
                    latency.format(limit)
                ));
            }
        }
    }
    if now.scrape_failures > 0 {
        figures.push(format!("{} failed metrics scrapes", now.scrape_failures));
        if now.requests == 0.0 {
            outside.push(format!(
                "the service's metrics could not be read ({} failed scrapes)",
                now.scrape_failures
            ));
        }
    }
    if now.hosts_reporting == 0 {
        outside.push("no health reports".into());
    }
    let figures = if figures.is_empty() {
        "nothing measured".to_string()
    } else {
        figures.join("; ")
    };
    Comparison { figures, outside }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_proto::v1::{AppMetrics, LatencyBucket, ProbeResult};

    fn report(ok: &[bool]) -> HealthReport {
        HealthReport {
            at_ms: 0,
            metrics: None,
            probes: ok
                .iter()
                .enumerate()
                .map(|(index, &ok)| ProbeResult {
                    service: "web".into(),
                    probe: format!("p{index}"),
                    ok,
                    latency_ms: 1,
                    detail: if ok {
                        String::new()
                    } else {
                        "status 500".into()
                    },
                })
                .collect(),
            app: vec![],
            retained: vec![],
            drift: vec![],
            answers_ask: 0,
        }
    }

    fn answer(ok: &[bool], ask: u64) -> HealthReport {
        HealthReport {
            answers_ask: ask,
            ..report(ok)
        }
    }

    #[test]
    fn an_ask_lets_its_first_answer_through_once_and_a_healthy_answer_closes_it() {
        let book = HealthBook::default();
        let woken = |book: &HealthBook| {
            futures::FutureExt::now_or_never(book.asked_report_arrived()).is_some()
        };
        book.record("web-2", report(&[true]), 10);
        assert!(!woken(&book), "web-2 was not asked");
        let ask = book.ask("web-1", "web", 20);
        assert!(
            !book.awaiting_answer("web-1", 20),
            "not known to answer asks yet"
        );
        assert_eq!(
            book.asked_report("web-1", 0, 21),
            AskedReport::No,
            "periodic"
        );
        assert_eq!(
            book.asked_report("web-1", ask + 1, 21),
            AskedReport::No,
            "not ours"
        );
        assert_eq!(
            book.asked_report("web-1", ask, 22),
            AskedReport::FirstAnswer
        );
        assert_eq!(
            book.asked_report("web-1", ask, 23),
            AskedReport::LaterAnswer
        );
        // A healthy periodic report probed before the ask arrived does not close it.
        book.record_report("web-1", report(&[true, true]), 25, false);
        assert!(!woken(&book), "not the answer");
        book.record_report("web-1", answer(&[true, false], ask), 30, true);
        assert!(!woken(&book), "an unhealthy answer closes nothing");
        assert!(
            book.awaiting_answer("web-1", 35),
            "it answers asks: awaited"
        );
        book.record_report("web-1", answer(&[true, true], ask), 40, true);
        assert!(woken(&book), "a healthy answer closes the ask");
        assert!(!book.awaiting_answer("web-1", 45));
        assert_eq!(
            book.asked_report("web-1", ask, 46),
            AskedReport::No,
            "closed"
        );
        // A new ask starts over, with a new id.
        let again = book.ask("web-1", "web", 50);
        assert!(again > ask);
        assert_eq!(
            book.asked_report("web-1", again, 51),
            AskedReport::FirstAnswer
        );
        // An ask nobody answers (an agent before asks) is forgotten, and never awaited.
        let ignored = book.ask("web-3", "web", 60);
        assert!(!book.awaiting_answer("web-3", 61));
        book.forget_ask("web-3", ignored);
        assert_eq!(book.asked_report("web-3", ignored, 62), AskedReport::No);
        let expired = book.ask("web-4", "web", 70);
        assert_eq!(
            book.asked_report("web-4", expired, 71 + ASKED_REPORT_KEPT_MS),
            AskedReport::No
        );
    }

    #[test]
    fn quick_answers_weigh_as_one_report_in_aggregates() {
        let book = HealthBook::default();
        let hosts = ["web-1".to_string()];
        book.record("web-1", report(&[true]), 10);
        for at in [20, 30, 40] {
            book.record_report("web-1", report(&[false]), at, true);
        }
        let figures = book.aggregate("web", &hosts, 0);
        assert_eq!(
            figures.samples, 2,
            "the periodic one and the latest answer, not three failing answers: {figures:?}"
        );
        book.record_report("web-1", report(&[true]), 50, true);
        let figures = book.aggregate("web", &hosts, 0);
        assert_eq!(figures.samples, 2, "{figures:?}");
        assert_eq!(
            figures.probe_failure_ratio, 0.0,
            "the latest answer is healthy"
        );
    }

    #[test]
    fn a_hosts_history_is_bounded_in_bytes_and_keeps_the_latest() {
        let book = HealthBook::default();
        let mut large = report(&[false]);
        large.probes[0].detail = "x".repeat(400 * 1024);
        for at in 0..20 {
            book.record("a", large.clone(), at);
        }
        let hosts = book.hosts.lock().unwrap();
        let history = &hosts["a"];
        assert!(history.bytes <= MAX_HEALTH_HISTORY_BYTES_PER_HOST);
        assert_eq!(history.reports.len(), 5, "2 MiB holds five 400 KiB reports");
        assert_eq!(history.reports.back().unwrap().received_at_ms, 19);
        drop(hosts);
        // One report larger than the whole budget is still kept, alone, as the latest.
        large.probes[0].detail = "x".repeat(3 << 20);
        book.record("a", large, 20);
        assert_eq!(book.hosts.lock().unwrap()["a"].reports.len(), 1);
    }

    /// Drift comes now and then; the latest stays with the host, outside the history, and
    /// goes with its latest report.
    #[test]
    fn the_latest_drift_is_kept_apart_from_the_history() {
        let book = HealthBook::default();
        let mut drifted = report(&[true]);
        drifted.drift = vec![rewind_proto::v1::ServiceDrift {
            service: "web".into(),
            changes: vec!["config/app.toml: 4 bytes -> 5 bytes".into()],
            ..Default::default()
        }];
        book.record("a", drifted.clone(), 1);
        book.record("a", report(&[true]), 2);
        assert_eq!(book.latest("a").unwrap().drift, drifted.drift);
        let hosts = book.hosts.lock().unwrap();
        assert!(
            hosts["a"]
                .reports
                .iter()
                .all(|kept| kept.report.drift.is_empty())
        );
    }

    #[test]
    fn aggregates_count_only_the_window_and_the_named_hosts() {
        let book = HealthBook::default();
        book.record("a", report(&[false, false]), 100);
        book.record("a", report(&[true, false]), 200);
        book.record("b", report(&[false]), 200);
        let hosts = vec!["a".to_string()];
        let aggregate = book.aggregate("web", &hosts, 150);
        assert_eq!((aggregate.samples, aggregate.hosts_reporting), (2, 1));
        assert!((aggregate.probe_failure_ratio - 0.5).abs() < 1e-9);
        assert_eq!(book.aggregate("other", &hosts, 0).samples, 0);
    }

    fn app(requests: f64, errors: f64, latency: &[(f64, f64)]) -> HealthReport {
        HealthReport {
            app: vec![AppMetrics {
                service: "web".into(),
                requests,
                errors,
                latency: latency
                    .iter()
                    .map(|&(le_ms, count)| LatencyBucket { le_ms, count })
                    .collect(),
                error: String::new(),
            }],
            ..report(&[])
        }
    }

    #[test]
    fn error_ratio_and_p99_come_from_summed_counters_and_histograms() {
        let book = HealthBook::default();
        let inf = f64::INFINITY;
        book.record(
            "a",
            app(100.0, 10.0, &[(100.0, 90.0), (500.0, 100.0), (inf, 100.0)]),
            200,
        );
        book.record(
            "b",
            app(100.0, 0.0, &[(100.0, 100.0), (500.0, 100.0), (inf, 100.0)]),
            200,
        );
        // A failed scrape counts for nothing.
        let mut broken = app(1000.0, 1000.0, &[]);
        broken.app[0].error = "GET http://x: refused".into();
        book.record("b", broken, 200);
        let hosts = vec!["a".to_string(), "b".to_string()];
        let health = book.aggregate("web", &hosts, 0);
        assert_eq!(health.requests, 200.0);
        assert_eq!(health.error_ratio, Some(0.05));
        // 198th of 200: 190 at or under 100 ms, so 8/10 of the way into (100, 500].
        assert!(
            (health.p99_latency_ms.unwrap() - 420.0).abs() < 1e-9,
            "{health:?}"
        );
        assert_eq!(health.hosts_reporting, 2);
        assert_eq!(health.scrape_failures, 1);
        let quiet = book.aggregate("web", &hosts, 300);
        assert_eq!((quiet.error_ratio, quiet.p99_latency_ms), (None, None));
    }

    #[test]
    fn few_requests_or_impossible_figures_are_not_judged() {
        let book = HealthBook::default();
        let inf = f64::INFINITY;
        // Three requests, one failed: too few for a ratio.
        book.record("a", app(3.0, 1.0, &[(10.0, 3.0), (inf, 3.0)]), 100);
        let few = book.aggregate("web", &["a".to_string()], 0);
        assert_eq!((few.error_ratio, few.p99_latency_ms), (None, None));
        assert_eq!(few.requests, 3.0);
        // From the network: NaN, more errors than requests, a negative bucket.
        book.record("b", app(f64::NAN, 0.0, &[]), 100);
        book.record("b", app(50.0, 60.0, &[]), 100);
        book.record("b", app(50.0, 1.0, &[(-1.0, 2.0), (inf, 2.0)]), 100);
        let broken = book.aggregate("web", &["b".to_string()], 0);
        assert_eq!((broken.requests, broken.scrape_failures), (0.0, 3));
        let comparison = compare(
            &broken,
            &HealthAggregate::default(),
            &GateOptions::default(),
        );
        assert!(
            comparison.outside.contains(
                &"the service's metrics could not be read (3 failed scrapes)".to_string()
            ),
            "{comparison:?}"
        );
    }

    #[test]
    fn hosts_with_different_bucket_layouts_merge_into_one_histogram() {
        let book = HealthBook::default();
        let inf = f64::INFINITY;
        book.record("a", app(100.0, 0.0, &[(100.0, 100.0), (inf, 100.0)]), 100);
        book.record(
            "b",
            app(100.0, 0.0, &[(50.0, 0.0), (1000.0, 100.0), (inf, 100.0)]),
            100,
        );
        let health = book.aggregate("web", &["a".to_string(), "b".to_string()], 0);
        // 200 observations: 100 by 100 ms, all by 1 s; p99 (the 198th) is 98/100 into (100, 1000].
        assert!(
            (health.p99_latency_ms.unwrap() - 982.0).abs() < 1e-9,
            "{health:?}"
        );
    }

    #[test]
    fn verdicts_wait_for_a_report_newer_than_the_step() {
        let book = HealthBook::default();
        book.record("a", report(&[false]), 100);
        assert_eq!(book.verdict_since("a", "web", 100), None);
        book.record("a", report(&[true, true]), 101);
        assert_eq!(
            book.verdict_since("a", "web", 100).map(|(ok, _)| ok),
            Some(true)
        );
        book.record("a", report(&[true, false]), 102);
        let (ok, why) = book.verdict_since("a", "web", 100).unwrap();
        assert!(!ok && why.contains("status 500"), "{why}");
    }

    #[test]
    fn a_host_keeps_a_bounded_number_of_reports() {
        let book = HealthBook::default();
        for at in 0..(MAX_REPORTS_PER_HOST as u64 + 50) {
            book.record("a", report(&[true]), at);
        }
        assert_eq!(
            book.aggregate("web", &["a".to_string()], 0).samples as usize,
            MAX_REPORTS_PER_HOST
        );
    }
}
