//! One HTTP check, as the agent's `check` step and the coordinator's wave-gate synthetics both
//! run it: a GET (or a POST with a body), judged on its status (as soon as the headers arrive),
//! then on what the body holds (its first MiB) and on how long the whole answer took.

use std::time::{Duration, Instant};

/// Most of a body read; a longer one is judged on its first this many bytes.
pub const MAX_CHECK_BODY_BYTES: usize = 1 << 20;

/// What to ask and how to judge the answer.
pub struct HttpCheck<'a> {
    pub url: &'a str,
    /// A POST with this body; `None` for a GET.
    pub post_body: Option<&'a str>,
    /// Sent with the request (`Authorization`, `Host`...).
    pub headers: &'a [(String, String)],
    pub expect_status: u16,
    /// Text the body must contain; `None` or empty for any body.
    pub body_contains: Option<&'a str>,
    /// Slower than this fails the check; `None` for no limit.
    pub max_latency: Option<Duration>,
    /// How long the request may take at all.
    pub timeout: Duration,
}

/// What a passed check measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Passed {
    pub status: u16,
    pub latency: Duration,
}

/// Runs `check`: `Ok` with the status and latency, `Err` saying what failed (callers add the
/// check's name).
pub async fn run(client: &reqwest::Client, check: &HttpCheck<'_>) -> Result<Passed, String> {
    let mut request = match check.post_body {
        Some(body) => client.post(check.url).body(body.to_string()),
        None => client.get(check.url),
    };
    for (name, value) in check.headers {
        request = request.header(name, value);
    }
    let started = Instant::now();
    let mut response = request
        .timeout(check.timeout)
        .send()
        .await
        .map_err(|error| {
            let method = if check.post_body.is_some() {
                "POST"
            } else {
                "GET"
            };
            format!("{method} {}: {error}", check.url)
        })?;
    let status = response.status().as_u16();
    if status != check.expect_status {
        return Err(format!("status {status}, expected {}", check.expect_status));
    }
    let slow = |latency: Duration| {
        let max = check.max_latency.filter(|max| latency > *max)?;
        Some(format!(
            "status {status} in {} ms, slower than {} ms",
            latency.as_millis(),
            max.as_millis()
        ))
    };
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() >= MAX_CHECK_BODY_BYTES {
                    body.truncate(MAX_CHECK_BODY_BYTES);
                    break;
                }
            }
            Ok(None) => break,
            // A body cut off by the timeout is reported as the slow answer it is.
            Err(error) => {
                return Err(
                    slow(started.elapsed()).unwrap_or_else(|| format!("reading the body: {error}"))
                );
            }
        }
    }
    let latency = started.elapsed();
    if let Some(wanted) = check.body_contains.filter(|wanted| !wanted.is_empty())
        && !String::from_utf8_lossy(&body).contains(wanted)
    {
        return Err(format!("the body lacks {wanted:?}"));
    }
    if let Some(slow) = slow(latency) {
        return Err(slow);
    }
    Ok(Passed { status, latency })
}
