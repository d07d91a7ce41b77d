//! The read-only web dashboard at `/ui/`: one page, its script and its stylesheet, embedded in
//! the binary so the dashboard needs no build step, no files beside the binary and no network.
//!
//! The assets themselves need no token (they hold no data); the page's script asks for a `read`
//! token and sends it on every call it makes to the JSON API, which checks it as for any client.

use axum::{
    Router,
    http::{HeaderValue, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};

/// An embedded file and the content type it is served with.
struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset { body: include_str!("assets/index.html"), content_type: "text/html; charset=utf-8" };
const SCRIPT: Asset = Asset { body: include_str!("assets/app.js"), content_type: "text/javascript; charset=utf-8" };
const STYLE: Asset = Asset { body: include_str!("assets/style.css"), content_type: "text/css; charset=utf-8" };

/// The assets change only with the binary, so a browser revalidates instead of keeping a copy
/// from before an upgrade; they are small enough that fetching them again costs nothing.
const CACHE_CONTROL: &str = "no-cache";

/// The page loads its own script and stylesheet and calls its own origin, nothing else.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Whether `path` is the dashboard's, which the token check lets through.
pub fn is_ui_path(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// The dashboard's routes, to merge into the HTTP API's router.
pub fn router() -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { serve(&INDEX) }))
        .route("/ui/app.js", get(|| async { serve(&SCRIPT) }))
        .route("/ui/style.css", get(|| async { serve(&STYLE) }))
}

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        ],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::{
        body::Body,
        http::{Request, StatusCode, header},
    };
    use tower::ServiceExt;

    use super::*;

    async fn fetch(path: &str) -> Response {
        let request = Request::get(path).body(Body::empty()).expect("a GET with an empty body is a valid request");
        router().oneshot(request).await.expect("the router's error type is Infallible")
    }

    fn header_of(response: &Response, name: header::HeaderName) -> &str {
        response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    #[tokio::test]
    async fn assets_carry_their_content_types_and_a_cache_header() {
        for (path, content_type) in [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")] {
            let response = fetch(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert!(header_of(&response, header::CONTENT_TYPE).starts_with(content_type), "{path}");
            assert_eq!(header_of(&response, header::CACHE_CONTROL), CACHE_CONTROL, "{path}");
            assert_eq!(header_of(&response, header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
        }
    }

    #[tokio::test]
    async fn the_bare_path_redirects_to_the_page() {
        let response = fetch("/ui").await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(header_of(&response, header::LOCATION), "/ui/");
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(INDEX.body.contains(r#"<script src="/ui/app.js""#));
        assert!(INDEX.body.contains(r#"href="/ui/style.css""#));
        for asset in [&INDEX, &SCRIPT, &STYLE] {
            // SVG's namespace is a name, not a place the browser goes.
            let body = asset.body.replace("http://www.w3.org/2000/svg", "");
            assert!(!body.contains("http://") && !body.contains("https://"), "an asset reaches off the host");
        }
    }

    #[test]
    fn only_the_dashboard_paths_are_the_dashboards() {
        assert!(is_ui_path("/ui") && is_ui_path("/ui/") && is_ui_path("/ui/app.js"));
        assert!(!is_ui_path("/uix") && !is_ui_path("/v1/services") && !is_ui_path("/"));
    }
}
