//! `rewind-demo-app ROOT`: the demo's sample web service, one process per demo host. It answers
//! `GET /health` with the status its `current` release declares (`ROOT/current/health_status`,
//! 503 when missing) and the release's `VERSION` as the body, resolving the link on every
//! request like an app served from `current`. It prints the port it listens on (loopback, chosen
//! by the system) on its first line of output, and runs until it is killed.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    rewind_shared::logging::init("info");
    let root: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: rewind-demo-app ROOT")?
        .into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind the sample app")?;
    let port = listener.local_addr()?.port();
    println!("{port}");
    tracing::info!(port, root = %root.display(), "Serving the sample app.");
    loop {
        let (stream, _) = listener.accept().await.context("accept")?;
        let root = root.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let answer = answer(&root, request.uri().path());
                async move { Ok::<_, Infallible>(answer) }
            });
            // A client that goes away mid-request is no concern of the demo's.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(root: &Path, path: &str) -> hyper::Response<String> {
    let (status, body) = if path == "/health" {
        let current = root.join("current");
        let status = std::fs::read_to_string(current.join("health_status"))
            .ok()
            .and_then(|text| text.trim().parse::<u16>().ok())
            .and_then(|code| hyper::StatusCode::from_u16(code).ok())
            .unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
        let version = std::fs::read_to_string(current.join("VERSION")).unwrap_or_default();
        (status, format!("version {version}\n"))
    } else {
        (hyper::StatusCode::NOT_FOUND, "not found\n".to_string())
    };
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    response
}
