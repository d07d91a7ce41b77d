//! The dashboard in a real browser: headless Chromium, driven through WebDriver, signs in with a
//! read token and shows the demo's three services, their instances' health and the calls between
//! them; when an instance's app dies, the page shows it critical without a reload.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them the
//! test says it skips, unless `FERRY_REQUIRE_BROWSER=1`. It saves screenshots of each part of the
//! page in `target/dashboard-screenshots/`, and with `FERRY_UPDATE_SCREENSHOTS=1` also in
//! `docs/img/`, where `docs/dashboard.md` shows them.

use std::{path::PathBuf, sync::Arc, time::Duration};

use fantoccini::Locator;
use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, browser::Browser, client::proxy_get, eventually};

/// How often the sidecars report their traffic, instead of every 5 s.
const QUICK: [&str; 2] = ["--traffic-report-interval", "200ms"];

#[tokio::test]
async fn the_dashboard_shows_the_mesh_and_an_instance_failing_without_a_reload() {
    let Some(browser) = Browser::start_or_skip("the dashboard's browser test", 1280, 900).await else { return };

    // The demo's services: frontend calls catalog (two instances), catalog calls inventory.
    let control_plane = ControlPlane::start().await;
    let reach = control_plane.reach();
    let apps = [
        HttpApp::start("frontend").await,
        HttpApp::start("catalog-1").await,
        HttpApp::start("catalog-2").await,
        HttpApp::start("inventory").await,
    ];
    let mut sidecars = Vec::new();
    for ((service, id), app) in
        [("frontend", "frontend-1"), ("catalog", "catalog-1"), ("catalog", "catalog-2"), ("inventory", "inventory-1")]
            .into_iter()
            .zip(&apps)
    {
        let flags = [&QUICK[..], &["--id", id, "--check", "http:/healthz,interval=200ms,failure=1"]].concat();
        sidecars.push(Sidecar::start(&reach, service, Some(app.addr), &flags).await);
    }
    control_plane.wait_passing("catalog", 2).await;
    control_plane.wait_passing("inventory", 1).await;

    // Steady traffic while the page is open: bounded in count, stopped when the test ends.
    let (frontend_out, catalog_out) = (sidecars[0].outbound, sidecars[1].outbound);
    let traffic = tokio::spawn(async move {
        for _ in 0..2_000 {
            let _ = proxy_get(frontend_out, "http://catalog/items").await;
            let _ = proxy_get(catalog_out, "http://inventory/stock").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let traffic = Arc::new(AbortOnDrop(traffic));

    // A policy that changes no traffic, for its version in the services table.
    let policy = control_plane.apply("kind: ServicePolicy\nservice: catalog\nsubsets: { v1: { version: v1 } }\n").await;

    // With auth on, the page asks for a token, and a read token is enough.
    let page = format!("{}/ui/", control_plane.http_url());
    browser.client.goto(&page).await.expect("opens the dashboard");
    browser.wait_for("#login:not([hidden]) #token").await;
    let read = control_plane.token("read", None).await;
    let field = browser.client.find(Locator::Css("#token")).await.expect("the token field");
    field.send_keys(&read).await.expect("types the token");
    browser.client.find(Locator::Css("#login button[type=submit]")).await.expect("the button").click().await.expect("submits");

    for service in ["frontend", "catalog", "inventory"] {
        browser.wait_for(&format!(r#"tr[data-service="{service}"]"#)).await;
    }
    for id in ["catalog-1", "catalog-2", "frontend-1", "inventory-1"] {
        browser.wait_text(&format!(r#"tr[data-instance="{id}"] td.health"#), "passing").await;
    }
    for edge in ["frontend->catalog", "catalog->inventory"] {
        browser.wait_for(&format!(r#"g.edge[data-edge="{edge}"]"#)).await;
        browser.wait_for(&format!(r#"tr[data-edge="{edge}"]"#)).await;
    }
    browser.wait_text("#status", "live").await;
    // Versions are shown by their last digits, as ferryctl shows them, and whole on hover.
    let whole = policy[0].to_string();
    let cell = r#"tr[data-service="catalog"] td:nth-child(6)"#;
    browser.wait_text(cell, &format!("v…{}", &whole[whole.len() - 6..])).await;
    let element = browser.client.find(Locator::Css(cell)).await.expect("the policy cell");
    assert_eq!(element.attr("title").await.expect("its title"), Some(whole));
    let signed_in = browser.client.find(Locator::Css("#login")).await.expect("the form");
    assert!(!signed_in.is_displayed().await.expect("displayed?"), "the sign-in form is hidden once signed in");

    // How long the page takes to show the mesh, from navigation to the instances' rows (the token
    // is in the tab's session now, so a reload signs in by itself).
    browser.client.refresh().await.expect("reloads");
    browser.wait_for(r#"tr[data-instance="inventory-1"] td.health"#).await;
    let timing = browser
        .client
        .execute(
            "const n = performance.getEntriesByType('navigation')[0];
             return [n.domContentLoadedEventEnd, n.loadEventEnd, performance.now()];",
            vec![],
        )
        .await
        .expect("navigation timing");
    println!(
        "dashboard timing (ms since navigation): DOMContentLoaded {}, load {}, instances shown by {}",
        timing[0], timing[1], timing[2]
    );
    for edge in ["frontend->catalog", "catalog->inventory"] {
        browser.wait_for(&format!(r#"g.edge[data-edge="{edge}"]"#)).await;
    }
    // Each figure on an edge is a number once reported.
    let row = eventually("the frontend → catalog edge's figures", || async {
        let text = browser.text(r#"tr[data-edge="frontend->catalog"]"#).await?;
        text.contains('%').then_some(text)
    })
    .await;
    let label = browser.text(r#"g.edge[data-edge="frontend->catalog"]"#).await.unwrap_or_default();
    println!("frontend -> catalog: row {row:?}, graph label {label:?}");
    assert!(label.contains(" rps") && label.contains("p99"), "{label}");
    save_screenshots(&browser, "").await;

    // A marker the page would lose on a reload: the page must change by itself.
    browser.client.execute("window.ferryTestMarker = 42;", vec![]).await.expect("sets a marker");
    apps[2].stop();
    browser.wait_text(r#"tr[data-instance="catalog-2"] td.health"#, "critical").await;
    let marker = browser.client.execute("return window.ferryTestMarker;", vec![]).await.expect("reads the marker");
    assert_eq!(marker, serde_json::json!(42), "the page was reloaded instead of updating itself");
    assert_eq!(browser.text(r#"tr[data-instance="catalog-1"] td.health"#).await.as_deref(), Some("passing"));
    // The services table counts one routable catalog instance of two, and the overview one
    // critical instance.
    browser.wait_text(r#"tr[data-service="catalog"] td:nth-child(3)"#, "1").await;
    browser.wait_text("#overview .card.critical .value", "1").await;
    let output = browser.text(r#"tr[data-instance="catalog-2"]"#).await.unwrap_or_default();
    assert!(output.contains("critical"), "{output}");
    save_screenshots(&browser, "-critical").await;

    drop(traffic);
    browser.close().await;
}

/// Aborts the traffic task when the test ends, passed or not.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Saves a PNG of each part of the page.
async fn save_screenshots(browser: &Browser, suffix: &str) {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = tests.parent().expect("the workspace holds the tests crate");
    let mut folders = vec![root.join("target").join("dashboard-screenshots")];
    if std::env::var("FERRY_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        folders.push(root.join("docs").join("img"));
    }
    for part in ["overview", "services", "traffic"] {
        // The suffix marks the shots taken after the instance failed; the docs show those of
        // the services only.
        if !suffix.is_empty() && part != "services" {
            continue;
        }
        let png = browser.screenshot_at(&format!("#{part}")).await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG of #{part}");
        for folder in &folders {
            std::fs::create_dir_all(folder).expect("a screenshot folder");
            let file = folder.join(format!("dashboard-{part}{suffix}.png"));
            std::fs::write(&file, &png).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
            println!("saved {}", file.display());
        }
    }
}
