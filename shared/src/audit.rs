//! The audit chain's entries: how each is hashed, how a run of them is verified, how a field is
//! redacted, and the manifest an export carries. Shared so that `rewindctl audit verify --file`
//! checks an export with no cluster, by the same code the cluster verifies itself with.
//!
//! Each entry's hash covers the previous entry's hash, so changing, removing, inserting or
//! reordering any entry breaks the chain at that entry. Two formats:
//! - **plain** (cluster versions 1-4): the hash covers the fields as they are.
//! - **salted** (from cluster version 5): the hash covers a commitment to each text field,
//!   `sha256(salt, field name, value)`, with a random salt kept beside the field. Redacting a
//!   field replaces its value and salt by that commitment, so the chain still verifies and proves
//!   nothing else changed, and a short value (a name) cannot be guessed from what is left: the
//!   salt is gone with it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead as _;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Fields hashed as they are (cluster versions 1-4); never written out, it is the default.
pub const FORMAT_PLAIN: u32 = 1;
/// Each text field committed to through its own salt: redactable.
pub const FORMAT_SALTED: u32 = 2;

/// Bytes of each field's salt: enough that no value can be found from its commitment by trying
/// every candidate.
const SALT_BYTES: usize = 16;

/// The text fields of an entry, each committed to separately in the salted format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Identity,
    Action,
    Target,
    Outcome,
    Reason,
}

impl Field {
    pub const ALL: [Field; 5] = [
        Field::Identity,
        Field::Action,
        Field::Target,
        Field::Outcome,
        Field::Reason,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::Identity => "identity",
            Field::Action => "action",
            Field::Target => "target",
            Field::Outcome => "outcome",
            Field::Reason => "reason",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// What `--redact` names: a class of personal data, and the fields it erases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redaction {
    /// Who acted: the entry's identity.
    Identities,
    /// Why: the free-text reason an operator gave.
    Reasons,
}

impl Redaction {
    pub const NAMES: &'static str = "identities, reasons";

    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "identities" | "identity" => Ok(Self::Identities),
            "reasons" | "reason" => Ok(Self::Reasons),
            other => Err(format!(
                "{:?} is not something that can be redacted (one of: {})",
                crate::names::truncate(other, 64),
                Self::NAMES
            )),
        }
    }

    pub fn field(self) -> Field {
        match self {
            Self::Identities => Field::Identity,
            Self::Reasons => Field::Reason,
        }
    }
}

fn is_plain(format: &u32) -> bool {
    *format == FORMAT_PLAIN
}

fn plain() -> u32 {
    FORMAT_PLAIN
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1-based position in the chain.
    pub index: u64,
    pub at_ms: u64,
    pub identity: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
    #[serde(default = "plain", skip_serializing_if = "is_plain")]
    pub format: u32,
    /// Why, as the operator gave it (salted entries; a plain entry has it inside `outcome`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Salted entries: each field's salt (hex), beside its field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub salts: BTreeMap<Field, String>,
    /// Fields erased after the fact: their commitment, in place of the value and its salt.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redacted: BTreeMap<Field, String>,
}

/// Where a salted entry's outcome named its reason.
pub const REASON_MARK: &str = "{reason}";
/// Where a salted entry's outcome named its identity.
pub const IDENTITY_MARK: &str = "{identity}";

/// The outcome text a salted entry stores: where it gives `: <reason>` the reason, and wherever
/// the identity stands as a whole word the identity, replaced by their marks, so that each lives
/// only in its own (redactable) field. Braces of the text itself are doubled, so a mark is only
/// ever one put here. [`AuditEntry::readable_outcome`] puts it all back.
pub fn outcome_template(outcome: &str, identity: &str, reason: &str) -> String {
    let escape = |text: &str| text.replace('{', "{{").replace('}', "}}");
    let mut template = escape(outcome);
    // Every outcome gives the reason once, after a colon, and then ends or goes on after `;`,
    // `)`, `:` or ` (`: the first such occurrence is it (another may be text that matches).
    if !reason.is_empty() {
        let given = format!(": {}", escape(reason));
        let ends_there = |after: &str| {
            after.is_empty() || after.starts_with([';', ')', ':']) || after.starts_with(" (")
        };
        let found = template
            .match_indices(&given)
            .map(|(at, _)| at)
            .find(|&at| ends_there(&template[at + given.len()..]));
        if let Some(at) = found {
            template.replace_range(at..at + given.len(), &format!(": {REASON_MARK}"));
        }
    }
    if !identity.is_empty() {
        template = replace_word(&template, &escape(identity), IDENTITY_MARK);
    }
    template
}

/// `text` with every occurrence of `word` that is not part of a longer name replaced (a name
/// goes on through letters, digits and `:_-.@`; a `:` or `.` that ends a sentence does not).
fn replace_word(text: &str, word: &str, by: &str) -> String {
    let in_name = |c: char| c.is_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '@');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        out.push_str(&rest[..at]);
        let after = &rest[at + word.len()..];
        let mut next = after.chars();
        let continues = match (next.next(), next.next()) {
            (Some(':' | '.'), following) => following.is_some_and(char::is_alphanumeric),
            (Some(c), _) => in_name(c),
            (None, _) => false,
        };
        if out.chars().last().is_some_and(in_name) || continues {
            out.push_str(word);
        } else {
            out.push_str(by);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// An entry's content before it is linked into the chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record<'a> {
    pub at_ms: u64,
    pub identity: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub reason: &'a str,
}

impl AuditEntry {
    /// A plain-format entry (cluster versions 1-4), linked to `prev_hash`. It has no reason
    /// of its own (its hash would not cover one): `record.reason` is left out.
    pub fn plain(index: u64, prev_hash: &str, record: &Record<'_>) -> Self {
        let mut entry = Self::unlinked(index, prev_hash, record, FORMAT_PLAIN);
        entry.reason.clear();
        entry.hash = entry.compute_hash();
        entry
    }

    /// A salted entry whose salts are derived from `seed`, the random bytes the proposer of the
    /// command chose before it was replicated (so every member derives the same ones).
    pub fn salted(index: u64, prev_hash: &str, record: &Record<'_>, seed: &[u8]) -> Self {
        let mut entry = Self::unlinked(index, prev_hash, record, FORMAT_SALTED);
        entry.salts = Field::ALL
            .into_iter()
            .map(|field| (field, derive_salt(seed, index, field)))
            .collect();
        entry.hash = entry.compute_hash();
        entry
    }

    fn unlinked(index: u64, prev_hash: &str, record: &Record<'_>, format: u32) -> Self {
        Self {
            index,
            at_ms: record.at_ms,
            identity: record.identity.to_string(),
            action: record.action.to_string(),
            target: record.target.to_string(),
            outcome: record.outcome.to_string(),
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
            format,
            reason: record.reason.to_string(),
            salts: BTreeMap::new(),
            redacted: BTreeMap::new(),
        }
    }

    /// The outcome as a person reads it: in a salted entry the outcome names the entry's
    /// reason and identity by [`REASON_MARK`] and [`IDENTITY_MARK`] (so that redacting them
    /// leaves no copy behind), filled in here, or shown as redacted.
    pub fn readable_outcome(&self) -> String {
        if self.format == FORMAT_PLAIN {
            return self.outcome.clone();
        }
        let value = |field: Field| {
            if self.redacted.contains_key(&field) {
                "[redacted]"
            } else {
                self.value(field)
            }
        };
        let mut out = String::with_capacity(self.outcome.len());
        let mut rest = self.outcome.as_str();
        while let Some(at) = rest.find(['{', '}']) {
            out.push_str(&rest[..at]);
            rest = &rest[at..];
            let (text, length) = if rest.starts_with("{{") {
                ("{", 2)
            } else if rest.starts_with("}}") {
                ("}", 2)
            } else if rest.starts_with(REASON_MARK) {
                (value(Field::Reason), REASON_MARK.len())
            } else if rest.starts_with(IDENTITY_MARK) {
                (value(Field::Identity), IDENTITY_MARK.len())
            } else {
                (&rest[..1], 1)
            };
            out.push_str(text);
            rest = &rest[length..];
        }
        out.push_str(rest);
        out
    }

    pub fn value(&self, field: Field) -> &str {
        match field {
            Field::Identity => &self.identity,
            Field::Action => &self.action,
            Field::Target => &self.target,
            Field::Outcome => &self.outcome,
            Field::Reason => &self.reason,
        }
    }

    fn value_mut(&mut self, field: Field) -> &mut String {
        match field {
            Field::Identity => &mut self.identity,
            Field::Action => &mut self.action,
            Field::Target => &mut self.target,
            Field::Outcome => &mut self.outcome,
            Field::Reason => &mut self.reason,
        }
    }

    /// What the entry's hash covers for `field` in the salted format: the kept commitment of a
    /// redacted field, else one computed from the value and its salt.
    fn commitment(&self, field: Field) -> String {
        if let Some(kept) = self.redacted.get(&field) {
            return kept.clone();
        }
        let salt = self.salts.get(&field).map_or("", String::as_str);
        let mut hasher = Sha256::new();
        for part in [salt, field.name(), self.value(field)] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        hex::encode(hasher.finalize())
    }

    /// The hash this entry's content and link call for.
    pub fn compute_hash(&self) -> String {
        let mut hasher = Sha256::new();
        // Length-prefixed parts: no two different entries can produce the same byte stream.
        let mut update = |part: &str| {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        };
        if self.format == FORMAT_PLAIN {
            for part in [
                self.prev_hash.as_str(),
                &self.index.to_string(),
                &self.at_ms.to_string(),
                &self.identity,
                &self.action,
                &self.target,
                &self.outcome,
            ] {
                update(part);
            }
        } else {
            update("rewind.audit.2");
            update(&self.prev_hash);
            update(&self.index.to_string());
            update(&self.at_ms.to_string());
            for field in Field::ALL {
                update(&self.commitment(field));
            }
        }
        hex::encode(hasher.finalize())
    }

    /// Checks that nothing in the entry escapes its hash: a plain entry has no reason, salts or
    /// redactions (its hash covers none); in a salted one every field has exactly one of a
    /// salt or a commitment, and a redacted field no value left.
    fn check_shape(&self) -> Result<(), String> {
        let index = self.index;
        let hex = |text: &str, length: usize| {
            text.len() == length && text.bytes().all(|byte| byte.is_ascii_hexdigit())
        };
        if self.format == FORMAT_PLAIN {
            if !self.reason.is_empty() || !self.salts.is_empty() || !self.redacted.is_empty() {
                return Err(format!(
                    "entry {index} is plain, yet carries a reason, salts or redactions its hash \
                     does not cover: it was altered"
                ));
            }
            return Ok(());
        }
        for field in Field::ALL {
            let shaped = match (self.salts.get(&field), self.redacted.get(&field)) {
                (Some(salt), None) => hex(salt, 2 * SALT_BYTES),
                (None, Some(commitment)) => hex(commitment, 64) && self.value(field).is_empty(),
                _ => false,
            };
            if !shaped {
                return Err(format!(
                    "entry {index}'s {field} has not exactly one salt or one redaction, or is \
                     redacted yet holds a value: it was altered"
                ));
            }
        }
        Ok(())
    }

    /// Erases `field`: its value and salt give way to their commitment, and the hash is
    /// unchanged. A plain entry cannot be redacted without breaking the chain: refused.
    pub fn redact(&mut self, field: Field) -> Result<(), String> {
        if self.format == FORMAT_PLAIN {
            return Err(format!(
                "entry {} was written before cluster version 5 (plain format): its {field} \
                 cannot be redacted without breaking the chain",
                self.index
            ));
        }
        if self.redacted.contains_key(&field) {
            return Ok(());
        }
        let commitment = self.commitment(field);
        self.redacted.insert(field, commitment);
        self.salts.remove(&field);
        self.value_mut(field).clear();
        Ok(())
    }
}

/// A field's salt: HMAC-SHA256 of the entry's index and field name under the proposer's seed,
/// cut to [`SALT_BYTES`]. One-way, so erasing one field's salt leaves it unguessable from the
/// others.
fn derive_salt(seed: &[u8], index: u64, field: Field) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(seed).expect("HMAC takes a key of any length");
    mac.update(&index.to_be_bytes());
    mac.update(field.name().as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..SALT_BYTES])
}

/// Checks a run of consecutive entries, one at a time, from a known anchor: the genesis hash
/// for a chain from the start, the hash an export or a pruned cluster continues from otherwise.
#[derive(Clone, Debug)]
pub struct ChainCheck {
    expected_index: u64,
    expected_prev: String,
    checked: u64,
}

impl ChainCheck {
    /// A chain from its first entry.
    pub fn from_genesis() -> Self {
        Self::continuing(1, GENESIS_HASH)
    }

    /// A chain whose first entry is `first_index` and links to `anchor_hash`.
    pub fn continuing(first_index: u64, anchor_hash: &str) -> Self {
        Self {
            expected_index: first_index,
            expected_prev: anchor_hash.to_string(),
            checked: 0,
        }
    }

    /// Checks the next entry; the error says what is wrong with it.
    pub fn next(&mut self, entry: &AuditEntry) -> Result<(), String> {
        let expected = self.expected_index;
        if entry.index != expected {
            return Err(format!(
                "holds entry {} where entry {expected} belongs: an entry was removed, inserted \
                 or moved here",
                entry.index
            ));
        }
        if entry.format != FORMAT_PLAIN && entry.format != FORMAT_SALTED {
            return Err(format!(
                "entry {expected} is in format {}, which this release does not know",
                entry.format
            ));
        }
        entry.check_shape()?;
        if entry.prev_hash != self.expected_prev {
            return Err(format!(
                "entry {expected} does not link to the hash of the entry before it: that entry \
                 was altered and rehashed, or one was removed or inserted here"
            ));
        }
        if entry.hash != entry.compute_hash() {
            return Err(format!(
                "entry {expected} ({}) does not match its hash: it was altered",
                entry.action
            ));
        }
        self.expected_index += 1;
        self.expected_prev = entry.hash.clone();
        self.checked += 1;
        Ok(())
    }

    /// The hash of the last entry checked (the anchor while none was).
    pub fn head_hash(&self) -> &str {
        &self.expected_prev
    }

    /// The index the next entry must have.
    pub fn next_index(&self) -> u64 {
        self.expected_index
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }
}

/// What an export says about itself, written beside its entries: enough to verify it alone
/// (nothing cut off at either end) and to chain it to the exports before and after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// This manifest's layout.
    pub manifest_format: u32,
    pub first_index: u64,
    pub last_index: u64,
    pub entries: u64,
    /// The hash the first entry links to: the genesis hash, or the previous export's
    /// `last_hash`.
    pub anchor_hash: String,
    /// The last entry's hash: where the next export continues from.
    pub last_hash: String,
    pub first_at_ms: u64,
    pub last_at_ms: u64,
    /// What was redacted (`identities`, `reasons`), and in how many entries.
    #[serde(default)]
    pub redacted: Vec<String>,
    #[serde(default)]
    pub redacted_entries: u64,
    /// sha256 (hex) of the entries file's bytes.
    pub entries_sha256: String,
    pub exported_at_ms: u64,
    /// The chain digest that `rewindctl audit archived --manifest-hash` confirms: it names
    /// the range and both ends of the chain, so the cluster can check it against its own
    /// entries whatever was redacted.
    pub manifest_hash: String,
}

pub const MANIFEST_FORMAT: u32 = 1;

/// The digest a manifest is confirmed by: the range and the hashes at both its ends.
pub fn manifest_hash(
    first_index: u64,
    last_index: u64,
    anchor_hash: &str,
    last_hash: &str,
) -> String {
    let mut hasher = Sha256::new();
    for part in [
        "rewind.audit.manifest.1",
        &first_index.to_string(),
        &last_index.to_string(),
        anchor_hash,
        last_hash,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

impl From<&AuditEntry> for rewind_proto::v1::AuditEntry {
    fn from(entry: &AuditEntry) -> Self {
        let by_name = |map: &BTreeMap<Field, String>| {
            map.iter()
                .map(|(field, text)| (field.name().to_string(), text.clone()))
                .collect()
        };
        Self {
            index: entry.index,
            at_ms: entry.at_ms,
            identity: entry.identity.clone(),
            action: entry.action.clone(),
            target: entry.target.clone(),
            outcome: entry.outcome.clone(),
            prev_hash: entry.prev_hash.clone(),
            hash: entry.hash.clone(),
            format: entry.format,
            reason: entry.reason.clone(),
            salts: by_name(&entry.salts),
            redacted: by_name(&entry.redacted),
        }
    }
}

impl TryFrom<rewind_proto::v1::AuditEntry> for AuditEntry {
    type Error = String;

    /// An entry as the cluster sent it; an unknown field name is an error (it would not
    /// verify).
    fn try_from(entry: rewind_proto::v1::AuditEntry) -> Result<Self, String> {
        let index = entry.index;
        let by_field = |map: std::collections::HashMap<String, String>| {
            map.into_iter()
                .map(|(name, text)| {
                    Field::parse(&name)
                        .map(|field| (field, text))
                        .ok_or_else(|| format!("entry {index} names an unknown field {name:?}"))
                })
                .collect::<Result<BTreeMap<_, _>, String>>()
        };
        Ok(Self {
            index,
            at_ms: entry.at_ms,
            identity: entry.identity,
            action: entry.action,
            target: entry.target,
            outcome: entry.outcome,
            prev_hash: entry.prev_hash,
            hash: entry.hash,
            // Coordinators before 0.3 do not send a format: theirs are all plain.
            format: entry.format.max(FORMAT_PLAIN),
            reason: entry.reason,
            salts: by_field(entry.salts)?,
            redacted: by_field(entry.redacted)?,
        })
    }
}

/// Longest line an export may hold, its newline included: an entry travels in one gRPC message
/// (4 MiB at most), so a longer line is not one. The writer refuses to write a longer one.
pub const MAX_EXPORT_LINE_BYTES: usize = 4 << 20;
/// Largest manifest file read.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// Where an export fails to verify: the line of the entries file (from 1), or 0 for the file
/// as a whole and its manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportProblem {
    pub line: u64,
    pub why: String,
}

impl fmt::Display for ExportProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => formatter.write_str(&self.why),
            line => write!(formatter, "line {line}: {}", self.why),
        }
    }
}

impl Manifest {
    /// Checks the manifest agrees with itself: its counts, and the hash it is confirmed by.
    pub fn check(&self) -> Result<(), String> {
        if self.manifest_format != MANIFEST_FORMAT {
            return Err(format!(
                "the manifest is in format {}, which this release does not know",
                self.manifest_format
            ));
        }
        let holds = self
            .first_index
            .checked_add(self.entries)
            .zip(self.last_index.checked_add(1));
        if self.first_index == 0 || self.entries == 0 || holds.is_none_or(|(a, b)| a != b) {
            return Err(format!(
                "the manifest's range {}..={} does not hold its {} entries",
                self.first_index, self.last_index, self.entries
            ));
        }
        let expected = manifest_hash(
            self.first_index,
            self.last_index,
            &self.anchor_hash,
            &self.last_hash,
        );
        if self.manifest_hash != expected {
            return Err("the manifest's hash does not match its range and chain ends: the manifest was altered"
                .into());
        }
        Ok(())
    }
}

/// Writes an export's entries as JSON lines, checking the chain as they pass, and makes the
/// manifest that describes them. A break in the chain does not stop the writing (the export
/// keeps what the cluster sent); it is reported by [`ExportWriter::finish`].
pub struct ExportWriter<W: std::io::Write> {
    out: W,
    file_hash: Sha256,
    chain: Option<ChainCheck>,
    first: Option<(u64, String, u64)>,
    last_at_ms: u64,
    redacted_entries: u64,
    problem: Option<String>,
}

/// A finished export: its manifest, and the first break in the chain it holds, if any.
pub struct Exported {
    pub manifest: Option<Manifest>,
    pub problem: Option<String>,
}

impl<W: std::io::Write> ExportWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            file_hash: Sha256::new(),
            chain: None,
            first: None,
            last_at_ms: 0,
            redacted_entries: 0,
            problem: None,
        }
    }

    pub fn write(&mut self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if line.len() > MAX_EXPORT_LINE_BYTES {
            return Err(std::io::Error::other(format!(
                "entry {} is {} bytes as a line, more than an export may hold \
                 ({MAX_EXPORT_LINE_BYTES})",
                entry.index,
                line.len()
            )));
        }
        self.out.write_all(&line)?;
        self.file_hash.update(&line);
        let chain = self
            .chain
            .get_or_insert_with(|| ChainCheck::continuing(entry.index, &entry.prev_hash));
        if let Err(why) = chain.next(entry) {
            self.problem.get_or_insert(why);
        }
        self.first
            .get_or_insert_with(|| (entry.index, entry.prev_hash.clone(), entry.at_ms));
        self.last_at_ms = entry.at_ms;
        self.redacted_entries += u64::from(!entry.redacted.is_empty());
        Ok(())
    }

    /// Flushes the entries; the manifest is `None` when nothing was written.
    pub fn finish(
        mut self,
        redacted: Vec<String>,
        exported_at_ms: u64,
    ) -> std::io::Result<Exported> {
        self.out.flush()?;
        let (Some((first_index, anchor_hash, first_at_ms)), Some(chain)) = (self.first, self.chain)
        else {
            return Ok(Exported {
                manifest: None,
                problem: None,
            });
        };
        let last_index = chain.next_index() - 1;
        let last_hash = chain.head_hash().to_string();
        let manifest = Manifest {
            manifest_format: MANIFEST_FORMAT,
            first_index,
            last_index,
            entries: last_index + 1 - first_index,
            manifest_hash: manifest_hash(first_index, last_index, &anchor_hash, &last_hash),
            anchor_hash,
            last_hash,
            first_at_ms,
            last_at_ms: self.last_at_ms,
            redacted,
            redacted_entries: self.redacted_entries,
            entries_sha256: hex::encode(self.file_hash.finalize()),
            exported_at_ms,
        };
        Ok(Exported {
            manifest: self.problem.is_none().then_some(manifest),
            problem: self.problem,
        })
    }
}

/// Verifies an export's entries (JSON lines) against its manifest, continuing `chain`: started
/// at the manifest's anchor for a lone export, or left where the previous export of a series
/// ended. Names the first line that does not verify.
pub fn verify_export(
    mut entries: impl std::io::BufRead,
    manifest: &Manifest,
    chain: &mut ChainCheck,
) -> Result<(), ExportProblem> {
    let whole = |why: String| ExportProblem { line: 0, why };
    manifest.check().map_err(whole)?;
    if chain.next_index() != manifest.first_index || chain.head_hash() != manifest.anchor_hash {
        return Err(whole(format!(
            "the export starts at entry {} from hash {}, which does not continue the chain before it (entry {} from hash {}): an export is missing or out of order",
            manifest.first_index,
            manifest.anchor_hash,
            chain.next_index(),
            chain.head_hash()
        )));
    }
    let mut file_hash = Sha256::new();
    let mut line = Vec::new();
    let mut number = 0u64;
    let mut redacted_entries = 0u64;
    let mut at_ms: (Option<u64>, u64) = (None, 0);
    loop {
        line.clear();
        let read = std::io::Read::take(&mut entries, MAX_EXPORT_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|error| whole(format!("read the entries: {error}")))?;
        if read == 0 {
            break;
        }
        number += 1;
        let at = |why: String| ExportProblem { line: number, why };
        if line.len() > MAX_EXPORT_LINE_BYTES {
            return Err(at(format!(
                "longer than {MAX_EXPORT_LINE_BYTES} bytes: not an audit entry"
            )));
        }
        file_hash.update(&line);
        let entry: AuditEntry = serde_json::from_slice(&line)
            .map_err(|error| at(format!("not an audit entry: {error}")))?;
        // Written exactly as rewind writes an entry: no key its hash does not cover, nothing
        // reformatted.
        let mut canonical = serde_json::to_vec(&entry).map_err(|error| at(error.to_string()))?;
        canonical.push(b'\n');
        if canonical != line {
            return Err(at(
                "not written as rewind writes an entry (a key its hash does not cover, or \
                 reformatted): it was altered"
                    .into(),
            ));
        }
        chain.next(&entry).map_err(at)?;
        redacted_entries += u64::from(!entry.redacted.is_empty());
        at_ms = (at_ms.0.or(Some(entry.at_ms)), entry.at_ms);
    }
    let checked_to = chain.next_index() - 1;
    if checked_to != manifest.last_index || chain.head_hash() != manifest.last_hash {
        return Err(ExportProblem {
            line: number + 1,
            why: format!(
                "the file ends after entry {checked_to}, and the manifest says it runs to entry {}: entries were removed from its end",
                manifest.last_index
            ),
        });
    }
    if redacted_entries != manifest.redacted_entries
        || at_ms != (Some(manifest.first_at_ms), manifest.last_at_ms)
    {
        return Err(whole(
            "the manifest's redaction count or times are not those of its entries: it was \
             altered"
                .into(),
        ));
    }
    let file_hash = hex::encode(file_hash.finalize());
    if file_hash != manifest.entries_sha256 {
        return Err(whole(format!(
            "every entry verifies, but the file's bytes (sha256 {file_hash}) are not those exported ({}): it was rewritten",
            manifest.entries_sha256
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u64) -> Record<'static> {
        Record {
            at_ms: 1_000 + index,
            identity: "user:ada",
            action: "change.start",
            target: "ch-1",
            outcome: "ok",
            reason: "INC-42 bad deploy",
        }
    }

    /// Five entries, the first two plain (as written before version 5), the rest salted.
    fn chain() -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = Vec::new();
        for index in 1..=5 {
            let prev = entries
                .last()
                .map_or(GENESIS_HASH, |last| last.hash.as_str());
            let entry = if index <= 2 {
                AuditEntry::plain(index, prev, &record(index))
            } else {
                AuditEntry::salted(index, prev, &record(index), &[index as u8; 32])
            };
            entries.push(entry);
        }
        entries
    }

    fn first_broken(entries: &[AuditEntry]) -> Option<(usize, String)> {
        let mut check = ChainCheck::from_genesis();
        entries
            .iter()
            .enumerate()
            .find_map(|(position, entry)| check.next(entry).err().map(|why| (position, why)))
    }

    #[test]
    fn a_chain_of_both_formats_verifies_and_survives_a_json_round_trip() {
        let entries = chain();
        assert_eq!(first_broken(&entries), None);
        let lines: Vec<String> = entries
            .iter()
            .map(|entry| serde_json::to_string(entry).unwrap())
            .collect();
        // A plain entry is written as it always was: no new keys.
        assert!(
            !lines[0].contains("format") && !lines[0].contains("salts"),
            "{}",
            lines[0]
        );
        assert!(lines[3].contains("\"format\":2"), "{}", lines[3]);
        let read: Vec<AuditEntry> = lines
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(read, entries);
    }

    #[test]
    fn tampering_with_any_field_of_either_format_is_found_at_that_entry() {
        let tamperings: [fn(&mut AuditEntry); 7] = [
            |entry| entry.identity = "user:mallory".into(),
            |entry| entry.outcome = "rejected".into(),
            |entry| entry.at_ms += 1,
            |entry| entry.target.push('x'),
            |entry| entry.action = "rollback.abort".into(),
            |entry| entry.reason = "nothing to see".into(),
            |entry| entry.format = FORMAT_SALTED + FORMAT_PLAIN - entry.format,
        ];
        for position in 0..5 {
            for (which, tamper) in tamperings.iter().enumerate() {
                let mut entries = chain();
                tamper(&mut entries[position]);
                let found = first_broken(&entries).map(|(at, _)| at);
                assert_eq!(found, Some(position), "tampering {which} at {position}");
            }
        }
    }

    #[test]
    fn removed_inserted_reordered_and_rehashed_entries_are_found() {
        let mut removed = chain();
        removed.remove(2);
        let (at, why) = first_broken(&removed).unwrap();
        assert_eq!(at, 2);
        assert!(why.contains("entry 4 where entry 3 belongs"), "{why}");

        let mut swapped = chain();
        swapped.swap(1, 3);
        assert_eq!(first_broken(&swapped).unwrap().0, 1);

        let mut inserted = chain();
        let copy = inserted[2].clone();
        inserted.insert(3, copy);
        assert_eq!(first_broken(&inserted).unwrap().0, 3);

        // Rehashing a forged entry does not help: the next entry's link breaks.
        let mut forged = chain();
        forged[3].outcome = "forged".into();
        forged[3].hash = forged[3].compute_hash();
        let (at, why) = first_broken(&forged).unwrap();
        assert_eq!(at, 4);
        assert!(why.contains("does not link"), "{why}");
    }

    #[test]
    fn a_redacted_salted_entry_still_verifies_and_keeps_nothing_of_the_value() {
        let mut entries = chain();
        let hash = entries[3].hash.clone();
        entries[3].redact(Field::Identity).unwrap();
        entries[3].redact(Field::Reason).unwrap();
        entries[3].redact(Field::Reason).unwrap(); // twice is once
        assert_eq!(entries[3].hash, hash);
        assert_eq!(first_broken(&entries), None);
        let line = serde_json::to_string(&entries[3]).unwrap();
        assert!(!line.contains("ada") && !line.contains("INC-42"), "{line}");
        assert!(!entries[3].salts.contains_key(&Field::Identity));
        // The redacted commitment is still bound: changing it breaks the entry.
        entries[3].redacted.insert(Field::Identity, "00".repeat(32));
        assert_eq!(first_broken(&entries).unwrap().0, 3);

        // A value moved back beside its commitment, as a forger would: the entry's shape
        // gives it away, though the hash still matches.
        let mut forged = chain();
        let commitment = forged[2].commitment(Field::Identity);
        forged[2].salts.remove(&Field::Identity);
        forged[2].redacted.insert(Field::Identity, commitment);
        forged[2].identity = "user:mallory".into();
        assert_eq!(forged[2].compute_hash(), forged[2].hash);
        let (at, why) = first_broken(&forged).unwrap();
        assert!(at == 2 && why.contains("identity"), "{why}");
        // A reason slipped into a plain entry, which does not commit to one.
        let mut slipped = chain();
        slipped[0].reason = "made up later".into();
        assert_eq!(first_broken(&slipped).unwrap().0, 0);

        // A plain entry refuses: its hash covers the value itself.
        let error = chain()[0].redact(Field::Identity).unwrap_err();
        assert!(
            error.contains("entry 1") && error.contains("cluster version 5"),
            "{error}"
        );
    }

    #[test]
    fn a_salted_outcome_keeps_its_reason_and_identity_only_in_their_fields() {
        let template = outcome_template(
            "denied by user:ada: INC-42 bad deploy",
            "user:ada",
            "INC-42 bad deploy",
        );
        assert_eq!(template, "denied by {identity}: {reason}");
        // Only the reason where it is given, the identity as a whole name, braces kept.
        let cases = [
            (
                "ok: web on web-1: web",
                "user:ada",
                "web",
                "ok: web on web-1: {reason}",
            ),
            (
                "user:adam {x}: ada",
                "user:ada",
                "ada",
                "user:adam {{x}}: {reason}",
            ),
            (
                "by user:ada, {reason}",
                "user:ada",
                "",
                "by {identity}, {{reason}}",
            ),
        ];
        for (outcome, identity, reason, expected) in cases {
            let template = outcome_template(outcome, identity, reason);
            assert_eq!(template, expected);
            let record = Record {
                outcome: &template,
                identity,
                reason,
                ..record(1)
            };
            let entry = AuditEntry::salted(1, GENESIS_HASH, &record, &[1; 32]);
            assert_eq!(entry.readable_outcome(), outcome);
        }
        let record = Record {
            outcome: &template,
            ..record(3)
        };
        let mut entry = AuditEntry::salted(3, GENESIS_HASH, &record, &[1; 32]);
        assert_eq!(
            entry.readable_outcome(),
            "denied by user:ada: INC-42 bad deploy"
        );
        entry.redact(Field::Reason).unwrap();
        assert_eq!(entry.readable_outcome(), "denied by user:ada: [redacted]");
        // A plain entry's outcome is what it always was, marks or not.
        let plain = AuditEntry::plain(1, GENESIS_HASH, &record);
        assert_eq!(plain.readable_outcome(), template);
    }

    #[test]
    fn salts_differ_per_field_and_entry_and_follow_only_from_the_seed() {
        let entries = chain();
        let salts: std::collections::BTreeSet<&String> = entries[2..]
            .iter()
            .flat_map(|entry| entry.salts.values())
            .collect();
        assert_eq!(salts.len(), 15);
        let again = AuditEntry::salted(3, &entries[1].hash, &record(3), &[3; 32]);
        assert_eq!(again, entries[2]);
    }

    #[test]
    fn entries_cross_the_wire_unchanged() {
        let mut entries = chain();
        entries[4].redact(Field::Reason).unwrap();
        for entry in entries {
            let wire = rewind_proto::v1::AuditEntry::from(&entry);
            assert_eq!(AuditEntry::try_from(wire).unwrap(), entry);
        }
    }

    fn export(entries: &[AuditEntry]) -> (Vec<u8>, Manifest) {
        let mut writer = ExportWriter::new(Vec::new());
        for entry in entries {
            writer.write(entry).unwrap();
        }
        let mut bytes = Vec::new();
        std::mem::swap(&mut bytes, &mut writer.out);
        let exported = writer.finish(vec![], 7).unwrap();
        assert_eq!(exported.problem, None);
        (bytes, exported.manifest.unwrap())
    }

    fn verify_alone(bytes: &[u8], manifest: &Manifest) -> Result<(), ExportProblem> {
        let mut chain = ChainCheck::continuing(manifest.first_index, &manifest.anchor_hash);
        verify_export(bytes, manifest, &mut chain)
    }

    fn edit_lines(bytes: &[u8], edit: impl FnOnce(&mut Vec<String>)) -> Vec<u8> {
        let mut lines: Vec<String> = String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        edit(&mut lines);
        lines
            .iter()
            .map(|line| format!("{line}\n"))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn an_export_verifies_alone_and_names_the_first_bad_line() {
        let (bytes, manifest) = export(&chain());
        assert_eq!(
            (manifest.first_index, manifest.last_index, manifest.entries),
            (1, 5, 5)
        );
        assert_eq!(manifest.anchor_hash, GENESIS_HASH);
        verify_alone(&bytes, &manifest).unwrap();

        let changed = edit_lines(&bytes, |lines| lines[2] = lines[2].replace("ada", "eve"));
        assert_eq!(verify_alone(&changed, &manifest).unwrap_err().line, 3);
        let removed = edit_lines(&bytes, |lines| drop(lines.remove(1)));
        assert_eq!(verify_alone(&removed, &manifest).unwrap_err().line, 2);
        let reordered = edit_lines(&bytes, |lines| lines.swap(3, 4));
        assert_eq!(verify_alone(&reordered, &manifest).unwrap_err().line, 4);
        let inserted = edit_lines(&bytes, |lines| {
            let copy = lines[0].clone();
            lines.insert(2, copy)
        });
        assert_eq!(verify_alone(&inserted, &manifest).unwrap_err().line, 3);
        let garbage = edit_lines(&bytes, |lines| lines[1] = "{not json".into());
        let problem = verify_alone(&garbage, &manifest).unwrap_err();
        assert_eq!(problem.line, 2);
        assert!(
            problem
                .to_string()
                .starts_with("line 2: not an audit entry"),
            "{problem}"
        );
        // The last lines cut off: every line left verifies, the manifest finds the cut.
        let cut = edit_lines(&bytes, |lines| lines.truncate(3));
        let problem = verify_alone(&cut, &manifest).unwrap_err();
        assert_eq!(problem.line, 4);
        assert!(problem.why.contains("removed from its end"), "{problem}");
        // The same entries written differently, or with a key their hash does not cover.
        let respaced = edit_lines(&bytes, |lines| lines[0] = lines[0].replace(",", ", "));
        let problem = verify_alone(&respaced, &manifest).unwrap_err();
        assert!(
            problem.line == 1 && problem.why.contains("not written as"),
            "{problem}"
        );
        let extra = edit_lines(&bytes, |lines| {
            lines[3] = lines[3].replacen('{', "{\"note\":1,", 1)
        });
        assert_eq!(verify_alone(&extra, &manifest).unwrap_err().line, 4);
        // A manifest whose counts or times differ from its entries.
        let mut recounted = manifest.clone();
        recounted.redacted_entries += 1;
        let problem = verify_alone(&bytes, &recounted).unwrap_err();
        assert!(
            problem.why.contains("redaction count or times"),
            "{problem}"
        );
        // A manifest moved to cover less does not match its hash.
        let mut shorter = manifest.clone();
        shorter.last_index = 4;
        shorter.entries = 4;
        let problem = verify_alone(&bytes, &shorter).unwrap_err();
        assert!(problem.why.contains("manifest was altered"), "{problem}");
    }

    #[test]
    fn consecutive_exports_chain_and_a_missing_one_is_found() {
        let mut entries = chain();
        entries[3].redact(Field::Identity).unwrap();
        let parts = [
            export(&entries[..2]),
            export(&entries[2..4]),
            export(&entries[4..]),
        ];
        let mut chain = ChainCheck::from_genesis();
        for (bytes, manifest) in &parts {
            verify_export(&bytes[..], manifest, &mut chain).unwrap();
        }
        assert_eq!(parts[1].1.redacted_entries, 1);
        assert_eq!(chain.head_hash(), entries[4].hash);

        let mut chain = ChainCheck::from_genesis();
        verify_export(&parts[0].0[..], &parts[0].1, &mut chain).unwrap();
        let problem = verify_export(&parts[2].0[..], &parts[2].1, &mut chain).unwrap_err();
        assert!(problem.why.contains("an export is missing"), "{problem}");
    }

    #[test]
    fn a_run_checked_from_an_anchor_continues_the_chain() {
        let entries = chain();
        let mut check = ChainCheck::continuing(3, &entries[1].hash);
        for entry in &entries[2..] {
            check.next(entry).unwrap();
        }
        assert_eq!(check.head_hash(), entries[4].hash);
        assert_eq!(check.checked(), 3);
        let mut wrong_anchor = ChainCheck::continuing(3, GENESIS_HASH);
        assert!(wrong_anchor.next(&entries[2]).is_err());
    }
}
