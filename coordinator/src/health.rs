//! Health as soft state: the latest reports from agents, kept in memory on the member the agents
//! talk to. Raw samples are never written to disk; what matters (a rollback's trigger evidence,
//! a change's baseline, a verified host) goes into commands.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use rewind_proto::v1::HealthReport;

use crate::state_machine::HealthAggregate;

/// Reports kept per host; at one report a second that is more than any window we use.
const MAX_REPORTS_PER_HOST: usize = 256;

struct ReceivedReport {
    received_at_ms: u64,
    report: HealthReport,
}

#[derive(Default)]
pub struct HealthBook {
    hosts: Mutex<HashMap<String, VecDeque<ReceivedReport>>>,
}

impl HealthBook {
    pub fn record(&self, host_id: &str, report: HealthReport, received_at_ms: u64) {
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let reports = hosts.entry(host_id.to_string()).or_default();
        if reports.len() >= MAX_REPORTS_PER_HOST {
            reports.pop_front();
        }
        reports.push_back(ReceivedReport {
            received_at_ms,
            report,
        });
    }

    /// Forgets a host (it was removed from the fleet).
    pub fn forget(&self, host_id: &str) {
        self.hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(host_id);
    }

    pub fn latest(&self, host_id: &str) -> Option<HealthReport> {
        let hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        hosts
            .get(host_id)?
            .back()
            .map(|received| received.report.clone())
    }

    /// Failed probe results of `service` over all probe results received from `hosts` at or
    /// after `since_ms`.
    pub fn aggregate(&self, service: &str, hosts: &[String], since_ms: u64) -> HealthAggregate {
        let book = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut total, mut failed, mut hosts_reporting) = (0u32, 0u32, 0u32);
        for host_id in hosts {
            let Some(reports) = book.get(host_id) else {
                continue;
            };
            let mut reported = false;
            for received in reports
                .iter()
                .filter(|received| received.received_at_ms >= since_ms)
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
            }
            hosts_reporting += u32::from(reported);
        }
        HealthAggregate {
            probe_failure_ratio: if total == 0 {
                0.0
            } else {
                f64::from(failed) / f64::from(total)
            },
            samples: total,
            hosts_reporting,
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
            .filter_map(|(host, reports)| Some((host.clone(), reports.back()?.report.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_proto::v1::ProbeResult;

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
        }
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
