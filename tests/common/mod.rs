//! Shared helpers for the integration tests: sandbox servers, a `cutover run`
//! child process, catch-up waits and source-vs-target comparison.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover::config::{Config, ConnUrl, Endpoint};
use cutover::pgconn::ConnectParams;
use cutover::sandbox::{MariaDbServer, PostgresServer};

/// A source and a target server and a pipeline config between them.
pub struct Pair {
    pub source: PostgresServer,
    pub target: PostgresServer,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// The URL cutover reads the source with (TLS settings included).
    pub source_url: String,
    /// How many "streaming changes" lines the log held when `cutover run` last started:
    /// the latest run logs one more once its snapshot work is done.
    streaming_before: std::cell::Cell<usize>,
}

impl Pair {
    pub fn start(name: &str, extra_config: &str) -> Pair {
        let target = PostgresServer::start(&[]).expect("target server");
        Pair::with_target(name, target, extra_config)
    }

    /// A pair whose target runs the server binaries in `target_bin`.
    pub fn start_with_target(name: &str, target_bin: &std::path::Path, extra_config: &str) -> Pair {
        let target = PostgresServer::start_with(target_bin, &[]).expect("target server");
        Pair::with_target(name, target, extra_config)
    }

    fn with_target(name: &str, target: PostgresServer, extra_config: &str) -> Pair {
        let source = PostgresServer::start(&[]).expect("source server");
        let source_url = source.url("postgres");
        Pair::from_servers(name, source, target, &source_url, extra_config)
    }

    /// A pair of running servers; cutover reads the source at `source_url`.
    pub fn from_servers(
        name: &str,
        source: PostgresServer,
        target: PostgresServer,
        source_url: &str,
        extra_config: &str,
    ) -> Pair {
        let dir = test_dir(&format!("cutover-test-{name}-{}", source.port()));
        let config_path = dir.join(format!("{name}.toml"));
        cutover::demo::write_config(
            &config_path,
            "postgres",
            source_url,
            &target.url("postgres"),
            &dir.join("state"),
            extra_config,
        )
        .expect("config");
        Pair {
            source,
            target,
            dir,
            config_path,
            source_url: source_url.to_string(),
            streaming_before: std::cell::Cell::new(0),
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("config loads")
    }

    pub fn slot(&self) -> String {
        format!("cutover_{}", self.config().name)
    }

    /// Starts `cutover run` as a child process, logging to a file in the test dir.
    pub fn spawn(&self) -> Child {
        self.spawn_with_env(&[])
    }

    /// As [`Pair::spawn`], with extra environment variables.
    pub fn spawn_with_env(&self, env: &[(&str, &std::path::Path)]) -> Child {
        self.streaming_before.set(self.log().matches("streaming changes").count());
        spawn_run(&self.config_path, &self.dir.join("cutover.log"), env)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cutover.log")).unwrap_or_default()
    }

    /// Waits until the latest `cutover run` is streaming and the slot confirms
    /// everything the source has written so far.
    pub async fn wait_caught_up(&self, child: &mut Child) {
        let source = connect(&self.source_url).await;
        let end: String = source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
        let started = Instant::now();
        loop {
            let done = source
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
                    &[&self.slot(), &end],
                )
                .await
                .expect("slot query")
                .is_some();
            if done && self.log().matches("streaming changes").count() > self.streaming_before.get() {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cutover exited early with {status}:\n{}", self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(180), "no catch-up within 180 s:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every selected table: same row count and checksum on both sides.
    pub async fn assert_identical(&self) {
        let reports = cutover::verify::verify(&self.config()).await.expect("verify runs");
        assert!(!reports.tables.is_empty());
        assert!(reports.matches(), "source and target differ:\n{}\n{}", cutover::verify::render(&reports), self.log());
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `cutover run --config config` as a child process, its log appended to `log`.
pub fn spawn_run(config: &std::path::Path, log: &std::path::Path, env: &[(&str, &std::path::Path)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "--config"])
        .arg(config)
        .env("CUTOVER_LOG", "info,cutover=debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cutover starts")
}

/// Runs `cutover <command> --config <config> <args>` to its end.
pub fn cutover(command: &str, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg(command)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cutover {command} does not run: {e}"))
}

/// A command's stdout and stderr, one after the other.
pub fn output_text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let url = ConnUrl::new(url);
    let params = ConnectParams::from_endpoint(Endpoint { url: &url, password_file: None, password_env: None })
        .expect("url parses");
    params.connect().await.expect("connects")
}

/// The single integer a query returns.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// A MariaDB binlog's current `file:offset`.
pub async fn master_status(conn: &mut mysql_async::Conn) -> String {
    use mysql_async::prelude::Queryable;
    let row: mysql_async::Row = conn.query_first("SHOW MASTER STATUS").await.expect("status").expect("row");
    format!("{}:{}", row.get::<String, _>(0).expect("file"), row.get::<u64, _>(1).expect("pos"))
}

/// Waits until `child` exits on its own: its exit status. Fails with `log()` after `within`.
pub async fn wait_for_exit(child: &mut Child, within: Duration, log: impl Fn() -> String) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(started.elapsed() < within, "cutover did not stop within {} s:\n{}", within.as_secs(), log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn kill9(child: &mut Child) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// SIGTERM, then waits: the exit status and how long the exit took.
pub fn stop(child: &mut Child) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("cutover exits");
    (status, started.elapsed())
}

/// A self-signed CA and a server certificate it signed for 127.0.0.1 and localhost,
/// written into `dir` (readable by the `postgres` user when the tests run as root).
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Another CA, which signed nothing the server shows.
    pub other_ca: PathBuf,
}

pub fn make_certs(dir: &std::path::Path) -> TestCerts {
    std::fs::create_dir_all(dir).expect("cert dir");
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=cutover test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost, IP:127.0.0.1\n").expect("san");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir).status().expect("chown");
        assert!(status.success());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).expect("key mode");
    TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

/// Runs `cutover switchover` while `writer` writes to the source (until the fence ends its
/// session): the switchover's output and how many writes the writer saw answered.
pub async fn switchover_under_writes(
    config: &std::path::Path,
    writer: impl std::future::Future<Output = u64> + Send + 'static,
) -> (std::process::Output, u64) {
    let writer = tokio::spawn(writer);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let config = config.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cutover")).args(["switchover", "--config"]).arg(&config).output()
    })
    .await
    .expect("join")
    .expect("switchover runs");
    // The fence ends the writer's session; a switchover that failed before fencing did not.
    if !output.status.success() {
        writer.abort();
        return (output, 0);
    }
    (output, writer.await.expect("writer"))
}

/// Inserts into `orders` at a MySQL URL as fast as it can, until the connection is ended.
pub async fn mysql_inserts(url: String) -> u64 {
    use mysql_async::prelude::Queryable;
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).expect("url")).await.expect("writer");
    let mut committed = 0u64;
    while conn.query_drop("INSERT INTO orders (note) VALUES ('load')").await.is_ok() {
        committed += 1;
    }
    committed
}

/// A PostgreSQL table whose keys the workload below moves about, with a column stored out
/// of line (TOAST) that most updates leave unchanged.
pub const KEY_CHAIN_TABLE: &str = "CREATE TABLE chain (id int PRIMARY KEY, v text, big text);
ALTER TABLE chain ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO chain SELECT g, 'v' || g, (SELECT string_agg(md5(g || '-' || s), '') FROM generate_series(1, 300) s)
FROM generate_series(1, 40) g;";

/// Key changes chained inside one transaction (1 → 41 → 42), a swap through a temporary
/// key, a key change then an update under the new key (unchanged TOAST both times), a delete
/// and re-insert of one key, a key moved away and back, and quick successive transactions
/// doing the same.
pub const KEY_CHAIN_CHANGES: &str = "BEGIN;
UPDATE chain SET id = 41 WHERE id = 1; UPDATE chain SET id = 42 WHERE id = 41;
UPDATE chain SET id = -1 WHERE id = 10; UPDATE chain SET id = 10 WHERE id = 20;
UPDATE chain SET id = 20 WHERE id = -1;
UPDATE chain SET id = 45 WHERE id = 4; UPDATE chain SET v = 'moved and updated' WHERE id = 45;
DELETE FROM chain WHERE id = 7; INSERT INTO chain VALUES (7, 'reborn', 'small');
UPDATE chain SET id = 7000 WHERE id = 8; UPDATE chain SET id = 8 WHERE id = 7000;
UPDATE chain SET v = 'same key twice' WHERE id = 8;
COMMIT;
UPDATE chain SET id = 50 WHERE id = 30;
UPDATE chain SET id = 51 WHERE id = 50;
UPDATE chain SET v = 'after two moves' WHERE id = 51;
UPDATE chain SET id = 30 WHERE id = 31;
UPDATE chain SET id = 31 WHERE id = 51;";

/// A MariaDB database `shop` for the partial-row-image workload below.
pub const PARTIAL_IMAGES_TABLES: &str = "CREATE DATABASE shop;
CREATE TABLE shop.img (id int PRIMARY KEY, a int, b varchar(20), t text, d int DEFAULT 5);
CREATE TABLE shop.marker (id int PRIMARY KEY);
INSERT INTO shop.img SELECT seq, seq, CONCAT('b', seq), REPEAT('t', seq), seq FROM seq_1_to_40;";

/// Sessions writing partial row images (`binlog_row_image` is a session variable):
/// updates of some columns, of the key, deletes, under MINIMAL and NOBLOB; then marker 1.
pub const PARTIAL_IMAGES_CHANGES: &str = "USE shop;
SET SESSION binlog_row_image = 'MINIMAL';
UPDATE img SET a = a + 100 WHERE id <= 5;
UPDATE img SET b = NULL, t = 'minimal' WHERE id = 6;
UPDATE img SET id = 1006 WHERE id = 7;
DELETE FROM img WHERE id IN (8, 9);
INSERT INTO img (id, a, b, t, d) VALUES (100, 1, 'all columns', 'named', 5);
SET SESSION binlog_row_image = 'NOBLOB';
UPDATE img SET b = 'noblob' WHERE id = 10;
UPDATE img SET id = 1011 WHERE id = 11;
DELETE FROM img WHERE id = 12;
SET SESSION binlog_row_image = 'FULL';
INSERT INTO marker VALUES (1);";

/// A sandbox server of either dialect, as a pipeline's source or target. A MariaDB source
/// is read from database `shop`, a MariaDB target written into `shop_copy`; PostgreSQL uses
/// database `postgres` either way.
pub enum Server {
    Postgres(PostgresServer),
    Mariadb(MariaDbServer),
}

impl Server {
    pub fn postgres() -> Server {
        Server::Postgres(PostgresServer::start(&[]).expect("postgres"))
    }

    pub fn mariadb() -> Server {
        Server::Mariadb(MariaDbServer::start(&[]).expect("mariadb"))
    }

    /// The `kind` a config names it by.
    pub fn kind(&self) -> &'static str {
        match self {
            Server::Postgres(_) => "postgres",
            Server::Mariadb(_) => "mysql",
        }
    }

    pub fn dialect(&self) -> cutover::sql::SqlDialect {
        match self {
            Server::Postgres(_) => cutover::sql::SqlDialect::Postgres,
            Server::Mariadb(_) => cutover::sql::SqlDialect::Mysql,
        }
    }

    /// The URL of the database a pipeline reads (source) or writes (target).
    pub fn url(&self, as_source: bool) -> String {
        match (self, as_source) {
            (Server::Postgres(server), _) => server.url("postgres"),
            (Server::Mariadb(server), true) => server.url("shop"),
            (Server::Mariadb(server), false) => server.url("shop_copy"),
        }
    }

    /// Runs `sql` in the database [`Server::url`] names (created on MariaDB if missing).
    pub async fn execute(&self, as_source: bool, sql: &str) {
        let url = self.url(as_source);
        match self {
            Server::Postgres(_) => connect(&url).await.batch_execute(sql).await.expect("sql runs"),
            Server::Mariadb(server) => {
                use mysql_async::prelude::Queryable;
                let opts = mysql_async::Opts::from_url(&server.url("mysql")).expect("url");
                let mut conn = mysql_async::Conn::new(opts).await.expect("connects to mariadb");
                let database = url.rsplit('/').next().unwrap_or_default();
                conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS {database}; USE {database}; {sql}"))
                    .await
                    .expect("sql runs");
            }
        }
    }
}

/// A pipeline config from `source`'s database into `target`'s, metrics off (tests run in
/// parallel), with `extra` sections appended.
pub fn pipeline_config(path: &std::path::Path, source: &Server, target: &Server, state: &std::path::Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[source]\nkind = \"{}\"\nurl = \"{}\"\n[target]\nkind = \"{}\"\nurl = \"{}\"\n\
             [state]\ndir = \"{}\"\n[metrics]\nlisten = \"off\"\n{extra}",
            source.kind(),
            source.url(true),
            target.kind(),
            target.url(false),
            state.display()
        ),
    )
    .expect("config");
}

/// A small seeded PRNG (splitmix64): no dependency, the same sequence everywhere, so a
/// randomized test's printed seed replays it.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// One of several independent streams of one seed.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next();
        rng
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// A test's own directory in the temp dir, `name` (which carries a port or a pid, both
/// reused between runs), emptied of what an earlier run left there: a stale log would
/// be read as this run's.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

/// A randomized test's seed: `var` in the environment (a number, or `random`), else `default`.
pub fn seed_from_env(var: &str, default: u64) -> u64 {
    match std::env::var(var).ok().filter(|s| !s.trim().is_empty()) {
        None => default,
        Some(s) if s.trim() == "random" => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            Rng::new(nanos as u64 ^ u64::from(std::process::id()), var.len() as u64).next() >> 16
        }
        Some(s) => s.trim().parse().unwrap_or_else(|_| panic!("{var}={s}: not a number")),
    }
}

/// Random transactions on a table `big (id bigint PRIMARY KEY, payload …)` whose keys
/// were `1..=keys`, split by key ranges for its copy, in SQL both dialects read (the
/// statements only, without BEGIN and COMMIT): keys moved past the last key or below the
/// first (across the ranges both ways), new payloads, deletes, a key deleted and
/// inserted again in one transaction, and one change of the caller's (`own`, given the
/// key and a number no other change uses). `round` keeps numbers apart between calls.
pub fn big_table_changes(
    rng: &mut Rng,
    keys: i64,
    round: i64,
    mut own: impl FnMut(&mut Rng, i64, i64) -> String,
) -> Vec<String> {
    (0..60)
        .map(|n| {
            let mut sql = String::new();
            for op in 0..rng.range(1, 4) {
                let fresh = round * 10_000 + n * 10 + op;
                let x = rng.range(1, keys);
                sql.push_str(&match rng.below(6) {
                    0 => format!("UPDATE big SET id = {} WHERE id = {x};", 1_000_000 + fresh),
                    1 => format!("UPDATE big SET id = {} WHERE id = {x};", -fresh),
                    2 => format!("UPDATE big SET payload = 'u{fresh}' WHERE id = {x};"),
                    3 => format!("DELETE FROM big WHERE id = {x};"),
                    4 => format!(
                        "DELETE FROM big WHERE id = {x}; INSERT INTO big (id, payload) VALUES ({x}, 'again{fresh}');"
                    ),
                    _ => own(rng, x, fresh),
                });
            }
            sql
        })
        .collect()
}
