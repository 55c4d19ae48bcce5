//! Prometheus metrics and the HTTP endpoint (`/metrics`, `/healthz`).
//!
//! One pipeline runs per process, so the metrics live in one process-wide
//! registry that the pipeline, sources and sinks update directly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pipeline phases `cutover_phase{phase}` can show.
pub const PHASES: [&str; 6] = ["snapshot", "catch-up", "streaming", "stopped", "switched-over", "fallback"];

/// Every metric cutover exports.
pub struct Metrics {
    registry: Registry,
    pub transactions_applied: IntCounter,
    pub changes_applied: IntCounterVec,
    pub lag_seconds: Gauge,
    pub lag_bytes: IntGauge,
    pub snapshot_rows: IntCounterVec,
    pub snapshot_tables: IntGaugeVec,
    pub phase: IntGaugeVec,
    pub apply_batch_seconds: Histogram,
    pub errors: IntCounterVec,
    pub reconnects: IntCounterVec,
    /// False while the pipeline retries a lost connection or has failed: `/healthz` says 503.
    healthy: AtomicBool,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are fixed and distinct, so registration cannot clash.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

impl Metrics {
    /// Row changes applied to the target, over every table and operation.
    pub fn changes_applied_total(&self) -> u64 {
        use prometheus::core::Collector as _;
        let families = self.changes_applied.collect();
        let counters = families.iter().flat_map(|family| family.get_metric()).map(|m| m.get_counter().get_value());
        counters.sum::<f64>() as u64
    }

    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        Ok(Metrics {
            transactions_applied: register(
                &registry,
                IntCounter::new("cutover_transactions_applied_total", "Source transactions committed on the target")?,
            ),
            changes_applied: register(
                &registry,
                counter_vec("cutover_changes_applied_total", "Row changes applied to the target", &["table", "op"])?,
            ),
            lag_seconds: register(
                &registry,
                Gauge::new("cutover_lag_seconds", "Seconds from a transaction's source commit to its target commit")?,
            ),
            lag_bytes: register(
                &registry,
                IntGauge::new(
                    "cutover_lag_bytes",
                    "WAL bytes the source has written past the applied position (PostgreSQL)",
                )?,
            ),
            snapshot_rows: register(
                &registry,
                counter_vec("cutover_snapshot_rows_total", "Rows copied by the snapshot", &["table"])?,
            ),
            snapshot_tables: register(
                &registry,
                IntGaugeVec::new(Opts::new("cutover_snapshot_tables", "Tables by snapshot state"), &["state"])?,
            ),
            phase: register(
                &registry,
                IntGaugeVec::new(Opts::new("cutover_phase", "1 for the pipeline's current phase"), &["phase"])?,
            ),
            apply_batch_seconds: register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(
                    "cutover_apply_batch_seconds",
                    "Seconds to apply and commit one target transaction",
                ))?,
            ),
            errors: register(&registry, counter_vec("cutover_errors_total", "Errors by kind", &["kind"])?),
            reconnects: register(
                &registry,
                counter_vec("cutover_reconnects_total", "Reconnects after a lost connection", &["side"])?,
            ),
            healthy: AtomicBool::new(true),
            registry,
        })
    }

    /// Shows `phase` as the current phase.
    pub fn set_phase(&self, phase: &str) {
        for p in PHASES {
            self.phase.with_label_values(&[p]).set(i64::from(p == phase));
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The process-wide metrics.
/// The definitions are constants, checked by the unit test below; no input reaches them.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new().expect("valid metric definitions")); // ok: constants

/// Serves `/metrics` and `/healthz` on `listen` until the process ends. A port that
/// cannot be bound is logged, not fatal: replication matters more than its metrics.
pub async fn serve(listen: SocketAddr) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!("metrics endpoint not started: cannot listen on {listen}: {e} (set [metrics] listen)");
            return;
        }
    };
    tracing::info!(%listen, "metrics at /metrics, health at /healthz");
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buffer = [0u8; 1024];
            // The request line is all that matters; read until the headers end.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", METRICS.render()),
                "/healthz" if METRICS.healthy.load(Ordering::Relaxed) => ("200 OK", b"ok\n".to_vec()),
                "/healthz" => ("503 Service Unavailable", b"retrying or failed\n".to_vec()),
                _ => ("404 Not Found", b"try /metrics or /healthz\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../contrib/grafana/cutover.json")).expect("dashboard is JSON");
        let exported = rendered_with_values();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                let names: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("cutover_"))
                    .collect();
                assert!(!names.is_empty(), "{expr}");
                for name in names {
                    let base = name.trim_end_matches("_bucket");
                    assert!(exported.contains(&format!("# HELP {base} ")), "{name} is not exported");
                    queried += 1;
                }
            }
        }
        assert!(queried >= 10);
    }

    /// Every metric with a value recorded (labelled ones are rendered only then).
    fn rendered_with_values() -> String {
        let metrics = Metrics::new().expect("valid definitions");
        metrics.transactions_applied.inc();
        metrics.changes_applied.with_label_values(&["public.t", "insert"]).inc();
        metrics.snapshot_rows.with_label_values(&["public.t"]).inc_by(3);
        metrics.errors.with_label_values(&["connection"]).inc();
        metrics.reconnects.with_label_values(&["source"]).inc();
        metrics.snapshot_tables.with_label_values(&["done"]).set(1);
        metrics.apply_batch_seconds.observe(0.01);
        metrics.set_phase("streaming");
        String::from_utf8(metrics.render()).expect("utf-8")
    }

    #[test]
    fn changes_applied_total_sums_every_table_and_operation() {
        let metrics = Metrics::new().expect("valid definitions");
        metrics.changes_applied.with_label_values(&["public.t", "insert"]).inc();
        metrics.changes_applied.with_label_values(&["public.u", "delete"]).inc_by(2);
        assert_eq!(metrics.changes_applied_total(), 3);
    }

    #[test]
    fn every_metric_is_defined_and_rendered() {
        let text = rendered_with_values();
        for name in [
            "cutover_transactions_applied_total 1",
            "cutover_changes_applied_total{op=\"insert\",table=\"public.t\"} 1",
            "cutover_lag_seconds",
            "cutover_lag_bytes",
            "cutover_snapshot_rows_total{table=\"public.t\"} 3",
            "cutover_snapshot_tables{state=\"done\"} 1",
            "cutover_phase{phase=\"streaming\"} 1",
            "cutover_apply_batch_seconds_count 1",
            "cutover_errors_total{kind=\"connection\"} 1",
            "cutover_reconnects_total{side=\"source\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
