use http::StatusCode;
use tower::ServiceExt;

use super::*;
use crate::outbound::BalanceMetrics;

fn config(runtime: tokio::runtime::Handle) -> OutboundConfig {
    OutboundConfig {
        discovery_timeout: Duration::from_secs(5),
        response_timeout: None,
        client: crate::http::client::ClientConfig::default(),
        gateway: None,
        zone: None,
        balance_metrics: BalanceMetrics::default(),
        runtime,
    }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(crate::http::empty()).expect("request")
}

#[tokio::test(start_paused = true)]
async fn a_first_request_waits_for_the_route_instead_of_bypassing_it() {
    use ferry_proto::v1::service_resources::Endpoints;
    let catalog = Arc::new(Catalog::new(16));
    let runtime = tokio::runtime::Handle::current();
    let protections = Arc::new(Protections::new(crate::metrics::Metrics::unregistered()));
    let router = Router::new(
        "catalog".into(),
        catalog.clone(),
        catalog.watch("catalog").expect("room"),
        config(runtime.clone()),
        protections.clone(),
    );
    let pending = tokio::spawn(router.oneshot(get("/items")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "no config yet: the request waits");

    // The first config carries a route whose only rule aborts: the waiting request must get
    // the abort, not go to the endpoint as if there were no route.
    let route = ferry_proto::json::resources_from_yaml(
        "kind: Route\nservice: catalog\nrules:\n  - fault: { abort: { percent: 100, status: 418 } }\n",
    )
    .expect("valid")
    .remove(0);
    let Some(ferry_proto::v1::resource::Kind::Route(mut route)) = route.kind else { panic!("a route") };
    route.version = 3;
    let endpoint = ferry_proto::v1::Endpoint {
        id: "a".into(),
        address: "127.0.0.1".into(),
        port: 9,
        health: ferry_proto::v1::Health::Passing as i32,
        ..Default::default()
    };
    let resources = ferry_proto::v1::ServiceResources {
        service: "catalog".into(),
        version: 3,
        exists: true,
        endpoints: Some(Endpoints::Snapshot(ferry_proto::v1::Endpoints { endpoints: vec![endpoint] })),
        route: Some(ferry_proto::v1::RouteUpdate { route: Some(route) }),
        ..Default::default()
    };
    catalog
        .apply(&ferry_proto::v1::Push { nonce: "1".into(), resources: vec![resources], ..Default::default() })
        .expect("applies");
    let response = pending.await.expect("joins").expect("answered");
    assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(response.extensions().get::<RouteLabel>().map(|l| &*l.0), Some("rules[0]"), "counted under its rule");

    // With no config at all within the discovery timeout, the request fails saying so.
    let silent =
        Router::new("inventory".into(), catalog.clone(), catalog.watch("inventory").expect("room"), config(runtime), protections);
    let error = silent.oneshot(get("/")).await.expect_err("times out");
    assert!(error.is::<DiscoveryTimeout>(), "{error}");
}
