//! Prometheus metrics of a mount (`incfs mount --metrics ADDR`): `GET /metrics` answers the
//! text exposition format (version 0.0.4) with the same counters as `incfs status`.

use std::fmt::Write;
use std::sync::Arc;

use crate::control::{Control, Status};

/// The exposition text for one status snapshot.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP incfs_{name} {help}");
        let _ = writeln!(out, "# TYPE incfs_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "incfs_{name}{labels} {v}");
        }
    };
    let n = |v: u64| v as f64;
    metric("reads_served_total", "counter", "FUSE reads answered by the daemon.", &[("", n(s.reads_served))]);
    metric(
        "reads_waited_total",
        "counter",
        "Reads that waited (delayed) for data from the network or a loader.",
        &[("", n(s.reads_waited))],
    );
    metric(
        "reads_failed_total",
        "counter",
        "Reads failed, by cause.",
        &[
            ("{cause=\"timeout\"}", n(s.reads_failed_timeout)),
            ("{cause=\"verification\"}", n(s.reads_failed_verification)),
            ("{cause=\"source\"}", n(s.reads_failed_source)),
            ("{cause=\"other\"}", n(s.reads_failed_other)),
        ],
    );
    metric("pending_reads", "gauge", "Reads waiting for data now.", &[("", n(s.pending_reads))]);
    metric("fetch_requests_total", "counter", "Ranged GETs made.", &[("", n(s.fetch_requests))]);
    metric("fetch_failures_total", "counter", "Ranged GETs that failed.", &[("", n(s.fetch_failures))]);
    metric("fetched_bytes_total", "counter", "Bytes received from sources.", &[("", n(s.bytes_fetched))]);
    metric("blocks_fetched_total", "counter", "Blocks fetched and verified.", &[("", n(s.blocks_fetched))]);
    metric("blocks_bad_total", "counter", "Blocks that failed verification.", &[("", n(s.blocks_bad))]);
    metric("blocks_filled_total", "counter", "Blocks filled from outside and kept.", &[("", n(s.blocks_filled))]);
    metric("fills_rejected_total", "counter", "Filled blocks that failed verification.", &[("", n(s.fills_rejected))]);
    metric("blocks_present", "gauge", "Blocks of the image present locally.", &[("", n(s.blocks_present))]);
    metric("blocks_total", "gauge", "Blocks of the image.", &[("", n(s.blocks_total))]);
    metric("complete", "gauge", "1 when every block is present.", &[("", if s.complete { 1.0 } else { 0.0 })]);
    metric("stored_bytes", "gauge", "Compressed bytes in the local store.", &[("", n(s.bytes_stored))]);
    metric("plain_bytes", "gauge", "Bytes of plain copies for passthrough.", &[("", n(s.plain_bytes.unwrap_or(0)))]);
    metric(
        "plain_queued",
        "gauge",
        "Plain copies asked for and not made yet.",
        &[("", n(s.plain_queued.unwrap_or(0)))],
    );
    let u = &s.cache_usage;
    metric(
        "cache_bytes",
        "gauge",
        "Bytes in the cache directory, by kind.",
        &[
            ("{kind=\"blocks\"}", n(u.blocks)),
            ("{kind=\"metadata\"}", n(u.metadata)),
            ("{kind=\"unindexed\"}", n(u.unindexed)),
            ("{kind=\"journal\"}", n(u.journals)),
            ("{kind=\"plain\"}", n(u.plain)),
            ("{kind=\"database\"}", n(u.database)),
            ("{kind=\"other\"}", n(u.other)),
        ],
    );
    if let Some(l) = s.cache_limit {
        metric("cache_limit_bytes", "gauge", "The cache's size limit.", &[("", n(l))]);
    }
    metric(
        "cache_full",
        "gauge",
        "1 while background completion is stopped at the cache limit.",
        &[("", if s.cache_full { 1.0 } else { 0.0 })],
    );
    metric("evictions_total", "counter", "Files evicted to stay within the cache limit.", &[("", n(s.evictions))]);
    metric(
        "evicted_bytes_total",
        "counter",
        "Bytes evicted to stay within the cache limit.",
        &[("", n(s.evicted_bytes))],
    );
    metric(
        "blocks_refetched_total",
        "counter",
        "Blocks fetched again after their eviction (approximate).",
        &[("", n(s.blocks_refetched))],
    );
    metric("opens_passthrough_total", "counter", "Opens served by FUSE passthrough.", &[("", n(s.opens_passthrough))]);
    metric(
        "background_cancelled_total",
        "counter",
        "Background requests cancelled for a waiting read.",
        &[("", n(s.background_cancelled))],
    );
    metric(
        "fetch_latency_milliseconds",
        "gauge",
        "Recent fetch latency.",
        &[("{stat=\"mean\"}", s.fetch_latency_mean_ms), ("{stat=\"p99\"}", s.fetch_latency_p99_ms)],
    );
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let info = format!("{{image=\"{}\",version=\"{}\"}}", escape(&s.image), s.version);
    metric("image_info", "gauge", "The mounted image and version.", &[(&info, 1.0)]);
    out
}

/// Serve `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(control: Arc<Control>, listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let control = control.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&control.status()))
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
