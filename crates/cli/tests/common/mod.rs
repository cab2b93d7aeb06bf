//! Shared helpers for the black-box API tests: each test starts the real `farthing` binary on
//! port 0 with a fresh place for its data, talks to it over HTTP, and kills it when done.
//!
//! **The conformance suite.** Tests written inside [`conformance!`] run twice: on the embedded
//! store, and on PostgreSQL (a fresh database per test, from `FARTHING_TEST_DATABASE_URL`;
//! without that variable the PostgreSQL run says it was skipped). The backend is chosen per
//! test thread: every [`TempDir`] made on a PostgreSQL run also gets a database of its own,
//! and a server started on that directory is given the database instead.
#![allow(dead_code)] // every test file uses a different subset

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};

pub mod private_postgres;

/// Runs each test given on both backends: `mod <test> { fn embedded(), fn postgres() }`.
#[allow(unused_macros)] // not every test file runs on both backends
macro_rules! conformance {
    ($(
        $(#[$attr:meta])*
        async fn $name:ident() $body:block
    )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body() $body

            $(#[$attr])*
            async fn embedded() {
                $crate::common::Backend::Embedded.enter();
                body().await
            }

            $(#[$attr])*
            async fn postgres() {
                if $crate::common::Backend::Postgres.enter() {
                    body().await
                } else {
                    $crate::common::skipped(concat!(module_path!(), "::postgres"));
                }
            }
        }
    )*};
}

/// Where a test's servers keep their state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Embedded,
    Postgres,
}

thread_local! {
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Embedded) };
}

/// The URL of the PostgreSQL server tests make their databases on, when there is one.
pub fn test_database_url() -> Option<String> {
    std::env::var("FARTHING_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// Says, past the test harness's capture, that a test did not run; under `CI=true` it fails
/// the test instead, since nothing may skip there.
pub fn skipped(test: &str) {
    let found = farthing_testing::test_database_url(test);
    assert!(
        found.is_none(),
        "{test} was told to skip with a database at hand"
    );
}

impl Backend {
    /// The backend of the test running on this thread.
    pub fn current() -> Backend {
        BACKEND.with(Cell::get)
    }

    /// Makes this the backend of the test running on this thread; `false` when it cannot run
    /// here (PostgreSQL without `FARTHING_TEST_DATABASE_URL`).
    pub fn enter(self) -> bool {
        if self == Backend::Postgres && test_database_url().is_none() {
            return false;
        }
        BACKEND.with(|backend| backend.set(self));
        true
    }
}

/// Databases of live [`TempDir`]s, by directory.
static DATABASES: LazyLock<Mutex<HashMap<PathBuf, String>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A PostgreSQL database made for one test and dropped (with any connections) after it.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// A fresh database for `test`, or `None` (after saying the test was skipped) without
    /// `FARTHING_TEST_DATABASE_URL`.
    pub fn for_test(test: &str) -> Option<TestDatabase> {
        if test_database_url().is_none() {
            skipped(test);
            return None;
        }
        Some(TestDatabase::create())
    }

    /// A fresh database on the test server; panics when there is none.
    pub fn create() -> TestDatabase {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let admin_url = test_database_url().expect("FARTHING_TEST_DATABASE_URL");
        let name = format!(
            "farthing_cli_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        admin_sql(
            &admin_url,
            vec![
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ],
        )
        .unwrap_or_else(|error| panic!("create test database {name}: {error}"));
        let url = farthing_store_postgres::with_database(&admin_url, &name);
        TestDatabase {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(error) = admin_sql(&self.admin_url, vec![drop]) {
            eprintln!("could not drop test database {}: {error}", self.name);
        }
    }
}

/// Runs `statements` one by one on `url`, from a thread and runtime of its own, so that it
/// works from synchronous code, async tests and `Drop` alike.
pub fn admin_sql(url: &str, statements: Vec<String>) -> Result<(), String> {
    let url = url.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                for statement in statements {
                    client
                        .batch_execute(&statement)
                        .await
                        .map_err(|e| format!("{statement}: {e:?}"))?;
                }
                Ok(())
            })
    })
    .join()
    .map_err(|_| "the admin thread panicked".to_string())?
}

/// The operator key every test server is started with.
pub const ADMIN_KEY: &str = "test-operator-key-0123456789abcdef-0123456789abcdef";

/// How long a server may take to print its listening line or to exit.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP request may take before the test fails instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A unique directory under the system temp dir, removed on drop. On a PostgreSQL run it also
/// has a database of its own, which servers started on the directory use.
pub struct TempDir {
    path: PathBuf,
    database: Option<TestDatabase>,
}

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "farthing-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temporary data directory");
        let database = (Backend::current() == Backend::Postgres).then(|| {
            let database = TestDatabase::create();
            DATABASES
                .lock()
                .expect("database registry")
                .insert(path.clone(), database.url.clone());
            database
        });
        TempDir { path, database }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database of a PostgreSQL run.
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|database| database.url.as_str())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        DATABASES
            .lock()
            .expect("database registry")
            .remove(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `farthing serve`, killed (SIGKILL) on drop.
pub struct Server {
    child: Child,
    pub addr: String,
    /// Journal records the server replayed when it started.
    pub replayed: u64,
    stderr: Arc<Mutex<String>>,
    // Dropped after the child is killed (fields drop after `Drop::drop`).
    dir: Option<TempDir>,
}

impl Server {
    /// A server on a fresh data directory of its own, without a rate limit.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`], with extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Server {
        let dir = TempDir::new();
        let mut server = Server::start_in(dir.path(), extra);
        server.dir = Some(dir);
        server
    }

    /// A server on `dir` (which the caller keeps, e.g. to restart on it).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::start_in_as(dir, extra, ADMIN_KEY)
    }

    /// Like [`Server::start_in`], with another operator key: the server replaces the
    /// installation's key with it.
    pub fn start_in_as(dir: &Path, extra: &[&str], admin_key: &str) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_farthing"));
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .args(
                DATABASES
                    .lock()
                    .expect("database registry")
                    .get(dir)
                    .map(|url| ["--database-url".to_string(), url.clone()])
                    .into_iter()
                    .flatten(),
            )
            .env("FARTHING_ADMIN_KEY", admin_key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Tests send bursts on purpose; only the rate-limit test turns the limit on.
        if !extra.contains(&"--rate-limit") {
            command.arg("--rate-limit").arg("0");
        }
        for name in [
            "FARTHING_LISTEN",
            "FARTHING_DATA_DIR",
            "FARTHING_DATABASE_URL",
            "FARTHING_DEFAULT_FEE_BPS",
            "FARTHING_DEFAULT_FEE_FIXED",
            "FARTHING_AMOUNT_MAX",
            "FARTHING_CURRENCIES",
            "FARTHING_RATE_LIMIT",
            "FARTHING_AUTH_FAILURES_PER_MIN",
            "FARTHING_METRICS_LISTEN",
            "FARTHING_CONNECTIONS_MAX",
            "FARTHING_HEADER_TIMEOUT_SECS",
            "FARTHING_REQUEST_TIMEOUT_SECS",
            "FARTHING_DRAIN_TIMEOUT_SECS",
            "FARTHING_TEST_CLOCK",
            "FARTHING_CACHE_MIB",
            "FARTHING_CHECKPOINT_ROWS",
            "FARTHING_JOURNAL_SEGMENT_BYTES",
            "FARTHING_LOG",
        ] {
            command.env_remove(name);
        }
        let mut child = command.spawn().expect("spawn the farthing binary");

        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("piped stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    stderr.lock().expect("stderr buffer").push_str(&text);
                }
            });
        }

        let (found, listening) = mpsc::channel::<(String, u64)>();
        {
            let stdout = child.stdout.take().expect("piped stdout");
            std::thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if sent {
                        continue;
                    }
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                        // "… (N journal records replayed)"
                        let replayed = rest
                            .split('(')
                            .nth(1)
                            .and_then(|tail| tail.split_whitespace().next())
                            .and_then(|count| count.parse().ok())
                            .unwrap_or(0);
                        let _ = found.send((addr, replayed));
                        sent = true;
                    }
                }
            });
        }

        let mut server = Server {
            child,
            addr: String::new(),
            replayed: 0,
            stderr,
            dir: None,
        };
        match listening.recv_timeout(STARTUP_TIMEOUT) {
            Ok((addr, replayed)) => {
                server.addr = addr;
                server.replayed = replayed;
            }
            Err(_) => {
                let status = server.child.try_wait().ok().flatten();
                panic!(
                    "the server did not print its listening line (exit: {status:?}); stderr:\n{}",
                    server.stderr()
                );
            }
        }
        server
    }

    pub fn api(&self) -> Api {
        Api::new(format!("http://{}", self.addr))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// SIGKILL, and reap the process: its data directory lock is free afterwards.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// SIGTERM, then wait for the process to exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// Asserts the status and returns the JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "expected HTTP {status}, got {}: {}",
            self.status, self.body
        );
        self.json()
    }

    /// Asserts an RFC 9457 problem with this status and code, and returns its body.
    #[track_caller]
    pub fn expect_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status, status,
            "expected HTTP {status} {code}, got {}: {}",
            self.status, self.body
        );
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "problem content type; body {}",
            self.body
        );
        let body = self.json();
        assert_eq!(body["code"], json!(code), "problem code in {body}");
        assert_eq!(body["status"], json!(status), "problem status in {body}");
        for field in ["type", "title", "detail"] {
            let text = body[field].as_str().unwrap_or_else(|| {
                panic!("problem field `{field}` is not a string in {body}");
            });
            assert!(
                !text.is_empty(),
                "problem field `{field}` is empty in {body}"
            );
        }
        body
    }
}

/// A party made through the API: its id and its API key.
#[derive(Clone, Debug)]
pub struct Party {
    pub id: String,
    pub key: String,
}

/// An HTTP client for one server; `ADMIN_KEY` is the operator.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Api {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build an HTTP client");
        Api { base, http }
    }

    /// Sends a request; transport errors are returned, not panicked on.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> reqwest::Result<Reply> {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("idempotency-key", idempotency_key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Reply {
        let description = format!("{method} {path}");
        self.try_send(method, path, key, body, idempotency_key)
            .await
            .unwrap_or_else(|e| panic!("{description} failed: {e}"))
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.send(Method::GET, path, Some(key), None, None).await
    }

    pub async fn get_anonymous(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Reply {
        self.send(Method::POST, path, Some(key), Some(&body.to_string()), None)
            .await
    }

    pub async fn post_raw(&self, path: &str, key: &str, body: &str) -> Reply {
        self.send(Method::POST, path, Some(key), Some(body), None)
            .await
    }

    pub async fn post_idempotent(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        idempotency_key: &str,
    ) -> Reply {
        self.send(
            Method::POST,
            path,
            Some(key),
            Some(&body.to_string()),
            Some(idempotency_key),
        )
        .await
    }

    /// Creates a merchant as the operator; `fee` is `(fee_bps, fee_fixed)`, each optional.
    pub async fn create_merchant(
        &self,
        name: &str,
        fee_bps: Option<u32>,
        fee_fixed: Option<&str>,
    ) -> Party {
        let mut body = json!({ "name": name });
        if let Some(bps) = fee_bps {
            body["fee_bps"] = json!(bps);
        }
        if let Some(fixed) = fee_fixed {
            body["fee_fixed"] = json!(fixed);
        }
        let created = self
            .post("/v1/merchants", ADMIN_KEY, &body)
            .await
            .expect(201);
        party(&created)
    }

    pub async fn create_payer(&self, name: &str) -> Party {
        let created = self
            .post("/v1/payers", ADMIN_KEY, &json!({ "name": name }))
            .await
            .expect(201);
        party(&created)
    }

    /// A sandbox top-up in USD by the operator; asserts 201.
    pub async fn topup(&self, payer: &Party, amount: &str) -> Value {
        self.post(
            &format!("/v1/payers/{}/topups", payer.id),
            ADMIN_KEY,
            &json!({ "amount": amount, "currency": "USD", "source": "sandbox" }),
        )
        .await
        .expect(201)
    }

    /// A payment in USD with the payer's key.
    pub async fn pay(&self, payer: &Party, merchant: &Party, amount: &str) -> Reply {
        self.post(
            "/v1/payments",
            &payer.key,
            &json!({ "merchant": merchant.id, "amount": amount, "currency": "USD" }),
        )
        .await
    }

    /// The payer's available USD balance as the operator sees it (`"0.00"` without a wallet).
    pub async fn payer_usd(&self, payer: &Party) -> String {
        let balances = self
            .get(&format!("/v1/payers/{}/balance", payer.id), ADMIN_KEY)
            .await
            .expect(200);
        available(&balances, "USD")
    }

    pub async fn merchant_usd(&self, merchant: &Party) -> String {
        let balances = self
            .get(&format!("/v1/merchants/{}/balance", merchant.id), ADMIN_KEY)
            .await
            .expect(200);
        available(&balances, "USD")
    }

    /// Every payment `key` may list, newest first, following `has_more` through pages.
    pub async fn list_all_payments(&self, key: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => "/v1/payments?limit=100".to_string(),
                Some(id) => format!("/v1/payments?limit=100&starting_after={id}"),
            };
            let page = self.get(&path, key).await.expect(200);
            let data = page["data"].as_array().expect("data array").clone();
            let has_more = page["has_more"].as_bool().expect("has_more bool");
            cursor = data
                .last()
                .map(|p| p["id"].as_str().expect("id").to_string());
            all.extend(data);
            if !has_more {
                return all;
            }
            assert!(cursor.is_some(), "has_more with an empty page");
        }
    }
}

pub fn party(created: &Value) -> Party {
    Party {
        id: created["id"].as_str().expect("id").to_string(),
        key: created["api_key"].as_str().expect("api_key").to_string(),
    }
}

/// The `available` of `currency` in a balances answer; `"0.00"` when there is no such wallet.
pub fn available(balances: &Value, currency: &str) -> String {
    balances["balances"]
        .as_array()
        .expect("balances array")
        .iter()
        .find(|b| b["currency"] == json!(currency))
        .map(|b| {
            b["available"]
                .as_str()
                .expect("available string")
                .to_string()
        })
        .unwrap_or_else(|| "0.00".to_string())
}

/// Micro-units of a decimal amount string (`"-1.5"` → `-1_500_000`).
pub fn micros(text: &str) -> i128 {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(fraction.len() <= 6, "more than 6 decimals in {text:?}");
    let whole: i128 = whole
        .parse()
        .unwrap_or_else(|_| panic!("not an amount: {text:?}"));
    let fraction: i128 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}")
            .parse()
            .unwrap_or_else(|_| panic!("not an amount: {text:?}"))
    };
    let value = whole * 1_000_000 + fraction;
    if negative { -value } else { value }
}

/// The canonical form of an amount: at least two decimals, at most six (`"1.00"`, `"0.0025"`).
pub fn amount(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let digits = format!("{:06}", micros % 1_000_000);
    let trimmed = digits.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &digits[..2]
    } else {
        trimmed
    };
    format!("{whole}.{shown}")
}

/// A fresh, syntactically valid id of `prefix` that no server made (26 base32 digits).
pub fn unknown_id(prefix: &str) -> String {
    format!("{prefix}_0000000000000000000000zzzz")
}

/// The position of a data directory's oldest journal segment: above zero once checkpoints have
/// removed some.
#[allow(dead_code)]
pub fn first_segment(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("journal"))
        .expect("the journal's segments")
        .filter_map(|entry| {
            let name = entry.expect("an entry").file_name();
            let name = name.to_str().expect("a UTF-8 name").to_string();
            // The next segment made ahead (`spare`) is not one yet.
            let position = name.strip_suffix(".farthing")?;
            Some(position.parse::<u64>().expect("a position"))
        })
        .min()
        .expect("a segment")
}
