//! `rewindctl service`: services, their health policies, synthetic checks and recipes.

use std::process::ExitCode;

use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::output::{Format, json, table};

#[derive(Clone, Subcommand)]
pub enum ServiceCommand {
    /// Create or replace a service.
    Set {
        name: String,
        /// A service this one calls (repeat for several).
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// Roll back automatically when more than this share of probes fail...
        #[arg(long, default_value_t = 0.5)]
        max_probe_failure_ratio: f64,
        /// ...for this many seconds...
        #[arg(long, default_value_t = 10)]
        for_s: u32,
        /// ...within this many seconds of a change being deployed.
        #[arg(long, default_value_t = 600)]
        watch_s: u32,
        /// Never roll back automatically.
        #[arg(long)]
        no_auto_rollback: bool,
        /// Another trigger condition (repeatable), over the service's own metrics or probes:
        /// `error_ratio > 0.05 for 30s`, `p99_latency_ms > 2x baseline for 60s`,
        /// `probe_failure_ratio > 0.2 for 10s`.
        #[arg(long = "condition", value_name = "CONDITION", value_parser = parse_condition)]
        conditions: Vec<pb::PolicyCondition>,
        /// A synthetic check a rollback's gate runs after each wave (repeatable), as
        /// `name=N,url=http://...[,method=POST][,body=...][,expect-status=200][,body-contains=TEXT][,max-latency-ms=2000]`.
        #[arg(long = "synthetic", value_name = "CHECK", value_parser = parse_synthetic)]
        synthetics: Vec<pb::SyntheticCheck>,
        /// A step each host goes through in a rollback, in order (repeat for each); none: drain,
        /// restore, restart, verify, undrain. From the agents' catalogue: drain, restore,
        /// restart, reload, verify, undrain, pause-jobs, resume-jobs, purge-cache, scale-up,
        /// check, reconcile, clear-client-caches, and `run:COMMAND ARG=VALUE...` for a command
        /// the agents' allow-list names.
        #[arg(long = "rollback-step", value_name = "STEP")]
        rollback_steps: Vec<String>,
        /// Recovery time objective (`10m`, `1h`): `rollback plan` says whether its estimate
        /// fits, `report sla` measures incidents against it.
        #[arg(long, value_name = "DURATION", value_parser = parse_rto)]
        rto: Option<u64>,
        /// When changes are refused unless break-glass (repeatable; rollbacks never are), in
        /// UTC: `Sat 00:00-06:00 UTC`, `Mon-Fri 09:00-17:00 UTC`,
        /// `2026-12-24 00:00 - 2027-01-02 00:00 UTC`.
        #[arg(long = "freeze", value_name = "WINDOW", value_parser = parse_freeze)]
        freeze_windows: Vec<String>,
        /// What an automatic rollback does with a host changed by hand since rewind put it
        /// there: skip (revert the others, leave it and call a person) or overwrite.
        #[arg(long, value_name = "POLICY", default_value = "skip",
              value_parser = ["skip", "overwrite"])]
        drift_policy: String,
        /// Isolate the service (its failing hosts, within max_unavailable) instead of pausing
        /// again once a rollback's wave of it failed this many times (0: never).
        #[arg(long, value_name = "N", default_value_t = 0)]
        isolate_after_failures: u32,
    },
    /// Registered services, with what they depend on.
    List,
    /// One service's current health figures over the coordinator's window.
    #[command(alias = "health")]
    Show { name: String },
    /// Each host of a service and what changed there since rewind last put it there (from the
    /// agents' periodic drift checks): hotfixes by hand, edits outside rewind. Exit 1 when a
    /// host drifted, 2 when none did but a host could not tell (no report, a failed check).
    Drift {
        name: String,
        /// Only hosts of this environment.
        #[arg(long, default_value = "")]
        env: String,
    },
}

/// `--rto 10m` as whole seconds.
fn parse_rto(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("{text:?} is not a duration like 10m or 1h: {error}"))?;
    match duration.as_secs() {
        0 => Err("an RTO must be at least 1s".into()),
        seconds => Ok(seconds),
    }
}

/// A freeze window, checked here so a typo is named before anything is sent.
fn parse_freeze(text: &str) -> Result<String, String> {
    rewind_shared::freeze::FreezeWindow::parse(text).map(|window| window.text)
}

pub(crate) fn parse_synthetic(text: &str) -> Result<pb::SyntheticCheck, String> {
    let mut check = pb::SyntheticCheck::default();
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} must be key=value"))?;
        let number = |value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}: {value:?} is not a whole number"))
        };
        match key {
            "name" => check.name = value.into(),
            "url" => check.url = value.into(),
            "method" => check.method = value.into(),
            "body" => check.body = value.into(),
            "expect-status" => check.expect_status = number(value)?,
            "body-contains" => check.body_contains = value.into(),
            "max-latency-ms" => check.max_latency_ms = number(value)?,
            other => {
                return Err(format!(
                    "unknown key {other:?}: use name, url, method, body, expect-status, body-contains, max-latency-ms"
                ));
            }
        }
    }
    if check.name.is_empty() || check.url.is_empty() {
        return Err("name= and url= are required".into());
    }
    Ok(check)
}

/// `FIGURE > NUMBER[x baseline] for Ns`.
pub(crate) fn parse_condition(text: &str) -> Result<pb::PolicyCondition, String> {
    let usage = "write FIGURE > LIMIT for Ns, e.g. `error_ratio > 0.05 for 30s` or `p99_latency_ms > 2x baseline for 60s`";
    let (figure, rest) = text
        .split_once('>')
        .ok_or_else(|| format!("{text:?} has no '>': {usage}"))?;
    let figure = pb::HealthFigure::from_short_name(figure.trim()).ok_or_else(|| {
        format!(
            "unknown figure {:?}: use probe_failure_ratio, error_ratio or p99_latency_ms",
            figure.trim()
        )
    })?;
    let (limit, window) = rest
        .split_once(" for ")
        .ok_or_else(|| format!("{text:?} has no `for Ns` window: {usage}"))?;
    let limit = limit.trim();
    let (number, relative_to_baseline) = match limit.strip_suffix("baseline") {
        Some(multiple) => {
            let multiple = multiple.trim_end();
            let number = multiple.strip_suffix('x').ok_or_else(|| {
                format!("{limit:?}: a limit relative to the baseline is written like `2x baseline`")
            })?;
            (number.trim(), true)
        }
        None => (limit, false),
    };
    let threshold: f64 = number
        .parse()
        .ok()
        .filter(|value: &f64| value.is_finite())
        .ok_or_else(|| format!("{number:?} in {text:?} is not a number"))?;
    let window = window.trim();
    let for_s = window
        .strip_suffix('s')
        .and_then(|seconds| seconds.parse::<u32>().ok())
        .filter(|&seconds| seconds > 0)
        .ok_or_else(|| format!("{window:?} must be whole seconds like 30s"))?;
    Ok(pb::PolicyCondition {
        figure: figure.into(),
        threshold,
        relative_to_baseline,
        for_s,
    })
}

pub(crate) async fn service(
    client: &mut client::Client,
    format: Format,
    command: ServiceCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        ServiceCommand::Set {
            name,
            depends_on,
            max_probe_failure_ratio,
            for_s,
            watch_s,
            no_auto_rollback,
            synthetics,
            conditions,
            rollback_steps,
            rto,
            freeze_windows,
            drift_policy,
            isolate_after_failures,
        } => {
            let service = pb::Service {
                name,
                depends_on,
                policy: Some(pb::HealthPolicy {
                    max_probe_failure_ratio,
                    for_s,
                    watch_s,
                    auto_rollback: !no_auto_rollback,
                    conditions,
                }),
                synthetics,
                rollback_steps,
                rto_s: rto.unwrap_or(0),
                freeze_windows,
                drift_policy,
                isolate_after_failures,
            };
            let request = pb::PutServiceRequest {
                request_id: request_id(),
                service: Some(service),
            };
            let response = client
                .put_service(request)
                .await
                .map_err(explain)?
                .into_inner();
            print_services(format, response.service.into_iter().collect())?;
        }
        ServiceCommand::List => {
            let response = client
                .list_services(pb::ListServicesRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            print_services(format, response.services)?;
        }
        ServiceCommand::Drift { name, env } => return drift(client, format, &name, &env).await,
        ServiceCommand::Show { name } => {
            let response = client
                .get_service_health(pb::GetServiceHealthRequest { service: name })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&response)?;
            } else {
                let current = response.current.unwrap_or_default();
                say!(
                    "probe failure ratio {:.3} over {} samples from {} hosts",
                    current.probe_failure_ratio,
                    current.samples,
                    current.hosts_reporting
                );
                if current.requests > 0.0 || current.scrape_failures > 0 {
                    say!(
                        "from its own metrics: error ratio {} over {:.0} requests, p99 latency {}, {} failed scrapes",
                        current
                            .error_ratio
                            .map_or("- (too few requests)".into(), |ratio| format!("{ratio:.3}")),
                        current.requests,
                        current
                            .p99_latency_ms
                            .map_or("-".into(), |ms| format!("{ms:.0} ms")),
                        current.scrape_failures,
                    );
                }
                for error in &response.scrape_errors {
                    say!("metrics scrape failed on {error}");
                }
                let rows = response
                    .latest_probes
                    .iter()
                    .map(|probe| {
                        vec![
                            probe.probe.clone(),
                            probe.ok.to_string(),
                            probe.latency_ms.to_string(),
                            probe.detail.clone(),
                        ]
                    })
                    .collect();
                table(&["PROBE", "OK", "LATENCY MS", "DETAIL"], rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A condition as `--condition` takes it.
pub(crate) fn describe_condition(condition: &pb::PolicyCondition) -> String {
    let figure = condition.figure().short_name();
    let limit = if condition.relative_to_baseline {
        format!("{}x baseline", condition.threshold)
    } else {
        condition.threshold.to_string()
    };
    format!("{figure} > {limit} for {}s", condition.for_s)
}

pub(crate) fn print_services(format: Format, services: Vec<pb::Service>) -> anyhow::Result<()> {
    if format.is_structured() {
        return json(&pb::ListServicesResponse { services });
    }
    let rows = services
        .iter()
        .map(|service| {
            let policy = service.policy.clone().unwrap_or_default();
            let trigger = if policy.auto_rollback {
                let mut conditions = vec![format!(
                    "probe_failure_ratio > {} for {}s",
                    policy.max_probe_failure_ratio, policy.for_s
                )];
                conditions.extend(policy.conditions.iter().map(describe_condition));
                format!(
                    "{} (within {} s of a change)",
                    conditions.join(" or "),
                    policy.watch_s
                )
            } else {
                "manual only".into()
            };
            // What an automatic rollback does with hand-made changes, and when the breaker
            // trips, where not the defaults.
            let mut trigger = trigger;
            if service.drift_policy == "overwrite" {
                trigger += "; overwrites drift";
            }
            if service.isolate_after_failures > 0 {
                trigger += &format!(
                    "; isolates after {} failures of a wave",
                    service.isolate_after_failures
                );
            }
            let steps = if service.rollback_steps.is_empty() {
                "default".to_string()
            } else {
                service.rollback_steps.join(" -> ")
            };
            let rto = match service.rto_s {
                0 => "-".to_string(),
                seconds => {
                    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
                }
            };
            vec![
                service.name.clone(),
                service.depends_on.join(","),
                trigger,
                steps,
                rto,
                service.freeze_windows.join("; "),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "DEPENDS ON",
            "AUTOMATIC ROLLBACK",
            "ROLLBACK STEPS",
            "RTO",
            "FREEZE WINDOWS",
        ],
        rows,
    );
    Ok(())
}

/// `service drift`: every host of the service with its latest reported drift. Exit 1 when a
/// host drifted, else 2 when a host could not tell (no report, or its check failed).
async fn drift(
    client: &mut client::Client,
    format: Format,
    service: &str,
    env: &str,
) -> anyhow::Result<ExitCode> {
    let hosts: Vec<pb::Host> = crate::cmd::fleet::all_hosts(client)
        .await?
        .into_iter()
        .filter(|host| {
            host.services.iter().any(|name| name == service)
                && (env.is_empty() || crate::cmd::fleet::environment_of(host) == env)
        })
        .collect();
    if hosts.is_empty() {
        anyhow::bail!(
            "no host runs service {service:?}{}",
            if env.is_empty() {
                String::new()
            } else {
                format!(" in environment {env:?}")
            }
        );
    }
    let of_service = |host: &pb::Host| -> Option<pb::ServiceDrift> {
        host.last_health
            .as_ref()?
            .drift
            .iter()
            .find(|drift| drift.service == service)
            .cloned()
    };
    if format.is_structured() {
        let found: Vec<serde_json::Value> = hosts
            .iter()
            .map(|host| serde_json::json!({ "host": host.host_id, "drift": of_service(host) }))
            .collect();
        json(&found)?;
    }
    let (mut drifted, mut unknown) = (0, 0);
    for host in &hosts {
        let Some(found) = of_service(host) else {
            unknown += 1;
            if !format.is_structured() {
                say!(
                    "{}: no drift check reported (agent not connected, of an earlier release, or checks off)",
                    host.host_id
                );
            }
            continue;
        };
        let changed = found.changes.len() + found.more as usize;
        drifted += usize::from(changed > 0);
        unknown += usize::from(!found.error.is_empty());
        if format.is_structured() {
            continue;
        }
        let checked = crate::output::time(found.checked_at_ms);
        if !found.error.is_empty() {
            say!(
                "{}: could not check ({checked}): {}",
                host.host_id,
                found.error
            );
        } else if changed == 0 {
            say!(
                "{}: no drift since {} (checked {checked})",
                host.host_id,
                found.against
            );
        } else {
            say!(
                "{}: {} since {}, {} (checked {checked}):",
                host.host_id,
                crate::output::plural(changed, "change"),
                found.against,
                crate::output::time(found.against_at_ms)
            );
            for line in &found.changes {
                say!("  {line}");
            }
            if found.more > 0 {
                say!("  and {} more", found.more);
            }
        }
    }
    Ok(match (drifted, unknown) {
        (0, 0) => ExitCode::SUCCESS,
        (0, _) => ExitCode::from(2),
        _ => ExitCode::from(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::release::parse_requirement;

    #[test]
    fn conditions_parse_back_to_what_was_written_or_say_what_is_wrong() {
        for text in [
            "error_ratio > 0.05 for 30s",
            "p99_latency_ms > 2x baseline for 60s",
            "probe_failure_ratio > 0.2 for 10s",
        ] {
            let condition = parse_condition(text).unwrap();
            assert_eq!(describe_condition(&condition), text);
        }
        let relative = parse_condition("p99_latency_ms>1.5x baseline for 5s").unwrap();
        assert!(relative.relative_to_baseline && relative.threshold == 1.5);
        for (bad, why) in [
            ("error_ratio 0.05 for 30s", "no '>'"),
            ("errors > 0.05 for 30s", "unknown figure \"errors\""),
            ("error_ratio > 0.05", "no `for Ns` window"),
            ("error_ratio > lots for 30s", "\"lots\" in"),
            ("error_ratio > 2 baseline for 30s", "like `2x baseline`"),
            ("error_ratio > 0.05 for 0s", "whole seconds"),
            ("error_ratio > 0.05 for 1m", "whole seconds"),
        ] {
            let error = parse_condition(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn release_requirements_and_synthetic_checks_parse_or_say_what_is_wrong() {
        assert_eq!(parse_requirement("api=3"), Ok(("api".to_string(), 3)));
        assert!(
            parse_requirement("api")
                .unwrap_err()
                .contains("PROVIDER=VERSION")
        );
        assert!(
            parse_requirement("api=x")
                .unwrap_err()
                .contains("not a whole number")
        );

        let check = parse_synthetic(
            "name=checkout,url=http://h/c,method=POST,expect-status=201,body-contains=ok,max-latency-ms=500",
        )
        .unwrap();
        assert_eq!(
            (
                check.name.as_str(),
                check.expect_status,
                check.max_latency_ms
            ),
            ("checkout", 201, 500)
        );
        assert!(
            parse_synthetic("url=http://h")
                .unwrap_err()
                .contains("name= and url=")
        );
        assert!(
            parse_synthetic("name=a,colour=red")
                .unwrap_err()
                .contains("unknown key \"colour\"")
        );
        assert!(
            parse_synthetic("name=a,url")
                .unwrap_err()
                .contains("key=value")
        );
    }
}
