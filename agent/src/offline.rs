//! What happened while the agent had no coordinator: a summary of the health history it kept,
//! sent at the next session (the coordinator audits it and shows it on the host).

use std::collections::BTreeMap;

use rewind_proto::v1 as pb;

/// Most probes named in one summary.
const MAX_PROBES: usize = 64;
/// A window without failures is worth reporting only when it lasted this long.
const MIN_QUIET_WINDOW_MS: u64 = 60_000;

/// Summarises the reports taken at or after `since_ms`; `None` when there were none, or the
/// window was short and every probe passed (a leader change, not an outage).
pub fn summary(
    history: &[pb::HealthReport],
    since_ms: u64,
    now_ms: u64,
) -> Option<pb::OfflineHealth> {
    let window: Vec<&pb::HealthReport> = history
        .iter()
        .filter(|report| report.at_ms >= since_ms)
        .collect();
    if window.is_empty() {
        return None;
    }
    let mut probes: BTreeMap<(String, String), pb::ProbeOutage> = BTreeMap::new();
    let mut failing_reports = 0u32;
    for report in &window {
        let mut failed_here = false;
        for probe in report.probes.iter().filter(|probe| !probe.ok) {
            failed_here = true;
            let outage = probes
                .entry((probe.service.clone(), probe.probe.clone()))
                .or_insert_with(|| pb::ProbeOutage {
                    service: probe.service.clone(),
                    probe: probe.probe.clone(),
                    failed: 0,
                    first_failed_at_ms: report.at_ms,
                    last_failed_at_ms: report.at_ms,
                    last_detail: String::new(),
                });
            outage.failed += 1;
            outage.last_failed_at_ms = report.at_ms;
            outage.last_detail = rewind_shared::names::truncate(&probe.detail, 256).to_string();
        }
        failing_reports += u32::from(failed_here);
    }
    if failing_reports == 0 && now_ms.saturating_sub(since_ms) < MIN_QUIET_WINDOW_MS {
        return None;
    }
    Some(pb::OfflineHealth {
        from_ms: since_ms,
        to_ms: now_ms,
        reports: window.len() as u32,
        failing_reports,
        probes: probes.into_values().take(MAX_PROBES).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(at_ms: u64, ok: bool) -> pb::HealthReport {
        pb::HealthReport {
            at_ms,
            probes: vec![pb::ProbeResult {
                service: "web".into(),
                probe: "health".into(),
                ok,
                latency_ms: 1,
                detail: if ok {
                    String::new()
                } else {
                    format!("status 500 at {at_ms}")
                },
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_summary_counts_failures_in_the_window_and_skips_quiet_blips() {
        let history = [
            report(1_000, true),
            report(5_000, false),
            report(7_000, false),
            report(9_000, true),
        ];
        let summary = summary(&history, 4_000, 10_000).unwrap();
        assert_eq!((summary.reports, summary.failing_reports), (3, 2));
        let outage = &summary.probes[0];
        assert_eq!(
            (
                outage.failed,
                outage.first_failed_at_ms,
                outage.last_failed_at_ms
            ),
            (2, 5_000, 7_000)
        );
        assert_eq!(outage.last_detail, "status 500 at 7000");

        // A few healthy seconds without a coordinator (a leader change): nothing to report.
        assert_eq!(super::summary(&history, 8_000, 10_000), None);
        // A healthy but long outage is reported.
        let long = super::summary(&history, 8_000, 80_000).unwrap();
        assert_eq!((long.reports, long.failing_reports), (1, 0));
        assert_eq!(
            super::summary(&history, 20_000, 90_000),
            None,
            "no reports in the window"
        );
    }
}
