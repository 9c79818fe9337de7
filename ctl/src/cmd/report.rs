//! `rewindctl report sla --since 30d`: per service, its incidents and how fast they were
//! detected, mitigated and recovered, against the service's recovery time objective.
//!
//! Detect and mitigate are counted from the impact (the change that hurt began to deploy), as
//! `incident show` counts them; recovery is measured against the RTO from detection, the moment
//! the clock of an objective starts: a slow deploy before anyone knew is not the rollback's.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use rewind_proto::v1 as pb;
use serde::Serialize;

use crate::client::{self, explain};
use crate::output::{Format, json, table};

/// Incidents read at most (pages of 1000, newest first).
const MAX_INCIDENTS: usize = 100_000;

#[derive(Clone, Subcommand)]
pub enum ReportCommand {
    /// Per service: incidents, time to detect, mitigate and recover, against its RTO.
    Sla {
        /// How far back (`30d`, `12h`): incidents detected since then.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        since: Duration,
    },
}

/// One service's figures, as `--output json` prints them (times in ms; -1: none).
#[derive(Default, Serialize)]
struct ServiceSla {
    service: String,
    rto_ms: u64,
    incidents: u32,
    /// Rollbacks still running or paused: not counted in the times (over the RTO when they
    /// have run longer than it).
    open: u32,
    /// Ended without recovering (failed, aborted, hosts skipped or isolated).
    not_recovered: u32,
    /// Recovered later than the RTO after detection, not at all, or still open past it.
    breached_rto: u32,
    detect_p50_ms: i64,
    detect_max_ms: i64,
    mitigate_p50_ms: i64,
    mitigate_max_ms: i64,
    recover_p50_ms: i64,
    recover_max_ms: i64,
    incident_ids: Vec<String>,
    #[serde(skip)]
    samples: [Vec<u64>; 3],
}

impl ServiceSla {
    fn add(&mut self, incident: &pb::Incident, now_ms: u64) {
        self.incidents += 1;
        self.incident_ids.push(incident.incident_id.clone());
        let ended = !matches!(incident.rollback_state.as_str(), "running" | "paused");
        if !ended {
            self.open += 1;
            // Still running past its objective counts against it already.
            let running_for = now_ms.saturating_sub(incident.detected_at_ms);
            self.breached_rto += u32::from(self.rto_ms > 0 && running_for > self.rto_ms);
            return;
        }
        let start = incident.impact_started_at_ms;
        let since = |at_ms: u64| (at_ms != 0).then(|| at_ms.saturating_sub(start));
        if let Some(ms) = since(incident.detected_at_ms) {
            self.samples[0].push(ms);
        }
        if let Some(ms) = since(incident.mitigated_at_ms) {
            self.samples[1].push(ms);
        }
        if incident.recovered_at_ms == 0 {
            self.not_recovered += 1;
            self.breached_rto += u32::from(self.rto_ms > 0);
            return;
        }
        let recover = incident
            .recovered_at_ms
            .saturating_sub(incident.detected_at_ms);
        self.samples[2].push(recover);
        if self.rto_ms > 0 && recover > self.rto_ms {
            self.breached_rto += 1;
        }
    }

    fn finish(&mut self) {
        let figures = self.samples.each_mut().map(|samples| {
            samples.sort_unstable();
            match samples.len() {
                0 => (-1, -1),
                n => (samples[(n - 1) / 2] as i64, samples[n - 1] as i64),
            }
        });
        (self.detect_p50_ms, self.detect_max_ms) = figures[0];
        (self.mitigate_p50_ms, self.mitigate_max_ms) = figures[1];
        (self.recover_p50_ms, self.recover_max_ms) = figures[2];
    }
}

pub(crate) async fn report(
    client: &mut client::Client,
    format: Format,
    command: ReportCommand,
) -> anyhow::Result<ExitCode> {
    let ReportCommand::Sla { since } = command;
    let now_ms = rewind_shared::time::now_ms();
    let from_ms = u64::try_from(since.as_millis())
        .ok()
        .and_then(|since_ms| now_ms.checked_sub(since_ms))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--since {}: reaches before 1970",
                humantime::format_duration(since)
            )
        })?;
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .services;
    let mut report: BTreeMap<String, ServiceSla> = services
        .iter()
        .map(|service| {
            let sla = ServiceSla {
                service: service.name.clone(),
                rto_ms: service.rto_s * 1000,
                ..ServiceSla::default()
            };
            (service.name.clone(), sla)
        })
        .collect();
    // Every incident is read (detection times do not follow incident numbers: a request may be
    // filed long before its rollback), up to a bound that is said when reached.
    let mut page_token = String::new();
    let mut read = 0;
    let truncated = loop {
        let page = client
            .list_incidents(pb::ListIncidentsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        read += page.incidents.len();
        for incident in page
            .incidents
            .iter()
            .filter(|incident| incident.detected_at_ms >= from_ms)
        {
            for service in &incident.services {
                report
                    .entry(service.clone())
                    .or_insert_with(|| ServiceSla {
                        service: service.clone(),
                        ..ServiceSla::default()
                    })
                    .add(incident, now_ms);
            }
        }
        if page.next_page_token.is_empty() {
            break false;
        }
        if read >= MAX_INCIDENTS {
            break true;
        }
        page_token = page.next_page_token;
    };
    if truncated {
        say_err!(
            "warning: only the newest {read} incidents were read (at most {MAX_INCIDENTS}): \
             older ones in the window are not counted"
        );
    }
    let mut rows: Vec<ServiceSla> = report.into_values().collect();
    rows.iter_mut().for_each(ServiceSla::finish);
    if format.is_structured() {
        json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "Since {} ({}): detect and mitigate from the impact, recover from detection",
        crate::output::time(from_ms),
        humantime::format_duration(since)
    );
    let ms = |ms: i64| match ms {
        -1 => "-".to_string(),
        ms => {
            humantime::format_duration(Duration::from_secs((ms as u64).div_ceil(1000))).to_string()
        }
    };
    let pair = |p50: i64, max: i64| format!("{} / {}", ms(p50), ms(max));
    let table_rows = rows
        .iter()
        .map(|sla| {
            vec![
                sla.service.clone(),
                if sla.rto_ms == 0 {
                    "-".into()
                } else {
                    ms(sla.rto_ms as i64)
                },
                sla.incidents.to_string(),
                pair(sla.detect_p50_ms, sla.detect_max_ms),
                pair(sla.mitigate_p50_ms, sla.mitigate_max_ms),
                pair(sla.recover_p50_ms, sla.recover_max_ms),
                if sla.rto_ms == 0 {
                    "-".into()
                } else {
                    sla.breached_rto.to_string()
                },
                format!("{} open, {} not recovered", sla.open, sla.not_recovered),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "RTO",
            "INCIDENTS",
            "DETECT P50/MAX",
            "MITIGATE P50/MAX",
            "RECOVER P50/MAX",
            "OVER RTO",
            "OTHER",
        ],
        table_rows,
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incident(id: &str, state: &str, times: [u64; 4]) -> pb::Incident {
        let [impact, detected, mitigated, recovered] = times;
        pb::Incident {
            incident_id: id.into(),
            rollback_state: state.into(),
            impact_started_at_ms: impact,
            detected_at_ms: detected,
            mitigated_at_ms: mitigated,
            recovered_at_ms: recovered,
            ..Default::default()
        }
    }

    #[test]
    fn recovery_counts_from_detection_against_the_rto_and_open_ones_wait() {
        let mut sla = ServiceSla {
            rto_ms: 60_000,
            ..ServiceSla::default()
        };
        let now = 300_000;
        let cases = [
            ("in-1", "succeeded", [1_000, 11_000, 21_000, 61_000]),
            ("in-2", "succeeded", [0, 100_000, 110_000, 200_000]),
            ("in-3", "failed", [0, 5_000, 0, 0]),
            ("in-4", "running", [0, 5_000, 0, 0]),
            ("in-5", "paused", [0, 290_000, 0, 0]),
        ];
        for (id, state, times) in cases {
            sla.add(&incident(id, state, times), now);
        }
        sla.finish();
        assert_eq!((sla.incidents, sla.open, sla.not_recovered), (5, 2, 1));
        // in-2 took 100 s from detection, in-3 never recovered, in-4 has run for 295 s.
        assert_eq!(sla.breached_rto, 3);
        assert_eq!((sla.recover_p50_ms, sla.recover_max_ms), (50_000, 100_000));
        assert_eq!((sla.detect_p50_ms, sla.detect_max_ms), (10_000, 100_000));
        assert_eq!(
            (sla.mitigate_p50_ms, sla.mitigate_max_ms),
            (20_000, 110_000)
        );
    }
}
