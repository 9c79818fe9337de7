//! `rewindctl release`: releases, their digests and what they require.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{self, explain, request_id};
use crate::output::{Format, json, table, time};

#[derive(Clone, Subcommand)]
pub enum ReleaseCommand {
    /// Register a release; give its digest, or a directory to compute it from.
    Register {
        service: String,
        version: String,
        #[arg(
            long,
            required_unless_present = "from_dir",
            conflicts_with = "from_dir"
        )]
        digest: Option<String>,
        /// Compute the digest of this release directory.
        #[arg(long)]
        from_dir: Option<PathBuf>,
        #[arg(long, default_value = "")]
        commit: String,
        /// API (or message schema) version this release provides.
        #[arg(long, default_value_t = 0)]
        api_version: u32,
        /// PROVIDER=VERSION: the lowest API version of a provider this release needs; repeatable.
        #[arg(long = "requires", value_name = "PROVIDER=VERSION", value_parser = parse_requirement)]
        requires: Vec<(String, u32)>,
        /// TOPIC=VERSION: the message schema version this release writes to a topic;
        /// repeatable. A rollback that leaves a consumer reading less is refused.
        #[arg(long = "produces", value_name = "TOPIC=VERSION", value_parser = parse_topic)]
        produces: Vec<(String, u32)>,
        /// TOPIC=VERSION: the newest message schema version this release reads from a topic;
        /// repeatable.
        #[arg(long = "consumes", value_name = "TOPIC=VERSION", value_parser = parse_topic)]
        consumes: Vec<(String, u32)>,
    },
    /// Registered releases, by service.
    List {
        #[arg(long, default_value = "")]
        service: String,
    },
}

pub(crate) fn parse_requirement(text: &str) -> Result<(String, u32), String> {
    name_and_number(text, "PROVIDER=VERSION, like api=3")
}

fn parse_topic(text: &str) -> Result<(String, u32), String> {
    name_and_number(text, "TOPIC=VERSION, like orders.created=2")
}

/// `NAME=NUMBER`, as `shape` describes it.
fn name_and_number(text: &str, shape: &str) -> Result<(String, u32), String> {
    let (name, number) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} must be {shape}"))?;
    let number = number
        .parse()
        .map_err(|_| format!("{number:?} in {text:?} is not a whole number"))?;
    Ok((name.to_string(), number))
}

pub(crate) async fn release(
    client: &mut client::Client,
    format: Format,
    command: ReleaseCommand,
) -> anyhow::Result<ExitCode> {
    let releases = match command {
        ReleaseCommand::Register {
            service,
            version,
            digest,
            from_dir,
            commit,
            api_version,
            requires,
            produces,
            consumes,
        } => {
            let artifact_digest = match (digest, from_dir) {
                (Some(digest), _) => digest,
                (None, Some(dir)) => rewind_shared::digest::tree_digest(&dir)
                    .with_context(|| format!("compute the digest of {}", dir.display()))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let release = pb::Release {
                service,
                version,
                artifact_digest,
                commit,
                registered_at_ms: 0,
                api_version,
                requires: requires.into_iter().collect(),
                produces: produces.into_iter().collect(),
                consumes: consumes.into_iter().collect(),
            };
            let request = pb::RegisterReleaseRequest {
                request_id: request_id(),
                release: Some(release),
            };
            client
                .register_release(request)
                .await
                .map_err(explain)?
                .into_inner()
                .release
                .into_iter()
                .collect()
        }
        ReleaseCommand::List { service } => {
            client
                .list_releases(pb::ListReleasesRequest { service })
                .await
                .map_err(explain)?
                .into_inner()
                .releases
        }
    };
    if format.is_structured() {
        json(&pb::ListReleasesResponse { releases })?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = releases
        .iter()
        .map(|release| {
            vec![
                release.service.clone(),
                release.version.clone(),
                release.artifact_digest.clone(),
                release.commit.clone(),
                time(release.registered_at_ms),
            ]
        })
        .collect();
    table(
        &["SERVICE", "VERSION", "DIGEST", "COMMIT", "REGISTERED"],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}
