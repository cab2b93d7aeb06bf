//! `farthing demo`: a new user pastes the printed `curl` lines and they work, on the embedded
//! store and on PostgreSQL.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_curl_lines_the_demo_prints_pay_and_report_and_sigterm_cleans_up() {
    run_demo(None);
}

#[test]
fn the_demo_runs_on_postgresql_and_its_curl_lines_work() {
    let Some(database) =
        common::TestDatabase::for_test("the_demo_runs_on_postgresql_and_its_curl_lines_work")
    else {
        return;
    };
    run_demo(Some(&database.url));
    // The database now holds the demo's data: a second demo refuses it rather than replacing
    // its operator key and seeding beside it.
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &database.url,
        ])
        .env_remove("FARTHING_DATABASE_URL")
        .output()
        .expect("run the demo again");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already holds Farthing data"), "{stderr}");
}

#[test]
fn a_demo_that_cannot_listen_says_so_once_and_leaves_no_directory_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let demo = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["demo", "--listen", &addr])
        .env_remove("FARTHING_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the demo");
    let pid = demo.id();
    let output = demo.wait_with_output().expect("wait for the demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("in use").count(),
        1,
        "the cause is said once: {stderr}"
    );
    // A demo's directory is named after its process.
    let left: Vec<_> = demo_directories()
        .into_iter()
        .filter(|name| {
            name.to_string_lossy()
                .starts_with(&format!("farthing-demo-{pid}-"))
        })
        .collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}

#[test]
fn help_names_the_settings_without_flags_and_no_flag_the_demo_ignores() {
    let help = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
            .args(args)
            .output()
            .expect("run --help");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let serve = help(&["serve", "--help"]);
    for setting in ["FARTHING_ADMIN_KEY", "FARTHING_LOG", "--metrics-listen"] {
        assert!(
            serve.contains(setting),
            "serve --help names {setting}:\n{serve}"
        );
    }
    let demo = help(&["demo", "--help"]);
    assert!(!demo.contains("--data-dir"), "{demo}");
    assert!(demo.contains("--database-url"), "{demo}");
}

/// This process's user's demo directories in the temporary directory, by name.
fn demo_directories() -> std::collections::HashSet<std::ffi::OsString> {
    std::fs::read_dir(std::env::temp_dir())
        .expect("read the temporary directory")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().starts_with("farthing-demo-"))
        .collect()
}

/// Runs the demo (on `database_url`, else on a fresh directory), pastes its lines, stops it.
fn run_demo(database_url: Option<&str>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_farthing"));
    command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("FARTHING_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let mut demo = command.spawn().expect("start the demo");
    let stdout = demo.stdout.take().expect("piped stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("demo output is text");
        let done = line.starts_with("Press Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    let place = lines
        .iter()
        .find_map(|l| l.split("(data in ").nth(1))
        .map(|rest| rest.trim_end_matches(')').to_string())
        .expect("the demo says where its data is");
    let data_dir = match database_url {
        None => {
            assert!(std::path::Path::new(&place).exists());
            Some(place)
        }
        Some(_) => {
            assert_eq!(place, "PostgreSQL");
            None
        }
    };
    let curls: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(
        curls.len(),
        9,
        "the demo prints curl lines to try: {lines:#?}"
    );

    let run = |line: &str| -> serde_json::Value {
        let output = Command::new("sh")
            .arg("-c")
            .arg(line)
            .output()
            .expect("run a printed curl line");
        assert!(output.status.success(), "{line} failed");
        serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
            panic!("{line} printed {}", String::from_utf8_lossy(&output.stdout))
        })
    };
    // In the order printed: balance, an article, a game item, the statement, the merchant.
    let before = run(curls[0]);
    assert_eq!(before["balances"][0]["available"], "20.00");
    let article = run(curls[1]);
    assert_eq!(article["status"], "succeeded");
    assert_eq!(article["amount"], "0.25");
    // The article line carries an Idempotency-Key: pasting it twice pays once.
    assert_eq!(run(curls[1])["id"], article["id"]);
    let item = run(curls[2]);
    assert_eq!(item["status"], "succeeded");
    assert_eq!(item["amount"], "0.0025");
    let statement = run(curls[3]);
    assert_eq!(statement["data"][0]["running_balance"], "19.7475");
    assert_eq!(statement["data"].as_array().map(Vec::len), Some(3));
    // The merchant earned the article's net, beside an earlier article it sold while the demo
    // was seeded (0.25 each, less 2.5%).
    let earned = run(curls[4]);
    assert_eq!(article["net"], "0.24375");
    assert_eq!(earned["balances"][0]["available"], "0.4875");
    let listed = run(curls[5]);
    assert_eq!(listed["data"][0]["id"], article["id"]);
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2));
    // The refund line names that earlier payment, with the key of the merchant that sold it.
    let refund = run(curls[6]);
    assert_eq!(refund["status"], "succeeded", "{refund}");
    assert_eq!(refund["amount"], "0.25");
    assert_eq!(refund["payment"], listed["data"][1]["id"]);
    // The capture line settles the hold the demo placed: what was played, the rest released.
    let captured = run(curls[7]);
    assert_eq!(captured["status"], "succeeded", "{captured}");
    assert_eq!(captured["amount"], "0.60");
    assert_eq!(captured["amount_authorized"], "2.00");
    // The metrics line is the operator's, and answers Prometheus text.
    let metrics = Command::new("sh")
        .arg("-c")
        .arg(curls[8])
        .output()
        .expect("run the metrics line");
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("farthing_http_responses_total"),
        "{metrics}"
    );
    // Every line a user is told to paste is a command that works: none holds a placeholder.
    for line in &curls {
        assert!(!line.contains('<') && !line.contains('>'), "{line}");
    }

    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = demo.try_wait().expect("wait for the demo") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "the demo exits 0 on SIGTERM: {exit:?}");
    if let Some(data_dir) = data_dir {
        assert!(
            !std::path::Path::new(&data_dir).exists(),
            "the demo removes its data directory"
        );
    }
}
