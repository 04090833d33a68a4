//! The Prometheus scrape endpoint.

use std::sync::Arc;

use prometheus::Registry;

/// Serve `registry` as Prometheus text on `GET /metrics` until `shutdown`;
/// `before_scrape` refreshes sampled gauges first.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Registry,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    let scrape = move || {
        let registry = registry.clone();
        let before = before_scrape.clone();
        async move {
            before();
            let encoder = prometheus::TextEncoder::new();
            match encoder.encode_to_string(&registry.gather()) {
                Ok(body) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    body,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    e.to_string(),
                ),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
