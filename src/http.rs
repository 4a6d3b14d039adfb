//! `/metrics` and `/healthz`: a thin HTTP layer over [`Metrics`] (axum).
//!
//! Nothing here knows broker internals: the handlers only encode what
//! [`Metrics`] holds, so `fifobus stats` and Prometheus see the same figures.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{MetricsEndpoint, DEFAULT_METRICS_ADDR};
use crate::metrics::Metrics;

/// Binds the metrics listener.
///
/// # Errors
/// When an explicitly given address cannot be bound.
pub async fn bind(endpoint: MetricsEndpoint) -> std::io::Result<Option<TcpListener>> {
    match endpoint {
        MetricsEndpoint::Off => Ok(None),
        MetricsEndpoint::At(addr) => TcpListener::bind(addr).await.map(Some),
        MetricsEndpoint::Default => match TcpListener::bind(DEFAULT_METRICS_ADDR).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                tracing::warn!(
                    "cannot serve metrics on {DEFAULT_METRICS_ADDR} ({e}); using a free loopback port instead (see metrics.addr in the bus directory)"
                );
                TcpListener::bind("127.0.0.1:0").await.map(Some)
            }
        },
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!("the metrics endpoint failed: {e}");
    }
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.encode(),
    )
}
