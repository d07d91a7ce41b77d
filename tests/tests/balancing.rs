//! Load balancing end to end: a calling sidecar in front of three instances of `catalog`, each a
//! real app behind a real sidecar. P2C over peak-EWMA keeps requests away from a slow instance;
//! outlier detection ejects one that keeps failing; a ring-hash key sticks to one instance and
//! moves only when that instance leaves; a new instance ramps up during slow start; and
//! requests stay in the caller's zone while enough of it passes.
//!
//! Every test sends a fixed number of requests and waits on the caller's `/config` and
//! `/metrics`, never on a fixed sleep. The caller's `/config` lists each balancer it built, with
//! its algorithm and the endpoints it can route to: waiting on it, rather than on the endpoints
//! the caller knows of, waits for the balancer itself to have caught up.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{HttpApp, SlowApp},
    client::{self, Answer, header, text},
    eventually,
    faulty::FaultyApp,
};
use futures::StreamExt;
use http::Request;
use http_body_util::Empty;
use serde_json::Value;

/// `GET /` to `catalog` through the caller's outbound listener (the service in `Host`), with
/// extra headers.
async fn get(outbound: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get("/").header(http::header::HOST, "catalog");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client::send_h1(outbound, request.body(Empty::new()).expect("valid request")).await.expect("answered")
}

/// The instance that served `answer`.
fn served_by(answer: &Answer) -> String {
    header(answer, "x-served-by").to_owned()
}

/// Sends `count` requests, `concurrency` at a time, every one of which must succeed, and counts
/// them by the instance that served them.
async fn spread(outbound: SocketAddr, count: usize, concurrency: usize) -> BTreeMap<String, usize> {
    let answers: Vec<Answer> =
        futures::stream::iter(0..count).map(|_| get(outbound, &[])).buffer_unordered(concurrency).collect().await;
    let mut served = BTreeMap::new();
    for answer in &answers {
        assert_eq!(answer.0, 200, "{} {}: {}", answer.0, header(answer, "x-ferry-error"), text(answer));
        *served.entry(served_by(answer)).or_default() += 1;
    }
    served
}

/// An instance of `catalog`: a sidecar in front of `app`, with extra flags.
async fn instance(control_plane: &ControlPlane, app: SocketAddr, flags: &[&str]) -> Sidecar {
    Sidecar::start(&control_plane.reach(), "catalog", Some(app), flags).await
}

/// The sidecar the tests send through, with extra flags.
async fn caller(control_plane: &ControlPlane, flags: &[&str]) -> Sidecar {
    Sidecar::start(&control_plane.reach(), "frontend", None, flags).await
}

/// The caller's balancer for all of `catalog`, as its `/config` shows it.
async fn balancer(caller: &Sidecar) -> Value {
    caller.config().await["services"]["catalog"]["balancers"]["catalog"].clone()
}

/// Waits until the caller's balancer for `catalog` uses `algorithm` and can route to `routable`
/// endpoints, sending a request in each poll (the first request builds the balancer).
async fn wait_for_balancer(caller: &Sidecar, algorithm: &str, routable: usize) {
    eventually(&format!("a {algorithm} balancer over {routable} endpoints of catalog in the caller"), || async {
        get(caller.outbound, &[]).await;
        let balancer = balancer(caller).await;
        let endpoints = balancer["endpoints"].as_array()?.len();
        (balancer["load_balancer"] == algorithm && endpoints == routable).then_some(())
    })
    .await;
}

/// The sidecar's `/metrics`.
async fn metrics(sidecar: &Sidecar) -> String {
    let (_, _, body) = client::get(&format!("http://{}/metrics", sidecar.admin)).await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// Whether `metrics` holds exactly this sample line.
fn has_sample(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

#[tokio::test]
async fn a_slow_instance_gets_under_a_tenth_of_requests() {
    let control_plane = ControlPlane::start().await;
    let (fast_1, fast_2) = (HttpApp::start("fast-1").await, HttpApp::start("fast-2").await);
    let slow = SlowApp::start("slow", Duration::from_millis(200)).await;
    let (_fast_1, _fast_2, _slow, caller) = tokio::join!(
        instance(&control_plane, fast_1.addr, &[]),
        instance(&control_plane, fast_2.addr, &[]),
        instance(&control_plane, slow.addr, &[]),
        caller(&control_plane, &[]),
    );
    control_plane.wait_passing("catalog", 3).await;
    wait_for_balancer(&caller, "p2c-ewma", 3).await;

    // Eight callers at once, as under load: the slow instance holds its requests 200 ms, while
    // the others answer at once.
    let served = spread(caller.outbound, 320, 8).await;
    eprintln!("served: {served:?}");
    let total: usize = served.values().sum();
    let to_slow = served.get("slow").copied().unwrap_or(0);
    assert_eq!(total, 320);
    assert!(to_slow * 10 < total, "the slow instance served {to_slow} of {total}: {served:?}\n{}", balancer(&caller).await);
    assert!(served.get("fast-1").is_some_and(|n| *n > 0) && served.get("fast-2").is_some_and(|n| *n > 0), "{served:?}");
}

#[tokio::test]
async fn an_instance_answering_503_is_ejected_and_failures_stop() {
    let control_plane = ControlPlane::start().await;
    // Round-robin sends the failing instance every third request. Under P2C over peak-EWMA, one
    // slow answer from it on a loaded machine would keep it out of picks for longer than a test
    // waits, ejection or not.
    control_plane.apply("kind: ServicePolicy\nservice: catalog\nload_balancer: round-robin\n").await;
    let (good_1, good_2) = (FaultyApp::start("good-1", 200).await, FaultyApp::start("good-2", 200).await);
    let failing = FaultyApp::start("failing", 503).await;
    let (_good_1, _good_2, _failing, caller) = tokio::join!(
        instance(&control_plane, good_1.addr, &[]),
        instance(&control_plane, good_2.addr, &[]),
        instance(&control_plane, failing.addr, &[]),
        caller(&control_plane, &[]),
    );
    control_plane.wait_passing("catalog", 3).await;
    wait_for_balancer(&caller, "round-robin", 3).await;

    // One request per poll until the failing instance has failed five in a row (outlier
    // detection's defaults: the policy sets none).
    let ejected = r#"ferry_outlier_ejections_total{backend="catalog"} 1"#;
    eventually("the failing instance to be ejected", || async {
        get(caller.outbound, &[]).await;
        has_sample(&metrics(&caller).await, ejected).then_some(())
    })
    .await;
    assert!(failing.hits() >= 5, "ejected after {} failures", failing.hits());
    let metrics = metrics(&caller).await;
    for line in [
        r#"ferry_balancer_endpoints{backend="catalog",state="ejected"} 1"#,
        r#"ferry_balancer_endpoints{backend="catalog",state="available"} 2"#,
    ] {
        assert!(has_sample(&metrics, line), "{line} in\n{metrics}");
    }
    let endpoints = balancer(&caller).await["endpoints"].clone();
    let ejected_endpoints: Vec<_> = endpoints.as_array().into_iter().flatten().filter(|e| e["ejected"] == true).collect();
    assert_eq!(ejected_endpoints.len(), 1, "{endpoints}");

    // The ejection lasts 30 s: far longer than these 100 requests take.
    let hits = failing.hits();
    for n in 0..100 {
        let answer = get(caller.outbound, &[]).await;
        assert_eq!(answer.0, 200, "request {n} after the ejection: {answer:?}");
        assert_ne!(served_by(&answer), "failing");
    }
    assert_eq!(failing.hits(), hits, "the ejected instance got no request");
    assert!(good_1.hits() > 0 && good_2.hits() > 0, "{} and {}", good_1.hits(), good_2.hits());
}

#[tokio::test]
async fn a_ring_hash_key_sticks_and_moves_only_when_its_instance_leaves() {
    let control_plane = ControlPlane::start().await;
    control_plane.apply("kind: ServicePolicy\nservice: catalog\nload_balancer: ring-hash\nhash_header: x-user\n").await;
    let apps = [HttpApp::start("catalog-1").await, HttpApp::start("catalog-2").await, HttpApp::start("catalog-3").await];
    // Fixed ids place the instances on the ring the same way in every run.
    let (one, two, three, caller) = tokio::join!(
        instance(&control_plane, apps[0].addr, &["--id", "catalog-1", "--drain", "500ms"]),
        instance(&control_plane, apps[1].addr, &["--id", "catalog-2", "--drain", "500ms"]),
        instance(&control_plane, apps[2].addr, &["--id", "catalog-3", "--drain", "500ms"]),
        caller(&control_plane, &[]),
    );
    let mut sidecars = [one, two, three];
    control_plane.wait_passing("catalog", 3).await;
    wait_for_balancer(&caller, "ring-hash", 3).await;

    // Each key goes to one instance, every time.
    let users: Vec<String> = (0..30).map(|n| format!("user-{n}")).collect();
    let mut owners = BTreeMap::new();
    for user in &users {
        let mut seen = HashSet::new();
        for _ in 0..5 {
            let answer = get(caller.outbound, &[("x-user", user)]).await;
            assert_eq!(answer.0, 200, "{answer:?}");
            seen.insert(served_by(&answer));
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        owners.insert(user.clone(), seen.into_iter().next().expect("one instance"));
    }
    let mut keys_of: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in owners.values() {
        *keys_of.entry(owner.as_str()).or_default() += 1;
    }
    assert_eq!(keys_of.len(), 3, "every instance owns keys: {keys_of:?}");

    // The instance holding the most keys leaves: it drains, deregisters and exits.
    let leaving = keys_of.iter().max_by_key(|(_, keys)| **keys).map(|(name, _)| name.to_string()).expect("an owner");
    let index = apps.iter().position(|app| app.name == leaving).expect("a started app");
    let status = sidecars[index].process.terminate().await;
    assert!(status.success(), "the sidecar exits 0 after draining: {status}");
    caller.wait_endpoints("catalog", 2).await;
    wait_for_balancer(&caller, "ring-hash", 2).await;

    // Its keys move, and stick where they land; every other key stays.
    let mut moved = 0;
    for user in &users {
        let first = get(caller.outbound, &[("x-user", user)]).await;
        let again = get(caller.outbound, &[("x-user", user)]).await;
        assert!(first.0 == 200 && again.0 == 200, "{first:?} {again:?}");
        let (now, before) = (served_by(&first), &owners[user]);
        assert_eq!(served_by(&again), now, "{user} sticks after the move");
        if *before == leaving {
            assert_ne!(now, leaving, "{user} moved off the instance that left");
            moved += 1;
        } else {
            assert_eq!(&now, before, "{user} stays on {before}");
        }
    }
    assert_eq!(moved, keys_of[leaving.as_str()]);
}

#[tokio::test]
async fn a_new_instance_ramps_up_during_slow_start() {
    let control_plane = ControlPlane::start().await;
    // A long window next to the test's own timing, so even a slow machine sends all the
    // requests below early in the ramp.
    control_plane.apply("kind: ServicePolicy\nservice: catalog\nload_balancer: round-robin\nslow_start: 20s\n").await;
    let (old_1, old_2, new) = (HttpApp::start("old-1").await, HttpApp::start("old-2").await, HttpApp::start("new").await);
    let (_old_1, _old_2, caller) = tokio::join!(
        instance(&control_plane, old_1.addr, &[]),
        instance(&control_plane, old_2.addr, &[]),
        caller(&control_plane, &[]),
    );
    // Both are known before the caller's first request, so its balancer starts with both, warm.
    control_plane.wait_passing("catalog", 2).await;
    wait_for_balancer(&caller, "round-robin", 2).await;
    let served = spread(caller.outbound, 20, 4).await;
    assert!(served.values().all(|n| (8..=12).contains(n)) && served.len() == 2, "warm: equal turns: {served:?}");

    let _new = instance(&control_plane, new.addr, &[]).await;
    caller.wait_endpoints("catalog", 3).await;
    wait_for_balancer(&caller, "round-robin", 3).await;
    let served = spread(caller.outbound, 200, 4).await;
    let described = balancer(&caller).await;
    eprintln!("served: {served:?}\n{described}");
    let to_new = served.get("new").copied().unwrap_or(0);
    // A fair third would be 67; at 10% of its weight, rising by 5% a second, it gets about 5%.
    assert!(to_new > 0, "the new instance takes some traffic from the start: {served:?}\n{described}");
    assert!(to_new * 100 < 25 * 200, "the new instance got {to_new} of 200 during slow start: {served:?}\n{described}");
}

#[tokio::test]
async fn locality_keeps_requests_in_the_callers_zone() {
    let control_plane = ControlPlane::start().await;
    let (a_1, a_2, b_1) = (HttpApp::start("a-1").await, HttpApp::start("a-2").await, HttpApp::start("b-1").await);
    let (_a_1, _a_2, _b_1, caller) = tokio::join!(
        instance(&control_plane, a_1.addr, &["--zone", "zone-a"]),
        instance(&control_plane, a_2.addr, &["--zone", "zone-a", "--check", "http:/healthz,interval=100ms,failure=1"]),
        instance(&control_plane, b_1.addr, &["--zone", "zone-b"]),
        caller(&control_plane, &["--zone", "zone-a"]),
    );
    control_plane.wait_passing("catalog", 3).await;
    wait_for_balancer(&caller, "p2c-ewma", 3).await;

    // All of zone-a passes: requests stay there.
    let served = spread(caller.outbound, 100, 4).await;
    assert!(served.keys().all(|name| name.starts_with("a-")), "{served:?}");

    // One of zone-a's two fails its check: 50% of the zone passes, under the 70% bar, so
    // requests spill over to zone-b.
    a_2.set_health(500);
    caller.wait_endpoints("catalog", 2).await;
    wait_for_balancer(&caller, "p2c-ewma", 2).await;
    let served = spread(caller.outbound, 200, 4).await;
    eprintln!("served: {served:?}");
    assert!(served.get("b-1").is_some_and(|n| *n > 0), "zone-b takes traffic: {served:?}");
    assert!(!served.contains_key("a-2"), "the critical instance gets nothing: {served:?}");
}

#[tokio::test]
async fn killing_an_instance_under_load_fails_no_get() {
    let control_plane = ControlPlane::start().await;
    let apps = [HttpApp::start("one").await, HttpApp::start("two").await, HttpApp::start("three").await];
    let (one, two, three, caller) = tokio::join!(
        instance(&control_plane, apps[0].addr, &[]),
        instance(&control_plane, apps[1].addr, &[]),
        instance(&control_plane, apps[2].addr, &[]),
        caller(&control_plane, &[]),
    );
    let mut victim = three;
    control_plane.wait_passing("catalog", 3).await;
    wait_for_balancer(&caller, "p2c-ewma", 3).await;

    // Four workers send 600 GETs in all; once a third of them are through, instance three dies
    // at once (its sidecar killed, its app gone): no goodbye, no drain.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (third_done, mut third_seen) = tokio::sync::watch::channel(false);
    let load = {
        let sent = sent.clone();
        let outbound = caller.outbound;
        async move {
            let answers: Vec<Answer> = futures::stream::iter(0..600)
                .map(|_| {
                    let sent = sent.clone();
                    let third_done = third_done.clone();
                    async move {
                        let answer = get(outbound, &[]).await;
                        if sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 200 {
                            third_done.send_replace(true);
                        }
                        answer
                    }
                })
                .buffer_unordered(4)
                .collect()
                .await;
            answers
        }
    };
    let kill = async {
        let _ = third_seen.wait_for(|done| *done).await;
        victim.process.kill().await;
        apps[2].stop();
    };
    let (answers, ()) = tokio::join!(load, kill);
    let failed: Vec<String> =
        answers.iter().filter(|a| a.0 != 200).map(|a| format!("{} {}: {}", a.0, header(a, "x-ferry-error"), text(a))).collect();
    assert!(failed.is_empty(), "{} of 600 GETs failed: {failed:?}", failed.len());
    let served: HashSet<String> = answers.iter().map(served_by).collect();
    assert!(served.contains("one") && served.contains("two"), "{served:?}");
    drop((one, two));
}
