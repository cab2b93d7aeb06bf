//! PostgreSQL over TLS: `sslmode` and `sslrootcert` in `--database-url` as libpq reads them,
//! against a PostgreSQL of the test's own that refuses TCP connections without TLS and holds a
//! certificate signed by a CA made for the test.
//!
//! Needs `FARTHING_TEST_DATABASE_URL` (as every PostgreSQL test) and the machine's `initdb`,
//! `pg_ctl` and `openssl`; says it was skipped without the variable.

#[macro_use]
mod common;

use std::process::{Command, Output};

use common::private_postgres::PrivatePostgres;
use common::{Server, TempDir};

fn farthing(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(args)
        .env_remove("FARTHING_DATABASE_URL")
        .output()
        .expect("run farthing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_reach_a_postgresql_that_takes_only_tls_and_check_its_certificate_as_told() {
    if common::test_database_url().is_none() {
        common::skipped("servers_reach_a_postgresql_that_takes_only_tls");
        return;
    }
    let (postgres, tls) = tokio::task::block_in_place(PrivatePostgres::start_with_tls);
    common::admin_sql(
        &postgres.socket_url("postgres"),
        vec!["CREATE DATABASE farthing".to_string()],
    )
    .expect("create the database over the socket");
    let port = postgres.port();
    let url = |host: &str, settings: &str| {
        format!("postgres://postgres@{host}:{port}/farthing{settings}")
    };
    let ca = tls.ca.display().to_string();
    let other_ca = tls.other_ca.display().to_string();
    let migrate = |url: &str| {
        let output = farthing(&["migrate", "--database-url", url]);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // Without TLS the server turns the connection away.
    let (ok, stderr) = migrate(&url("localhost", ""));
    assert!(!ok, "a connection without TLS was let in");
    assert!(stderr.contains("no encryption"), "{stderr}");
    // Encrypted, certificate unchecked (libpq's `require`).
    let (ok, stderr) = migrate(&url("localhost", "?sslmode=require"));
    assert!(ok, "{stderr}");
    // Checked against the CA that signed it, by name and by address.
    for host in ["localhost", "127.0.0.1"] {
        let (ok, stderr) = migrate(&url(
            host,
            &format!("?sslmode=verify-full&sslrootcert={ca}"),
        ));
        assert!(ok, "{host}: {stderr}");
    }
    // Another CA's roots: refused, whether the name is checked or not.
    for mode in ["verify-full", "verify-ca", "require"] {
        let (ok, stderr) = migrate(&url(
            "localhost",
            &format!("?sslmode={mode}&sslrootcert={other_ca}"),
        ));
        assert!(!ok, "{mode} accepted a certificate another CA signed");
        assert!(
            stderr.to_lowercase().contains("certificate"),
            "{mode}: {stderr}"
        );
    }
    // A name the certificate does not carry (the same server, reached by address): refused
    // when the name is checked, accepted when only the CA is.
    let elsewhere = |mode: &str| {
        format!(
            "host=db.elsewhere.example hostaddr=127.0.0.1 port={port} user=postgres \
             dbname=farthing sslmode={mode} sslrootcert='{ca}'"
        )
    };
    let (ok, stderr) = migrate(&elsewhere("verify-full"));
    assert!(!ok, "verify-full accepted a certificate for another name");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let (ok, stderr) = migrate(&elsewhere("verify-ca"));
    assert!(ok, "{stderr}");
    // A checking mode without roots is a mistake in the URL, said before connecting.
    let (ok, stderr) = migrate(&url("localhost", "?sslmode=verify-full"));
    assert!(!ok);
    assert!(stderr.contains("sslrootcert"), "{stderr}");

    // A server on it: the whole path, over TLS.
    let dir = TempDir::new();
    let verified = url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    );
    let server = Server::start_in(dir.path(), &["--database-url", &verified]);
    let api = server.api();
    let merchant = api.create_merchant("Kiosk", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "5").await;
    api.pay(&payer, &merchant, "1.25").await.expect(201);
    assert_eq!(api.payer_usd(&payer).await, "3.75");
}
