//! Scrapes a service's own Prometheus text endpoint (parsed by `prometheus-parse`) and reports
//! what its counters gained since the previous scrape: requests, failed requests and a latency
//! histogram. The coordinator sums these over hosts and windows into an error ratio and a p99,
//! the way `sum(rate(...))` and `histogram_quantile` would.

use std::collections::{BTreeMap, HashMap};

use rewind_proto::v1::{AppMetrics, LatencyBucket};

use crate::config::{MetricsConfig, ServiceConfig};

/// Largest metrics page read; a bigger one is an error, not an allocation.
const MAX_PAGE_BYTES: usize = 4 << 20;
/// Most histogram buckets kept per service.
const MAX_BUCKETS: usize = 64;

/// Counter values read from one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub requests: f64,
    pub errors: f64,
    /// Cumulative count per upper bound in ms, summed over every label set.
    pub latency: Vec<(f64, f64)>,
}

/// Reads a page into totals. A requests counter missing from the page is an error (the config
/// names the wrong metric); a missing latency histogram is too, when one is configured.
pub fn read_totals(page: &str, config: &MetricsConfig) -> Result<Totals, String> {
    let lines = page.lines().map(|line| Ok(line.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).map_err(|error| error.to_string())?;
    let mut totals = Totals::default();
    let mut found_requests = false;
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut found_latency = false;
    for sample in &scrape.samples {
        match &sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Untyped(value)
                if sample.metric == config.requests =>
            {
                found_requests = true;
                totals.requests += value;
                let failed = sample.labels.get(&config.error_label).is_some_and(|label| {
                    config
                        .error_prefixes
                        .iter()
                        .any(|prefix| label.starts_with(prefix.as_str()))
                });
                if failed {
                    totals.errors += value;
                }
            }
            prometheus_parse::Value::Histogram(counts)
                if config.latency.as_deref() == Some(sample.metric.as_str()) =>
            {
                found_latency = true;
                for count in counts {
                    let le_ms = count.less_than * config.latency_unit_ms;
                    if le_ms.is_nan() || le_ms < 0.0 {
                        continue;
                    }
                    // Non-negative floats order like their bit patterns, +Inf last.
                    *buckets.entry(le_ms.to_bits()).or_default() += count.count;
                }
            }
            _ => {}
        }
    }
    if !found_requests {
        return Err(format!(
            "no counter {} on the page (check [service.metrics] requests)",
            config.requests
        ));
    }
    if let (Some(latency), false) = (&config.latency, found_latency) {
        return Err(format!(
            "no histogram {latency} on the page (it needs a `# TYPE {latency} histogram` line)"
        ));
    }
    if buckets.len() > MAX_BUCKETS {
        return Err(format!(
            "{} latency buckets, more than the {MAX_BUCKETS} rewind keeps",
            buckets.len()
        ));
    }
    totals.latency = buckets
        .into_iter()
        .map(|(bits, count)| (f64::from_bits(bits), count))
        .collect();
    Ok(totals)
}

/// What the counters gained from `previous` to `current`. A counter that went down was reset
/// (the service restarted): its whole current value is the gain, as Prometheus's `rate` assumes.
pub fn increase(previous: &Totals, current: &Totals) -> Totals {
    let gain = |before: f64, now: f64| if now >= before { now - before } else { now };
    let reset = current.requests < previous.requests;
    let before = |value: f64| if reset { 0.0 } else { value };
    let latency = current
        .latency
        .iter()
        .map(|&(le_ms, count)| {
            let earlier = previous
                .latency
                .iter()
                .find(|(bound, _)| *bound == le_ms)
                .map_or(0.0, |&(_, count)| before(count));
            (le_ms, gain(earlier, count))
        })
        .collect();
    Totals {
        requests: gain(before(previous.requests), current.requests),
        errors: gain(before(previous.errors), current.errors),
        latency,
    }
}

/// Keeps the previous scrape of each service, to report increases.
pub struct AppScraper {
    http: reqwest::Client,
    previous: HashMap<String, Totals>,
}

impl AppScraper {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            previous: HashMap::new(),
        }
    }

    /// Scrapes every service that has a metrics endpoint, concurrently. The first scrape of a
    /// service reports nothing counted yet (there is nothing to subtract from).
    pub async fn scrape_all(&mut self, services: &[ServiceConfig]) -> Vec<AppMetrics> {
        let http = &self.http;
        let scraped = futures::future::join_all(services.iter().filter_map(|service| {
            let config = service.metrics.as_ref()?;
            Some(async move { (service.name.clone(), scrape(http, config).await) })
        }))
        .await;
        scraped
            .into_iter()
            .map(|(service, outcome)| match outcome {
                Ok(totals) => {
                    let gained = self
                        .previous
                        .insert(service.clone(), totals.clone())
                        .map(|previous| increase(&previous, &totals))
                        .unwrap_or_default();
                    AppMetrics {
                        service,
                        requests: gained.requests,
                        errors: gained.errors,
                        latency: gained
                            .latency
                            .into_iter()
                            .map(|(le_ms, count)| LatencyBucket { le_ms, count })
                            .collect(),
                        error: String::new(),
                    }
                }
                Err(error) => AppMetrics {
                    service,
                    error,
                    ..AppMetrics::default()
                },
            })
            .collect()
    }
}

/// One bounded GET of a metrics page, read into totals.
async fn scrape(http: &reqwest::Client, config: &MetricsConfig) -> Result<Totals, String> {
    let url = &config.url;
    let fetch = async {
        let mut response = http
            .get(url)
            .send()
            .await
            .map_err(|error| format!("GET {url}: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: status {}", response.status().as_u16()));
        }
        let mut page = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| format!("GET {url}: {error}"))?
        {
            if page.len() + chunk.len() > MAX_PAGE_BYTES {
                return Err(format!(
                    "GET {url}: page larger than {MAX_PAGE_BYTES} bytes"
                ));
            }
            page.extend_from_slice(&chunk);
        }
        String::from_utf8(page).map_err(|_| format!("GET {url}: the page is not UTF-8"))
    };
    let page = tokio::time::timeout(config.timeout, fetch)
        .await
        .map_err(|_| {
            format!(
                "GET {url}: no answer within {} ms",
                config.timeout.as_millis()
            )
        })??;
    read_totals(&page, config).map_err(|error| format!("{url}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> MetricsConfig {
        MetricsConfig {
            url: "http://127.0.0.1:1/metrics".into(),
            requests: "http_requests_total".into(),
            error_label: "code".into(),
            error_prefixes: vec!["5".into()],
            latency: Some("http_request_duration_seconds".into()),
            latency_unit_ms: 1000.0,
            timeout: Duration::from_secs(1),
        }
    }

    const PAGE: &str = r#"# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{code="200",path="/a"} 90
http_requests_total{code="503",path="/a"} 6
http_requests_total{code="500",path="/b"} 4
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{path="/a",le="0.1"} 50
http_request_duration_seconds_bucket{path="/a",le="0.5"} 90
http_request_duration_seconds_bucket{path="/a",le="+Inf"} 96
http_request_duration_seconds_sum{path="/a"} 20
http_request_duration_seconds_count{path="/a"} 96
http_request_duration_seconds_bucket{path="/b",le="0.1"} 1
http_request_duration_seconds_bucket{path="/b",le="0.5"} 2
http_request_duration_seconds_bucket{path="/b",le="+Inf"} 4
other_metric 7
"#;

    #[test]
    fn errors_and_latency_are_summed_over_label_sets() {
        let totals = read_totals(PAGE, &config()).unwrap();
        assert_eq!((totals.requests, totals.errors), (100.0, 10.0));
        assert_eq!(
            totals.latency,
            vec![(100.0, 51.0), (500.0, 92.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn a_page_without_the_named_metrics_is_an_error_that_names_them() {
        let error = read_totals("other 1\n", &config()).unwrap_err();
        assert!(error.contains("http_requests_total"), "{error}");
        let untyped_histogram =
            "http_requests_total 3\nhttp_request_duration_seconds_bucket{le=\"1\"} 3\n";
        let error = read_totals(untyped_histogram, &config()).unwrap_err();
        assert!(
            error.contains("# TYPE http_request_duration_seconds histogram"),
            "{error}"
        );
    }

    #[test]
    fn increases_survive_a_counter_reset() {
        let before = Totals {
            requests: 100.0,
            errors: 10.0,
            latency: vec![(100.0, 60.0), (f64::INFINITY, 100.0)],
        };
        let later = Totals {
            requests: 150.0,
            errors: 30.0,
            latency: vec![(100.0, 70.0), (f64::INFINITY, 150.0)],
        };
        let gained = increase(&before, &later);
        assert_eq!((gained.requests, gained.errors), (50.0, 20.0));
        assert_eq!(gained.latency, vec![(100.0, 10.0), (f64::INFINITY, 50.0)]);
        // The service restarted: its counters start again from zero.
        let restarted = Totals {
            requests: 8.0,
            errors: 1.0,
            latency: vec![(100.0, 8.0), (f64::INFINITY, 8.0)],
        };
        let gained = increase(&later, &restarted);
        assert_eq!((gained.requests, gained.errors), (8.0, 1.0));
        assert_eq!(gained.latency, vec![(100.0, 8.0), (f64::INFINITY, 8.0)]);
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported_not_fatal() {
        let mut scraper = AppScraper::new(reqwest::Client::new());
        let service = ServiceConfig {
            name: "web".into(),
            root: "/srv/web".into(),
            config_files: vec![],
            flags_file: None,
            restart_command: vec!["true".into()],
            restart_timeout: Duration::from_secs(1),
            probes: vec![],
            drain: None,
            undrain: None,
            metrics: Some(config()),
        };
        let reports = scraper.scrape_all(&[service]).await;
        assert_eq!(reports.len(), 1);
        assert!(reports[0].error.contains("127.0.0.1:1"), "{:?}", reports[0]);
    }
}
