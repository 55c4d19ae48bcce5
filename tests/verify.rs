//! `cutover verify` against real sandbox servers: a copy that matches is `ok` in
//! every pairing (PostgreSQL and MariaDB, same dialect and across), then a changed,
//! a missing and an extra row made on the target are found and named by key, and
//! `--repair` makes the target equal again, within one dialect and across (keyed,
//! text-keyed, uuid-keyed and keyless tables, every column type of the fixture), also
//! after 40 random changes (CUTOVER_VERIFY_SEED), checked against a fresh copy by the
//! target server's own digests; on a live pipeline, a row the target has not applied
//! yet is read again, not reported.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Server;
use cutover::config::Config;
use cutover::verify::{TableReport, Verification};

const PG_SOURCE: &str = r#"
CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, price numeric(10,2), at timestamptz,
    raw bytea, tags text[], flag boolean, doc jsonb, note character(6), ratio real, weight double precision);
INSERT INTO items SELECT g, 'item ' || g, g / 4.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1.5 second',
    decode(lpad(to_hex(g), 8, '0'), 'hex'), ARRAY['a', 'b' || g % 3], g % 2 = 0,
    jsonb_build_object('n', g, 'half', g / 2.0), 'n' || g % 10, g / 7.0, g * 1e12
    FROM generate_series(1, 5000) g;
INSERT INTO items (id, name, price, ratio, weight) VALUES
    (5001, E'it''s \\ a\ttab\nline ü \U0001F600', -99999999.99, 3.4e38, -1.7976931348623157e308);
CREATE TABLE codes (code text PRIMARY KEY, n integer);
INSERT INTO codes SELECT 'c' || g, g FROM generate_series(1, 25000) g;
CREATE TABLE events (v text, n integer);
INSERT INTO events SELECT 'e' || g, g FROM generate_series(1, 24000) g;
INSERT INTO events VALUES (NULL, NULL), (NULL, NULL), ('e1', 1);
CREATE TABLE tokens (id uuid PRIMARY KEY, n integer);
INSERT INTO tokens SELECT md5(g::text)::uuid, g FROM generate_series(1, 24000) g;
CREATE TABLE blobs (flag boolean, raw bytea, ratio double precision);
INSERT INTO blobs SELECT g % 2 = 0, decode(md5(g::text), 'hex'), g / 3.0 FROM generate_series(1, 24000) g;
INSERT INTO blobs VALUES (NULL, NULL, NULL);
ANALYZE;
"#;

const MARIADB_SOURCE: &str = "
CREATE TABLE shop.items (id int PRIMARY KEY, name varchar(40) NOT NULL, price decimal(10,2), at datetime(6),
    raw varbinary(8), tags set('a','b0','b1','b2'), flag tinyint(1), doc json, note char(6), ratio float,
    weight double, tm time(3));
INSERT INTO shop.items SELECT seq, CONCAT('item ', seq), seq / 4, '2024-01-01' + INTERVAL seq * 1500000 MICROSECOND,
    UNHEX(LPAD(HEX(seq), 8, '0')), CONCAT('a,b', seq % 3), seq % 2 = 0, JSON_OBJECT('n', seq), CONCAT('n', seq % 10),
    seq / 7, seq * 1e12, SEC_TO_TIME(seq * 1.5)
    FROM seq_1_to_5000;
INSERT INTO shop.items (id, name, price, ratio, weight, tm) VALUES
    (5001, 'it''s \\\\ a\\ttab\\nline ü 😀', -99999999.99, -3.4e38, 1.7976931348623157e308, '-838:59:59');
CREATE TABLE shop.codes (code varchar(20) PRIMARY KEY, n int);
INSERT INTO shop.codes SELECT CONCAT('c', seq), seq FROM seq_1_to_25000;
CREATE TABLE shop.events (v varchar(20), n int);
INSERT INTO shop.events SELECT CONCAT('e', seq), seq FROM seq_1_to_24000;
INSERT INTO shop.events VALUES (NULL, NULL), (NULL, NULL), ('e1', 1);
CREATE TABLE shop.tokens (id char(36) PRIMARY KEY, n int);
INSERT INTO shop.tokens SELECT CONCAT_WS('-', SUBSTR(MD5(seq), 1, 8), SUBSTR(MD5(seq), 9, 4), SUBSTR(MD5(seq), 13, 4),
    SUBSTR(MD5(seq), 17, 4), SUBSTR(MD5(seq), 21, 12)), seq FROM seq_1_to_24000;
CREATE TABLE shop.blobs (flag tinyint(1), raw varbinary(16), ratio double);
INSERT INTO shop.blobs SELECT seq % 2 = 0, UNHEX(MD5(seq)), seq / 3 FROM seq_1_to_24000;
INSERT INTO shop.blobs VALUES (NULL, NULL, NULL);
ANALYZE TABLE shop.codes, shop.events, shop.tokens, shop.blobs;
";

/// Made on the target after the copy: per table, one changed, one missing and one extra row
/// (and a second changed item, by a cent; one of two equal keyless rows gone; in a keyless
/// table of bytes, a boolean and a float, a changed and a missing row).
fn drift(qualifier: &str, mysql_target: bool) -> String {
    let (one_of_two, one_flag) = match mysql_target {
        true => (
            "DELETE FROM {q}events WHERE v IS NULL LIMIT 1",
            "UPDATE {q}blobs SET flag = NULL WHERE flag IS NOT NULL ORDER BY ratio LIMIT 1",
        ),
        false => (
            "DELETE FROM {q}events WHERE ctid = (SELECT min(ctid) FROM {q}events WHERE v IS NULL)",
            "UPDATE {q}blobs SET flag = NULL WHERE ctid = (SELECT min(ctid) FROM {q}blobs WHERE flag IS NOT NULL)",
        ),
    };
    [
        "UPDATE {q}items SET name = 'changed' WHERE id = 1234",
        "UPDATE {q}items SET price = price + 0.01 WHERE id = 2000",
        "DELETE FROM {q}items WHERE id = 4321",
        "INSERT INTO {q}items (id, name) VALUES (99999, 'extra')",
        "UPDATE {q}codes SET n = 0 WHERE code = 'c42'",
        "DELETE FROM {q}codes WHERE code = 'c7'",
        "INSERT INTO {q}codes VALUES ('zz', 1)",
        "DELETE FROM {q}events WHERE n = 3",
        "INSERT INTO {q}events VALUES ('new', 51)",
        one_of_two,
        "UPDATE {q}tokens SET n = -n WHERE n = 77",
        "DELETE FROM {q}tokens WHERE n = 78",
        one_flag,
        "DELETE FROM {q}blobs WHERE raw IS NULL",
    ]
    .map(|statement| statement.replace("{q}", qualifier))
    .join(";\n")
}

fn table<'a>(verification: &'a Verification, name: &str) -> &'a TableReport {
    verification
        .tables
        .iter()
        .find(|t| t.table.ends_with(&format!(".{name}")))
        .unwrap_or_else(|| panic!("no report for {name}:\n{}", cutover::verify::render(verification)))
}

fn keys(keys: &[String]) -> BTreeSet<&str> {
    keys.iter().map(String::as_str).collect()
}

/// Copies the source, verifies (all `ok`), makes the target drift, verifies again.
async fn names_differing_rows(name: &str, source: Server, target: Server) {
    let dir = common::test_dir(&format!("cutover-test-verify-{name}-{}", std::process::id()));
    let setup = match &source {
        Server::Postgres(_) => PG_SOURCE,
        Server::Mariadb(_) => MARIADB_SOURCE,
    };
    source.execute(true, setup).await;
    target.execute(false, "SELECT 1").await;
    let config_path = dir.join(format!("{name}.toml"));
    common::pipeline_config(&config_path, &source, &target, &dir.join("state"), "[snapshot]\nmode = \"only\"\n");
    let config = Config::load(&config_path).expect("config loads");
    cutover::pipeline::run(&config, std::future::pending()).await.expect("the copy runs");

    let clean = cutover::verify::verify(&config).await.expect("verify runs");
    assert!(clean.matches(), "a fresh copy differs:\n{}", cutover::verify::render(&clean));
    assert_eq!(clean.tables.len(), 5);
    assert_eq!(table(&clean, "items").source_rows, 5001);

    // A MySQL source's database lands in the PostgreSQL schema of its name.
    let qualifier = match (&source, &target) {
        (Server::Mariadb(_), Server::Postgres(_)) => "shop.",
        _ => "",
    };
    target.execute(false, &drift(qualifier, matches!(target, Server::Mariadb(_)))).await;
    let drifted = cutover::verify::verify(&config).await.expect("verify runs");
    let shown = cutover::verify::render(&drifted);
    assert!(!drifted.matches(), "{shown}");
    let items = table(&drifted, "items");
    assert_eq!((items.source_rows, items.target_rows), (5001, 5001), "{shown}");
    assert_eq!(keys(&items.missing.keys), BTreeSet::from(["4321"]), "{shown}");
    assert_eq!(keys(&items.extra.keys), BTreeSet::from(["99999"]), "{shown}");
    assert_eq!(keys(&items.changed.keys), BTreeSet::from(["1234", "2000"]), "{shown}");
    let codes = table(&drifted, "codes");
    assert_eq!(keys(&codes.missing.keys), BTreeSet::from(["c7"]), "{shown}");
    assert_eq!(keys(&codes.extra.keys), BTreeSet::from(["zz"]), "{shown}");
    assert_eq!(keys(&codes.changed.keys), BTreeSet::from(["c42"]), "{shown}");
    // Keys no range splits alike (text) went in buckets by hash, across dialects too (each
    // bucket read whole); rows without a key within one dialect only.
    assert!(codes.chunks > 1 && codes.source_rows == 25000, "{shown}");
    // So did a uuid key (compared as text), and rows without a key, by a column's text.
    assert!(table(&drifted, "events").chunks > 1 && table(&drifted, "tokens").chunks > 1, "{shown}");
    let tokens = table(&drifted, "tokens");
    assert_eq!((tokens.missing.count, tokens.extra.count, tokens.changed.count), (1, 0, 1), "{shown}");
    // Without a key, a row is named by its values; a changed row is one missing and one extra.
    let events = table(&drifted, "events");
    assert_eq!((events.missing.count, events.extra.count, events.changed.count), (2, 1, 0), "{shown}");
    assert!(events.missing.keys.iter().any(|k| k.contains("e3")), "{shown}");
    assert!(events.extra.keys[0].contains("new"), "{shown}");
    // Without a key or a text column: in buckets by the bytes' hex, across dialects too.
    let blobs = table(&drifted, "blobs");
    assert_eq!((blobs.missing.count, blobs.extra.count, blobs.changed.count), (2, 1, 0), "{shown}");
    assert!(blobs.chunks > 1 && blobs.source_rows == 24001, "{shown}");

    // The command: the keys on stdout, exit status 1.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["verify", "--config"])
        .arg(&config_path)
        .output()
        .expect("cutover verify runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("differ: 1 missing, 1 extra, 2 changed") && stdout.contains("4321"), "{stdout}");

    // Repair: the script for the differing rows, then the repair run, which verifies again.
    let verify = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["verify", "--config"])
            .arg(&config_path)
            .args(args)
            .output()
            .expect("cutover verify runs");
        (
            output.status.code(),
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        )
    };
    let script = dir.join("repair.sql");
    let script_arg = script.to_string_lossy().to_string();
    let (code, output) = verify(&["--repair-script", &script_arg]);
    assert_eq!(code, Some(1), "{output}");
    let sql = std::fs::read_to_string(&script).expect("repair script");
    assert!(sql.contains("DELETE FROM") && sql.contains("INSERT INTO") && sql.matches("COMMIT;").count() == 5, "{sql}");
    let (code, output) = verify(&["--repair"]);
    assert!(code == Some(0) && output.contains("repaired") && output.contains("5 tables, 5 match"), "{output}");
    let repaired = cutover::verify::verify(&config).await.expect("verify runs");
    assert!(repaired.matches(), "{}", cutover::verify::render(&repaired));

    // Random drift (printed seed), repaired, then compared with a fresh copy of the source
    // made into another database, table by table by the target server itself: a blind
    // spot verify shares with its repair would show here.
    let seed = common::seed_from_env("CUTOVER_VERIFY_SEED", 11);
    println!("{name}: random drift seed={seed} (replay: CUTOVER_VERIFY_SEED={seed})");
    target.execute(false, &random_drift(&mut common::Rng::new(seed, 3), qualifier)).await;
    if let Server::Mariadb(_) = target {
        // Two rows swap a value of another unique index: `ON DUPLICATE KEY UPDATE` would
        // update the row holding the value, not the one of the key.
        target
            .execute(
                false,
                "ALTER TABLE tokens ADD UNIQUE KEY tokens_n (n); UPDATE tokens SET n = -1 WHERE n = 100;
                 UPDATE tokens SET n = 100 WHERE n = 101; UPDATE tokens SET n = 101 WHERE n = -1;",
            )
            .await;
    }
    let (code, output) = verify(&["--repair"]);
    assert!(code == Some(0) && output.contains("5 tables, 5 match"), "seed {seed}: {output}");
    assert_equals_a_fresh_copy(&dir, &config_path, &source, &target, seed).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Copies the source afresh into another database on the target's server, then has the
/// target server compare every table of the pipeline's target with it, by digests of its
/// own: a blind spot verify shares with its repair would show here.
async fn assert_equals_a_fresh_copy(
    dir: &std::path::Path,
    config_path: &std::path::Path,
    source: &Server,
    target: &Server,
    seed: u64,
) {
    let fresh_url = match target {
        Server::Postgres(server) => {
            target.execute(false, "DROP DATABASE IF EXISTS fresh").await;
            target.execute(false, "CREATE DATABASE fresh").await;
            server.url("fresh")
        }
        Server::Mariadb(server) => server.url("fresh"),
    };
    let fresh_config = dir.join("fresh.toml");
    let text = std::fs::read_to_string(config_path).expect("config");
    let mut text = text
        .replace(&target.url(false), &fresh_url)
        .replace(&dir.join("state").display().to_string(), &dir.join("fresh-state").display().to_string());
    if !text.contains("mode = \"only\"") {
        text.push_str("[snapshot]\nmode = \"only\"\n");
    }
    std::fs::write(&fresh_config, text).expect("fresh config");
    let fresh_config = Config::load(&fresh_config).expect("config loads");
    cutover::pipeline::run(&fresh_config, std::future::pending()).await.expect("the fresh copy runs");
    let schema = match (source, target) {
        (Server::Mariadb(_), Server::Postgres(_)) => "shop",
        (_, Server::Postgres(_)) => "public",
        (_, Server::Mariadb(_)) => "",
    };
    let repaired = table_digests(target, &target.url(false), schema).await;
    assert!(!repaired.is_empty());
    assert_eq!(repaired, table_digests(target, &fresh_url, schema).await, "seed {seed}");
}

/// 40 random changes on the target: rows deleted, values changed (NULLs too), keys
/// changed, rows added, in every table.
fn random_drift(rng: &mut common::Rng, qualifier: &str) -> String {
    let mut statements = Vec::new();
    for i in 0..40 {
        let (item, code, n) = (rng.range(1, 5001), rng.range(1, 25000), rng.range(1, 24000));
        statements.push(match rng.below(10) {
            0 => format!("DELETE FROM {qualifier}items WHERE id = {item}"),
            1 => format!("UPDATE {qualifier}items SET name = 'drift {i}', price = NULL WHERE id = {item}"),
            2 => format!("UPDATE {qualifier}items SET id = {} WHERE id = {item}", 200_000 + i),
            3 => format!("INSERT INTO {qualifier}items (id, name, flag) VALUES ({}, 'added', NULL)", 300_000 + i),
            4 => format!("DELETE FROM {qualifier}codes WHERE code = 'c{code}'"),
            5 => format!("UPDATE {qualifier}codes SET n = NULL WHERE code = 'c{code}'"),
            6 => format!("INSERT INTO {qualifier}codes VALUES ('added {i}', {n})"),
            7 => format!("DELETE FROM {qualifier}events WHERE n = {n}"),
            8 => format!("UPDATE {qualifier}events SET v = NULL WHERE n = {n}"),
            _ => format!("UPDATE {qualifier}tokens SET n = n + 1000000 WHERE n = {n}"),
        });
    }
    statements.join(";\n")
}

/// Every table of a database (MariaDB) or of `schema` in it (PostgreSQL): name, row count
/// and an md5 of its rows' text in order, computed by the server.
async fn table_digests(server: &Server, url: &str, schema: &str) -> Vec<(String, i64, String)> {
    let mut digests = Vec::new();
    match server {
        Server::Postgres(_) => {
            let client = common::connect(url).await;
            let tables = client
                .query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1", &[&schema])
                .await
                .expect("tables");
            for row in tables {
                let table: String = row.get(0);
                let name = cutover::schema::quote_table(&cutover::change::TableName::new(schema, table.clone()));
                let sql = format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {name} t"
                );
                let digest = client.query_one(&sql, &[]).await.expect("digest");
                digests.push((table, digest.get(0), digest.get(1)));
            }
        }
        Server::Mariadb(_) => {
            use mysql_async::prelude::Queryable;
            let mut conn =
                mysql_async::Conn::new(mysql_async::Opts::from_url(url).expect("url")).await.expect("mariadb");
            conn.query_drop("SET SESSION group_concat_max_len = 1073741824").await.expect("session");
            let tables: Vec<String> = conn
                .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() ORDER BY 1")
                .await
                .expect("tables");
            for table in tables {
                let columns: Vec<String> = conn
                    .exec(
                        "SELECT CONCAT('QUOTE(`', COLUMN_NAME, '`)') FROM information_schema.COLUMNS \
                         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                        (&table,),
                    )
                    .await
                    .expect("columns");
                let row = format!("CONCAT_WS('|', {})", columns.join(", "));
                let sql = format!(
                    "SELECT COUNT(*), COALESCE(MD5(GROUP_CONCAT({row} ORDER BY {row} SEPARATOR ',')), '') FROM `{table}`"
                );
                let digest: Option<(i64, String)> = conn.query_first(sql).await.expect("digest");
                let (count, md5) = digest.unwrap_or_default();
                digests.push((table, count, md5));
            }
        }
    }
    digests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_postgres_names_changed_missing_and_extra_rows() {
    names_differing_rows("pg-pg", Server::postgres(), Server::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_to_mariadb_names_changed_missing_and_extra_rows() {
    names_differing_rows("my-my", Server::mariadb(), Server::mariadb()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_to_postgres_names_changed_missing_and_extra_rows_across_dialects() {
    names_differing_rows("my-pg", Server::mariadb(), Server::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_mariadb_names_changed_missing_and_extra_rows_across_dialects() {
    names_differing_rows("pg-my", Server::postgres(), Server::mariadb()).await;
}

/// The target holds a change back (its table locked against writes): the first pass sees
/// the row differ, the re-check waits until the target has applied it and finds it equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_a_live_pipeline_rechecks_rows_the_target_has_not_applied_yet() {
    let pair = common::Pair::start("verify-live", "");
    let source = common::connect(&pair.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE hot (id integer PRIMARY KEY, n bigint); INSERT INTO hot SELECT g, 0 FROM generate_series(1, 500) g",
        )
        .await
        .expect("source table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;

    let mut target = common::connect(&pair.target.url("postgres")).await;
    let lock = target.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE hot IN EXCLUSIVE MODE").await.expect("lock");
    source.batch_execute("UPDATE hot SET n = 1 WHERE id = 7").await.expect("update");
    let config = pair.config();
    let verifying = tokio::spawn(async move { cutover::verify::verify(&config).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.rollback().await.expect("unlock");
    let verification = verifying.await.expect("verify task").expect("verify runs");
    let shown = cutover::verify::render(&verification);
    assert!(verification.matches(), "{shown}\n{}", pair.log());
    assert!(verification.consistent_at.is_some(), "the held-back row was not re-checked:\n{shown}");
    common::stop(&mut child);
}

const PG_LIVE: &str = "
CREATE TABLE hot (id integer PRIMARY KEY, n bigint NOT NULL, note text);
INSERT INTO hot SELECT g, 0, 'row ' || g FROM generate_series(1, 3000) g;
CREATE TABLE tags (code text PRIMARY KEY, n integer);
INSERT INTO tags SELECT 't' || g, g FROM generate_series(1, 3000) g;
";

const MARIADB_LIVE: &str = "
CREATE TABLE hot (id int PRIMARY KEY, n bigint NOT NULL, note varchar(40));
INSERT INTO hot SELECT seq, 0, CONCAT('row ', seq) FROM seq_1_to_3000;
CREATE TABLE tags (code varchar(20) PRIMARY KEY, n int);
INSERT INTO tags SELECT CONCAT('t', seq), seq FROM seq_1_to_3000;
";

/// Whether the target applies everything the source has written now, within `seconds`.
async fn caught_up(config: &Config, seconds: u64) -> bool {
    let position = cutover::pipeline::source_position(config).await.expect("source position");
    cutover::pipeline::wait_until_applied(config, &position, Duration::from_secs(seconds))
        .await
        .is_ok_and(|(reached, _)| reached)
}

/// A source connection that stays open, for a writer.
enum Writer {
    Postgres(tokio_postgres::Client),
    Mariadb(mysql_async::Conn),
}

impl Writer {
    async fn open(server: &Server) -> Writer {
        match server {
            Server::Postgres(_) => Writer::Postgres(common::connect(&server.url(true)).await),
            Server::Mariadb(_) => Writer::Mariadb(
                mysql_async::Conn::new(mysql_async::Opts::from_url(&server.url(true)).expect("url"))
                    .await
                    .expect("mariadb"),
            ),
        }
    }

    async fn run(&mut self, sql: &str) {
        use mysql_async::prelude::Queryable;
        match self {
            Writer::Postgres(client) => client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")),
            Writer::Mariadb(conn) => conn.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }
}

/// One random write on the source: values changed, rows deleted, added, deleted and added
/// again under the same key in one transaction, keys changed.
fn random_write(rng: &mut common::Rng, i: u64) -> String {
    let id = rng.range(1, 3000);
    match rng.below(8) {
        0 | 1 => format!("UPDATE hot SET n = n + 1, note = 'w{i}' WHERE id = {id}"),
        2 => format!("DELETE FROM hot WHERE id = {id}"),
        3 => format!("INSERT INTO hot VALUES ({}, {i}, 'new')", 10_000 + i),
        4 => format!("BEGIN; DELETE FROM hot WHERE id = {id}; INSERT INTO hot VALUES ({id}, -{i}, 'again'); COMMIT"),
        5 => format!("UPDATE hot SET id = {} WHERE id = {id}", 100_000 + i),
        _ => format!("UPDATE tags SET n = n + 1 WHERE code = 't{id}'"),
    }
}

/// `verify --repair` while the pipeline runs and the source takes random writes: the
/// repair holds the applier at its snapshot of the source, so a change applied between its
/// read and its write cannot be overwritten by an older row. Its write waits 2 s there
/// (failpoint), while the writer goes on, so an unheld repair loses changes here. A repair
/// killed while it holds lets the pipeline go on; a daemon killed and started again while
/// a repair holds it has the repair roll back. Once the writer stops and the target
/// caught up, every table equals a fresh copy of the source (CUTOVER_VERIFY_SEED).
async fn repairs_a_live_pipeline(name: &str, source: Server, target: Server) {
    let dir = common::test_dir(&format!("cutover-test-verify-{name}-{}", std::process::id()));
    source.execute(true, if matches!(source, Server::Postgres(_)) { PG_LIVE } else { MARIADB_LIVE }).await;
    target.execute(false, "SELECT 1").await;
    let config_path = dir.join(format!("{name}.toml"));
    common::pipeline_config(&config_path, &source, &target, &dir.join("state"), "");
    let config = Config::load(&config_path).expect("config loads");
    let log = dir.join("cutover.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut daemon = common::spawn_run(&config_path, &log, &[]);
    let started = std::time::Instant::now();
    while !(read_log().contains("streaming changes") && caught_up(&config, 5).await) {
        assert!(started.elapsed() < Duration::from_secs(120), "no catch-up:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let seed = common::seed_from_env("CUTOVER_VERIFY_SEED", 11);
    println!("{name}: live repair seed={seed} (replay: CUTOVER_VERIFY_SEED={seed})");
    let mut rng = common::Rng::new(seed, 5);
    let qualifier = match (&source, &target) {
        (Server::Mariadb(_), Server::Postgres(_)) => "shop.",
        _ => "",
    };
    let drift: Vec<String> = (0..30)
        .map(|i| {
            let id = rng.range(1, 3000);
            match rng.below(5) {
                0 => format!("DELETE FROM {qualifier}hot WHERE id = {id}"),
                1 => format!("UPDATE {qualifier}hot SET n = -5 WHERE id = {id}"),
                2 => format!("INSERT INTO {qualifier}hot VALUES ({}, 0, 'extra')", 500_000 + i),
                3 => format!("UPDATE {qualifier}tags SET n = NULL WHERE code = 't{id}'"),
                _ => format!("DELETE FROM {qualifier}tags WHERE code = 't{id}'"),
            }
        })
        .collect();
    target.execute(false, &drift.join(";\n")).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writer = Writer::open(&source).await;
    let writing = {
        let stop = stop.clone();
        let mut rng = common::Rng::new(seed, 6);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                writer.run(&random_write(&mut rng, i)).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            i
        })
    };
    let verify = |failpoint: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["verify", "--repair", "--config"])
            .arg(&config_path)
            .env("CUTOVER_FAILPOINT", failpoint)
            .output()
            .expect("cutover verify runs");
        (output.status.code(), common::output_text(&output))
    };
    // Killed while it holds the applier: the hold ends with it.
    let (code, output) = verify("repair-rows-read");
    assert!(code.is_none() && output.contains("failpoint repair-rows-read"), "{output}");
    assert!(caught_up(&config, 60).await, "the pipeline did not go on after the repair died:\n{}", read_log());
    // The daemon killed and started again while a repair holds it: the hold is gone, so
    // the repair's transaction rolls back instead of committing beside the new daemon.
    let holds = read_log().matches("holding the applier for a repair").count();
    let repairing = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["verify", "--repair", "--config"])
        .arg(&config_path)
        .env("CUTOVER_FAILPOINT", "repair-rows-read:sleep=4")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cutover verify starts");
    let started = std::time::Instant::now();
    while read_log().matches("holding the applier for a repair").count() < holds + 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "the repair never held:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::kill9(&mut daemon);
    daemon = common::spawn_run(&config_path, &log, &[]);
    let output = repairing.wait_with_output().expect("cutover verify ends");
    let text = common::output_text(&output);
    assert!(!output.status.success() && text.contains("rolled back"), "{text}");
    let (code, output) = verify("repair-rows-read:sleep=2");
    assert!(matches!(code, Some(0 | 1)) && output.contains("repaired"), "{output}\n{}", read_log());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writing.await.expect("writer");
    println!("{name}: {writes} writes on the source");
    assert!(caught_up(&config, 120).await, "no catch-up after the writes:\n{}", read_log());
    common::stop(&mut daemon);
    assert_equals_a_fresh_copy(&dir, &config_path, &source, &target, seed).await;
    assert!(read_log().contains("holding the applier for a repair"), "{}", read_log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_on_a_live_postgres_pipeline_holds_the_applier_at_its_snapshot() {
    repairs_a_live_pipeline("live-pg-pg", Server::postgres(), Server::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_on_a_live_mariadb_pipeline_holds_the_applier_at_its_snapshot() {
    repairs_a_live_pipeline("live-my-pg", Server::mariadb(), Server::postgres()).await;
}
