//! TLS against sandbox servers that take encrypted connections only, with a
//! self-signed CA: cutover's SQL connections, its walsender connection and its
//! MySQL connections all verify the server, and a wrong CA is refused by name.

mod common;

use std::process::Command;

use common::{connect, count, make_certs, Pair};
use cutover::sandbox::{free_port, MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

fn check(config: &std::path::Path) -> (bool, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["check", "--config"]).arg(config).output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_over_verified_tls_snapshots_and_streams() {
    let dir = common::test_dir(&format!("cutover-test-tls-pg-{}", free_port().expect("port")));
    let certs = make_certs(&dir.join("certs"));
    // Encrypted connections only: a plain one finds no pg_hba.conf entry.
    let hba = dir.join("certs").join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n",
    )
    .expect("hba");
    let quoted = |path: &std::path::Path| format!("'{}'", path.display());
    let source = PostgresServer::start(&[
        ("ssl", "on"),
        ("ssl_cert_file", &quoted(&certs.cert)),
        ("ssl_key_file", &quoted(&certs.key)),
        ("hba_file", &quoted(&hba)),
    ])
    .expect("source with TLS");
    let target = PostgresServer::start(&[]).expect("target");
    let plain_url = source.url("postgres");
    let tls_url = |mode: &str, ca: &std::path::Path| format!("{plain_url}?sslmode={mode}&sslrootcert={}", ca.display());
    let source_url = tls_url("verify-full", &certs.ca);
    let client = connect(&source_url).await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text); \
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;",
        )
        .await
        .expect("source rows");
    let pair = Pair::from_servers("tls-pg", source, target, &source_url, "");

    let mut child = pair.spawn();
    client
        .batch_execute("INSERT INTO items SELECT g, 'streamed ' || g FROM generate_series(1001, 1500) g; DELETE FROM items WHERE id <= 10;")
        .await
        .expect("stream rows");
    pair.wait_caught_up(&mut child).await;
    // Every connection of cutover's to the source is encrypted, the walsender's included.
    let encrypted = count(
        &client,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'cutover' AND a.backend_type = 'walsender' AND s.ssl",
    )
    .await;
    assert_eq!(encrypted, 1, "{}", pair.log());
    common::stop(&mut child);
    pair.assert_identical().await;
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT count(*) FROM public.items").await, 1490);

    // The same server checked against a CA that did not sign its certificate, and in the clear.
    let config = std::fs::read_to_string(&pair.config_path).expect("config");
    for (url, expected) in [
        (tls_url("verify-ca", &certs.other_ca), "certificate"),
        (format!("{}?sslmode=disable", pair.source.url("postgres")), "no encryption"),
    ] {
        let path = pair.dir.join("wrong.toml");
        std::fs::write(&path, config.replace(&source_url, &url)).expect("config");
        let (ok, text) = check(&path);
        assert!(!ok && text.contains(expected) && text.contains(&pair.source.port().to_string()), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_source_over_verified_tls_copies() {
    let dir = common::test_dir(&format!("cutover-test-tls-my-{}", free_port().expect("port")));
    let certs = make_certs(&dir.join("certs"));
    let option = |name: &str, path: &std::path::Path| format!("--{name}={}", path.display());
    let source = MariaDbServer::start(&[
        &option("ssl-ca", &certs.ca),
        &option("ssl-cert", &certs.cert),
        &option("ssl-key", &certs.key),
    ])
    .expect("MariaDB with TLS");
    let target = PostgresServer::start(&[]).expect("target");
    let mut conn = mysql_async::Conn::new(
        mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&source.url("mysql")).expect("url"))
            .ssl_opts(mysql_async::SslOpts::default().with_root_certs(vec![certs.ca.clone().into()])),
    )
    .await
    .expect("TLS connection");
    conn.query_drop(
        "ALTER USER 'cutover'@'%' REQUIRE SSL; CREATE DATABASE shop; \
         CREATE TABLE shop.items (id int PRIMARY KEY, name varchar(20)); \
         INSERT INTO shop.items SELECT seq, concat('item ', seq) FROM seq_1_to_1000",
    )
    .await
    .expect("source rows");
    let tls_url =
        |mode: &str, ca: &std::path::Path| format!("{}?ssl-mode={mode}&ssl-ca={}", source.url("shop"), ca.display());
    let config = |name: &str, url: &str| {
        let path = dir.join(format!("{name}.toml"));
        cutover::demo::write_config(
            &path,
            "mysql",
            url,
            &target.url("postgres"),
            &dir.join(format!("{name}-state")),
            "[snapshot]\nmode = \"only\"\n",
        )
        .expect("config");
        path
    };
    let good = config("good", &tls_url("VERIFY_IDENTITY", &certs.ca));
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&good).output().expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let target_client = connect(&target.url("postgres")).await;
    assert_eq!(count(&target_client, "SELECT count(*) FROM shop.items").await, 1000);

    let (ok, text) = check(&config("wrong-ca", &tls_url("VERIFY_CA", &certs.other_ca)));
    assert!(!ok && text.contains(&source.port().to_string()), "{text}");
    let (ok, text) = check(&config("clear", &format!("{}?ssl-mode=DISABLED", source.url("shop"))));
    assert!(!ok && text.contains(&source.port().to_string()), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
