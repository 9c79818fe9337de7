//! PagerDuty's Events API v2 as a receiver sees it: the field rules an event must meet
//! ([`check_event`], after <https://developer.pagerduty.com/docs/events-api-v2/trigger-events/>)
//! and, with the `pager-receiver` feature, a loopback [`Receiver`] that holds rewind's incident
//! webhook to them (and to its signature), answering as PagerDuty does: 202 with the dedup key,
//! 400 with the errors. The demo and the tests listen with it; it is written apart from the
//! coordinator's sender so that each checks the other.

use serde_json::Value;

/// An event that met the rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub action: String,
    pub dedup_key: String,
    /// Trigger only: what the payload said.
    pub summary: String,
    pub severity: String,
    pub source: String,
}

pub const ACTIONS: [&str; 3] = ["trigger", "acknowledge", "resolve"];
pub const SEVERITIES: [&str; 4] = ["critical", "error", "warning", "info"];
pub const ROUTING_KEY_LEN: usize = 32;
pub const MAX_DEDUP_KEY_LEN: usize = 255;
pub const MAX_SUMMARY_LEN: usize = 1024;

/// Checks an alert event's JSON against the Events API v2 rules; every broken rule is named.
pub fn check_event(body: &[u8]) -> Result<Event, Vec<String>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| vec![format!("the body is not JSON: {error}")])?;
    let Some(event) = value.as_object() else {
        return Err(vec!["the event must be a JSON object".into()]);
    };
    let mut errors = Vec::new();
    let text = |object: &serde_json::Map<String, Value>, field: &str, errors: &mut Vec<String>| {
        match object.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(_) => {
                errors.push(format!("'{field}' must be a string"));
                None
            }
        }
    };
    match text(event, "routing_key", &mut errors) {
        Some(key) if key.chars().count() == ROUTING_KEY_LEN => {}
        Some(_) => errors.push(format!(
            "Length of 'routing_key' is incorrect (should be {ROUTING_KEY_LEN} characters)"
        )),
        None => errors.push("'routing_key' is missing".into()),
    }
    let action = text(event, "event_action", &mut errors).unwrap_or_default();
    if !ACTIONS.contains(&action.as_str()) {
        errors.push(format!(
            "'event_action' is {action:?}, must be one of {}",
            ACTIONS.join(", ")
        ));
    }
    let dedup_key = text(event, "dedup_key", &mut errors).unwrap_or_default();
    if dedup_key.chars().count() > MAX_DEDUP_KEY_LEN {
        errors.push(format!(
            "'dedup_key' is longer than {MAX_DEDUP_KEY_LEN} characters"
        ));
    }
    if dedup_key.is_empty() && action != "trigger" {
        errors.push(format!("'dedup_key' is required to {action}"));
    }
    let mut checked = Event {
        action: action.clone(),
        dedup_key,
        summary: String::new(),
        severity: String::new(),
        source: String::new(),
    };
    match event.get("payload") {
        Some(Value::Object(payload)) => {
            checked.summary = text(payload, "summary", &mut errors).unwrap_or_default();
            checked.source = text(payload, "source", &mut errors).unwrap_or_default();
            checked.severity = text(payload, "severity", &mut errors).unwrap_or_default();
            if checked.summary.is_empty() {
                errors.push("'payload.summary' is required".into());
            }
            if checked.summary.chars().count() > MAX_SUMMARY_LEN {
                errors.push(format!(
                    "'payload.summary' is longer than {MAX_SUMMARY_LEN} characters"
                ));
            }
            if checked.source.is_empty() {
                errors.push("'payload.source' is required".into());
            }
            if !SEVERITIES.contains(&checked.severity.as_str()) {
                errors.push(format!(
                    "'payload.severity' is {:?}, must be one of {}",
                    checked.severity,
                    SEVERITIES.join(", ")
                ));
            }
            if let Some(timestamp) = text(payload, "timestamp", &mut errors)
                && time::OffsetDateTime::parse(
                    &timestamp,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_err()
            {
                errors.push(format!("'payload.timestamp' {timestamp:?} is not ISO 8601"));
            }
            for field in ["component", "group", "class"] {
                text(payload, field, &mut errors);
            }
            if payload
                .get("custom_details")
                .is_some_and(|details| !details.is_object() && !details.is_string())
            {
                errors.push("'payload.custom_details' must be an object".into());
            }
        }
        Some(_) => errors.push("'payload' must be an object".into()),
        None if action == "trigger" => errors.push("'payload' is required to trigger".into()),
        None => {}
    }
    for (field, required) in [("links", "href"), ("images", "src")] {
        match event.get(field) {
            None => {}
            Some(Value::Array(items))
                if items
                    .iter()
                    .all(|item| item.get(required).is_some_and(Value::is_string)) => {}
            Some(Value::Array(_)) => {
                errors.push(format!("every one of '{field}' needs a '{required}'"));
            }
            Some(_) => errors.push(format!("'{field}' must be an array")),
        }
    }
    for field in ["client", "client_url"] {
        text(event, field, &mut errors);
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(errors)
    }
}

#[cfg(feature = "pager-receiver")]
pub use receiver::Receiver;

#[cfg(feature = "pager-receiver")]
mod receiver {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt as _;
    use hyper::body::Incoming;
    use hyper::{Request, Response, StatusCode};

    use super::{Event, check_event};

    /// Largest event accepted (PagerDuty takes up to 512 KB).
    const MAX_BODY_BYTES: usize = 512 * 1024;

    #[derive(Default)]
    struct Book {
        accepted: Vec<Event>,
        refused: Vec<String>,
        /// Answers to give before accepting again (status codes), for tests of retries.
        failures: Vec<u16>,
    }

    /// A PagerDuty Events API v2 stand-in on loopback that also checks rewind's signature.
    pub struct Receiver {
        pub address: std::net::SocketAddr,
        /// With [`Receiver::start_tls`]: the CA its certificate chains to (PEM).
        pub ca_pem: Option<String>,
        book: Arc<Mutex<Book>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Receiver {
        /// Listens on 127.0.0.1 (a free port) over plain HTTP; events must be signed with
        /// `secret`.
        pub async fn start(secret: Vec<u8>) -> std::io::Result<Self> {
            Self::listen(secret, None).await
        }

        /// Like [`Receiver::start`] over HTTPS, with a certificate for 127.0.0.1 from a CA of
        /// its own (`ca_pem`).
        pub async fn start_tls(secret: Vec<u8>) -> std::io::Result<Self> {
            use rustls::pki_types::pem::PemObject as _;
            crate::tls::install_crypto_provider();
            let ca = crate::dev_ca::DevCa::generate("rewind pager stand-in CA")
                .map_err(std::io::Error::other)?;
            let subject = crate::dev_ca::Subject::new(crate::identity::Kind::Member, "pager");
            let (cert_pem, key_pem) = ca
                .issue(&subject, &["127.0.0.1", "localhost"])
                .map_err(std::io::Error::other)?;
            let bad_pem = |error: rustls::pki_types::pem::Error| {
                std::io::Error::other(format!("the stand-in's certificate: {error}"))
            };
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad_pem)?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(bad_pem)?;
            let config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(std::io::Error::other)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let mut receiver = Self::listen(secret, Some(acceptor)).await?;
            receiver.ca_pem = Some(ca.cert_pem().to_string());
            Ok(receiver)
        }

        async fn listen(
            secret: Vec<u8>,
            tls: Option<tokio_rustls::TlsAcceptor>,
        ) -> std::io::Result<Self> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?;
            let book: Arc<Mutex<Book>> = Arc::default();
            let shared = Arc::clone(&book);
            let secret = Arc::new(secret);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let book = Arc::clone(&shared);
                    let secret = Arc::clone(&secret);
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(request, Arc::clone(&book), Arc::clone(&secret))
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        // A client that goes away mid-request is no concern of the stand-in's.
                        let _ = match tls {
                            None => {
                                http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await
                            }
                            Some(tls) => match tls.accept(stream).await {
                                Ok(stream) => {
                                    http.serve_connection(
                                        hyper_util::rt::TokioIo::new(stream),
                                        service,
                                    )
                                    .await
                                }
                                Err(_) => return,
                            },
                        };
                    });
                }
            });
            Ok(Self {
                address,
                ca_pem: None,
                book,
                task,
            })
        }

        /// The events accepted so far, in order.
        pub fn events(&self) -> Vec<Event> {
            self.book.lock().expect("receiver book").accepted.clone()
        }

        /// Why each refused request was refused.
        pub fn refusals(&self) -> Vec<String> {
            self.book.lock().expect("receiver book").refused.clone()
        }

        /// Answers the next requests with these statuses instead of accepting them.
        pub fn fail_next(&self, statuses: &[u16]) {
            self.book
                .lock()
                .expect("receiver book")
                .failures
                .extend_from_slice(statuses);
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn answer(
        request: Request<Incoming>,
        book: Arc<Mutex<Book>>,
        secret: Arc<Vec<u8>>,
    ) -> Result<Response<String>, Infallible> {
        let reply = |status: StatusCode, body: serde_json::Value| {
            let mut response = Response::new(body.to_string());
            *response.status_mut() = status;
            Ok(response)
        };
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (timestamp, signature) = (header("x-rewind-timestamp"), header("x-rewind-signature"));
        let json = header("content-type") == "application/json";
        let body = match http_body_util::Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                return reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    serde_json::json!({"status": "invalid event", "message": error.to_string()}),
                );
            }
        };
        let mut book = book.lock().expect("receiver book");
        if !book.failures.is_empty() {
            let status = book.failures.remove(0);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return reply(
                status,
                serde_json::json!({"status": "failure for the test"}),
            );
        }
        if !signed(&secret, &timestamp, &body, &signature) {
            book.refused
                .push("bad or missing X-Rewind-Signature".into());
            return reply(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"status": "unauthorized"}),
            );
        }
        let checked = if json {
            check_event(&body)
        } else {
            Err(vec!["Content-Type must be application/json".into()])
        };
        match checked {
            Ok(event) => {
                let dedup_key = event.dedup_key.clone();
                book.accepted.push(event);
                reply(
                    StatusCode::ACCEPTED,
                    serde_json::json!({
                        "status": "success",
                        "message": "Event processed",
                        "dedup_key": dedup_key,
                    }),
                )
            }
            Err(errors) => {
                book.refused.push(errors.join("; "));
                reply(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({
                        "status": "invalid event",
                        "message": "Event object is invalid",
                        "errors": errors,
                    }),
                )
            }
        }
    }

    /// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, checked in constant time.
    fn signed(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
        use hmac::{Hmac, Mac};
        let Some(hex_mac) = signature.strip_prefix("sha256=") else {
            return false;
        };
        let Ok(mac_bytes) = hex::decode(hex_mac) else {
            return false;
        };
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&mac_bytes).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_full_trigger_and_a_bare_resolve_meet_the_rules() {
        let trigger = serde_json::json!({
            "routing_key": KEY,
            "event_action": "trigger",
            "dedup_key": "in-1",
            "payload": {
                "summary": "Rollback rb-1",
                "source": "rewind",
                "severity": "critical",
                "timestamp": "2026-12-05T03:00:00.000Z",
                "custom_details": {"a": 1},
            },
        });
        let event = check_event(trigger.to_string().as_bytes()).unwrap();
        assert_eq!(
            (event.action.as_str(), event.dedup_key.as_str()),
            ("trigger", "in-1")
        );
        let resolve =
            serde_json::json!({"routing_key": KEY, "event_action": "resolve", "dedup_key": "in-1"});
        check_event(resolve.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn each_broken_rule_is_named() {
        let cases = [
            (
                serde_json::json!({"routing_key": "short", "event_action": "resolve", "dedup_key": "x"}),
                "routing_key",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "page", "dedup_key": "x"}),
                "event_action",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "resolve"}),
                "'dedup_key' is required",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "trigger"}),
                "'payload' is required",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "trigger",
                "payload": {"summary": "s", "source": "x", "severity": "fatal"}}),
                "payload.severity",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "trigger",
                "payload": {"summary": "s".repeat(1025), "source": "x", "severity": "info"}}),
                "payload.summary",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "trigger",
                "payload": {"summary": "s", "severity": "info"}}),
                "payload.source",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "trigger",
                "payload": {"summary": "s", "source": "x", "severity": "info", "timestamp": "yesterday"}}),
                "timestamp",
            ),
            (
                serde_json::json!({"routing_key": KEY, "event_action": "resolve", "dedup_key": "k".repeat(256)}),
                "dedup_key",
            ),
        ];
        for (event, named) in cases {
            let errors = check_event(event.to_string().as_bytes()).unwrap_err();
            assert!(
                errors.iter().any(|error| error.contains(named)),
                "{named}: {errors:?}"
            );
        }
    }
}
