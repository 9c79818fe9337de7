//! Signed webhooks and a real Alertmanager.

use crate::*;

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: how rewind signs its escalations
/// and checks generic webhooks, computed here independently of the coordinator's code.
pub fn webhook_signature(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs `body` to the generic webhook at `http` (`http://host:port`), signed with `secret` now;
/// returns the status code and the answer's text.
pub async fn post_signed_webhook(http: &str, secret: &[u8], body: String) -> (u16, String) {
    let now = rewind_shared::time::now_ms();
    let signature = webhook_signature(secret, now, body.as_bytes());
    post_webhook_as_signed(http, now, &signature, body).await
}

/// POSTs a generic webhook with the timestamp and signature headers given as they are (to
/// send a request again, or spelled another way).
pub async fn post_webhook_as_signed(
    http: &str,
    timestamp_ms: u64,
    signature: &str,
    body: String,
) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{http}/v1/webhook"))
        .header("content-type", "application/json")
        .header("x-rewind-timestamp", timestamp_ms.to_string())
        .header("x-rewind-signature", signature)
        .body(body)
        .send()
        .await
        .expect("the coordinator answers HTTP");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) on `port`, routing every
/// alert grouped by service to `webhook_url` with the bearer token in `token_file`, quickly.
pub fn must_start_alertmanager(
    dir: &Path,
    port: u16,
    webhook_url: &str,
    token_file: &Path,
) -> Process {
    let binary = ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("Alertmanager is not installed: apt-get install prometheus-alertmanager");
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"route:
  receiver: rewind
  group_by: ['service']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: rewind
    webhook_configs:
      - url: {webhook_url}
        send_resolved: false
        http_config:
          authorization:
            type: Bearer
            credentials_file: {token}
"#,
        token = token_file.display()
    );
    let config_path = dir.join("alertmanager.yml");
    std::fs::write(&config_path, config).unwrap();
    let listen = format!("--web.listen-address=127.0.0.1:{port}");
    let config_arg = format!("--config.file={}", config_path.display());
    let storage = format!("--storage.path={}", dir.join("data").display());
    let process = spawn(
        &binary,
        &[&config_arg, &storage, &listen, "--cluster.listen-address="],
        &dir.join("alertmanager.log"),
    );
    must_wait(Duration::from_secs(30), "Alertmanager to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    process
}
