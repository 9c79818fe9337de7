//! Health probes: HTTP GET expecting a status, TCP connect, command exit code. Each is bounded by
//! its own timeout, so a hung service cannot stall the report.

use std::time::Instant;

use rewind_proto::v1::ProbeResult;

use crate::config::{Probe, ProbeKind, ServiceConfig};
use crate::host::Host;

pub struct Prober {
    http: reqwest::Client,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new(&rewind_shared::outbound::HttpsTrust::default())
    }
}

impl Prober {
    /// A prober whose HTTP client (probes, metrics scrapes, hooks, purges and checks without
    /// TLS files of their own) reaches https:// as the agent's `[https]` says; no redirects.
    pub fn new(https: &rewind_shared::outbound::HttpsTrust) -> Self {
        // The files were checked when the config loaded; what fails here is the TLS backend
        // itself, and an agent that cannot probe is of no use: say so and stop.
        let http = https
            .client()
            .expect("the HTTP client builds (its TLS files were checked with the config)");
        Self { http }
    }

    /// The HTTP client (no redirects), shared with the metrics scraper.
    pub fn http_client(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// Runs every probe of every service concurrently.
    pub async fn probe_all(&self, host: &dyn Host, services: &[ServiceConfig]) -> Vec<ProbeResult> {
        let probes = services
            .iter()
            .flat_map(|service| service.probes.iter().map(move |probe| (service, probe)));
        let checks = probes.map(|(service, probe)| self.probe(host, &service.name, probe));
        futures::future::join_all(checks).await
    }

    /// POSTs an empty body (a drain hook); Ok with the status when it is 2xx.
    pub async fn post(&self, url: &str, timeout: std::time::Duration) -> Result<u16, String> {
        let response = self
            .http
            .post(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|error| format!("POST {url}: {error}"))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            Ok(status)
        } else {
            Err(format!("POST {url} answered {status}"))
        }
    }

    pub async fn probe(&self, host: &dyn Host, service: &str, probe: &Probe) -> ProbeResult {
        let started = Instant::now();
        let outcome = match tokio::time::timeout(probe.timeout, self.check(host, probe)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {} ms", probe.timeout.as_millis())),
        };
        ProbeResult {
            service: service.to_string(),
            probe: probe.name.clone(),
            ok: outcome.is_ok(),
            latency_ms: started.elapsed().as_millis() as u64,
            detail: outcome.err().unwrap_or_default(),
        }
    }

    async fn check(&self, host: &dyn Host, probe: &Probe) -> Result<(), String> {
        match &probe.kind {
            ProbeKind::Http { url, expect_status } => {
                let response = self
                    .http
                    .get(url)
                    .timeout(probe.timeout)
                    .send()
                    .await
                    .map_err(|error| format!("GET {url}: {error}"))?;
                let status = response.status().as_u16();
                if status == *expect_status {
                    Ok(())
                } else {
                    Err(format!(
                        "GET {url}: status {status}, expected {expect_status}"
                    ))
                }
            }
            ProbeKind::Tcp { address } => tokio::net::TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|error| format!("connect {address}: {error}")),
            ProbeKind::Command { argv } => host
                .run(argv, probe.timeout)
                .await
                .map_err(|error| error.to_string()),
        }
    }
}
