//! The dashboard's assets are served from the binary to anyone, while every call its page makes
//! to the JSON API still needs a token.

use ferry_tests::{
    ControlPlane,
    client::{header, text},
};

#[tokio::test]
async fn the_dashboard_loads_without_a_token_and_its_data_does_not() {
    let control_plane = ControlPlane::start().await;
    assert!(control_plane.token.is_some(), "the harness's control plane runs with auth on");
    let anonymous = control_plane.api().with_token(None);

    let page = anonymous.call(http::Method::GET, "/ui/", None).await.expect("GET /ui/");
    assert_eq!(page.0, 200, "{}", text(&page));
    assert!(header(&page, "content-type").starts_with("text/html"), "{:?}", page.1);
    assert!(text(&page).contains(r#"<script src="/ui/app.js""#), "{}", text(&page));
    assert!(!header(&page, "cache-control").is_empty(), "{:?}", page.1);

    for (path, content_type, sample) in
        [("/ui/app.js", "text/javascript", "/v1/services"), ("/ui/style.css", "text/css", "td.health")]
    {
        let asset = anonymous.call(http::Method::GET, path, None).await.expect("GET an asset");
        assert_eq!(asset.0, 200, "{path}: {}", text(&asset));
        assert!(header(&asset, "content-type").starts_with(content_type), "{path}: {:?}", asset.1);
        assert!(text(&asset).contains(sample), "{path}");
    }

    let bare = anonymous.call(http::Method::GET, "/ui", None).await.expect("GET /ui");
    assert_eq!(bare.0, 308);
    assert_eq!(header(&bare, "location"), "/ui/");

    // Being open stops at the assets: the data the page shows needs a token, as for any client.
    for path in ["/v1/services", "/v1/services/catalog?index=1&wait=1s", "/v1/sidecars", "/v1/traffic", "/v1/routes"] {
        let refused = anonymous.call(http::Method::GET, path, None).await.expect("GET without a token");
        assert_eq!(refused.0, 401, "{path}: {}", text(&refused));
    }
    let sneaky = anonymous.call(http::Method::GET, "/ui/../v1/services", None).await.expect("GET a dot path");
    assert_ne!(sneaky.0, 200, "{}", text(&sneaky));

    // A read token, what the page asks for, reads everything the page shows.
    let read = control_plane.token("read", None).await;
    let reader = control_plane.api().with_token(Some(&read));
    for path in ["/v1/services", "/v1/sidecars", "/v1/traffic", "/v1/routes", "/v1/policies", "/v1/authorizations"] {
        let answer = reader.call(http::Method::GET, path, None).await.expect("GET with a read token");
        assert_eq!(answer.0, 200, "{path}: {}", text(&answer));
    }
}
