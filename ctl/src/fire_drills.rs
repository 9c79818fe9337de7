//! `rewindctl drill rollback|list|show rd-N|abort`: rollback fire drills (cluster version 11).
//! A drill deploys a known-bad release where the environment allows drills, lets detection and
//! the automatic rollback run, and is scored; the scorecard prints as a table, JSON, or a JUnit
//! report a CI pipeline can gate on.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::commands::{PageArgs, next_page};
use crate::output::{Format, json, table, time};

/// What `drill rollback` asks for.
pub struct DrillRequest {
    pub service: String,
    pub environment: String,
    pub release: String,
    pub reason: String,
    pub no_wait: bool,
    pub timeout: Duration,
}

/// Starts a drill and, unless told not to, follows it to its end and prints its scorecard.
/// Exits 1 when it failed or was aborted.
pub async fn start(
    client: &mut Client,
    format: Format,
    request: DrillRequest,
) -> anyhow::Result<ExitCode> {
    let started = client
        .start_rollback_drill(pb::StartRollbackDrillRequest {
            request_id: request_id(),
            service: request.service,
            environment: request.environment,
            version: request.release,
            reason: request.reason,
        })
        .await
        .map_err(explain)?
        .into_inner()
        .drill
        .context("the coordinator answered without the drill")?;
    if format.is_table() {
        say_err!(
            "{} started: {} {} -> {} on {} ({}); waiting for detection and the automatic \
             rollback (stop it: rewindctl drill abort {} --reason R)",
            started.drill_id,
            started.service,
            started.previous_version,
            started.version,
            started.environment,
            started.change_id,
            started.drill_id
        );
    }
    let drill = if request.no_wait {
        started
    } else {
        follow(client, format, started, request.timeout).await?
    };
    report(format, &[drill], !request.no_wait)
}

/// Polls the drill until it ends, saying each phase once (table output only).
async fn follow(
    client: &mut Client,
    format: Format,
    mut drill: pb::RollbackDrill,
    timeout: Duration,
) -> anyhow::Result<pb::RollbackDrill> {
    let began = Instant::now();
    let mut said = String::new();
    while drill.state == "running" {
        let phase = if drill.rollback_id.is_empty() {
            format!(
                "{} is live through {}: waiting for detection",
                drill.version, drill.change_id
            )
        } else {
            format!("detected: {} reverts it", drill.rollback_id)
        };
        if format.is_table() && phase != said {
            say_err!(
                "{}: {phase} ({:.0} s)",
                drill.drill_id,
                began.elapsed().as_secs_f64()
            );
            said = phase;
        }
        if began.elapsed() > timeout {
            // Reported as it is (a JUnit report fails its "ended" check); exit 1.
            say_err!(
                "{} still runs after {} s; follow it with rewindctl drill show {}, or stop it \
                 with rewindctl drill abort {} --reason R",
                drill.drill_id,
                timeout.as_secs(),
                drill.drill_id,
                drill.drill_id
            );
            return Ok(drill);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        drill = get(client, &drill.drill_id).await?;
    }
    Ok(drill)
}

async fn get(client: &mut Client, drill_id: &str) -> anyhow::Result<pb::RollbackDrill> {
    client
        .get_rollback_drill(pb::GetRollbackDrillRequest {
            drill_id: drill_id.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .drill
        .context("the coordinator answered without the drill")
}

pub async fn show(
    client: &mut Client,
    format: Format,
    drill_id: String,
) -> anyhow::Result<ExitCode> {
    let drill = get(client, &drill_id).await?;
    report(format, &[drill], false)
}

pub async fn list(
    client: &mut Client,
    format: Format,
    service: Option<String>,
    page: PageArgs,
) -> anyhow::Result<ExitCode> {
    let answer = client
        .list_rollback_drills(pb::ListRollbackDrillsRequest {
            service: service.clone().unwrap_or_default(),
            page_size: page.page_size,
            page_token: page.page_token,
        })
        .await
        .map_err(explain)?
        .into_inner();
    match format {
        Format::Json | Format::Yaml => json(&answer)?,
        Format::Junit => println!("{}", junit(&answer.drills)),
        Format::Table | Format::Wide => {
            let rows = answer
                .drills
                .iter()
                .map(|drill| {
                    let card = drill.scorecard.unwrap_or_default();
                    vec![
                        drill.drill_id.clone(),
                        drill.state.to_uppercase(),
                        drill.service.clone(),
                        drill.environment.clone(),
                        drill.version.clone(),
                        time(drill.started_at_ms),
                        seconds(card.detect_ms),
                        seconds(card.all_verified_ms),
                        drill.outcome.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "DRILL", "STATE", "SERVICE", "ENV", "RELEASE", "STARTED", "DETECT", "VERIFIED",
                    "OUTCOME",
                ],
                rows,
            );
            let command = match &service {
                Some(service) => format!("drill list --service {service}"),
                None => "drill list".to_string(),
            };
            next_page(&command, page.page_size, &answer.next_page_token);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn abort(
    client: &mut Client,
    format: Format,
    drill_id: String,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let drill = client
        .abort_rollback_drill(pb::AbortRollbackDrillRequest {
            request_id: request_id(),
            drill_id,
            reason,
        })
        .await
        .map_err(explain)?
        .into_inner()
        .drill
        .context("the coordinator answered without the drill")?;
    if format.is_structured() {
        json(&drill)?;
    } else {
        say!(
            "{} aborted; {} is reverted ({}): rewindctl change show {}",
            drill.drill_id,
            drill.version,
            if drill.rollback_id.is_empty() {
                "the engine starts its rollback".to_string()
            } else {
                format!("by {}", drill.rollback_id)
            },
            drill.change_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints drills in the format asked for; exits 1 if any failed or was aborted.
fn report(format: Format, drills: &[pb::RollbackDrill], waited: bool) -> anyhow::Result<ExitCode> {
    match format {
        Format::Json | Format::Yaml => match drills {
            [drill] => json(drill)?,
            _ => json(&drills)?,
        },
        Format::Junit => println!("{}", junit(drills)),
        Format::Table | Format::Wide => drills.iter().for_each(print_scorecard),
    }
    // A drill followed past its timeout has not passed either.
    let failed = drills.iter().any(|drill| {
        matches!(drill.state.as_str(), "failed" | "aborted") || (waited && drill.state == "running")
    });
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_scorecard(drill: &pb::RollbackDrill) {
    say!(
        "{}  {}  DRILL of {} in {}: {} -> {} (known bad) as {}{}",
        drill.drill_id,
        drill.state.to_uppercase(),
        drill.service,
        drill.environment,
        drill.previous_version,
        drill.version,
        drill.change_id,
        if drill.rollback_id.is_empty() {
            String::new()
        } else {
            format!(", reverted by {}", drill.rollback_id)
        }
    );
    say!(
        "reason: {}  (started by {} at {})",
        drill.reason,
        drill.started_by,
        time(drill.started_at_ms)
    );
    if !drill.outcome.is_empty() {
        say!("outcome: {}", drill.outcome);
    }
    let Some(card) = &drill.scorecard else {
        return;
    };
    let previous = drill.previous_scorecard.as_ref();
    let before =
        |value: &dyn Fn(&pb::DrillScorecard) -> String| previous.map(value).unwrap_or_default();
    let rows = vec![
        vec![
            "detected by its health policy".into(),
            yes_no(card.detected),
            "yes".into(),
            before(&|card| yes_no(card.detected)),
        ],
        vec![
            "time to detect".into(),
            seconds(card.detect_ms),
            String::new(),
            before(&|card| seconds(card.detect_ms)),
        ],
        vec![
            "time to first host reverted".into(),
            seconds(card.first_reverted_ms),
            String::new(),
            before(&|card| seconds(card.first_reverted_ms)),
        ],
        vec![
            "time to every host verified".into(),
            seconds(card.all_verified_ms),
            if card.rto_s == 0 {
                "(no RTO set)".into()
            } else {
                format!("{} s (RTO)", card.rto_s)
            },
            before(&|card| seconds(card.all_verified_ms)),
        ],
        vec![
            "gates passed".into(),
            format!("{}/{}", card.gates_passed, card.gates),
            "all".into(),
            before(&|card| format!("{}/{}", card.gates_passed, card.gates)),
        ],
        vec![
            "steps retried".into(),
            card.steps_retried.to_string(),
            String::new(),
            before(&|card| card.steps_retried.to_string()),
        ],
        vec![
            "escalations".into(),
            card.escalations.to_string(),
            "0".into(),
            before(&|card| card.escalations.to_string()),
        ],
    ];
    let previous_header = if drill.previous_drill_id.is_empty() {
        "PREVIOUS".to_string()
    } else {
        format!("PREVIOUS ({})", drill.previous_drill_id)
    };
    table(
        &["SCORECARD", "THIS DRILL", "TARGET", &previous_header],
        rows,
    );
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "-".to_string(),
        |ms| format!("{:.1} s", ms as f64 / 1000.0),
    )
}

/// A JUnit XML report, one test suite per drill and one test case per check of its scorecard,
/// so a CI pipeline can gate on a drill the way it gates on tests.
pub fn junit(drills: &[pb::RollbackDrill]) -> String {
    let mut suites = String::new();
    let (mut total, mut failures) = (0, 0);
    for drill in drills {
        let card = drill.scorecard.unwrap_or_default();
        let within_rto = card.rto_s == 0
            || card
                .all_verified_ms
                .is_some_and(|ms| ms <= card.rto_s * 1000);
        let ended = drill.state != "running";
        let cases: Vec<(&str, Option<u64>, Option<String>)> = vec![
            ("ended", None, (!ended).then(|| "still running".to_string())),
            (
                "not aborted",
                None,
                (drill.state == "aborted").then(|| drill.outcome.clone()),
            ),
            (
                "detected by its health policy",
                card.detect_ms,
                (!card.detected).then(|| drill.outcome.clone()),
            ),
            (
                "every host reverted and verified",
                card.all_verified_ms,
                card.all_verified_ms
                    .is_none()
                    .then(|| drill.outcome.clone()),
            ),
            (
                "within the service's RTO",
                card.all_verified_ms,
                (!within_rto).then(|| format!("over the RTO of {} s", card.rto_s)),
            ),
            (
                "every gate passed",
                None,
                (card.gates_passed < card.gates)
                    .then(|| format!("{} of {} gates passed", card.gates_passed, card.gates)),
            ),
            (
                "no escalation",
                None,
                (card.escalations > 0).then(|| format!("{} escalations", card.escalations)),
            ),
        ];
        let failed = cases
            .iter()
            .filter(|(_, _, failure)| failure.is_some())
            .count();
        total += cases.len();
        failures += failed;
        let _ = writeln!(
            suites,
            r#"  <testsuite name="{}" tests="{}" failures="{failed}"{}>"#,
            xml(&format!(
                "{} {} of {} in {}",
                drill.drill_id, drill.version, drill.service, drill.environment
            )),
            cases.len(),
            if drill.started_at_ms == 0 {
                String::new()
            } else {
                format!(r#" timestamp="{}""#, xml(&time(drill.started_at_ms)))
            },
        );
        for (name, ms, failure) in cases {
            let time = ms.map_or(0.0, |ms| ms as f64 / 1000.0);
            let classname = xml(&format!(
                "rewind.drill.{}.{}",
                drill.service, drill.environment
            ));
            match failure {
                None => {
                    let _ = writeln!(
                        suites,
                        r#"    <testcase classname="{classname}" name="{}" time="{time:.3}"/>"#,
                        xml(name)
                    );
                }
                Some(message) => {
                    let _ = writeln!(
                        suites,
                        r#"    <testcase classname="{classname}" name="{}" time="{time:.3}"><failure message="{}"/></testcase>"#,
                        xml(name),
                        xml(&message)
                    );
                }
            }
        }
        suites.push_str("  </testsuite>\n");
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"rewind drills\" tests=\"{total}\" failures=\"{failures}\">\n{suites}</testsuites>"
    )
}

/// Escapes text for an XML attribute; control characters (never valid in XML 1.0) become `?`.
fn xml(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\n' | '\t' => escaped.push(' '),
            other if other.is_control() => escaped.push('?'),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_junit_report_names_each_check_and_escapes_what_hosts_wrote() {
        let drill = pb::RollbackDrill {
            drill_id: "rd-3".into(),
            service: "web".into(),
            environment: "staging".into(),
            version: "v3".into(),
            state: "failed".into(),
            outcome: "not detected: <script>\u{1b}[31m".into(),
            scorecard: Some(pb::DrillScorecard {
                detected: false,
                all_verified_ms: Some(12_000),
                gates_passed: 1,
                gates: 2,
                rto_s: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let report = junit(&[drill]);
        assert!(report.starts_with("<?xml"), "{report}");
        assert!(
            report.contains(r#"<testsuites name="rewind drills" tests="7" failures="3">"#),
            "{report}"
        );
        assert!(report.contains(r#"name="detected by its health policy" time="0.000"><failure message="not detected: &lt;script&gt;?[31m"/>"#), "{report}");
        assert!(report.contains(r#"name="within the service&apos;s RTO" time="12.000"><failure message="over the RTO of 10 s"/>"#), "{report}");
        assert!(
            report.contains(r#"<failure message="1 of 2 gates passed"/>"#),
            "{report}"
        );
        assert!(
            report.contains(r#"name="ended" time="0.000"/>"#),
            "{report}"
        );
        assert!(!report.contains('\u{1b}'));
    }
}
