//! Passwords with the characters that end a URL's parts (`/ ? # @ : % & =`), in every URL kind
//! the config takes, as written or percent-encoded, on the source and on the target: the
//! connection works (the URL is read right, not just redacted), and no command prints them —
//! not `check`, not the daemon's log of `run` (its retries included), not `status`.

mod common;
mod mongo_server;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{connect, cutover, output_text, stop, Pair};
use cutover::sandbox::{free_port, MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

const PASSWORD: &str = "s3/cr?et@pw#x:y%z&w=v";
const ENCODED: &str = "s3%2Fcr%3Fet%40pw%23x%3Ay%25z%26w%3Dv";

/// Fails when `text` holds the password, or a piece of it, in either spelling.
fn assert_no_password(what: &str, text: &str) {
    for piece in [PASSWORD, ENCODED, "s3/cr", "cr?et", "et@pw", "s3%2F"] {
        assert!(!text.contains(piece), "{what} shows the password ({piece}):\n{text}");
    }
}

/// `cutover status --json` for a config: its text (checked for the password) and its JSON.
fn status(config: &Path) -> (String, serde_json::Value) {
    let output = cutover("status", config, &["--json"]);
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert_no_password("cutover status", &text);
    (text, serde_json::from_slice(&output.stdout).expect("status is JSON"))
}

/// Waits until the running daemon's `status` reports an error: it is retrying.
async fn wait_for_last_error(config: &Path, child: &mut std::process::Child, log: &dyn Fn() -> String) -> String {
    let started = Instant::now();
    loop {
        let (_, json) = status(config);
        if let Some(error) = json["last_error"].as_str() {
            return error.to_string();
        }
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("cutover exited with {exit} before retrying:\n{}", log());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no retry within 60 s:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A superuser `app` with the password, on a sandbox PostgreSQL that now checks it.
async fn postgres_password_user(server: &PostgresServer) {
    let admin = connect(&server.url("postgres")).await;
    let create = format!("CREATE ROLE app LOGIN SUPERUSER PASSWORD {}", cutover::schema::quote_literal(PASSWORD));
    admin.batch_execute(&create).await.expect("role");
    server.require_password("app").expect("pg_hba.conf");
    // The server has reloaded once a wrong password is refused.
    let wrong = format!("host=127.0.0.1 port={} user=app password=wrong dbname=postgres", server.port());
    let started = Instant::now();
    while tokio_postgres::connect(&wrong, tokio_postgres::NoTls).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "the server still lets app in without its password");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PostgreSQL → PostgreSQL: the source's password as written (`postgresql://`), the target's
/// percent-encoded and followed by parameters (`postgres://`). The target goes away mid-stream
/// and comes back: the retries say why without the password, and the stream resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_urls_with_odd_passwords_connect_and_never_print() {
    let source = PostgresServer::start(&[]).expect("source");
    let target = PostgresServer::start(&[]).expect("target");
    postgres_password_user(&source).await;
    postgres_password_user(&target).await;
    let writer = connect(&source.url("postgres")).await;
    writer
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, note text); INSERT INTO items SELECT g, 'copied' FROM generate_series(1, 100) g")
        .await
        .expect("table");
    let source_url = format!("postgresql://app:{PASSWORD}@127.0.0.1:{}/postgres", source.port());
    let target_url =
        format!("postgres://app:{ENCODED}@127.0.0.1:{}/postgres?connect_timeout=10&sslmode=disable", target.port());
    let pair = Pair::from_servers("pgpassword", source, target, &source_url, "");
    let extra = "[metrics]\nlisten = \"off\"\n[pipeline]\nmax_retry_time = \"2m\"\n";
    cutover::demo::write_config(
        &pair.config_path,
        "postgres",
        &source_url,
        &target_url,
        &pair.dir.join("state"),
        extra,
    )
    .expect("config");

    let check = cutover("check", &pair.config_path, &[]);
    assert!(check.status.success(), "{}", output_text(&check));
    assert_no_password("cutover check", &output_text(&check));

    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    writer.batch_execute("UPDATE items SET note = 'streamed' WHERE id <= 10").await.expect("update");
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    let (text, _) = status(&pair.config_path);
    assert!(text.contains("streaming"), "{text}");

    pair.target.stop("fast").expect("the target stops");
    writer.batch_execute("UPDATE items SET note = 'while the target was down' WHERE id <= 20").await.expect("update");
    let error = wait_for_last_error(&pair.config_path, &mut child, &|| pair.log()).await;
    assert!(error.contains("target") || error.contains("connect"), "{error}");
    pair.target.restart().expect("the target starts again");
    pair.wait_caught_up(&mut child).await;
    pair.assert_identical().await;
    let (exit, _) = stop(&mut child);
    assert!(exit.success(), "{}", pair.log());
    assert!(pair.log().contains("connection lost; resuming"), "{}", pair.log());
    assert_no_password("the log of cutover run", &pair.log());
}

/// A user `app` with the password and every privilege, on a sandbox MariaDB.
async fn mariadb_password_user(server: &MariaDbServer) -> mysql_async::Conn {
    let mut admin =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&server.url("mysql")).expect("url")).await.expect("mariadb");
    admin
        .query_drop(format!("CREATE USER 'app'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT ALL ON *.* TO 'app'@'%'"))
        .await
        .expect("user");
    admin
}

fn mysql_config(dir: &Path, name: &str, source_url: &str, target_url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nkind = \"mysql\"\nurl = \"{source_url}\"\n[target]\nkind = \"mysql\"\nurl = \"{target_url}\"\n\
             [state]\ndir = \"{}\"\n[metrics]\nlisten = \"off\"\n{extra}",
            dir.join("state").display()
        ),
    )
    .expect("config");
    path
}

/// MariaDB → MariaDB: the source's password as written, the target's percent-encoded with a
/// parameter after it. Then the target at a wrong port: `run` retries until it gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_urls_with_odd_passwords_connect_and_never_print() {
    let source = MariaDbServer::start(&[]).expect("source");
    let target = MariaDbServer::start(&[]).expect("target");
    let mut source_admin = mariadb_password_user(&source).await;
    let mut target_admin = mariadb_password_user(&target).await;
    source_admin
        .query_drop(
            "CREATE DATABASE shop; CREATE TABLE shop.items (id int PRIMARY KEY, note varchar(40)); \
             INSERT INTO shop.items SELECT seq, 'copied' FROM seq_1_to_100",
        )
        .await
        .expect("source data");
    let dir = common::test_dir(&format!("cutover-test-mypassword-{}", source.port()));
    let log_path = dir.join("cutover.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let source_url = format!("mysql://app:{PASSWORD}@127.0.0.1:{}/shop", source.port());
    let target_at = |port: u16| format!("mysql://app:{ENCODED}@127.0.0.1:{port}/shop_copy?ssl-mode=DISABLED");
    let config = mysql_config(&dir, "mypassword", &source_url, &target_at(target.port()), "");

    let check = cutover("check", &config, &[]);
    assert!(check.status.success(), "{}", output_text(&check));
    assert_no_password("cutover check", &output_text(&check));

    let mut child = common::spawn_run(&config, &log_path, &[]);
    source_admin.query_drop("UPDATE shop.items SET note = 'marker' WHERE id = 1").await.expect("update");
    let started = Instant::now();
    loop {
        // An error while the table is not there yet.
        let arrived: Option<i64> =
            target_admin.query_first("SELECT COUNT(*) FROM shop_copy.items WHERE note = 'marker'").await.ok().flatten();
        if arrived == Some(1) {
            break;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("cutover exited with {exit}:\n{}", log());
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the update did not arrive:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The marker may arrive with the snapshot: the daemon says streaming once it is done.
    let started = Instant::now();
    loop {
        let (text, _) = status(&config);
        if text.contains("streaming") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never streaming:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (exit, _) = stop(&mut child);
    assert!(exit.success(), "{}", log());

    let retried = "[pipeline]\nmax_retry_time = \"5s\"\n";
    let config = mysql_config(&dir, "mypassword", &source_url, &target_at(free_port().expect("port")), retried);
    let mut child = common::spawn_run(&config, &log_path, &[]);
    wait_for_last_error(&config, &mut child, &log).await;
    let exit = child.wait().expect("cutover exits");
    assert!(!exit.success() && log().contains("gave up after retrying"), "{}", log());
    assert_no_password("the log of cutover run", &log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// MongoDB (`mongodb://`): the driver gets the credentials where it looks for them — the test
/// server knows no authentication, so the login itself fails — and no word of them is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_url_with_an_odd_password_is_read_and_never_printed() {
    let server = mongo_server::MongoTestServer::start();
    let target = PostgresServer::start(&[]).expect("target");
    let dir = common::test_dir(&format!("cutover-test-mongopassword-{}", target.port()));
    let config = dir.join("mongopassword.toml");
    let url = server.uri("shop").replacen("mongodb://", &format!("mongodb://app:{PASSWORD}@"), 1);
    cutover::demo::write_config(&config, "mongodb", &url, &target.url("postgres"), &dir.join("state"), "")
        .expect("config");
    let check = cutover("check", &config, &[]);
    let text = output_text(&check);
    assert!(!check.status.success(), "{text}");
    assert!(text.contains("SCRAM") && !text.contains("not a MongoDB URL"), "{text}");
    assert_no_password("cutover check", &text);
    let _ = std::fs::remove_dir_all(&dir);
}
