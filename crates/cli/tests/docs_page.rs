//! The pages a person opens, in a real browser (headless Chromium): `/` says what the server
//! is, and `/docs/` renders the API reference from the served OpenAPI document, with every
//! asset from the server itself.

mod common;

use std::process::Command;

use common::Server;

/// The browser to drive: `FARTHING_TEST_CHROMIUM`, else `chromium` on the path. Without one the
/// test says it was skipped, except under `CI=true`, where it fails (`.ci/run` installs it).
fn chromium() -> Option<String> {
    let candidate =
        std::env::var("FARTHING_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
    let found = Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if found {
        return Some(candidate);
    }
    assert!(
        !farthing_testing::running_in_ci(),
        "no Chromium ({candidate}) to render the pages with; under CI=true this fails"
    );
    eprintln!("the_pages_render_in_a_real_browser: skipped, no Chromium ({candidate})");
    None
}

/// The page at `url` as the browser has it once its scripts have run.
fn rendered(browser: &str, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("farthing-chromium-{}", std::process::id()));
    let output = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("run Chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "Chromium failed on {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_pages_render_in_a_real_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let server = Server::start();
    let base = format!("http://{}", server.addr);

    let index = rendered(&browser, &format!("{base}/"));
    assert!(index.contains("Farthing"), "{index}");
    assert!(index.contains("href=\"/docs/\""), "{index}");

    // Swagger UI fetched /openapi.json and drew an entry for every operation.
    let docs = rendered(&browser, &format!("{base}/docs"));
    for text in [
        "Create a payer",
        "Pay a merchant",
        "Refund a payment",
        "/v1/payments/batch",
    ] {
        assert!(docs.contains(text), "the reference does not show {text:?}");
    }
}
