//! The admin server every binary runs: `/healthz` and `/metrics`.
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The one content type of every `/metrics` tally serves.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `/metrics` answer: `text` in the OpenMetrics text format.
pub fn metrics_response(text: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text)
}

/// Logs that `what` listens on `addr` (the bound address, so with port 0 the chosen
/// port): `<what> listening on addr=<host:port>`, at info level (target
/// `tally_runtime::admin`). Tests read this line to find a server started on port 0.
pub fn announce(what: &str, addr: SocketAddr) {
    tracing::info!("{what} listening on addr={addr}");
}

/// Binds `addr` (port 0: any free port), announces it, and serves `/healthz` and
/// `/metrics` (the text `encode` returns) in the background. Returns the bound address.
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    encode: impl Fn() -> String + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let encode = Arc::new(encode);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let encode = encode.clone();
                async move { metrics_response(encode()) }
            }),
        );
    announce(what, bound);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, what, "The admin server stopped");
        }
    });
    Ok(bound)
}
