//! Graceful drain: a rolling restart of a service's instances under a steady load from another
//! sidecar loses no request.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, client};

/// What the load saw.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

#[tokio::test]
async fn a_rolling_restart_under_load_loses_no_request() {
    let control_plane = ControlPlane::start().await;
    let mut instances = Vec::new();
    for n in 1..=3 {
        let app = HttpApp::start(&format!("catalog-{n}")).await;
        let id = format!("catalog-{n}");
        let sidecar = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", &id, "--drain", "1s"]).await;
        instances.push((app, sidecar));
    }
    let caller = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;
    caller.wait_endpoints("catalog", 3).await;

    // A steady, bounded load: four workers, each stopping on the flag, after 60 s, or after
    // 50,000 requests, whichever comes first.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (load, stop, outbound) = (load.clone(), stop.clone(), caller.outbound);
            tokio::spawn(async move {
                let started = Instant::now();
                for _ in 0..50_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    match client::proxy_get(outbound, "http://catalog/").await {
                        Ok(answer) if answer.0 == 200 => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            let detail = match other {
                                Ok(answer) => format!("{} {}", answer.0, client::header(&answer, "x-ferry-error")),
                                Err(error) => error.to_string(),
                            };
                            load.first_failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(detail);
                        }
                    }
                }
            })
        })
        .collect();

    // Replace each instance in turn: stop its sidecar (it drains, then leaves), stop its app,
    // start a new app and sidecar, and wait until the caller routes to three again.
    for round in 1..=3 {
        let (app, mut sidecar) = instances.remove(0);
        let before = load.ok.load(Ordering::Relaxed);
        let status = sidecar.process.terminate().await;
        assert!(status.success(), "the sidecar exits 0 after draining: {status}");
        app.stop();
        let app = HttpApp::start(&format!("catalog-new-{round}")).await;
        let id = format!("catalog-new-{round}");
        let sidecar = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", &id, "--drain", "1s"]).await;
        caller.wait_endpoints("catalog", 3).await;
        assert!(load.ok.load(Ordering::Relaxed) > before, "traffic flowed during round {round}");
        instances.push((app, sidecar));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("the worker finishes");
    }

    let (ok, failed) = (load.ok.load(Ordering::Relaxed), load.failed.load(Ordering::Relaxed));
    let first = load.first_failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(failed, 0, "{failed} of {} requests failed; the first: {first:?}", ok + failed);
    eprintln!("rolling restart: {ok} requests, {failed} failed");
    assert!(ok > 100, "only {ok} requests were sent");
    let new_apps: u64 = instances.iter().map(|(app, _)| app.hits()).sum();
    assert!(new_apps > 0, "the new instances took traffic");
}
