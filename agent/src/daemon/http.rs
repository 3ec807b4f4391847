//! The metrics and health HTTP server.
use super::error::AgentError;
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;

/// Serves /metrics, /healthz and /readyz until the runtime stops.
pub(super) async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::MetricsServer { addr, source })?;
    let for_metrics = metrics.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = for_metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], metrics.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.readiness_text() {
                        (true, text) => (StatusCode::OK, text),
                        (false, text) => (StatusCode::SERVICE_UNAVAILABLE, text),
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    Ok(())
}
