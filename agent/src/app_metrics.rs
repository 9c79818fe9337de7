//! Scrapes a service's own Prometheus text endpoint (parsed by `prometheus-parse`) and reports
//! what its counters gained since the previous scrape: requests, failed requests and a latency
//! histogram. Increases are taken per series (label set), each with its own reset detection,
//! and then summed, as `sum(increase(...))` would: a series that restarts or disappears cannot
//! pass its whole history off as one interval's traffic. The coordinator sums these over hosts
//! and windows into an error ratio and a p99.

use std::collections::{BTreeMap, HashMap};

use rewind_proto::v1::{AppMetrics, LatencyBucket};
use rewind_shared::histogram;

use crate::config::{MetricsConfig, ServiceConfig};

/// Largest metrics page read; a bigger one is an error, not an allocation.
const MAX_PAGE_BYTES: usize = 4 << 20;
/// Most series kept per service (requests and latency each), and buckets per histogram.
const MAX_SERIES: usize = 1024;
const MAX_BUCKETS: usize = 64;

/// Counter values read from one scrape, per series (its labels, sorted, as the key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Requests counter value, and whether its series counts failed requests.
    pub requests: BTreeMap<String, (f64, bool)>,
    /// Cumulative count per upper bound in ms.
    pub latency: BTreeMap<String, Vec<(f64, f64)>>,
}

/// What one interval added, summed over series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gained {
    pub requests: f64,
    pub errors: f64,
    pub latency: Vec<(f64, f64)>,
}

/// Reads a page into totals. A requests counter missing from the page is an error (the config
/// names the wrong metric); a missing latency histogram is too, when one is configured; so is
/// a value no counter can have (negative, NaN, infinite).
pub fn read_totals(page: &str, config: &MetricsConfig) -> Result<Totals, String> {
    let lines = page.lines().map(|line| Ok(line.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).map_err(|error| error.to_string())?;
    let mut totals = Totals::default();
    for sample in &scrape.samples {
        let series = sample.labels.to_string();
        match &sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Untyped(value)
                if sample.metric == config.requests =>
            {
                if !value.is_finite() || *value < 0.0 {
                    return Err(format!(
                        "{}{{{series}}} is {value}, not a counter value",
                        config.requests
                    ));
                }
                let failed = sample.labels.get(&config.error_label).is_some_and(|label| {
                    config
                        .error_prefixes
                        .iter()
                        .any(|prefix| label.starts_with(prefix.as_str()))
                });
                totals.requests.insert(series, (*value, failed));
            }
            prometheus_parse::Value::Histogram(counts)
                if config.latency.as_deref() == Some(sample.metric.as_str()) =>
            {
                let mut buckets: Vec<(f64, f64)> = counts
                    .iter()
                    .map(|count| (count.less_than * config.latency_unit_ms, count.count))
                    .collect();
                if !histogram::is_valid(&buckets) {
                    return Err(format!(
                        "{}{{{series}}} has a negative or non-finite bucket",
                        sample.metric
                    ));
                }
                if buckets.len() > MAX_BUCKETS {
                    return Err(format!(
                        "{}{{{series}}} has {} buckets, more than the {MAX_BUCKETS} rewind keeps",
                        sample.metric,
                        buckets.len()
                    ));
                }
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                totals.latency.insert(series, buckets);
            }
            _ => {}
        }
        if totals.requests.len() > MAX_SERIES || totals.latency.len() > MAX_SERIES {
            return Err(format!("more than {MAX_SERIES} series of one metric"));
        }
    }
    if totals.requests.is_empty() {
        return Err(format!(
            "no counter {} on the page (check [service.metrics] requests)",
            config.requests
        ));
    }
    if let (Some(latency), true) = (&config.latency, totals.latency.is_empty()) {
        return Err(format!(
            "no histogram {latency} on the page (it needs a `# TYPE {latency} histogram` line)"
        ));
    }
    Ok(totals)
}

/// What the counters gained from `previous` to `current`, per series then summed. A series
/// that went down was reset (the service restarted): its whole current value is the gain, as
/// Prometheus's `increase` assumes; a series new since `previous` started from zero.
pub fn increase(previous: &Totals, current: &Totals) -> Gained {
    let mut gained = Gained::default();
    for (series, &(now, failed)) in &current.requests {
        let before = previous
            .requests
            .get(series)
            .map_or(0.0, |&(value, _)| value);
        let gain = if now >= before { now - before } else { now };
        gained.requests += gain;
        if failed {
            gained.errors += gain;
        }
    }
    let increases: Vec<Vec<(f64, f64)>> = current
        .latency
        .iter()
        .map(|(series, now)| {
            let Some(before) = previous.latency.get(series) else {
                return now.clone();
            };
            // A histogram resets as a whole: its total count going down says so.
            let total = |buckets: &[(f64, f64)]| buckets.last().map_or(0.0, |&(_, count)| count);
            if total(now) < total(before) {
                return now.clone();
            }
            now.iter()
                .map(|&(bound, count)| {
                    let earlier = before
                        .iter()
                        .find(|(other, _)| *other == bound)
                        .map_or(0.0, |&(_, count)| count);
                    (bound, (count - earlier).max(0.0))
                })
                .collect()
        })
        .collect();
    gained.latency = histogram::merge(increases.iter().map(Vec::as_slice));
    gained
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

    /// The page's figures summed over series.
    fn summed(totals: &Totals) -> Gained {
        increase(&Totals::default(), totals)
    }

    #[test]
    fn errors_and_latency_are_summed_over_label_sets() {
        let totals = read_totals(PAGE, &config()).unwrap();
        let sum = summed(&totals);
        assert_eq!((sum.requests, sum.errors), (100.0, 10.0));
        assert_eq!(
            sum.latency,
            vec![(100.0, 51.0), (500.0, 92.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn a_page_without_the_named_metrics_or_with_impossible_values_is_an_error_naming_them() {
        let error = read_totals("other 1\n", &config()).unwrap_err();
        assert!(error.contains("http_requests_total"), "{error}");
        let untyped_histogram =
            "http_requests_total 3\nhttp_request_duration_seconds_bucket{le=\"1\"} 3\n";
        let error = read_totals(untyped_histogram, &config()).unwrap_err();
        assert!(
            error.contains("# TYPE http_request_duration_seconds histogram"),
            "{error}"
        );
        let nan = "# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\"} NaN\n";
        let error = read_totals(nan, &config()).unwrap_err();
        assert!(
            error.contains(r#"http_requests_total{code="200"} is NaN"#),
            "{error}"
        );
    }

    fn requests(series: &[(&str, f64, bool)]) -> Totals {
        Totals {
            requests: series
                .iter()
                .map(|&(labels, value, failed)| (labels.to_string(), (value, failed)))
                .collect(),
            latency: BTreeMap::new(),
        }
    }

    #[test]
    fn increases_are_per_series_and_survive_resets_and_churn() {
        let before = requests(&[
            ("code=\"200\",pod=\"a\"", 100.0, false),
            ("code=\"500\",pod=\"a\"", 40.0, true),
        ]);
        let later = requests(&[
            ("code=\"200\",pod=\"a\"", 150.0, false),
            ("code=\"500\",pod=\"a\"", 41.0, true),
        ]);
        let gained = increase(&before, &later);
        assert_eq!((gained.requests, gained.errors), (51.0, 1.0));
        // The error series disappeared (its worker restarted) while requests grew: nothing of
        // its history counts; when it comes back from zero, only its new value does.
        let churned = requests(&[("code=\"200\",pod=\"a\"", 200.0, false)]);
        let gained = increase(&later, &churned);
        assert_eq!((gained.requests, gained.errors), (50.0, 0.0));
        let back = requests(&[
            ("code=\"200\",pod=\"a\"", 210.0, false),
            ("code=\"500\",pod=\"a\"", 2.0, true),
        ]);
        let gained = increase(&churned, &back);
        assert_eq!((gained.requests, gained.errors), (12.0, 2.0));
        // One series reset (down), the other kept counting.
        let reset = requests(&[
            ("code=\"200\",pod=\"a\"", 5.0, false),
            ("code=\"500\",pod=\"a\"", 3.0, true),
        ]);
        let gained = increase(&back, &reset);
        assert_eq!((gained.requests, gained.errors), (6.0, 1.0));
    }

    #[test]
    fn histogram_increases_detect_their_own_reset() {
        let inf = f64::INFINITY;
        let with = |buckets: Vec<(f64, f64)>| Totals {
            requests: BTreeMap::new(),
            latency: [("".to_string(), buckets)].into_iter().collect(),
        };
        let before = with(vec![(100.0, 60.0), (inf, 100.0)]);
        let later = with(vec![(100.0, 70.0), (inf, 150.0)]);
        assert_eq!(
            increase(&before, &later).latency,
            vec![(100.0, 10.0), (inf, 50.0)]
        );
        let restarted = with(vec![(100.0, 8.0), (inf, 8.0)]);
        assert_eq!(
            increase(&later, &restarted).latency,
            vec![(100.0, 8.0), (inf, 8.0)]
        );
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported_not_fatal() {
        let mut scraper = AppScraper::new(reqwest::Client::new());
        let service = ServiceConfig {
            restart_timeout: Duration::from_secs(1),
            metrics: Some(config()),
            ..ServiceConfig::bare("web", std::path::Path::new("/srv/web"))
        };
        let reports = scraper.scrape_all(&[service]).await;
        assert_eq!(reports.len(), 1);
        assert!(reports[0].error.contains("127.0.0.1:1"), "{:?}", reports[0]);
    }
}
