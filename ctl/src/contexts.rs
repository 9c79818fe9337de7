//! Named clusters, as kubeconfig's contexts and etcdctl's endpoints: `rewindctl config
//! set-context prod --coordinator rewind-1.internal:7443 --tls-dir ~/.rewind/prod`, then
//! `rewindctl config use-context prod` (or `--context prod` on one command), and nobody types
//! the connection flags again.
//!
//! Contexts live in one TOML file: `$REWIND_CONTEXTS_FILE`, else
//! `$XDG_CONFIG_HOME/rewind/contexts.toml`, else `~/.config/rewind/contexts.toml`, written whole
//! and owner-only. A flag or environment variable given on the command line wins over the
//! context; the context wins over the built-in defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::client::ConnectOptions;
use crate::output::{Format, table};

/// Largest contexts file read.
const MAX_CONTEXTS_FILE_BYTES: u64 = 1 << 20;
/// Most contexts one file may hold.
const MAX_CONTEXTS: usize = 256;

#[derive(Clone, Subcommand)]
pub enum ConfigCommand {
    /// Creates or updates a context from the connection flags given with it
    /// (`--coordinator`, `--tls-dir`, `--identity`, `--ca`/`--cert`/`--key`, `--server-name`);
    /// a flag not given keeps the context's value.
    SetContext {
        name: String,
        /// Make it the current context too.
        #[arg(long = "use")]
        use_it: bool,
    },
    /// Makes a context the one every command uses (unless `--context` says otherwise).
    UseContext { name: String },
    /// The current context's name.
    CurrentContext,
    /// Every context, the current one marked.
    GetContexts,
    /// Removes a context.
    DeleteContext { name: String },
}

/// One cluster and how to reach it: each field as its connection flag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// The contexts file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Contexts {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub current_context: String,
    #[serde(rename = "context")]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the contexts file is.
pub fn file() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("REWIND_CONTEXTS_FILE") {
        return Ok(PathBuf::from(path));
    }
    // An empty or relative XDG_CONFIG_HOME is to be ignored (the XDG base directory spec).
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|home| home.is_absolute())
                .map(|home| home.join(".config"))
        })
        .ok_or_else(|| anyhow!("neither REWIND_CONTEXTS_FILE, XDG_CONFIG_HOME nor HOME is set"))?;
    Ok(config_home.join("rewind").join("contexts.toml"))
}

impl Contexts {
    /// The file's contexts; none when it does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::io::Read as _;
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
        };
        let mut text = String::new();
        file.take(MAX_CONTEXTS_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("read {}", path.display()))?;
        if text.len() as u64 > MAX_CONTEXTS_FILE_BYTES {
            bail!(
                "{} is larger than {MAX_CONTEXTS_FILE_BYTES} bytes",
                path.display()
            );
        }
        let contexts: Self = toml::from_str(&text)
            .with_context(|| format!("{} is not a contexts file", path.display()))?;
        contexts
            .check()
            .with_context(|| path.display().to_string())?;
        Ok(contexts)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.contexts.len() > MAX_CONTEXTS {
            bail!("{} contexts, at most {MAX_CONTEXTS}", self.contexts.len());
        }
        for name in self.contexts.keys() {
            rewind_shared::names::validate_name("context", name)?;
        }
        if !self.current_context.is_empty() && !self.contexts.contains_key(&self.current_context) {
            bail!(
                "current-context {:?} names no context",
                self.current_context
            );
        }
        Ok(())
    }

    /// Writes the file whole (a partial file is renamed into place), readable by its owner only.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        self.check()?;
        // Only a file is replaced: never a device or a directory named by mistake. A link
        // (a dotfile manager's) is followed, and its target replaced.
        let resolved = std::fs::canonicalize(path).ok();
        let path = resolved.as_deref().unwrap_or(path);
        if let Ok(metadata) = std::fs::metadata(path)
            && !metadata.is_file()
        {
            bail!("{} is not a regular file: not replacing it", path.display());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let text = toml::to_string(self).context("encode the contexts")?;
        let partial = path.with_extension("partial");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("write {}", partial.display()))?;
        // A leftover partial file keeps its mode: set it, not only on create.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("write {}", partial.display()))?;
        std::fs::rename(&partial, path).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }
}

/// Which connection flags the command line (or the environment) set: those a context must not
/// override, and those `set-context` records.
#[derive(Clone, Copy, Debug, Default)]
pub struct Given {
    pub coordinator: bool,
    pub tls_dir: bool,
    pub identity: bool,
    pub ca: bool,
    pub cert: bool,
    pub key: bool,
    pub server_name: bool,
}

impl Given {
    /// What the command line or the environment set: a context fills in only the rest.
    pub fn from_matches(matches: &clap::ArgMatches) -> Self {
        Self::from(matches, true)
    }

    /// What the command line itself set: what `set-context` records (an exported
    /// `REWIND_TLS_DIR` must not change a context by accident).
    pub fn typed(matches: &clap::ArgMatches) -> Self {
        Self::from(matches, false)
    }

    fn from(matches: &clap::ArgMatches, with_environment: bool) -> Self {
        use clap::parser::ValueSource;
        let given = |id: &str| match matches.value_source(id) {
            Some(ValueSource::CommandLine) => true,
            Some(ValueSource::EnvVariable) => with_environment,
            _ => false,
        };
        Self {
            coordinator: given("coordinator"),
            tls_dir: given("tls_dir"),
            identity: given("identity"),
            ca: given("ca"),
            cert: given("cert"),
            key: given("key"),
            server_name: given("server_name"),
        }
    }
}

/// `options` with the context's values where the command line gave none: the named one, else
/// the current one, else none.
pub fn apply(
    options: &mut ConnectOptions,
    given: Given,
    named: Option<&str>,
) -> anyhow::Result<()> {
    // Without a home (a service manager's environment), there are no contexts to apply.
    let path = match file() {
        Ok(path) => path,
        Err(_) if named.is_none() => return Ok(()),
        Err(error) => return Err(error),
    };
    let contexts = Contexts::load(&path)?;
    let name = match named {
        Some(name) => name,
        None if contexts.current_context.is_empty() => return Ok(()),
        None => contexts.current_context.as_str(),
    };
    let context = contexts.contexts.get(name).ok_or_else(|| {
        anyhow!(
            "no context {name:?} in {} (rewindctl config get-contexts lists them)",
            path.display()
        )
    })?;
    fill_in(options, given, context);
    Ok(())
}

/// `options` with `context`'s values where the command line gave none.
fn fill_in(options: &mut ConnectOptions, given: Given, context: &Context) {
    if let Some(value) = context.coordinator.as_ref().filter(|_| !given.coordinator) {
        options.coordinator = value.clone();
    }
    if let Some(value) = context.identity.as_ref().filter(|_| !given.identity) {
        options.identity = value.clone();
    }
    if let Some(value) = context.server_name.as_ref().filter(|_| !given.server_name) {
        options.server_name = value.clone();
    }
    // Certificates come one way or the other: a directory, or three files. The command
    // line's way, if it names either, wins whole over the context's.
    let files_given = given.ca || given.cert || given.key;
    if !given.tls_dir && !files_given {
        if context.tls_dir.is_some() {
            options.tls_dir = context.tls_dir.clone();
        }
        if context.ca.is_some() {
            options.ca = context.ca.clone();
            options.cert = context.cert.clone();
            options.key = context.key.clone();
        }
    }
}

/// Runs a `config` command: it touches the contexts file only, never a cluster.
pub fn run(
    command: ConfigCommand,
    options: &ConnectOptions,
    given: Given,
    format: Format,
) -> anyhow::Result<()> {
    let path = file()?;
    let mut contexts = Contexts::load(&path)?;
    match command {
        ConfigCommand::SetContext { name, use_it } => {
            rewind_shared::names::validate_name("context", &name)?;
            let context = contexts.contexts.entry(name.clone()).or_default();
            let absolute = |path: &PathBuf| std::path::absolute(path).unwrap_or(path.clone());
            if given.coordinator {
                context.coordinator = Some(options.coordinator.clone());
            }
            // One way of naming certificates replaces the other.
            if given.tls_dir {
                context.tls_dir = options.tls_dir.as_ref().map(absolute);
                (context.ca, context.cert, context.key) = (None, None, None);
            }
            if given.identity {
                context.identity = Some(options.identity.clone());
            }
            if given.server_name {
                context.server_name = Some(options.server_name.clone());
            }
            if given.ca || given.cert || given.key {
                context.ca = options.ca.as_ref().map(absolute);
                context.cert = options.cert.as_ref().map(absolute);
                context.key = options.key.as_ref().map(absolute);
                context.tls_dir = None;
            }
            if use_it {
                contexts.current_context = name.clone();
            }
            contexts.save(&path)?;
            say!("context {name} saved in {}", path.display());
        }
        ConfigCommand::UseContext { name } => {
            if !contexts.contexts.contains_key(&name) {
                bail!(
                    "no context {name:?} in {} (rewindctl config get-contexts lists them)",
                    path.display()
                );
            }
            contexts.current_context = name.clone();
            contexts.save(&path)?;
            say!("using context {name}");
        }
        ConfigCommand::CurrentContext => {
            if contexts.current_context.is_empty() {
                bail!("no current context (rewindctl config use-context NAME)");
            }
            say!("{}", contexts.current_context);
        }
        ConfigCommand::GetContexts => {
            if format.is_structured() {
                return crate::output::structured(&contexts);
            }
            let rows = contexts
                .contexts
                .iter()
                .map(|(name, context)| {
                    let shown = |value: Option<String>| value.unwrap_or_else(|| "-".into());
                    vec![
                        if *name == contexts.current_context {
                            "*"
                        } else {
                            ""
                        }
                        .to_string(),
                        name.clone(),
                        shown(context.coordinator.clone()),
                        shown(context.identity.clone()),
                        shown(
                            context
                                .tls_dir
                                .as_ref()
                                .or(context.cert.as_ref())
                                .map(|path| path.display().to_string()),
                        ),
                    ]
                })
                .collect();
            table(
                &["CURRENT", "NAME", "COORDINATOR", "IDENTITY", "CERTIFICATES"],
                rows,
            );
        }
        ConfigCommand::DeleteContext { name } => {
            if contexts.contexts.remove(&name).is_none() {
                bail!("no context {name:?} in {}", path.display());
            }
            if contexts.current_context == name {
                contexts.current_context.clear();
            }
            contexts.save(&path)?;
            say!("context {name} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_wins_over_the_context_and_certificates_come_one_way() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            connect: ConnectOptions,
        }
        let context = Context {
            coordinator: Some("rewind.internal:7443".into()),
            ca: Some("/ctx/ca.pem".into()),
            cert: Some("/ctx/me.pem".into()),
            key: Some("/ctx/me.key".into()),
            ..Context::default()
        };
        let with = |args: &[&str]| {
            let matches = <Cli as clap::CommandFactory>::command()
                .try_get_matches_from(std::iter::once("rewindctl").chain(args.iter().copied()))
                .unwrap();
            let mut options =
                Cli::try_parse_from(std::iter::once("rewindctl").chain(args.iter().copied()))
                    .unwrap()
                    .connect;
            fill_in(&mut options, Given::from_matches(&matches), &context);
            options
        };
        let defaults = with(&[]);
        assert_eq!(defaults.coordinator, "rewind.internal:7443");
        assert_eq!(defaults.cert, Some(PathBuf::from("/ctx/me.pem")));
        let flagged = with(&["--coordinator", "10.0.0.9:7443", "--tls-dir", "/mine"]);
        assert_eq!(flagged.coordinator, "10.0.0.9:7443");
        assert_eq!(flagged.tls_dir, Some(PathBuf::from("/mine")));
        // The context's three files would otherwise win over the directory given.
        assert_eq!((flagged.ca, flagged.cert, flagged.key), (None, None, None));
    }

    #[test]
    fn a_contexts_file_round_trips_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contexts.toml");
        assert_eq!(Contexts::load(&path).unwrap(), Contexts::default());
        let mut contexts = Contexts::default();
        contexts.contexts.insert(
            "prod".into(),
            Context {
                coordinator: Some("rewind-1.internal:7443".into()),
                identity: Some("alice".into()),
                ..Context::default()
            },
        );
        contexts.current_context = "prod".into();
        contexts.save(&path).unwrap();
        assert_eq!(Contexts::load(&path).unwrap(), contexts);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        for (text, expected) in [
            ("current-context = \"nope\"\n", "names no context"),
            ("[context.prod]\ncoordinatr = \"x\"\n", "unknown field"),
            ("[context.\"bad name!\"]\n", "context"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = format!("{:#}", Contexts::load(&path).unwrap_err());
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
