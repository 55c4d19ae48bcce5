//! `cutover check` against real servers: misconfigured ones are named with their
//! setting, value and fix; ready ones pass; the plan shows each type mapping.

use std::process::{Command, Output};

use cutover::sandbox::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

fn check(name: &str, source_kind: &str, source_url: &str, target_url: &str) -> Output {
    check_with(name, source_kind, source_url, target_url, "")
}

fn check_with(name: &str, source_kind: &str, source_url: &str, target_url: &str, extra: &str) -> Output {
    let dir = std::env::temp_dir().join(format!("cutover-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join(format!("{name}.toml"));
    cutover::demo::write_config(&config, source_kind, source_url, target_url, &dir.join("state"), extra)
        .expect("config");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["check", "--config"]).arg(&config).output().expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    output
}

fn stdout(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn postgres_with_wal_level_replica_is_refused_with_the_fix() {
    let source = PostgresServer::start(&[("wal_level", "replica")]).expect("source");
    let target = PostgresServer::start(&[]).expect("target");
    let output = check("replica", "postgres", &source.url("postgres"), &target.url("postgres"));
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("wal_level = replica") && text.contains("ALTER SYSTEM SET wal_level = logical"), "{text}");
}

/// Each apply connection needs a replication origin of its own on the target, and the
/// target keeps the progress of at most `max_replication_slots` of them.
#[test]
fn too_few_replication_origins_for_the_apply_connections_are_named_with_the_fix() {
    let source = PostgresServer::start(&[]).expect("source");
    let target = PostgresServer::start(&[("max_replication_slots", "2")]).expect("target");
    let (source_url, target_url) = (source.url("postgres"), target.url("postgres"));
    let two = check_with("origins2", "postgres", &source_url, &target_url, "[pipeline]\napply_connections = 2\n");
    assert_eq!(two.status.code(), Some(0), "{}", stdout(&two));
    let four = check_with("origins4", "postgres", &source_url, &target_url, "[pipeline]\napply_connections = 4\n");
    let text = stdout(&four);
    assert_eq!(four.status.code(), Some(1), "{text}");
    assert!(
        text.contains("max_replication_slots = 2 on the target, 0 replication origin(s) in use")
            && text.contains("apply_connections = 4 needs 4 more")
            && text.contains("ALTER SYSTEM SET max_replication_slots = 4"),
        "{text}"
    );
}

#[test]
fn a_ready_postgres_pair_passes_and_prints_its_plan() {
    let source = PostgresServer::start(&[]).expect("source");
    let target = PostgresServer::start(&[]).expect("target");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (client, connection) =
            tokio_postgres::connect(&source.url("postgres"), tokio_postgres::NoTls).await.expect("pg");
        tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE orders (id int PRIMARY KEY, note text); CREATE TABLE log (line text); \
                 INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 5000) g;",
            )
            .await
            .expect("tables");
    });
    let output = check("ready", "postgres", &source.url("postgres"), &target.url("postgres"));
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("public.orders") && text.contains("key (id)"), "{text}");
    assert!(text.contains("ALTER TABLE \"public\".\"log\" REPLICA IDENTITY FULL"), "{text}");
    // The target's free space was read (df on the server) and is plenty for 5000 rows.
    assert!(!text.contains("free disk space unknown") && !text.contains("free on the volume"), "{text}");
}

#[test]
fn mariadb_with_statement_binlog_is_refused_and_the_plan_shows_the_mapping() {
    let source = MariaDbServer::start(&["--binlog-format=STATEMENT"]).expect("mariadb");
    let target = PostgresServer::start(&[]).expect("target");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url"))
            .await
            .expect("mariadb");
        conn.query_drop(
            "CREATE DATABASE shop; CREATE TABLE shop.t (id bigint unsigned PRIMARY KEY, d datetime(3), tm time)",
        )
        .await
        .expect("table");
    });
    let output = check("statement", "mysql", &source.url("shop"), &target.url("postgres"));
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("binlog_format = STATEMENT") && text.contains("SET GLOBAL binlog_format = 'ROW'"), "{text}");
    assert!(text.contains("bigint(20) unsigned") && text.contains("numeric(20,0)"), "{text}");
    assert!(text.contains("timestamp(3)") && text.contains("zero dates become NULL"), "{text}");
}

#[test]
fn a_bad_config_names_the_file_and_key() {
    let dir = std::env::temp_dir().join(format!("cutover-check-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[source]\nkind = \"oracle\"\nurl = \"x\"\n[target]\nkind = \"postgres\"\nurl = \"y\"\n[state]\ndir = \"/tmp/x\"\n")
        .expect("config");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["check", "--config"]).arg(&config).output().expect("runs");
    let text = stdout(&output);
    assert!(!output.status.success());
    assert!(text.contains("bad.toml") && text.contains("oracle") && text.contains("postgres"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
