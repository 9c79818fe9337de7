//! Connecting to the coordinator and turning gRPC failures into sentences a person can act on.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rewind_proto::MAX_MESSAGE_BYTES;
use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_shared::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

/// How to reach and authenticate to the coordinator.
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectOptions {
    /// Coordinator address, host:port.
    #[arg(
        long,
        global = true,
        env = "REWIND_COORDINATOR",
        default_value = "127.0.0.1:7443"
    )]
    pub coordinator: String,
    /// Directory holding ca.pem, <identity>.pem and <identity>.key. Defaults to the dev
    /// coordinator's (<tmp>/rewind-dev/tls) when --ca/--cert/--key are not given.
    #[arg(long, global = true, env = "REWIND_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Certificate name to use from --tls-dir.
    #[arg(
        long,
        global = true,
        env = "REWIND_IDENTITY",
        default_value = "operator"
    )]
    pub identity: String,
    #[arg(long, global = true, env = "REWIND_CA", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    #[arg(long, global = true, env = "REWIND_CERT", requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    #[arg(long, global = true, env = "REWIND_KEY", requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// Name the coordinator's certificate must carry.
    #[arg(
        long,
        global = true,
        env = "REWIND_SERVER_NAME",
        default_value = "localhost"
    )]
    pub server_name: String,
}

impl ConnectOptions {
    pub fn tls_files(&self) -> TlsFiles {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => {
                let dir = self
                    .tls_dir
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("rewind-dev").join("tls"));
                TlsFiles::in_dir(&dir, &self.identity)
            }
        }
    }
}

pub type Client = ControlServiceClient<Channel>;

pub async fn connect(options: &ConnectOptions) -> anyhow::Result<Client> {
    let files = options.tls_files();
    let tls = files.client_config(&options.server_name).with_context(|| {
        format!(
            "load the TLS identity ({}, {}, {}); pass --tls-dir or --ca/--cert/--key",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        )
    })?;
    let endpoint = Endpoint::from_shared(format!("https://{}", options.coordinator))
        .with_context(|| format!("--coordinator {:?} is not a host:port", options.coordinator))?
        .tls_config(tls)
        .context("configure TLS")?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| anyhow!("cannot reach the coordinator at {}: {} (is it running? set --coordinator or REWIND_COORDINATOR)", options.coordinator, rewind_shared::errors::error_chain(&error)))?;
    Ok(ControlServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The member answered that another one leads; rewindctl moves there.
#[derive(Debug)]
pub struct LeaderElsewhere {
    pub address: String,
    pub message: String,
}

impl std::fmt::Display for LeaderElsewhere {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for LeaderElsewhere {}

use rewind_shared::LEADER_METADATA_KEY as LEADER_KEY;

/// Turns a status into an error whose text is the coordinator's own explanation.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    if let Some(address) = status
        .metadata()
        .get(LEADER_KEY)
        .and_then(|value| value.to_str().ok())
    {
        return LeaderElsewhere {
            address: address.to_string(),
            message: status.message().to_string(),
        }
        .into();
    }
    match status.code() {
        Code::Unavailable => anyhow!("the coordinator is unavailable: {}", status.message()),
        Code::Unauthenticated => anyhow!("not authenticated: {}", status.message()),
        Code::PermissionDenied => anyhow!("permission denied: {}", status.message()),
        Code::Unknown if status.message().contains("transport") => anyhow!(
            "lost the connection to the coordinator: {}",
            status.message()
        ),
        _ => anyhow!("{}", status.message()),
    }
}

static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static INVOCATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A request id for each mutation of this invocation. When a command is re-run against the
/// leader, [`restart_request_ids`] makes it send the same ids again, so a request the old member
/// did accept is not applied twice.
pub fn request_id() -> String {
    let invocation = INVOCATION.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        format!("ctl-{}-{nanos}", std::process::id())
    });
    let sequence = REQUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{invocation}-{sequence}")
}

pub fn restart_request_ids() {
    REQUEST_IDS.store(0, std::sync::atomic::Ordering::Relaxed);
}
