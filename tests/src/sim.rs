//! Simulated agents for benchmarks: real gRPC sessions over real mutual TLS, each with its own
//! certificate, that register, report healthy probes, answer every step at once without doing
//! anything, and note when each flag update arrives. They measure rewind, not the hosts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_proto::v1::agent_service_client::AgentServiceClient;
use rewind_proto::v1::{self as pb, agent_message, coordinator_message};
use rewind_shared::dev_ca::DevCa;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

/// When a simulated agent received each flag update: (host, flag, enabled, at).
pub type FlagLog = Arc<Mutex<Vec<(String, String, bool, Instant)>>>;

/// Steps the simulated agents received, and of those, how many a second time (a step is sent
/// again only when its result was not recorded within the step timeout).
pub static STEPS_RECEIVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub static STEPS_RECEIVED_AGAIN: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

pub struct SimAgent {
    pub host_id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimAgent {
    /// Connects `host_id` (its certificate written into `tls_dir` from `ca`) to `address` from
    /// the loopback address `from` (one per simulated host, as real hosts each have theirs: the
    /// coordinator bounds handshakes per address), running `service` in `region`, reporting
    /// every `report_every`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        ca: &DevCa,
        tls_dir: &Path,
        address: &str,
        host_id: &str,
        from: std::net::IpAddr,
        service: &str,
        region: &str,
        report_every: Duration,
        flags: FlagLog,
    ) -> Result<Self, String> {
        let files = ca
            .write_identity(
                tls_dir,
                &rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::Agent, host_id),
                &[],
            )
            .map_err(|error| error.to_string())?;
        let tls = files
            .client_config("localhost")
            .map_err(|error| error.to_string())?;
        let channel = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|error| error.to_string())?
            .tls_config(tls)
            .map_err(|error| error.to_string())?
            .local_address(Some(from))
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|error| format!("{host_id}: {error:?}"))?;
        let (outbound, receiver) = mpsc::channel::<pb::AgentMessage>(256);
        let message = |body| pb::AgentMessage { body: Some(body) };
        outbound
            .send(message(agent_message::Body::Register(pb::Register {
                host_id: host_id.to_string(),
                labels: Some(pb::HostLabels {
                    region: region.to_string(),
                    zone: String::new(),
                    environment: "bench".into(),
                }),
                services: vec![service.to_string()],
                agent_version: "sim".into(),
            })))
            .await
            .map_err(|error| error.to_string())?;
        let mut inbound = AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(|status| format!("{host_id}: {status}"))?
            .into_inner();
        let (host, service) = (host_id.to_string(), service.to_string());
        let task = tokio::spawn(async move {
            let mut report = tokio::time::interval(report_every);
            // The ask the next report answers (always healthy: one answer closes it).
            let mut asked = 0u64;
            let mut steps_seen = std::collections::HashSet::new();
            loop {
                tokio::select! {
                    _ = report.tick() => {
                        let health = pb::HealthReport {
                            at_ms: rewind_shared::time::now_ms(),
                            metrics: None,
                            probes: vec![pb::ProbeResult {
                                service: service.clone(),
                                probe: "sim".into(),
                                ok: true,
                                latency_ms: 0,
                                detail: String::new(),
                            }],
                            app: vec![],
                            retained: vec![],
                            drift: vec![],
                            answers_ask: asked,
                        };
                        asked = 0;
                        if outbound.send(message(agent_message::Body::Health(health))).await.is_err() {
                            return;
                        }
                    }
                    next = inbound.next() => {
                        let Some(Ok(received)) = next else { return };
                        match received.body {
                            Some(coordinator_message::Body::Step(step)) => {
                                use std::sync::atomic::Ordering::Relaxed;
                                STEPS_RECEIVED.fetch_add(1, Relaxed);
                                if !steps_seen.insert(step.step_id.clone()) {
                                    STEPS_RECEIVED_AGAIN.fetch_add(1, Relaxed);
                                }
                                let now = rewind_shared::time::now_ms();
                                let capture = matches!(step.action, Some(pb::step_command::Action::Capture(_)));
                                let result = pb::StepResult {
                                    step_id: step.step_id,
                                    ok: true,
                                    detail: "simulated".into(),
                                    snapshot_id: if capture { format!("snap-{host}") } else { String::new() },
                                    started_at_ms: now,
                                    finished_at_ms: now,
                                    replayed: false,
                                    schema: None,
                                };
                                if outbound.send(message(agent_message::Body::StepResult(result))).await.is_err() {
                                    return;
                                }
                            }
                            // A verify began: report now, as a real agent does.
                            Some(coordinator_message::Body::ReportNow(ask)) => {
                                asked = ask.ask_id;
                                report.reset_immediately();
                            }
                            Some(coordinator_message::Body::Flag(update)) => {
                                flags.lock().unwrap().push((host.clone(), update.flag, update.enabled, Instant::now()));
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        Ok(Self {
            host_id: host_id.to_string(),
            task,
        })
    }
}
