//! MariaDB → PostgreSQL against real sandbox servers: every row of the type
//! mapping, with extreme values, lands as the documented PostgreSQL value.

mod common;

use common::master_status;

use std::process::Command;
use std::time::Duration;

use cutover::sandbox::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

/// The awkward types plus a table big enough to take a moment.
fn source_sql() -> String {
    format!(
        "{}\nCREATE TABLE big_one (id bigint PRIMARY KEY, payload varchar(100));\n\
         INSERT INTO big_one SELECT seq, CONCAT('row ', seq) FROM seq_1_to_250000;",
        cutover::demo::MYSQL_AWKWARD_TYPES_SQL
    )
}

/// A MariaDB source holding `source_sql()`, a PostgreSQL target, a connection to the source
/// and a scratch dir.
async fn start(name: &str) -> (MariaDbServer, PostgresServer, mysql_async::Conn, std::path::PathBuf) {
    start_with(name, &source_sql()).await
}

/// As [`start`], with the source holding `sql` (run in database `mysql`).
async fn start_with(name: &str, sql: &str) -> (MariaDbServer, PostgresServer, mysql_async::Conn, std::path::PathBuf) {
    let source = MariaDbServer::start(&[]).expect("mariadb");
    let target = PostgresServer::start(&[]).expect("postgres");
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url"))
        .await
        .expect("connects to mariadb");
    conn.query_drop(sql).await.expect("source data");
    let dir = common::test_dir(&format!("cutover-test-{name}-{}", source.port()));
    (source, target, conn, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_copy_maps_every_type() {
    let (source, target, _conn, dir) = start("mysql").await;
    let config = dir.join("mysql-to-pg.toml");
    write_config(&config, &source.url("shop"), &target.url("postgres"), &dir.join("state"), "only");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&config).output().expect("runs");
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "cutover failed:\n{log}");

    let client = pg(&target.url("postgres")).await;
    let rows = client
        .query(
            "SELECT concat_ws('|', flag, tiny, utiny, small, usmall, medium, umedium, regular, uint, big, ubig, money, f, d,
                     c, vc, t, length(lt), encode(bin, 'hex'), encode(vb, 'hex'), encode(bl, 'hex'), dt, dtm, ts, tm, yr,
                     mood, tags, doc, bits, length(g), latin)
             FROM shop.every_type ORDER BY id",
            &[],
        )
        .await
        .expect("query");
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got,
        vec![
            "t|-128|255|-32768|65535|-8388608|16777215|-2147483648|4294967295|-9223372036854775808|18446744073709551615|\
             -12345678901234567890.0123456789|3.14159|2.718281828459045|ab|emoji 🦀|tab\there\nnewline \\ backslash|70000|\
             00ff0102|deadbeef|00|2024-02-29|1999-12-31 23:59:59.123456|2024-02-29 23:59:59.654321+00|-838:59:59|2024|\
             it's fine|{a,c}|{\"k\": [1, \"two\", null]}|101010111100|25|Zürich"
                .to_string(),
            "f|0|0|0|0|0|0|0|0|0|0|0.0000000000|0|0||||0|00000000|||838:59:59.999|1901|sad|{}|[]|000000000000|".to_string(),
            String::new(),
        ]
    );
    // Zero dates became NULL; keys, unique constraints, indexes and the identity came along.
    let checks = [
        ("SELECT count(*) FROM shop.every_type WHERE dt IS NULL AND dtm IS NULL", 2i64),
        ("SELECT count(*) FROM shop.no_key", 3),
        ("SELECT count(*) FROM shop.big_one", 250_000),
        ("SELECT count(*) FROM pg_indexes WHERE schemaname = 'shop' AND indexname IN ('every_type_pkey', 'every_type_vc_unique', 'every_type_by_big', 'big_one_pkey')", 4),
        ("SELECT nextval(pg_get_serial_sequence('shop.every_type', 'id'))", 4),
        ("SELECT count(*) FROM pg_type WHERE typname = 'every_type_mood' AND typtype = 'e'", 1),
    ];
    for (sql, expected) in checks {
        let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        assert_eq!(got, expected, "{sql}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("pg");
    tokio::spawn(connection);
    client
        .batch_execute("SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3")
        .await
        .expect("session");
    client
}

fn write_config(path: &std::path::Path, source: &str, target: &str, state: &std::path::Path, mode: &str) {
    let extra = format!("[snapshot]\nmode = \"{mode}\"\nworkers = 2\n");
    cutover::demo::write_config(path, "mysql", source, target, state, &extra).expect("config");
}

const STREAM_CHANGES: &str = r#"
SET SESSION sql_mode = '', time_zone = '+00:00';
INSERT INTO every_type (flag, utiny, usmall, umedium, uint, ubig, money, f, d, vc, t, bin, dt, dtm, ts, tm, yr, mood, tags, doc, bits, latin)
VALUES (1, 255, 65535, 16777215, 4294967295, 18446744073709551615, 0.0000000001, -1.5, 1e300, 'streamed ☃',
        'multi\nline', 0x01020304, '2000-01-01', '0000-00-00 00:00:00', '1970-01-02 00:00:00.5', '-00:00:01.5', 2155,
        'ok', 'b,c', '{"s": "x"}', b'111100001111', 'Ærø');
UPDATE every_type SET vc = 'updated', uint = 4000000000, tags = 'a' WHERE id = 1;
UPDATE every_type SET id = 100 WHERE id = 2;
DELETE FROM every_type WHERE id = 3;
UPDATE no_key SET b = 'uno' WHERE a = 1 LIMIT 1;
DELETE FROM no_key WHERE a = 2;
START TRANSACTION;
INSERT INTO big_one SELECT seq + 1000000, CONCAT('tx ', seq) FROM seq_1_to_50000;
UPDATE big_one SET payload = 'touched' WHERE id % 10 = 0;
DELETE FROM big_one WHERE id % 7 = 0;
COMMIT;
INSERT INTO marker VALUES (1);
"#;

const STREAM_CHANGES_AFTER_KILL: &str = r#"
SET SESSION sql_mode = '', time_zone = '+00:00';
INSERT INTO big_one VALUES (5000000, 'before rotation');
FLUSH BINARY LOGS;
INSERT INTO big_one VALUES (5000001, 'after rotation');
ALTER TABLE big_one ADD COLUMN extra int DEFAULT 7;
INSERT INTO big_one VALUES (5000002, 'with extra', 42);
TRUNCATE no_key;
INSERT INTO no_key (a, b) VALUES (5, 'five');
INSERT INTO marker VALUES (2);
"#;

async fn wait_for_marker(
    target: &tokio_postgres::Client,
    n: i32,
    child: &mut std::process::Child,
    log: &std::path::Path,
) {
    let started = std::time::Instant::now();
    loop {
        let found = target
            .query_opt("SELECT 1 FROM shop.marker WHERE id = $1", &[&n])
            .await
            .map(|r| r.is_some())
            .unwrap_or(false);
        if found {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cutover exited with {status}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "marker {n} never arrived:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A streaming pipeline from the MariaDB source's `shop` into the target's `postgres`
/// database, logging to `cutover.log` in the test dir.
struct Streaming {
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Streaming {
    fn new(source: &MariaDbServer, target: &PostgresServer, dir: &std::path::Path) -> Streaming {
        let config = dir.join("stream.toml");
        write_config(&config, &source.url("shop"), &target.url("postgres"), &dir.join("state"), "initial");
        Streaming { config, log: dir.join("cutover.log") }
    }

    fn spawn(&self) -> std::process::Child {
        self.spawn_with_env(&[])
    }

    fn spawn_with_env(&self, env: &[(&str, &std::path::Path)]) -> std::process::Child {
        common::spawn_run(&self.config, &self.log, env)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The streamed target against a fresh one-shot copy of the source as it is now,
    /// made into database `fresh`: every table of `shop` the same, rows and columns.
    async fn assert_matches_fresh_copy(&self, source: &MariaDbServer, target: &PostgresServer, dir: &std::path::Path) {
        self.assert_tables_match_fresh_copy(source, target, dir, 4).await;
    }

    /// As [`Streaming::assert_matches_fresh_copy`], for a `shop` of `tables` tables.
    async fn assert_tables_match_fresh_copy(
        &self,
        source: &MariaDbServer,
        target: &PostgresServer,
        dir: &std::path::Path,
        tables: usize,
    ) {
        let streamed = pg(&target.url("postgres")).await;
        streamed.batch_execute("CREATE DATABASE fresh").await.expect("fresh db");
        let fresh_config = dir.join("fresh.toml");
        write_config(&fresh_config, &source.url("shop"), &target.url("fresh"), &dir.join("fresh-state"), "only");
        let output = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["run", "--config"])
            .arg(&fresh_config)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let fresh = pg(&target.url("fresh")).await;
        let streamed_digests = schema_digests(&streamed, "shop").await.expect("digests");
        let fresh_digests = schema_digests(&fresh, "shop").await.expect("digests");
        assert_eq!(streamed_digests.len(), tables, "{streamed_digests:?}\n{}", self.log());
        assert_eq!(streamed_digests, fresh_digests, "{}", self.log());
        let columns = "SELECT table_name || '.' || column_name || ' ' || data_type FROM information_schema.columns \
                       WHERE table_schema = 'shop' ORDER BY table_name, ordinal_position";
        let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<String>>();
        let streamed_columns = names(streamed.query(columns, &[]).await.expect("columns"));
        let fresh_columns = names(fresh.query(columns, &[]).await.expect("columns"));
        assert_eq!(streamed_columns, fresh_columns, "{}", self.log());
    }
}

fn signal(child: &mut std::process::Child, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binlog_stream_matches_a_fresh_copy_after_kill_rotation_and_ddl() {
    let (source, target, mut conn, dir) = start("binlog").await;
    conn.query_drop("CREATE TABLE shop.marker (id int PRIMARY KEY)").await.expect("marker");
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;

    let mut child = pipeline.spawn();
    conn.query_drop(STREAM_CHANGES).await.expect("changes");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGKILL);
    conn.query_drop(STREAM_CHANGES_AFTER_KILL).await.expect("changes after kill");
    let mut child = pipeline.spawn();
    wait_for_marker(&streamed, 2, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGTERM);

    pipeline.assert_matches_fresh_copy(&source, &target, &dir).await;
    // The restart after kill -9 resumed by MariaDB GTID: its checkpoint carried the state.
    let log = pipeline.log();
    let resumed = log.lines().filter(|l| l.contains("streaming changes")).nth(1).unwrap_or_default();
    assert!(resumed.contains(";gtid=0-1-"), "{log}");
    // The 250 k-row table was copied by both workers in primary-key ranges.
    assert!(log.contains("KeyRange"), "{log}");
    let extra: i64 =
        streamed.query_one("SELECT count(*) FROM shop.big_one WHERE extra = 7", &[]).await.expect("extra").get(0);
    assert!(extra > 200_000, "ADD COLUMN … DEFAULT 7 reached the existing rows: {extra}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_restart_mid_stream_is_survived() {
    let (mut source, target, mut conn, dir) = start("restart").await;
    conn.query_drop("CREATE TABLE shop.marker (id int PRIMARY KEY)").await.expect("marker");
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    conn.query_drop(STREAM_CHANGES).await.expect("changes");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    drop(conn);
    source.restart().expect("mariadb restarts");
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("shop")).expect("url"))
        .await
        .expect("reconnects");
    conn.query_drop(STREAM_CHANGES_AFTER_KILL).await.expect("changes after restart");
    wait_for_marker(&streamed, 2, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGTERM);

    pipeline.assert_matches_fresh_copy(&source, &target, &dir).await;
    assert!(pipeline.log().contains("connection lost; resuming"), "{}", pipeline.log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A value its target column cannot take stops the copy with the table, the row's key,
/// the column and the value — never a silently dropped row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_target_cannot_take_is_named() {
    let (source, target, mut conn, dir) = start("badvalue").await;
    conn.query_drop(
        "CREATE TABLE shop.flags (id int PRIMARY KEY, active tinyint(1)); INSERT INTO shop.flags VALUES (1, 1), (2, 5)",
    )
    .await
    .expect("table");
    let config = dir.join("bad.toml");
    write_config(&config, &source.url("shop"), &target.url("postgres"), &dir.join("state"), "only");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&config).output().expect("runs");
    let text = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("shop.flags")
            && text.contains("id=2")
            && text.contains("column active")
            && text.contains("value 5"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A MariaDB source set up by `setup`, and a PostgreSQL target holding a one-shot copy of
/// it: a "restored backup" to replay onto.
async fn restored_copy(
    name: &str,
    setup: &str,
) -> (MariaDbServer, PostgresServer, mysql_async::Conn, std::path::PathBuf) {
    let source = MariaDbServer::start(&[]).expect("mariadb");
    let target = PostgresServer::start(&[]).expect("postgres");
    let mut conn =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url")).await.expect("mariadb");
    conn.query_drop(setup).await.expect("setup");
    let dir = common::test_dir(&format!("cutover-test-{name}-{}", source.port()));
    let copy = dir.join("copy.toml");
    write_config(&copy, &source.url("shop"), &target.url("postgres"), &dir.join("copy-state"), "only");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&copy).output().expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    (source, target, conn, dir)
}

async fn one_value(conn: &mut mysql_async::Conn, sql: &str) -> String {
    conn.query_first::<String, _>(sql).await.expect(sql).expect("a value")
}

/// Point-in-time recovery onto a restored copy: start at the copy's GTID, leave out the
/// accidental DELETE, stop at a binlog position — and say which skip entry never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_starts_at_a_gtid_skips_the_bad_transaction_and_stops_at_a_position() {
    // The "restored backup": a one-shot copy, and the GTID it corresponds to.
    let (source, target, mut conn, dir) = restored_copy(
        "pitr",
        "CREATE DATABASE shop; CREATE TABLE shop.ledger (id int PRIMARY KEY, amount int); \
         INSERT INTO shop.ledger SELECT seq, seq * 10 FROM seq_1_to_10",
    )
    .await;
    let backup_gtid = one_value(&mut conn, "SELECT @@gtid_binlog_pos").await;

    conn.query_drop("INSERT INTO shop.ledger SELECT seq, seq * 10 FROM seq_11_to_20").await.expect("batch A");
    conn.query_drop("DELETE FROM shop.ledger").await.expect("the accident");
    let bad_gtid = one_value(&mut conn, "SELECT @@gtid_binlog_pos").await;
    conn.query_drop("INSERT INTO shop.ledger SELECT seq, seq * 10 FROM seq_21_to_30").await.expect("batch B");
    let stop_position = master_status(&mut conn).await;
    conn.query_drop("INSERT INTO shop.ledger SELECT seq, seq * 10 FROM seq_31_to_40").await.expect("batch C");

    let pitr = dir.join("pitr.toml");
    std::fs::write(
        &pitr,
        format!(
            "[source]\nkind = \"mysql\"\nurl = \"{}\"\n[target]\nkind = \"postgres\"\nurl = \"{}\"\n[state]\ndir = \"{}\"\n\
             [snapshot]\nmode = \"never\"\n[stream]\nstart = \"gtid:{backup_gtid}\"\nstop_at = \"{stop_position}\"\n\
             skip = [\"gtid:{bad_gtid}\", \"gtid:0-1-999999\"]\n",
            source.url("shop"),
            target.url("postgres"),
            dir.join("pitr-state").display()
        ),
    )
    .expect("config");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&pitr).output().expect("runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("reached stop_at") && stdout.contains("skip entry gtid:0-1-999999 matched no transaction"),
        "{stdout}"
    );
    assert!(stderr.contains(&format!("gtid:{bad_gtid}")) && stderr.contains("changes=20"), "{stderr}");
    let streamed = pg(&target.url("postgres")).await;
    let ids: Vec<i32> = streamed
        .query("SELECT id FROM shop.ledger ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `start` at a binlog file:offset (the way MySQL, without GTIDs, resumes): the replay
/// reads from that event on and stops at a later position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_binlog_file_offset() {
    let (source, target, mut conn, dir) = restored_copy(
        "fileoffset",
        "CREATE DATABASE shop; CREATE TABLE shop.events (id int PRIMARY KEY, what varchar(20))",
    )
    .await;
    let start = master_status(&mut conn).await;
    conn.query_drop("INSERT INTO shop.events SELECT seq, 'before' FROM seq_1_to_50").await.expect("before");
    conn.query_drop("FLUSH BINARY LOGS").await.expect("rotate");
    conn.query_drop("UPDATE shop.events SET what = 'updated' WHERE id <= 10").await.expect("update");
    let stop = master_status(&mut conn).await;
    conn.query_drop("INSERT INTO shop.events SELECT seq, 'after' FROM seq_51_to_60").await.expect("after");

    let replay = dir.join("replay.toml");
    let extra = format!("[snapshot]\nmode = \"never\"\n[stream]\nstart = \"{start}\"\nstop_at = \"{stop}\"\n");
    cutover::demo::write_config(
        &replay,
        "mysql",
        &source.url("shop"),
        &target.url("postgres"),
        &dir.join("replay-state"),
        &extra,
    )
    .expect("config");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&replay).output().expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let streamed = pg(&target.url("postgres")).await;
    let summary: String = streamed
        .query_one(
            "SELECT count(*) || ' rows, ' || count(*) FILTER (WHERE what = 'updated') || ' updated' FROM shop.events",
            &[],
        )
        .await
        .expect("summary")
        .get(0);
    assert_eq!(summary, "50 rows, 10 updated", "{}", String::from_utf8_lossy(&output.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// MariaDB → PostgreSQL switchover under a write load, with fallback: the source turns
/// read-only, the target has every committed row and its identity continues past the
/// source's AUTO_INCREMENT, and the new primary's writes flow back into MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_switchover_fences_the_source_and_falls_back() {
    let source = MariaDbServer::start(&[]).expect("mariadb");
    let target = PostgresServer::start(&[]).expect("postgres");
    let mut conn =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url")).await.expect("mariadb");
    conn.query_drop(
        "CREATE DATABASE shop; CREATE TABLE shop.orders (id int AUTO_INCREMENT PRIMARY KEY, note varchar(40)); \
         INSERT INTO shop.orders (note) SELECT 'before' FROM seq_1_to_100",
    )
    .await
    .expect("source data");
    let dir = common::test_dir(&format!("cutover-test-mysql-switchover-{}", source.port()));
    let config = dir.join("shop_switch.toml");
    let extra = "[snapshot]\nworkers = 2\n[switchover]\nfallback = true\n[metrics]\nlisten = \"off\"\n";
    cutover::demo::write_config(
        &config,
        "mysql",
        &source.url("shop"),
        &target.url("postgres"),
        &dir.join("state"),
        extra,
    )
    .expect("config");
    let log = dir.join("cutover.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("cutover starts");
    let pg_client = pg(&target.url("postgres")).await;
    let started = std::time::Instant::now();
    while pg_client.query_opt("SELECT 1 FROM shop.orders LIMIT 1", &[]).await.map(|r| r.is_none()).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (output, committed) = common::switchover_under_writes(&config, common::mysql_inserts(source.url("shop"))).await;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{report}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(committed > 0 && report.contains("write-blocked window"), "{report}");
    // MariaDB has no super_read_only: the summary names the accounts read_only does not hold back.
    assert!(report.contains("can still write to the old source") && report.contains("'cutover'@'%'"), "{report}");
    println!("{report}");

    // Read-only for applications (a user without SUPER / READ_ONLY ADMIN), everything on the target.
    // The fence ended every client session, this test's own included: connect again.
    let mut conn =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url")).await.expect("mariadb");
    conn.query_drop("CREATE USER app@'%'; GRANT INSERT, SELECT ON shop.* TO app@'%'").await.expect("app user");
    let app_url = format!("mysql://app@127.0.0.1:{}/shop", source.port());
    let mut app = mysql_async::Conn::new(mysql_async::Opts::from_url(&app_url).expect("url")).await.expect("app");
    assert!(
        app.query_drop("INSERT INTO orders (note) VALUES ('too late')").await.is_err(),
        "the source still takes writes"
    );
    let loaded: i64 =
        conn.query_first("SELECT COUNT(*) FROM shop.orders WHERE note = 'load'").await.expect("count").expect("row");
    let on_target: i64 =
        pg_client.query_one("SELECT count(*) FROM shop.orders WHERE note = 'load'", &[]).await.expect("count").get(0);
    assert_eq!(loaded, on_target);
    // The insert the fence's KILL interrupted may have committed without its answer reaching the client.
    assert!(
        (committed as i64..=committed as i64 + 1).contains(&loaded),
        "{loaded} rows for {committed} answered inserts"
    );

    // The identity continues past the source's keys; the write comes back to MariaDB.
    let id: i32 = pg_client
        .query_one("INSERT INTO shop.orders (note) VALUES ('on the new primary') RETURNING id", &[])
        .await
        .expect("the new primary takes writes")
        .get(0);
    let max: i64 = conn.query_first("SELECT MAX(id) FROM shop.orders").await.expect("max").expect("row");
    assert!(i64::from(id) > max - 1, "identity not synced: {id} vs {max}");
    let started = std::time::Instant::now();
    loop {
        let back: Option<String> =
            conn.query_first(format!("SELECT note FROM shop.orders WHERE id = {id}")).await.expect("read back");
        if back.as_deref() == Some("on the new primary") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&mut child, libc::SIGTERM);
    assert!(child.wait().expect("exit").success());
    conn.query_drop("SET GLOBAL read_only = OFF").await.expect("undo");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every table of `schema` in one PostgreSQL database: name, row count and an md5 of its
/// rows' text in order. Two databases loaded by different paths compare by these.
async fn schema_digests(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<Vec<(String, i64, String)>, tokio_postgres::Error> {
    let tables =
        client.query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1", &[&schema]).await?;
    let mut digests = Vec::new();
    for row in tables {
        let table: String = row.get(0);
        let name = cutover::change::TableName::new(schema, table.clone());
        let digest = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {} t",
                    cutover::schema::quote_table(&name)
                ),
                &[],
            )
            .await?;
        digests.push((table, digest.get(0), digest.get(1)));
    }
    Ok(digests)
}

/// Sessions that write partial row images (`binlog_row_image` is a session variable):
/// updates and deletes are applied exactly from what their column bitmaps say; an insert
/// that leaves columns out stops the pipeline, naming the setting, the table and the
/// position, with nothing of it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_row_images_apply_exactly_or_stop_saying_why() {
    let (source, target, mut conn, dir) = start_with("images", common::PARTIAL_IMAGES_TABLES).await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    // Once marker 0 is on the target, the snapshot point is behind: what follows streams.
    conn.query_drop("INSERT INTO shop.marker VALUES (0)").await.expect("marker");
    wait_for_marker(&streamed, 0, &mut child, &pipeline.log).await;
    conn.query_drop(common::PARTIAL_IMAGES_CHANGES).await.expect("changes");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 2).await;

    conn.query_drop(
        "SET SESSION binlog_row_image = 'MINIMAL'; INSERT INTO img (id) VALUES (500); INSERT INTO marker VALUES (2);",
    )
    .await
    .expect("partial insert");
    let started = std::time::Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "still running:\n{}", pipeline.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let log = pipeline.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("binlog_row_image") && log.contains("shop.img") && log.contains("binlog.0"), "{log}");
    let applied: i64 =
        streamed.query_one("SELECT count(*) FROM shop.img WHERE id = 500", &[]).await.expect("count").get(0);
    assert_eq!(applied, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Restarts across binlog rotations, by kill -9 and SIGTERM in turn, each after a
/// `FLUSH BINARY LOGS`: every restart reads the dump's opening rotate event (whose
/// checksum bytes differ each time), and the target ends equal to a fresh copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_across_many_rotations_resume_exactly() {
    let (source, target, mut conn, dir) = start_with("rotations", common::PARTIAL_IMAGES_TABLES).await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    for round in 1..=12 {
        conn.query_drop(format!(
            "USE shop; INSERT INTO img (id, a, b, t, d) SELECT seq + {round} * 1000, seq, 'r{round}', 'x', 1 FROM seq_1_to_50;
             FLUSH BINARY LOGS;
             UPDATE img SET a = a + 1 WHERE id % 7 = {round} % 7;
             INSERT INTO marker VALUES ({round});"
        ))
        .await
        .expect("round");
        if round % 3 == 0 {
            // Mid-stream, not after the marker: a kill while changes are in flight.
            tokio::time::sleep(std::time::Duration::from_millis(10 * round)).await;
        } else {
            wait_for_marker(&streamed, round as i32, &mut child, &pipeline.log).await;
        }
        signal(&mut child, if round % 2 == 0 { libc::SIGKILL } else { libc::SIGTERM });
        child = pipeline.spawn();
    }
    wait_for_marker(&streamed, 12, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGTERM);
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 2).await;
    let log = pipeline.log();
    assert!(!log.contains("ERROR"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A transaction left out by `[stream] skip` right after one whose commit was deferred
/// (both arrive together as a backlog): the group before it still commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_transaction_after_a_deferred_commit_leaves_nothing_open() {
    let (source, target, mut conn, dir) = start_with("skipdefer", common::PARTIAL_IMAGES_TABLES).await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    conn.query_drop("INSERT INTO shop.marker VALUES (1)").await.expect("marker");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGTERM);

    let state: String = one_value(&mut conn, "SELECT @@gtid_binlog_pos").await;
    let seq: u64 = state.rsplit('-').next().and_then(|s| s.parse().ok()).expect("a MariaDB GTID");
    for _ in 0..20 {
        conn.query_drop("INSERT INTO shop.img (id, a, b, t, d) SELECT MAX(id) + 1, 0, 'kept', 'k', 0 FROM shop.img")
            .await
            .expect("kept");
    }
    conn.query_drop("INSERT INTO shop.img VALUES (9999, 0, 'skipped', 's', 0)").await.expect("skipped");
    let config = std::fs::read_to_string(&pipeline.config).expect("config");
    std::fs::write(&pipeline.config, format!("{config}[stream]\nskip = [\"gtid:0-1-{}\"]\n", seq + 21))
        .expect("config");
    let mut child = pipeline.spawn();
    let started = std::time::Instant::now();
    loop {
        let kept: i64 =
            streamed.query_one("SELECT count(*) FROM shop.img WHERE b = 'kept'", &[]).await.expect("count").get(0);
        if kept == 20 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cutover exited with {status}:\n{}", pipeline.log());
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{kept} of 20 rows visible:\n{}",
            pipeline.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let skipped: i64 =
        streamed.query_one("SELECT count(*) FROM shop.img WHERE id = 9999", &[]).await.expect("count").get(0);
    assert_eq!(skipped, 0);
    signal(&mut child, libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check` reads the event at each positional `[stream] skip` entry: a transaction's GTID
/// event passes; a position inside a transaction, or one no event starts at, is an error
/// that says what to name instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_which_skip_positions_name_no_transaction() {
    let (source, target, mut conn, dir) = start_with("skipcheck", common::PARTIAL_IMAGES_TABLES).await;
    conn.query_drop("INSERT INTO shop.marker VALUES (1)").await.expect("a transaction");
    let file = master_status(&mut conn).await.split(':').next().unwrap_or_default().to_string();
    let events: Vec<(u64, String)> = conn
        .exec_map(format!("SHOW BINLOG EVENTS IN '{file}'"), (), |row: mysql_async::Row| {
            (row.get::<u64, _>(1).unwrap_or(0), row.get::<String, _>(2).unwrap_or_default())
        })
        .await
        .expect("binlog events");
    let gtid = events.iter().rev().find(|(_, kind)| kind == "Gtid").map(|(pos, _)| *pos).expect("a GTID event");
    let inside = events.iter().find(|(pos, _)| *pos > gtid).map(|(pos, _)| *pos).expect("an event after it");
    let config = dir.join("check.toml");
    let skip = format!("[stream]\nskip = [\"{file}:{gtid}\", \"{file}:{inside}\", \"{file}:{}\"]\n", gtid + 1);
    cutover::demo::write_config(
        &config,
        "mysql",
        &source.url("shop"),
        &target.url("postgres"),
        &dir.join("state"),
        &skip,
    )
    .expect("config");
    let output =
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["check", "--config"]).arg(&config).output().expect("runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{said}");
    assert!(!said.contains(&format!("skip entry {file}:{gtid} ")), "{said}");
    assert!(said.contains(&format!("skip entry {file}:{inside} names a")), "{said}");
    assert!(said.contains(&format!("skip entry {file}:{} names no event", gtid + 1)), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A table truncated after the snapshot was pinned but before its copy read it fails the
/// read (ER_TABLE_DEF_CHANGED): it is copied again under a new snapshot, its changes
/// applied from that snapshot's position on, and the target ends as a fresh copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_truncated_while_the_snapshot_is_copied_is_copied_again() {
    let (source, target, mut conn, dir) = start_with("truncated", common::PARTIAL_IMAGES_TABLES).await;
    conn.query_drop("CREATE TABLE shop.bag (v int, note varchar(20)); INSERT INTO shop.bag SELECT seq % 7, CONCAT('n', seq) FROM seq_1_to_300")
        .await
        .expect("keyless table");
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn_with_env(&[("CUTOVER_FAILPOINT", std::path::Path::new("snapshot-pinned:sleep=4"))]);
    let started = std::time::Instant::now();
    while !pipeline.log().contains("failpoint snapshot-pinned") {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the copy never paused:\n{}", pipeline.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    conn.query_drop(
        "USE shop; UPDATE img SET a = -a WHERE id <= 10; UPDATE bag SET note = 'changed' WHERE v = 3;
         TRUNCATE img; TRUNCATE bag;
         INSERT INTO img (id, a, b, t, d) VALUES (1, 1, 'after', 'x', 1), (900, 2, 'after', 'y', 2);
         INSERT INTO bag VALUES (1, 'after'), (1, 'after'), (2, 'after'); UPDATE bag SET note = 'twice' WHERE v = 2;
         INSERT INTO marker VALUES (1);",
    )
    .await
    .expect("truncate");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    assert!(pipeline.log().contains("copying them again under a new snapshot"), "{}", pipeline.log());
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 3).await;
    signal(&mut child, libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Columns dropped, renamed, added and widened as the first copy starts: after the
/// catalog was read but before the snapshot was pinned (`schema-read`; only added and
/// widened ones leave every name the copy reads in place), and after the snapshot was
/// pinned but before the table was read (`snapshot-pinned`). Each table is copied with
/// the columns its snapshot has, and the stream brings the rest; the target then equals
/// a fresh copy of the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_changed_as_the_copy_starts_are_copied_as_the_snapshot_has_them() {
    const ADDED: &str = "ALTER TABLE t ADD COLUMN d int DEFAULT 5; ALTER TABLE t MODIFY e varchar(40);";
    const GONE: &str =
        "UPDATE t SET a = -a WHERE id <= 10; ALTER TABLE t DROP COLUMN a; ALTER TABLE t CHANGE b b2 varchar(20);";
    for (case, (point, ddl)) in
        [("schema-read", ADDED), ("schema-read", GONE), ("snapshot-pinned", &format!("{GONE} {ADDED}"))]
            .into_iter()
            .enumerate()
    {
        let (source, target, mut conn, dir) = start_with(
            &format!("columns_at_{}_{case}", point.replace('-', "_")),
            "CREATE DATABASE shop;
             CREATE TABLE shop.t (id int PRIMARY KEY, a int, b varchar(20), c int, e varchar(10));
             INSERT INTO shop.t SELECT seq, seq, CONCAT('b', seq), seq % 5, 'e' FROM seq_1_to_300;
             CREATE TABLE shop.marker (id int PRIMARY KEY);",
        )
        .await;
        let pipeline = Streaming::new(&source, &target, &dir);
        let streamed = pg(&target.url("postgres")).await;
        let failpoint = std::path::PathBuf::from(format!("{point}:sleep=3"));
        let mut child = pipeline.spawn_with_env(&[("CUTOVER_FAILPOINT", &failpoint)]);
        let started = std::time::Instant::now();
        while !pipeline.log().contains(&format!("failpoint {point}")) {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "never paused at {point}:\n{}",
                pipeline.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let wide = if ddl.contains("varchar(40)") { 30 } else { 8 };
        let after = match ddl.contains("DROP") {
            true => "INSERT INTO t (id, b2, c) VALUES (1000, 'new', 1);",
            false => "INSERT INTO t (id, a, b, c) VALUES (1000, 1, 'new', 1);",
        };
        conn.query_drop(format!(
            "USE shop; {ddl} UPDATE t SET c = -c, e = REPEAT('w', {wide}) WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0;
             {after} INSERT INTO marker VALUES (1);"
        ))
        .await
        .expect("schema changes");
        wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
        pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 2).await;
        signal(&mut child, libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// VIRTUAL and PERSISTENT (STORED) generated columns become plain columns on the target,
/// filled with the source's values by the copy and by the stream alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_arrive_as_the_sources_values() {
    let (source, target, mut conn, dir) = start_with(
        "generated",
        "CREATE DATABASE shop; CREATE TABLE shop.priced (id int PRIMARY KEY, price decimal(10,2), qty int,
             total decimal(12,2) AS (price * qty) PERSISTENT, label varchar(20) AS (CONCAT('#', id)) VIRTUAL, note text);
         CREATE TABLE shop.marker (id int PRIMARY KEY);
         INSERT INTO shop.priced (id, price, qty, note) SELECT seq, seq / 4, seq % 5, 'n' FROM seq_1_to_200;",
    )
    .await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    conn.query_drop("INSERT INTO shop.marker VALUES (0)").await.expect("marker");
    wait_for_marker(&streamed, 0, &mut child, &pipeline.log).await;
    conn.query_drop(
        "USE shop; INSERT INTO priced (id, price, qty, note) VALUES (500, 2.5, 4, 'streamed');
         UPDATE priced SET qty = qty + 1 WHERE id % 3 = 0; UPDATE priced SET id = id + 1000 WHERE id % 11 = 0;
         DELETE FROM priced WHERE id % 7 = 0; INSERT INTO marker VALUES (1);",
    )
    .await
    .expect("changes");
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    let rows: Vec<String> = streamed
        .query("SELECT id || '|' || total || '|' || label FROM shop.priced WHERE id IN (500, 1011, 3) ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["3|3.00|#3", "500|10.00|#500", "1011|2.75|#1011"], "{}", pipeline.log());
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 2).await;
    signal(&mut child, libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Schema changes on a MariaDB source while rows stream, each with rows written before and
/// after it in the binlog, and kill -9 after every other step: a column renamed, retyped
/// and dropped; a burst of ALTERs on one table with rows between them (a restart reads
/// rows in shapes older than the table's own); a key changed; a table renamed (leaving
/// under one name, joining under another), dropped, created, and created by
/// `CREATE … SELECT`; ADD COLUMN and TRUNCATE as before. What the binlog cannot carry
/// copies the table again. The streamed target equals a fresh copy of the source, columns
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_on_a_mariadb_source_land_as_on_the_source() {
    let (source, target, mut conn, dir) = start_with(
        "mysql_ddl",
        "CREATE DATABASE shop;
         CREATE TABLE shop.items (id int PRIMARY KEY, name varchar(20), qty int, note text);
         INSERT INTO shop.items SELECT seq, CONCAT('i', seq), seq, CONCAT('n', seq) FROM seq_1_to_300;
         CREATE TABLE shop.other (id int PRIMARY KEY, v int);
         INSERT INTO shop.other SELECT seq, seq FROM seq_1_to_50;
         CREATE TABLE shop.doomed (id int PRIMARY KEY);
         INSERT INTO shop.doomed SELECT seq FROM seq_1_to_10;
         CREATE TABLE shop.marker (id int PRIMARY KEY);",
    )
    .await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    conn.query_drop("INSERT INTO shop.marker VALUES (100)").await.expect("marker");
    wait_for_marker(&streamed, 100, &mut child, &pipeline.log).await;
    let steps = [
        "UPDATE items SET qty = qty + 1 WHERE id <= 10; ALTER TABLE items CHANGE note remark text;
         UPDATE items SET remark = 'r' WHERE id % 3 = 0;",
        "ALTER TABLE items MODIFY name varchar(60); UPDATE items SET name = REPEAT('x', 50) WHERE id = 5;",
        "INSERT INTO items (id, name, qty) VALUES (1000, 'z', 1); ALTER TABLE items DROP COLUMN qty;
         INSERT INTO items (id, name) VALUES (1001, 'a');",
        "ALTER TABLE other ADD COLUMN w int DEFAULT 3; UPDATE other SET w = 9 WHERE id < 5;
         ALTER TABLE other MODIFY v bigint; UPDATE other SET v = v * 1000000000 WHERE id = 7;
         ALTER TABLE other DROP COLUMN w; INSERT INTO other VALUES (51, 51);",
        "RENAME TABLE doomed TO doomed_old; INSERT INTO doomed_old VALUES (11);",
        "DROP TABLE doomed_old; CREATE TABLE fresh_one (id int PRIMARY KEY, v text); INSERT INTO fresh_one VALUES (1, 'x');
         CREATE TABLE made (PRIMARY KEY (id)) AS SELECT id, name FROM items WHERE id < 50;",
        "ALTER TABLE other DROP PRIMARY KEY, ADD PRIMARY KEY (id, v); UPDATE other SET v = -v WHERE id = 3;",
        "ALTER TABLE items ADD COLUMN extra int DEFAULT 7; INSERT INTO items (id, name) VALUES (1002, 'b');
         TRUNCATE other; INSERT INTO other VALUES (1, 2);",
        "ALTER TABLE items ADD INDEX by_name (name); UPDATE items SET name = 'last' WHERE id = 1;",
    ];
    for (i, step) in steps.iter().enumerate() {
        conn.query_drop(format!("USE shop; {step} INSERT INTO marker VALUES ({i});")).await.unwrap_or_else(|e| {
            panic!("step {i}: {e}");
        });
        // Every other step is streamed before the kill; the others meet the next start
        // with the step in the binlog ahead of it.
        if i % 2 == 1 {
            wait_for_marker(&streamed, i as i32, &mut child, &pipeline.log).await;
            signal(&mut child, libc::SIGKILL);
            child = pipeline.spawn();
        }
    }
    wait_for_marker(&streamed, steps.len() as i32 - 1, &mut child, &pipeline.log).await;
    // Indexes and unique keys while the stream runs (one the restart's catalog read
    // already shows is not seen as new: no schema history).
    let index_steps = [
        "CREATE UNIQUE INDEX uq_id_name ON items (id, name); DROP INDEX by_name ON items;
         ALTER TABLE other ADD INDEX by_v (v); INSERT INTO other VALUES (2, 3);",
        "ALTER TABLE other DROP INDEX by_v, ADD INDEX by_v (v, id);
         ALTER TABLE items DROP INDEX uq_id_name, ADD UNIQUE KEY uq_name_id (name, id); UPDATE items SET name = 'u' WHERE id = 2;",
    ];
    for (i, step) in (200..).zip(index_steps) {
        conn.query_drop(format!("USE shop; {step} INSERT INTO marker VALUES ({i});")).await.expect("index step");
        wait_for_marker(&streamed, i, &mut child, &pipeline.log).await;
    }
    signal(&mut child, libc::SIGTERM);

    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 5).await;
    assert!(pipeline.log().contains("copying the table again"), "{}", pipeline.log());
    // Indexes and unique constraints created and dropped while streaming, as a fresh copy has them.
    let indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'shop' ORDER BY 1";
    let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<String>>();
    let fresh = pg(&target.url("fresh")).await;
    let streamed_indexes = names(streamed.query(indexes, &[]).await.expect("indexes"));
    assert_eq!(streamed_indexes, names(fresh.query(indexes, &[]).await.expect("indexes")), "{}", pipeline.log());
    assert!(streamed_indexes.iter().any(|i| i.contains("items_uq_name_id")), "{streamed_indexes:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One table of [`random_schema_changes_on_a_mariadb_source_land_as_on_the_source`]'s model.
struct ModelTable {
    name: String,
    /// Besides `id`: (name, SQL type).
    columns: Vec<(String, String)>,
    ids: std::collections::BTreeSet<i64>,
}

/// A random value for a column of `sql_type`.
fn value_for(sql_type: &str, rng: &mut common::Rng) -> String {
    match (sql_type, rng.below(6)) {
        (_, 0) => "NULL".into(),
        ("int" | "bigint", _) => rng.range(-1000, 1000).to_string(),
        _ => format!("'v{}'", rng.below(10_000)),
    }
}

/// A random walk of schema changes on two MariaDB tables with rows written between them:
/// columns added (with defaults), dropped, renamed, widened; TRUNCATE; a table renamed
/// away and back; kill -9 at random moments, with or without the step streamed first.
/// The streamed target, columns included, equals a fresh copy of the source. The seed is
/// printed; `CUTOVER_DDL_SEED=<n>` replays a run, `random` makes a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schema_changes_on_a_mariadb_source_land_as_on_the_source() {
    let seed = common::seed_from_env("CUTOVER_DDL_SEED", 7);
    println!("schema-change walk seed={seed} (replay: CUTOVER_DDL_SEED={seed})");
    let mut rng = common::Rng::new(seed, 1);
    let (source, target, mut conn, dir) = start_with(
        "mysql_ddl_walk",
        "CREATE DATABASE shop;
         CREATE TABLE shop.t0 (id int PRIMARY KEY, a int, b varchar(20));
         CREATE TABLE shop.t1 (id int PRIMARY KEY, c varchar(20));
         INSERT INTO shop.t0 SELECT seq, seq, CONCAT('b', seq) FROM seq_1_to_200;
         INSERT INTO shop.t1 SELECT seq, CONCAT('c', seq) FROM seq_1_to_100;
         CREATE TABLE shop.marker (id int PRIMARY KEY);",
    )
    .await;
    let mut tables = [
        ModelTable {
            name: "t0".into(),
            columns: vec![("a".into(), "int".into()), ("b".into(), "varchar(20)".into())],
            ids: (1..=200).collect(),
        },
        ModelTable { name: "t1".into(), columns: vec![("c".into(), "varchar(20)".into())], ids: (1..=100).collect() },
    ];
    let pipeline = Streaming::new(&source, &target, &dir);
    let streamed = pg(&target.url("postgres")).await;
    let mut child = pipeline.spawn();
    let (mut next_id, mut next_column, mut marker) = (10_000i64, 0u32, 0i32);
    for _ in 0..40 {
        let table = &mut tables[rng.below(2) as usize];
        let mut sql = Vec::new();
        // Rows before the change, the change, rows after it: one binlog stretch in two shapes.
        for phase in 0..2 {
            for _ in 0..rng.range(1, 4) {
                let id = next_id;
                next_id += 1;
                let names: Vec<&str> = table.columns.iter().map(|(n, _)| n.as_str()).collect();
                let values: Vec<String> = table.columns.iter().map(|(_, t)| value_for(t, &mut rng)).collect();
                sql.push(format!(
                    "INSERT INTO {} (id{}) VALUES ({id}{})",
                    table.name,
                    names.iter().map(|n| format!(", {n}")).collect::<String>(),
                    values.iter().map(|v| format!(", {v}")).collect::<String>()
                ));
                table.ids.insert(id);
            }
            if let Some((column, sql_type)) = table.columns.get(rng.below(table.columns.len().max(1) as u64) as usize) {
                let value = value_for(sql_type, &mut rng);
                sql.push(format!("UPDATE {} SET {column} = {value} WHERE id % 7 = {}", table.name, rng.below(7)));
            }
            if let Some(&id) = table.ids.iter().nth(rng.below(table.ids.len().max(1) as u64) as usize) {
                sql.push(format!("DELETE FROM {} WHERE id = {id}", table.name));
                table.ids.remove(&id);
            }
            if phase == 1 {
                break;
            }
            next_column += 1;
            let fresh = format!("x{next_column}");
            let change = match rng.below(7) {
                0 | 1 => {
                    let sql_type = rng.pick(&["int", "varchar(20)"]).to_string();
                    let default = value_for(&sql_type, &mut rng);
                    let change = format!("ALTER TABLE {} ADD COLUMN {fresh} {sql_type} DEFAULT {default}", table.name);
                    table.columns.push((fresh, sql_type));
                    change
                }
                2 if !table.columns.is_empty() => {
                    let (gone, _) = table.columns.remove(rng.below(table.columns.len() as u64) as usize);
                    format!("ALTER TABLE {} DROP COLUMN {gone}", table.name)
                }
                3 if !table.columns.is_empty() => {
                    let i = rng.below(table.columns.len() as u64) as usize;
                    let (old, sql_type) = table.columns[i].clone();
                    table.columns[i].0 = fresh.clone();
                    format!("ALTER TABLE {} CHANGE {old} {fresh} {sql_type}", table.name)
                }
                4 if !table.columns.is_empty() => {
                    let i = rng.below(table.columns.len() as u64) as usize;
                    let wider = if table.columns[i].1.contains("int") { "bigint" } else { "varchar(60)" };
                    table.columns[i].1 = wider.into();
                    format!("ALTER TABLE {} MODIFY {} {wider}", table.name, table.columns[i].0)
                }
                5 => {
                    table.ids.clear();
                    format!("TRUNCATE {}", table.name)
                }
                _ => {
                    let renamed = match table.name.strip_suffix("_r") {
                        Some(base) => base.to_string(),
                        None => format!("{}_r", table.name),
                    };
                    let change = format!("RENAME TABLE {} TO {renamed}", table.name);
                    table.name = renamed;
                    change
                }
            };
            sql.push(change);
        }
        marker += 1;
        sql.push(format!("INSERT INTO marker VALUES ({marker})"));
        let statements = format!("USE shop; {};", sql.join("; "));
        conn.query_drop(&statements).await.unwrap_or_else(|e| panic!("seed {seed}: {statements}: {e}"));
        if rng.percent(30) {
            if rng.percent(50) {
                wait_for_marker(&streamed, marker, &mut child, &pipeline.log).await;
            }
            signal(&mut child, libc::SIGKILL);
            child = pipeline.spawn();
        }
    }
    wait_for_marker(&streamed, marker, &mut child, &pipeline.log).await;
    signal(&mut child, libc::SIGTERM);
    println!("schema-change walk seed={seed}: comparing with a fresh copy");
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 3).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A MariaDB table's copy split by key ranges, cut short by kill -9 three times (after a
/// range was recorded, after one landed but before its record, after another was
/// recorded) while random changes move keys between the ranges, some under MINIMAL row
/// images (the binlog then carries only the key of the row before and the columns
/// changed): each run copies only the ranges not finished, and the binlog brings each
/// range up to date from its own snapshot. CUTOVER_RESUME_SEED replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_short_resumes_from_its_finished_key_ranges() {
    let seed = common::seed_from_env("CUTOVER_RESUME_SEED", 5);
    println!("CUTOVER_RESUME_SEED={seed}");
    let mut rng = common::Rng::new(seed, 2);
    let (source, target, mut conn, dir) = start_with(
        "resume",
        "CREATE DATABASE shop;
         CREATE TABLE shop.big (id bigint PRIMARY KEY, payload varchar(300), doc text);
         INSERT INTO shop.big SELECT seq, CONCAT(MD5(seq), REPEAT('p', 200)), IF(seq % 1000 = 0, REPEAT(MD5(seq), 100), NULL)
             FROM seq_1_to_400000;
         CREATE TABLE shop.marker (id int PRIMARY KEY);
         ANALYZE TABLE shop.big;",
    )
    .await;
    let pipeline = Streaming::new(&source, &target, &dir);
    let failpoints = ["snapshot-chunk-copied", "snapshot-chunk-written", "snapshot-chunk-copied"];
    for (round, failpoint) in (1..).zip(failpoints) {
        let mut child = pipeline.spawn_with_env(&[("CUTOVER_FAILPOINT", std::path::Path::new(failpoint))]);
        let status = common::wait_for_exit(&mut child, Duration::from_secs(180), || pipeline.log()).await;
        let log = pipeline.log();
        assert!(!status.success() && log.matches("failpoint").count() == round as usize, "round {round}:\n{log}");
        change_big_at_random(&mut conn, &mut rng, round).await;
    }
    let mut child = pipeline.spawn();
    change_big_at_random(&mut conn, &mut rng, 4).await;
    // The marker goes in once the copy is done, so it comes through the binlog, after
    // every change before it (and any copy again those set off).
    let started = std::time::Instant::now();
    while !pipeline.log().contains("streaming changes") {
        assert!(started.elapsed() < Duration::from_secs(120), "no stream:\n{}", pipeline.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conn.query_drop("INSERT INTO shop.marker VALUES (1)").await.expect("marker");
    let streamed = pg(&target.url("postgres")).await;
    wait_for_marker(&streamed, 1, &mut child, &pipeline.log).await;
    let log = pipeline.log();
    let resumed: Vec<&str> = log.lines().filter(|l| l.contains("resuming the table's copy")).collect();
    assert_eq!(resumed.len(), 3, "seed {seed}:\n{log}");
    // Two workers may both record a range before the failpoint ends the process: at least two.
    let finished = resumed[2].contains("finished=2 left=2") || resumed[2].contains("finished=3 left=1");
    assert!(finished, "seed {seed}: {resumed:?}");
    pipeline.assert_tables_match_fresh_copy(&source, &target, &dir, 2).await;
    let rows = "SELECT id || ' ' || md5(t::text) FROM shop.big t ORDER BY id";
    let fresh = pg(&target.url("fresh")).await;
    let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<String>>();
    let streamed_rows = names(streamed.query(rows, &[]).await.expect("rows"));
    assert_eq!(streamed_rows, names(fresh.query(rows, &[]).await.expect("rows")), "seed {seed}");
    signal(&mut child, libc::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Random changes to `shop.big` (keys 1..=400 000) between the runs of a copy cut short
/// ([`common::big_table_changes`]), some keys moved in a transaction of their own under
/// MINIMAL row images (an insert under them would lack columns: cutover stops on those).
async fn change_big_at_random(conn: &mut mysql_async::Conn, rng: &mut common::Rng, round: i64) {
    let own = |rng: &mut common::Rng, x: i64, fresh: i64| {
        format!(
            "COMMIT; SET SESSION binlog_row_image = 'MINIMAL'; UPDATE big SET id = {} WHERE id = {x}; \
             SET SESSION binlog_row_image = 'FULL'; START TRANSACTION;",
            if rng.percent(50) { -fresh } else { 2_000_000 + fresh }
        )
    };
    for changes in common::big_table_changes(rng, 400_000, round, own) {
        let sql = format!("USE shop; SET SESSION binlog_row_image = 'FULL'; START TRANSACTION; {changes} COMMIT;");
        conn.query_drop(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}
