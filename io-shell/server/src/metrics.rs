//! The metrics endpoint: serves the [`Metrics`] the shell keeps (never the
//! core, which stays sans-io; see [`crate::observe`] for what is counted and
//! where) as Prometheus text over HTTP on `metrics_listen` when it is set.
//!
//! The endpoint answers `GET /metrics` (and `GET /`) with the OpenMetrics
//! text format and anything else with 404. It serves at most
//! [`SCRAPES_IN_FLIGHT_MAX`] connections at once, reads at most
//! [`REQUEST_HEAD_BYTES_MAX`] of a request within [`SCRAPE_TIMEOUT`], and
//! never exposes keys, payloads or identities — only counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::observe::Metrics;

/// Scrape connections served at once; more wait for a slot.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 16;
/// Largest HTTP request head read from a scraper.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a scraper has to send its request and read the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics endpoint (before the runtime serves anything, so a bad
/// address fails at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `metrics` on `listener` until the task is dropped or aborted.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(SCRAPES_IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                // Accept errors (e.g. out of file descriptors) are usually
                // transient; don't spin on them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > REQUEST_HEAD_BYTES_MAX {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let response = match (method, path) {
        (Some(b"GET"), Some(b"/metrics" | b"/")) => {
            let body = metrics.encode();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::ServiceGauges;
    use quicproquo_core::node::Durability;

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_404_otherwise() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new(Durability::Buffered, ServiceGauges::default()));
        m.fsync(3);
        let server = tokio::spawn(serve_metrics(listener, m));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("qpq_fsyncs_total 1"), "{ok}");
        assert!(ok.contains("qpq_durability_fsync 0"), "{ok}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
