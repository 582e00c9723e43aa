//! Reads qpq-server's Prometheus text endpoint (`metrics_listen`), so the
//! load generator can report server-side figures such as messages per
//! fsync. A tiny HTTP/1.1 GET over a plain TCP connection: the endpoint is
//! on loopback and the exposition format is line-oriented text.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest metrics page accepted.
const PAGE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Time one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One scrape: every sample line as `(series, value)`, where `series` is
/// the metric name with its labels exactly as the server wrote them.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<(String, f64)>);

impl Samples {
    /// Parses the Prometheus text exposition format; comments and lines
    /// that do not end in a number are skipped.
    pub fn parse(text: &str) -> Samples {
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Ok(v) = value.trim().parse::<f64>() {
                out.push((series.trim().to_owned(), v));
            }
        }
        Samples(out)
    }

    /// Sum of every series of metric `name` whose labels contain each of
    /// `labels` (as `key="value"`).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name && labels.iter().all(|l| rest.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// Fetches and parses `url` (`http://host:port/path`).
pub async fn scrape(url: &str) -> anyhow::Result<Samples> {
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch(url))
        .await
        .with_context(|| format!("scraping {url}: timed out"))?
        .map(|text| Samples::parse(&text))
}

async fn fetch(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}`: only http:// metrics URLs are supported"))?;
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/metrics".to_owned()),
    };
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    stream.take(PAGE_BYTES_MAX).read_to_end(&mut body).await?;
    let text = String::from_utf8(body).context("metrics page is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{url}: malformed HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{url}: {}", head.lines().next().unwrap_or("no status line"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name_and_labels() {
        let s = Samples::parse(
            "# HELP x\n# TYPE qpq_requests counter\n\
             qpq_requests_total{method=\"enqueue\"} 10\n\
             qpq_requests_total{method=\"fetch\"} 5\n\
             qpq_fsyncs_total 3\n\
             qpq_requests_totalx 99\n",
        );
        assert_eq!(s.sum("qpq_requests_total", &[]), 15.0);
        assert_eq!(s.sum("qpq_requests_total", &["method=\"enqueue\""]), 10.0);
        assert_eq!(s.sum("qpq_fsyncs_total", &[]), 3.0);
    }
}
