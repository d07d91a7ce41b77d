//! Headless Chromium driven through WebDriver (Debian's `chromium` and `chromium-driver`), for
//! the dashboard's browser test.
//!
//! `chromedriver` starts on port 0 and says which port it took; it runs in a process group of
//! its own, so the browser it starts goes with it when the test ends, whether it passed or not.
//! Without the two programs the test says it skips, unless `FERRY_REQUIRE_BROWSER=1` (which
//! `.ci/run` sets once it has installed them).

use std::{path::PathBuf, process::Stdio, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{PATIENCE, eventually};

/// Where Debian installs the two programs; `FERRY_CHROMIUM` and `FERRY_CHROMEDRIVER` override.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium session, and the chromedriver that runs it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn program(variable: &str, default: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is missing (apt-get install -y chromium chromium-driver, or set {variable})", path.display()))
    }
}

impl Browser {
    /// A browser with a `width`×`height` window, or `None` when the test must skip: the programs
    /// are missing and `FERRY_REQUIRE_BROWSER` is not `1`.
    pub async fn start_or_skip(suite: &str, width: u32, height: u32) -> Option<Self> {
        let programs = program("FERRY_CHROMIUM", CHROMIUM).and_then(|c| Ok((c, program("FERRY_CHROMEDRIVER", CHROMEDRIVER)?)));
        let (chromium, chromedriver) = match programs {
            Ok(programs) => programs,
            Err(why) if std::env::var("FERRY_REQUIRE_BROWSER").as_deref() == Ok("1") => {
                panic!("{suite}: FERRY_REQUIRE_BROWSER=1 but {why}")
            }
            Err(why) => {
                eprintln!("skipping {suite}: {why}");
                return None;
            }
        };
        Some(Self::start(&chromium, &chromedriver, width, height).await)
    }

    async fn start(chromium: &std::path::Path, chromedriver: &std::path::Path, width: u32, height: u32) -> Self {
        let mut driver = Command::new(chromedriver)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
        let stdout = driver.stdout.take().expect("stdout is piped");
        let port = tokio::time::timeout(PATIENCE, async {
            let mut lines = BufReader::new(stdout).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                // "ChromeDriver was started successfully on port 38013."
                if let Some(port) = line.split("successfully on port ").nth(1) {
                    let port: u16 = port.trim_end_matches('.').trim().parse().expect("chromedriver's port");
                    // Keep reading its output, so that it never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return port;
                }
                seen.push(line);
            }
            panic!("chromedriver exited without a port:\n{}", seen.join("\n"))
        })
        .await
        .expect("chromedriver to say its port");

        let profile = tempfile::tempdir().expect("a profile directory");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), "chrome".into());
        // The control plane's certificate is signed by the mesh's own CA, which this profile
        // does not know; the API client of the test verifies it, the browser need not.
        capabilities.insert("acceptInsecureCerts".into(), true.into());
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Root (as CI runs) has no user-namespace sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("a WebDriver session in {}: {e}", chromium.display()));
        Self { client, driver, _profile: profile }
    }

    /// The text of the first element that `css` selects, once there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until `css` selects an element whose text is `expected`, and returns it.
    pub async fn wait_text(&self, css: &str, expected: &str) {
        eventually(&format!("`{css}` to read {expected:?} in the page"), || async {
            (self.text(css).await?.trim() == expected).then_some(())
        })
        .await;
    }

    /// Waits until `css` selects an element.
    pub async fn wait_for(&self, css: &str) {
        self.client
            .wait()
            .at_most(PATIENCE)
            .every(Duration::from_millis(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("`{css}` did not appear in the page within {PATIENCE:?}: {e}"));
    }

    /// A PNG of the window, scrolled to the element that `css` selects (as a link to it would
    /// scroll: below the page's sticky header).
    pub async fn screenshot_at(&self, css: &str) -> Vec<u8> {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("`{css}`: {e}"));
        let element = serde_json::to_value(&element).expect("an element reference");
        self.client
            .execute("arguments[0].scrollIntoView({ block: 'start' });", vec![element])
            .await
            .unwrap_or_else(|e| panic!("scrolling to `{css}`: {e}"));
        self.client.screenshot().await.unwrap_or_else(|e| panic!("a screenshot at `{css}`: {e}"))
    }

    /// Ends the session (the browser exits) and then chromedriver.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(PATIENCE, self.client.clone().close()).await;
        self.kill_group();
        let _ = self.driver.wait().await;
    }

    fn kill_group(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed half-way leaves no browser behind.
        self.kill_group();
    }
}
