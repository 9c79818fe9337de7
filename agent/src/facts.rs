//! Facts about a service that a snapshot records but a restore does not put back: its systemd
//! unit's state, the versions of named packages, and the image of its container. They show what
//! else differed at capture time (`snapshot diff`), so an engineer sees that a rollback of files
//! and link left, say, a package upgrade in place.
//!
//! Each fact comes from a short command (`systemctl`, `dpkg-query` or `rpm`, `docker inspect`)
//! bounded by a timeout; a tool that is missing or fails is recorded as such, never as an error
//! of the capture.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ServiceConfig;

/// Longest a fact's command may take.
const FACT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most output read from a fact's command.
const MAX_OUTPUT: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFacts {
    /// `systemctl is-active` and `is-enabled` of the service's unit, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitFacts>,
    /// Package -> installed version (or why there is none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, String>,
    /// The image id the service's container runs, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    /// The latest applied migration of its database, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// The flags file's flags (`name=on|off`, sorted), when one is configured. Recorded, not
    /// restored: flags belong to the coordinator, which turns a change's flags back itself and
    /// must never see a restore undo a later kill switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitFacts {
    pub name: String,
    pub active: String,
    pub enabled: String,
}

/// Runs `argv` with a timeout; its first line of output when it exits 0, else why not.
fn first_line(argv: &[&str]) -> Result<String, String> {
    let shown = argv.join(" ");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("{}: {error}", argv[0]))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|error| error.to_string())? {
            break status;
        }
        if started.elapsed() > FACT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{shown}: no answer within {FACT_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut output = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_OUTPUT as u64).read_to_end(&mut output);
    }
    let line = String::from_utf8_lossy(&output)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if status.success() {
        Ok(line)
    } else if line.is_empty() {
        Err(format!("{shown}: {status}"))
    } else {
        // systemctl answers `inactive` or `disabled` with a non-zero status: still the fact.
        Err(line)
    }
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Reads every fact the service's config asks for.
pub fn collect(service: &ServiceConfig) -> ServiceFacts {
    let either = |result: Result<String, String>| result.unwrap_or_else(|why| why);
    let unit = service.unit.as_ref().map(|name| UnitFacts {
        name: name.clone(),
        active: either(first_line(&["systemctl", "is-active", name])),
        enabled: either(first_line(&["systemctl", "is-enabled", name])),
    });
    let mut packages = BTreeMap::new();
    if !service.packages.is_empty() {
        let (dpkg, rpm) = (
            installed("dpkg-query"),
            !installed("dpkg-query") && installed("rpm"),
        );
        for package in &service.packages {
            let version = if dpkg {
                first_line(&["dpkg-query", "-W", "-f=${Version}\n", package])
                    .map_err(|_| "not installed".to_string())
            } else if rpm {
                first_line(&["rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}\n", package])
                    .map_err(|_| "not installed".to_string())
            } else {
                Err("no dpkg-query or rpm on this host".to_string())
            };
            packages.insert(package.clone(), either(version));
        }
    }
    let container_image = service.container.as_ref().map(|name| {
        either(
            first_line(&["docker", "inspect", "--format", "{{.Image}}", name])
                .map_err(|why| format!("no container {name}: {why}")),
        )
    });
    let schema_version = service.database.as_ref().map(crate::schema::schema_version);
    let flags = service
        .flags_file
        .as_ref()
        .map(|relative| read_flags(service, relative));
    ServiceFacts {
        unit,
        packages,
        container_image,
        schema_version,
        flags,
    }
}

/// The flags file as `a=on, b=off`, or why it could not be read.
fn read_flags(service: &ServiceConfig, relative: &str) -> String {
    let read = || -> Result<String, String> {
        let Some((bytes, _)) = crate::paths::ServiceRoot::open(service)
            .and_then(|root| root.read_regular(relative, crate::paths::MAX_SERVICE_FILE_BYTES))
            .map_err(|error| error.to_string())?
        else {
            return Ok("no flags file".to_string());
        };
        let flags: BTreeMap<String, bool> = serde_json::from_slice(&bytes)
            .map_err(|error| format!("not a JSON object of booleans: {error}"))?;
        Ok(flags
            .iter()
            .map(|(name, on)| format!("{name}={}", if *on { "on" } else { "off" }))
            .collect::<Vec<_>>()
            .join(", "))
    };
    let text = read().unwrap_or_else(|why| why);
    rewind_shared::names::truncate(&text, MAX_OUTPUT).to_string()
}

/// What differs between two sets of facts, one line each.
pub fn diff(before: &ServiceFacts, after: &ServiceFacts) -> Vec<String> {
    let mut lines = Vec::new();
    if before.unit != after.unit {
        let show = |unit: &Option<UnitFacts>| {
            unit.as_ref().map_or("no unit".to_string(), |unit| {
                format!("{} {}, {}", unit.name, unit.active, unit.enabled)
            })
        };
        lines.push(format!(
            "unit: {} -> {}",
            show(&before.unit),
            show(&after.unit)
        ));
    }
    let names: std::collections::BTreeSet<&String> = before
        .packages
        .keys()
        .chain(after.packages.keys())
        .collect();
    for name in names {
        let (was, now) = (before.packages.get(name), after.packages.get(name));
        if was != now {
            lines.push(format!(
                "package {name}: {} -> {}",
                was.map_or("not recorded", String::as_str),
                now.map_or("not recorded", String::as_str)
            ));
        }
    }
    if before.flags != after.flags {
        lines.push(format!(
            "flags: {} -> {}",
            before.flags.as_deref().unwrap_or("none"),
            after.flags.as_deref().unwrap_or("none")
        ));
    }
    if before.schema_version != after.schema_version {
        lines.push(format!(
            "schema version: {} -> {}",
            before.schema_version.as_deref().unwrap_or("none"),
            after.schema_version.as_deref().unwrap_or("none")
        ));
    }
    if before.container_image != after.container_image {
        lines.push(format!(
            "container image: {} -> {}",
            before.container_image.as_deref().unwrap_or("none"),
            after.container_image.as_deref().unwrap_or("none")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> ServiceConfig {
        ServiceConfig {
            restart_timeout: Duration::from_secs(1),
            ..ServiceConfig::bare("web", std::path::Path::new("/srv/web"))
        }
    }

    #[test]
    fn facts_come_from_the_hosts_tools_and_missing_things_are_said_not_fatal() {
        let mut service = service();
        service.packages = vec!["dpkg".into(), "no-such-package-rewind".into()];
        service.unit = Some("no-such-unit-rewind.service".into());
        assert!(
            installed("dpkg-query"),
            "dpkg-query is needed (the package facts come from it): apt-get install dpkg"
        );
        let facts = collect(&service);
        let dpkg = &facts.packages["dpkg"];
        assert!(
            dpkg.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{dpkg}"
        );
        assert_eq!(facts.packages["no-such-package-rewind"], "not installed");
        let unit = facts.unit.as_ref().unwrap();
        assert!(
            !unit.active.is_empty() && unit.active != "active",
            "{unit:?}"
        );
        assert!(facts.container_image.is_none());
    }

    #[test]
    fn a_diff_names_each_fact_that_changed() {
        let mut before = ServiceFacts::default();
        before.packages.insert("nginx".into(), "1.22.1-9".into());
        let mut after = before.clone();
        after.packages.insert("nginx".into(), "1.24.0-1".into());
        after.container_image = Some("sha256:abc".into());
        assert_eq!(
            diff(&before, &after),
            vec![
                "package nginx: 1.22.1-9 -> 1.24.0-1".to_string(),
                "container image: none -> sha256:abc".to_string()
            ]
        );
        assert!(diff(&before, &before).is_empty());
    }

    #[test]
    fn a_command_that_hangs_is_cut_off() {
        let error = first_line(&["sleep", "30"]).unwrap_err();
        assert!(error.contains("sleep 30: no answer within 5s"), "{error}");
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;

    #[test]
    fn the_flags_file_is_recorded_as_a_fact_and_its_changes_diffed() {
        let root = tempfile::tempdir().unwrap();
        let service = ServiceConfig {
            flags_file: Some("flags.json".into()),
            ..ServiceConfig::bare("web", root.path())
        };
        assert_eq!(collect(&service).flags.as_deref(), Some("no flags file"));
        std::fs::write(
            root.path().join("flags.json"),
            r#"{"new-ui": true, "beta": false}"#,
        )
        .unwrap();
        let before = collect(&service);
        assert_eq!(before.flags.as_deref(), Some("beta=off, new-ui=on"));
        std::fs::write(root.path().join("flags.json"), r#"{"new-ui": false}"#).unwrap();
        let after = collect(&service);
        assert_eq!(
            diff(&before, &after),
            ["flags: beta=off, new-ui=on -> new-ui=off"]
        );
        std::fs::write(root.path().join("flags.json"), "not json").unwrap();
        assert!(
            collect(&service)
                .flags
                .unwrap()
                .starts_with("not a JSON object of booleans")
        );
    }
}
