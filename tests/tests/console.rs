//! The operator console (`/ui`) in a real headless Chromium (Debian's
//! `chromium` and `chromium-driver`, installed by `.ci/run`), driven over
//! WebDriver against a real 4-node, 3-region testnet: the page loads small
//! and without console errors, shows every node in its region and the
//! leader, escapes what it shows (a chain note with markup renders as
//! text), turns a killed node's card down within seconds without a reload,
//! and its playground streams a completion with the path it took. A
//! screenshot of each view is saved under target/console-screenshots/.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use trine_tests::{Testnet, wait_for};

/// Stops chromedriver (and its browser) with the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
}

/// chromedriver's browser log (`/session/{id}/se/log`, type browser): what
/// the page printed to its console, failed loads included.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

async fn severe_console_entries(c: &Client) -> Result<Vec<String>> {
    let log = c
        .issue_cmd(BrowserLog)
        .await
        .context("reading the browser log")?;
    Ok(log
        .as_array()
        .context("the browser log is not a list")?
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect())
}

async fn start_browser(port: u16) -> Result<(Driver, Client)> {
    for tool in ["chromedriver", "chromium"] {
        ensure!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is not installed: `bash .ci/run` installs it (Debian: apt-get install chromium chromium-driver)"
        );
    }
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?,
    );
    let status = format!("http://127.0.0.1:{port}/status");
    wait_for(
        "chromedriver answering",
        Duration::from_secs(20),
        || async {
            reqwest::get(&status)
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        },
    )
    .await?;
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
        serde_json::json!({
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1100"],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }),
    )?;
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("opening a Chromium session through chromedriver")?;
    Ok((driver, client))
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .ok()?
        .attr(name)
        .await
        .ok()?
}

async fn save_view(c: &Client, id: &str, file: &str) -> Result<()> {
    // Scroll it into view first, so the element screenshot is complete.
    c.execute(
        "document.getElementById(arguments[0]).scrollIntoView()",
        vec![serde_json::json!(id)],
    )
    .await?;
    let png = c.find(Locator::Id(id)).await?.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "{id}: not a PNG");
    std::fs::create_dir_all(screenshots())?;
    std::fs::write(screenshots().join(format!("{file}.png")), png)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_the_cluster_live_escapes_and_streams_in_a_real_browser() -> Result<()> {
    let net = Testnet::start_with_model(&["--regions", "us-east:2,us-west:1,eu-central:1"]).await?;
    let rows = net.status(&net.grpc(0))?;
    ensure!(rows.len() == 4, "{rows:?}");
    let leader = rows
        .iter()
        .find(|r| r.role == "leader")
        .context("no leader")?
        .name
        .clone();
    let entry = net.endpoints("us-east-1")?;
    let url = format!("http://{}/ui", entry.http);

    // Small, and complete without any other request (no CDN, no font).
    let page = reqwest::get(&url).await?;
    ensure!(page.status().is_success(), "/ui: {}", page.status());
    let body = page.text().await?;
    ensure!(body.len() < 200 * 1024, "/ui is {} bytes", body.len());
    for external in ["http://", "https://", "//cdn", "@import"] {
        let hits: Vec<&str> = body
            .lines()
            .filter(|l| l.contains(external) && !l.contains("http://www.w3.org/2000/svg"))
            .collect();
        ensure!(
            hits.is_empty(),
            "/ui loads something from outside: {hits:?}"
        );
    }

    // A chain note with markup: it must show as text.
    let mut note = trine_tests::trine();
    note.args([
        "chain",
        "note",
        "--node",
        &entry.grpc.to_string(),
        "<script>window.__pwned=1</script><b id=\"injected\">bold</b>",
    ]);
    let noted = trine_tests::run(note, Duration::from_secs(20))?;
    ensure!(noted.status.success(), "trine chain note: {noted:?}");

    let (_driver, c) = start_browser(net.base_port + 97).await?;
    let opened = Instant::now();
    c.goto(&url).await?;
    // Loopback timings of the page load (reported, not asserted: speed is
    // for benchmarks); BENCHMARKS.md records them.
    let timing = c
        .execute(
            "const n = performance.getEntriesByType('navigation')[0]; \
             const p = performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint'); \
             return { response_end: n.responseEnd, dom_content_loaded: n.domContentLoadedEventEnd, \
             load: n.loadEventEnd, first_contentful_paint: p ? p.startTime : null, bytes: n.transferSize };",
            vec![],
        )
        .await?;
    eprintln!(
        "console opened in {:?}; navigation timing (ms): {timing}",
        opened.elapsed()
    );

    // Every node in its region's column; the leader marked.
    for r in &rows {
        let css = format!(
            r#".region[data-region="{}"] .card[data-node="{}"]"#,
            r.region, r.name
        );
        c.find(Locator::Css(&css))
            .await
            .with_context(|| format!("{} is not shown in {}", r.name, r.region))?;
    }
    let shown_leader = attr(&c, r#".card[data-role="leader"]"#, "data-node").await;
    ensure!(
        shown_leader.as_deref() == Some(leader.as_str()),
        "the page shows leader {shown_leader:?}, trine status says {leader}"
    );
    // Which node serves stage 0 of the model, from the placement view.
    let serving = attr(&c, r#"tr[data-model="tiny"][data-stage="0"]"#, "data-node")
        .await
        .context("no placement row for tiny stage 0")?;
    ensure!(
        rows.iter().any(|r| r.name == serving),
        "placement names {serving}"
    );

    // Escaped: the note's markup is text, its script never ran.
    let chain_text = wait_for(
        "the note in the chain view",
        Duration::from_secs(15),
        || async {
            let t = c
                .find(Locator::Css(r#"[data-view="chain"]"#))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            t.contains("<script>window.__pwned=1</script>").then_some(t)
        },
    )
    .await?;
    ensure!(
        chain_text.contains("<b id=\"injected\">bold</b>"),
        "{chain_text}"
    );
    ensure!(
        c.find(Locator::Id("injected")).await.is_err(),
        "the note's <b> became an element"
    );
    let pwned = c
        .execute("return window.__pwned === undefined;", vec![])
        .await?;
    ensure!(pwned == serde_json::json!(true), "the note's script ran");

    // The playground streams a completion and shows its path.
    let prompt = c.find(Locator::Id("prompt")).await?;
    prompt.clear().await?;
    prompt.send_keys("Hello").await?;
    c.find(Locator::Id("send")).await?.click().await?;
    let path = wait_for(
        "the playground's answer",
        Duration::from_secs(60),
        || async {
            let p = c.find(Locator::Id("path")).await.ok()?;
            p.attr("data-done").await.ok()??;
            p.text().await.ok()
        },
    )
    .await?;
    let answer = c.find(Locator::Id("answer")).await?.text().await?;
    ensure!(!answer.is_empty(), "no answer text; path line: {path}");
    ensure!(
        path.contains("tokens") && rows.iter().any(|r| path.contains(&r.name)),
        "the path line names no node: {path}"
    );

    for view in [
        "cluster",
        "latency",
        "placement",
        "chain",
        "events",
        "playground",
    ] {
        save_view(&c, view, view).await?;
    }

    // Kill a node that is neither the leader nor the one we browse: its card
    // turns down without a reload.
    let victim = rows
        .iter()
        .find(|r| r.name != leader && r.name != "us-east-1")
        .context("no node to kill")?
        .name
        .clone();
    let pid = net.endpoints(&victim)?.pid;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let css = format!(r#".card[data-node="{victim}"]"#);
    wait_for(
        "the killed node's card down",
        Duration::from_secs(20),
        || async { (attr(&c, &css, "data-status").await.as_deref() == Some("down")).then_some(()) },
    )
    .await?;
    eprintln!("{victim} shown down {:?} after the kill", killed.elapsed());
    wait_for("the node-down event", Duration::from_secs(10), || async {
        let t = c
            .find(Locator::Css(r#"[data-view="events"]"#))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains(&format!("{victim} is down")).then_some(())
    })
    .await?;
    save_view(&c, "cluster", "cluster-node-down").await?;

    // No console errors the whole time (failed loads included).
    let errors = severe_console_entries(&c).await?;
    let js = c.execute("return window.__errors;", vec![]).await?;
    if !errors.is_empty() || js != serde_json::json!([]) {
        bail!("console errors: {errors:?}; page errors: {js}");
    }
    c.close().await?;
    Ok(())
}
