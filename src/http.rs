//! `/metrics` and `/healthz`: a thin HTTP layer over [`Metrics`] (axum).
//!
//! Nothing here knows broker internals: the handlers only encode what
//! [`Metrics`] holds, so `fifobus stats` and Prometheus see the same figures.
//!
//! With `--metrics-token-file`, `/metrics` answers only requests that carry
//! the token (`Authorization: Bearer <token>`, RFC 6750); others get 401 and
//! a one-line body saying what is missing. `/healthz` stays open: it says
//! "ok" and nothing else, and probes should not need the secret.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{MetricsEndpoint, DEFAULT_METRICS_ADDR};
use crate::metrics::Metrics;
use crate::metrics_token::BearerToken;
use crate::throttle::LogThrottle;

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

struct Endpoint {
    metrics: Arc<Metrics>,
    /// `Some`: `/metrics` requires this bearer token.
    token: Option<BearerToken>,
    throttle: LogThrottle,
}

/// Serves until `stop` is cancelled. With a `token`, `/metrics` requires it.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    token: Option<BearerToken>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(Endpoint {
            metrics,
            token,
            throttle: LogThrottle::default(),
        }));
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
    {
        tracing::error!("the metrics endpoint failed: {e}");
    }
}

async fn render(
    State(endpoint): State<Arc<Endpoint>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = &endpoint.token {
        let given = headers.get(header::AUTHORIZATION);
        if !given.is_some_and(|h| token.matches_header(h.as_bytes())) {
            let why = if given.is_some() {
                "wrong-metrics-token"
            } else {
                "missing-metrics-token"
            };
            crate::warn_throttled!(
                endpoint.throttle,
                why,
                %peer,
                "refused a /metrics request without the right bearer token"
            );
            return unauthorized(given.is_some());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoint.metrics.encode(),
    )
        .into_response()
}

/// 401 with the challenge of RFC 6750 §3: `invalid_token` when a token was
/// sent but was not the one.
fn unauthorized(token_given: bool) -> Response {
    let (challenge, body) = if token_given {
        (
            r#"Bearer realm="fifobus", error="invalid_token""#,
            "401 unauthorized: wrong bearer token for /metrics (send the content of the broker's --metrics-token-file)\n",
        )
    } else {
        (
            r#"Bearer realm="fifobus""#,
            "401 unauthorized: /metrics requires Authorization: Bearer <the content of the broker's --metrics-token-file>\n",
        )
    };
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, challenge),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        body,
    )
        .into_response()
}
