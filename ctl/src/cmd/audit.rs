//! `rewindctl audit`: the hash-chained audit log: list, verify (the cluster's chain, or an
//! export offline), export.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;
use rewind_shared::audit::{self as chain, ChainCheck, ExportWriter, Manifest, Redaction};
use tokio_stream::StreamExt as _;

use crate::client::{self, explain};
use crate::output::{Format, json, table, time};

#[derive(Clone, Subcommand)]
pub enum AuditCommand {
    /// Audit entries in order, oldest first, a page at a time (`--page-token N` starts at entry
    /// N, numbered from 1).
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
        /// The spelling before 0.3 of `--page-token N`.
        #[arg(long, hide = true, conflicts_with = "page_token")]
        from: Option<u64>,
    },
    /// Recompute the hash chain; exit 0 only if it is intact. With `--file`, verify exports
    /// offline instead (no cluster): each against its manifest (`FILE.manifest.json`), and
    /// several in order as one chain; the first line that does not verify is named.
    Verify {
        /// An export's entries file; repeat for consecutive exports, oldest first.
        #[arg(long = "file", value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The manifest hash the last file's manifest must have: the one the cluster's
        /// `audit.archived` entry names. Without it, a file and a manifest rewritten together
        /// (cut short, say) are told apart only by the exports around them.
        #[arg(long, value_name = "H", requires = "files")]
        manifest_hash: Option<String>,
    },
    /// Confirm that an export is archived outside the cluster (admin): with `[audit]
    /// retain-days` or `retain-entries` set, the cluster may then drop the entries it covers,
    /// and only those. The cluster checks the manifest hash against its own entries.
    Archived {
        /// The export's last index (its manifest's `last_index`).
        #[arg(long, value_name = "ID")]
        through: u64,
        /// The export's manifest hash (`manifest_hash` in FILE.manifest.json).
        #[arg(long, value_name = "H")]
        manifest_hash: String,
        /// Where the archive is kept (required: audited).
        #[arg(long)]
        reason: String,
    },
    /// Erase fields of an audit entry in the cluster (admin; a GDPR erasure). The chain still
    /// verifies. Entries written before cluster version 5 cannot be redacted.
    Redact {
        /// The entry's index.
        index: u64,
        /// What to erase: identity, reason (personal data; what was done, and to what, stay).
        #[arg(long, value_delimiter = ',', required = true)]
        fields: Vec<String>,
        /// The erasure request this answers (required: audited).
        #[arg(long)]
        reason: String,
    },
    /// Write a range of the audit log to FILE (JSON lines) and FILE.manifest.json (the range,
    /// the hashes at both ends, counts). Verify it with `rewindctl audit verify --file FILE`;
    /// continue the series with `--after` the manifest's last index.
    Export {
        /// Where to write the entries; refused if it exists.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Entries after this index (the last of the previous export).
        #[arg(long, value_name = "ID", conflicts_with_all = ["since", "until"])]
        after: Option<u64>,
        /// Entries from this time on: RFC 3339 (2026-12-01T00:00:00Z) or an age (30d, 12h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Entries before this time (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Erase these before the entries leave the cluster: identities, reasons. The chain
        /// still verifies. Entries written before cluster version 5 cannot be redacted.
        #[arg(long, value_delimiter = ',', value_name = "WHAT")]
        redact: Vec<String>,
    },
}

pub(crate) async fn audit(
    client: &mut client::Client,
    format: Format,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::List { page, from } => {
            let page_token = match from {
                Some(index) => index.to_string(),
                None => page.page_token,
            };
            let asked = page_token.parse::<u64>().unwrap_or(1).max(1);
            // The old fields too, for a coordinator before 0.3 (the new ones win on a newer).
            #[allow(deprecated)]
            let request = pb::ListAuditRequest {
                from_index: page_token.parse().unwrap_or(1),
                limit: page.page_size,
                page_size: page.page_size,
                page_token,
            };
            let entries = client
                .list_audit(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&entries)?;
            } else {
                if asked < entries.first_index {
                    say_err!(
                        "entries {asked}..{} were archived and pruned from the cluster: read them \
                         in the archive (rewindctl audit verify --file ARCHIVE ...); listing from {}",
                        entries.first_index - 1,
                        entries.first_index
                    );
                }
                let rows = entries
                    .entries
                    .iter()
                    .map(|entry| {
                        vec![
                            entry.index.to_string(),
                            time(entry.at_ms),
                            entry.identity.clone(),
                            entry.action.clone(),
                            entry.target.clone(),
                            // Salted entries name their reason apart: put it back.
                            chain::AuditEntry::try_from(entry.clone()).map_or_else(
                                |_| entry.outcome.clone(),
                                |entry| entry.readable_outcome(),
                            ),
                        ]
                    })
                    .collect();
                table(
                    &["#", "AT", "IDENTITY", "ACTION", "TARGET", "OUTCOME"],
                    rows,
                );
                crate::commands::next_page("audit list", page.page_size, &entries.next_page_token);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            files,
            manifest_hash,
        } if !files.is_empty() => verify_files(&files, manifest_hash.as_deref(), format),
        AuditCommand::Export {
            out,
            after,
            since,
            until,
            redact,
        } => {
            let now_ms = rewind_shared::time::now_ms();
            let request = pb::ExportAuditRequest {
                after_index: after.unwrap_or(0),
                since_ms: since.as_deref().map_or(Ok(0), |text| when(text, now_ms))?,
                until_ms: until.as_deref().map_or(Ok(0), |text| when(text, now_ms))?,
                redact: redact.clone(),
            };
            for what in &redact {
                Redaction::parse(what).map_err(|why| anyhow::anyhow!("--redact: {why}"))?;
            }
            export(client, format, request, &out, redact).await
        }
        AuditCommand::Archived {
            through,
            manifest_hash,
            reason,
        } => {
            let verification = client
                .confirm_audit_archive(pb::ConfirmAuditArchiveRequest {
                    request_id: client::request_id(),
                    through_index: through,
                    manifest_hash,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&verification)?;
            } else {
                say!(
                    "archived through entry {}; the cluster holds entries {}..{}",
                    verification.archived_through,
                    verification.first_index,
                    verification.first_index + verification.entries.saturating_sub(1)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Redact {
            index,
            fields,
            reason,
        } => {
            let entry = client
                .redact_audit(pb::RedactAuditRequest {
                    request_id: client::request_id(),
                    index,
                    fields,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&entry)?;
            } else {
                let mut erased: Vec<&String> = entry.redacted.keys().collect();
                erased.sort();
                say!(
                    "entry {} now keeps only the salted hash of: {}",
                    entry.index,
                    erased
                        .iter()
                        .map(|name| name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { .. } => {
            let verification = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&verification)?;
            } else if verification.ok {
                say!(
                    "audit chain intact: {} entries, head {}",
                    verification.entries,
                    verification.head_hash
                );
                if verification.first_index > 1 {
                    say!(
                        "entries before {} were archived and dropped; the chain goes on from {} \
                         (the archive's last hash)",
                        verification.first_index,
                        verification.anchor_hash
                    );
                }
                if verification.archived_through > 0 {
                    say!("archived through entry {}", verification.archived_through);
                }
            } else {
                say!(
                    "audit chain BROKEN at entry {}: {}",
                    verification.first_broken_index,
                    verification.detail
                );
            }
            Ok(if verification.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A time from `--since`/`--until`: RFC 3339, or an age before `now_ms` (`30d`, `12h`).
fn when(text: &str, now_ms: u64) -> anyhow::Result<u64> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return Ok(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX));
    }
    let age = humantime::parse_duration(text).map_err(|_| {
        anyhow::anyhow!("{text:?} is neither a time (2026-12-01T00:00:00Z) nor an age (30d, 12h)")
    })?;
    Ok(now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)))
}

/// A file removed when this goes out of scope (it is gone already once put in place).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Syncs `partial` to disk and moves it to `path`, which must not exist: by a hard link, which
/// fails rather than overwrite, or where the file system has none (vfat, many FUSE stores) by
/// a rename after checking `path` is free.
fn put_in_place(partial: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(partial)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("sync {}", partial.display()))?;
    let placed = match std::fs::hard_link(partial, path) {
        Ok(()) => std::fs::remove_file(partial),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
            ) && !path.exists() =>
        {
            std::fs::rename(partial, path)
        }
        Err(error) => Err(error),
    };
    placed.with_context(|| {
        format!(
            "put {} in place (an export never overwrites a file)",
            path.display()
        )
    })
}

/// `FILE.manifest.json` beside `FILE`.
fn manifest_path(entries: &Path) -> PathBuf {
    beside(entries, ".manifest.json")
}

/// `path` with `suffix` added to its name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

async fn export(
    client: &mut client::Client,
    format: Format,
    request: pb::ExportAuditRequest,
    out: &Path,
    redacted: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let manifest_out = manifest_path(out);
    for path in [out, &manifest_out] {
        if path.exists() {
            anyhow::bail!(
                "{} exists: an export never overwrites one (choose another --out)",
                path.display()
            );
        }
    }
    let mut stream = client
        .export_audit(request)
        .await
        .map_err(explain)?
        .into_inner();
    // Written beside the target and linked into place once complete and on disk: a failed
    // export leaves no file that looks whole, and the link fails rather than overwrite.
    let partial = beside(out, ".partial");
    // Removed on any failure below: a rerun must not find it in its way.
    let _cleanup = RemoveOnDrop(partial.clone());
    let manifest_partial = beside(&manifest_out, ".partial");
    let _cleanup_manifest = RemoveOnDrop(manifest_partial.clone());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .with_context(|| {
            format!(
                "create {} (left by an export that did not finish? remove it)",
                partial.display()
            )
        })?;
    let mut writer = ExportWriter::new(std::io::BufWriter::new(file));
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(explain)?;
        for entry in chunk.entries {
            let entry = chain::AuditEntry::try_from(entry).map_err(|why| anyhow::anyhow!(why))?;
            writer
                .write(&entry)
                .with_context(|| format!("write {}", partial.display()))?;
            received += 1;
        }
    }
    let exported = writer
        .finish(redacted, rewind_shared::time::now_ms())
        .with_context(|| format!("write {}", partial.display()))?;
    if received == 0 {
        let _ = std::fs::remove_file(&partial);
        anyhow::bail!("no audit entries in that range: nothing was written");
    }
    let Some(manifest) = exported.manifest else {
        // Kept as received (nothing is thrown away), but with no manifest to vouch for it.
        put_in_place(&partial, out)?;
        say!(
            "audit chain BROKEN in the export: {}; the {received} entries received are in {}, \
             and no manifest was written",
            exported.problem.unwrap_or_default(),
            out.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&manifest_partial)
        .and_then(|mut file| {
            use std::io::Write as _;
            file.write_all(text.as_bytes())
        })
        .with_context(|| format!("write {}", manifest_partial.display()))?;
    // The entries first: a manifest never stands without the file it describes.
    put_in_place(&partial, out)?;
    put_in_place(&manifest_partial, &manifest_out)?;
    if format.is_structured() {
        json(&manifest)?;
    } else {
        say!(
            "exported entries {}..{} ({}) to {}, manifest {}",
            manifest.first_index,
            manifest.last_index,
            manifest.entries,
            out.display(),
            manifest_out.display()
        );
        say!("manifest hash {}", manifest.manifest_hash);
        say!(
            "next: rewindctl audit export --after {} --out NEXT_FILE",
            manifest.last_index
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Verifies exports offline, in order, as one chain.
pub(crate) fn verify_files(
    files: &[PathBuf],
    manifest_hash: Option<&str>,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let mut chain: Option<ChainCheck> = None;
    let mut results = Vec::new();
    for (position, file) in files.iter().enumerate() {
        let manifest_file = manifest_path(file);
        let manifest = read_manifest(&manifest_file)?;
        let entries =
            std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
        let chain = chain.get_or_insert_with(|| {
            ChainCheck::continuing(manifest.first_index, &manifest.anchor_hash)
        });
        let last = position + 1 == files.len();
        let outcome = match manifest_hash {
            Some(expected) if last && !expected.eq_ignore_ascii_case(&manifest.manifest_hash) => {
                Err(chain::ExportProblem {
                    line: 0,
                    why: format!(
                        "its manifest hash is {}, not {expected}: it is not the export the \
                         cluster confirmed",
                        manifest.manifest_hash
                    ),
                })
            }
            _ => chain::verify_export(std::io::BufReader::new(entries), &manifest, chain),
        };
        let ok = outcome.is_ok();
        results.push(serde_json::json!({
            "file": file.display().to_string(),
            "ok": ok,
            "first_index": manifest.first_index,
            "last_index": manifest.last_index,
            "problem": outcome.as_ref().err().map(ToString::to_string),
        }));
        match outcome {
            Ok(()) if !format.is_structured() => say!(
                "{}: entries {}..{} intact, last hash {}",
                file.display(),
                manifest.first_index,
                manifest.last_index,
                manifest.last_hash
            ),
            Ok(()) => {}
            Err(problem) => {
                if format.is_structured() {
                    json(&results)?;
                } else {
                    say!("{}: BROKEN: {problem}", file.display());
                }
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    if format.is_structured() {
        json(&results)?;
    } else if files.len() > 1 {
        say!("{} exports chain into each other", files.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "open {} (an export is verified against the manifest written beside it)",
            path.display()
        )
    })?;
    let mut text = String::new();
    file.take(chain::MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("read {}", path.display()))?;
    if text.len() as u64 > chain::MAX_MANIFEST_BYTES {
        anyhow::bail!(
            "{} is larger than {} bytes: not a manifest",
            path.display(),
            chain::MAX_MANIFEST_BYTES
        );
    }
    serde_json::from_str(&text).with_context(|| format!("{} is not a manifest", path.display()))
}
