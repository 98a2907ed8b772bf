//! Nacos's HTTP open API on the registry's port, under `/nacos/`. Its
//! naming calls (`/nacos/v1/ns/`) are to come; until then every path
//! under `/nacos/v1/` and `/nacos/v2/` answers 501, naming what is not
//! served and what is, so a Nacos 1.x client fails at once with a reason
//! rather than hanging or reading an empty 200.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;

/// The routes of the open API.
pub fn routes() -> axum::Router {
    axum::Router::new()
        .route("/nacos/v1/{*rest}", any(not_served))
        .route("/nacos/v2/{*rest}", any(not_served))
}

/// A Nacos HTTP call this registry does not serve: 501, naming it.
async fn not_served(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let what = if path.contains("/cs/") {
        "Nacos's configuration API"
    } else {
        "this Nacos HTTP call"
    };
    (
        StatusCode::NOT_IMPLEMENTED,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        format!(
            "{what} ({method} {path}) is not served by shop-mesh; Nacos clients reach its naming registry over Nacos's 2.x gRPC API, on this port + 1000\n"
        ),
    )
        .into_response()
}
