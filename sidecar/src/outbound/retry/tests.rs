use std::time::Duration;

use http::{StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::{
    http::{
        client::{ConnectError, ConnectFailure},
        empty, full,
    },
    metrics::Metrics,
    outbound::protection::Protections,
};

type MockHandle = tower_test::mock::Handle<Request<AttemptBody>, Response<Body>>;

fn protection() -> Arc<Protection> {
    Protections::new(Metrics::unregistered()).get(&"catalog".into())
}

fn config(retries: Retries, protection: Arc<Protection>) -> RetryConfig {
    RetryConfig { retries, backoff: BACKOFF, protection, label: "test".into() }
}

/// Sends `request` through a retry layer over a mock endpoint, in a task; returns its outcome
/// to come and the mock's handle.
fn spawn(config: RetryConfig, request: Request<Body>) -> (tokio::task::JoinHandle<Result<Response<Body>, BoxError>>, MockHandle) {
    let (mock, handle) = tower_test::mock::pair::<Request<AttemptBody>, Response<Body>>();
    let service = RetryLayer::new(config).layer(mock);
    (tokio::spawn(service.oneshot(request)), handle)
}

fn connect_error() -> ConnectError {
    ConnectError { address: "x".into(), reason: ConnectFailure::Timeout(Duration::from_secs(1)) }
}

fn status(status: u16) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    response
}

#[tokio::test(start_paused = true)]
async fn a_post_never_sent_is_retried_with_its_body_numbered_and_its_endpoints_shared() {
    let request = Request::post("/orders").header(header::CONTENT_LENGTH, "5").body(full("order")).expect("request");
    let (outcome, mut handle) = spawn(config(mesh_default(), protection()), request);
    let mut tried = None;
    for attempt in 1..=3 {
        let (request, answer) = handle.next_request().await.expect("an attempt");
        assert_eq!(request.headers()[ATTEMPT_HEADER], attempt.to_string().as_str());
        let shared = request.extensions().get::<Tried>().expect("every attempt carries Tried").clone();
        shared.record(format!("endpoint-{attempt}").into());
        tried = Some(shared);
        let body = request.into_body().collect().await.expect("reads").to_bytes();
        assert_eq!(body, "order", "attempt {attempt} sends the whole body");
        if attempt < 3 {
            answer.send_error(connect_error());
        } else {
            answer.send_response(Response::new(full("done")));
        }
    }
    assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::OK);
    let endpoints = tried.expect("tried").endpoints();
    assert_eq!(endpoints.len(), 3, "one Tried for every attempt of the request: {endpoints:?}");
}

#[tokio::test(start_paused = true)]
async fn a_post_that_reached_the_app_is_not_retried() {
    let retries = Retries { attempts: 3, any_5xx: true, ..mesh_default() };
    let request = Request::post("/orders").body(full("order")).expect("request");
    let (outcome, mut handle) = spawn(config(retries, protection()), request);
    let (_, answer) = handle.next_request().await.expect("an attempt");
    answer.send_response(status(503));
    assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_is_already_a_retry_is_not_retried_again() {
    let request = Request::get("/").header(ATTEMPT_HEADER, "2").body(empty()).expect("request");
    let (outcome, mut handle) = spawn(config(mesh_default(), protection()), request);
    let (request, answer) = handle.next_request().await.expect("an attempt");
    assert_eq!(request.headers()[ATTEMPT_HEADER], "1", "this hop numbers its own attempts");
    assert!(request.extensions().get::<Tried>().is_none(), "nothing is kept for attempts that cannot follow");
    answer.send_error(connect_error());
    assert!(outcome.await.expect("joins").expect_err("not retried").is::<ConnectError>());
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_retries_and_counts_every_request() {
    let refusing = protection();
    refusing.budget.update(crate::outbound::policy::Budget { ratio: 0.0, min_per_second: 0, window: Duration::from_secs(10) });
    let (outcome, mut handle) =
        spawn(config(mesh_default(), refusing.clone()), Request::get("/").body(empty()).expect("request"));
    let (_, answer) = handle.next_request().await.expect("an attempt");
    answer.send_error(connect_error());
    assert!(outcome.await.expect("joins").is_err(), "the last attempt's outcome");
    assert_eq!(refusing.budget.counts(), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn no_backoff_starts_that_would_end_past_the_deadline() {
    let mut request = Request::get("/").body(empty()).expect("request");
    request.extensions_mut().insert(RequestDeadline(Instant::now() + Duration::from_millis(1)));
    let (outcome, mut handle) = spawn(config(mesh_default(), protection()), request);
    let (_, answer) = handle.next_request().await.expect("an attempt");
    answer.send_error(connect_error());
    assert!(outcome.await.expect("joins").expect_err("no retry").is::<ConnectError>());
}

#[tokio::test(start_paused = true)]
async fn retries_wait_out_their_backoff() {
    let (outcome, mut handle) = spawn(config(mesh_default(), protection()), Request::get("/").body(empty()).expect("request"));
    let (_, answer) = handle.next_request().await.expect("an attempt");
    let failed_at = Instant::now();
    answer.send_error(connect_error());
    let (request, answer) = handle.next_request().await.expect("a retry");
    let waited = failed_at.elapsed();
    assert!(waited >= BACKOFF.ceiling(1) / 4 && waited <= BACKOFF.ceiling(1), "waited {waited:?}");
    assert_eq!(request.headers()[ATTEMPT_HEADER], "2");
    answer.send_response(status(200));
    assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_rule_of_one_attempt_sends_its_body_untouched_with_its_per_try_limit() {
    let retries = Retries { attempts: 1, per_try_timeout: Some(Duration::from_millis(300)), ..mesh_default() };
    let request = Request::post("/orders").body(full("order")).expect("request");
    let (outcome, mut handle) = spawn(config(retries, protection()), request);
    let (request, answer) = handle.next_request().await.expect("an attempt");
    assert!(matches!(request.body(), AttemptBody::Once(_)), "no copy kept");
    assert_eq!(request.extensions().get::<PerTryTimeout>().map(|t| t.0), Some(Duration::from_millis(300)));
    answer.send_response(status(200));
    assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_the_inner_services() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<AttemptBody>, Response<Body>>();
    let mut service = tower_test::mock::Spawn::new(RetryLayer::new(config(mesh_default(), protection())).layer(mock));
    handle.allow(0);
    assert!(service.poll_ready().is_pending());
    handle.allow(1);
    assert!(service.poll_ready().is_ready());
}
