//! Parallel apply (`[pipeline] apply_connections`) against real PostgreSQL servers: a
//! random workload written by several clients — balances moved between keyed rows, a
//! secondary unique value handed from row to row across transactions, parents and
//! children inserted and deleted in storms with their foreign key checked on the target,
//! keys changed and changed back, rows appended to and deleted from a table without a
//! key — while `cutover run` applies on four connections and is killed with SIGKILL at
//! random moments. Every table must end identical on both sides: nothing lost, doubled
//! or applied out of order. CUTOVER_PARALLEL_SEED replays a run (`random` for a new
//! one); CUTOVER_PARALLEL_KILLS sets how many kills (default 6).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, count, kill9, stop, Pair, Rng};

/// One random source transaction.
fn random_transaction(rng: &mut Rng, round: i64) -> String {
    let account = || format!("{}", 1 + round.rem_euclid(200));
    match rng.below(6) {
        // A transfer between two accounts, with its two ledger lines (no key).
        0 | 1 => {
            let (a, b, x) = (rng.range(1, 200), rng.range(1, 200), rng.range(1, 50));
            format!(
                "UPDATE accounts SET balance = balance - {x} WHERE id = {a};
                 UPDATE accounts SET balance = balance + {x} WHERE id = {b};
                 INSERT INTO ledger VALUES ({a}, -{x}), ({b}, {x});"
            )
        }
        // A unique code freed by one row here, taken by another in a later transaction.
        2 => match rng.percent(50) {
            true => format!("UPDATE accounts SET code = NULL WHERE code = 'k{}';", rng.range(1, 40)),
            false => format!("UPDATE accounts SET code = 'k{}' WHERE id = {};", rng.range(1, 40), rng.range(1, 200)),
        },
        // A parent with children, or a parent deleted with its children: the same keys
        // come and go all the time.
        3 => {
            let p = rng.range(1, 30);
            match rng.percent(50) {
                true => format!(
                    "INSERT INTO parent VALUES ({p}, 'p{round}') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name;
                     INSERT INTO child VALUES ({c1}, {p}, 'n{round}'), ({c2}, {p}, 'n{round}') ON CONFLICT (id) DO NOTHING;",
                    c1 = p * 100 + rng.range(0, 9),
                    c2 = p * 100 + rng.range(10, 19),
                ),
                false => format!("DELETE FROM child WHERE parent_id = {p}; DELETE FROM parent WHERE id = {p};"),
            }
        }
        // A key changed and changed back, then deleted and inserted again, in one transaction.
        4 => {
            let a = rng.range(1, 200);
            format!(
                "UPDATE accounts SET id = id + 100000 WHERE id = {a};
                 UPDATE accounts SET id = id - 100000, balance = balance + 1 WHERE id = {a} + 100000;
                 DELETE FROM accounts WHERE id = {a};
                 INSERT INTO accounts VALUES ({a}, {round}, NULL);"
            )
        }
        // One of several identical rows of the table without a key deleted.
        _ => {
            format!("DELETE FROM ledger WHERE ctid IN (SELECT ctid FROM ledger WHERE account = {} LIMIT 1);", account())
        }
    }
}

/// Writes random transactions until told to stop; a transaction the source refuses (a
/// unique code taken meanwhile, a parent deleted by another writer) is rolled back.
async fn writer(url: String, seed: u64, stream: u64, stop: Arc<AtomicBool>) -> u64 {
    let client = connect(&url).await;
    let mut rng = Rng::new(seed, stream);
    let mut committed = 0;
    let mut round = 0i64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let statements: Vec<String> = (0..1 + rng.below(3)).map(|_| random_transaction(&mut rng, round)).collect();
        match client.batch_execute(&format!("BEGIN; {} COMMIT;", statements.join("\n"))).await {
            Ok(()) => committed += 1,
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
        if rng.percent(20) {
            tokio::time::sleep(rng.millis(1, 20)).await;
        }
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_apply_killed_at_random_moments_loses_doubles_and_reorders_nothing() {
    let seed = common::seed_from_env("CUTOVER_PARALLEL_SEED", 21);
    let kills: usize = std::env::var("CUTOVER_PARALLEL_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(6);
    println!("CUTOVER_PARALLEL_SEED={seed} CUTOVER_PARALLEL_KILLS={kills}");
    let mut rng = Rng::new(seed, 0);
    let pair = Pair::start("parallel", "[pipeline]\napply_connections = 4\nmax_batch_changes = 20\n");
    let source = connect(&pair.source.url("postgres")).await;
    source
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, code text UNIQUE);
             CREATE TABLE parent (id int PRIMARY KEY, name text);
             CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id), note text);
             CREATE TABLE ledger (account int, amount bigint);
             ALTER TABLE ledger REPLICA IDENTITY FULL;
             INSERT INTO accounts SELECT g, 1000, CASE WHEN g <= 40 THEN 'k' || g END FROM generate_series(1, 200) g;
             INSERT INTO parent SELECT g, 'p' FROM generate_series(1, 30) g;
             INSERT INTO child SELECT p * 100 + g, p, 'c' FROM generate_series(1, 30) p, generate_series(0, 3) g;
             INSERT INTO ledger SELECT g % 200 + 1, 0 FROM generate_series(1, 400) g;",
        )
        .await
        .expect("tables");
    // A target role that is no superuser: foreign keys are created DEFERRABLE and checked
    // at each target commit, and each connection's position goes into cutover.progress.
    let target_url = pair.target.url("postgres");
    connect(&target_url)
        .await
        .batch_execute(
            "CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE postgres TO app; GRANT CREATE ON SCHEMA public TO app;",
        )
        .await
        .expect("target role");
    let config = std::fs::read_to_string(&pair.config_path).expect("config");
    std::fs::write(&pair.config_path, config.replace(&target_url, &target_url.replace("cutover@", "app@")))
        .expect("config");

    let mut child = pair.spawn();
    pair.wait_caught_up(&mut child).await;
    let stop_writers = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=3)
        .map(|stream| tokio::spawn(writer(pair.source.url("postgres"), seed, stream, stop_writers.clone())))
        .collect();
    // How many apply connections had a transaction open at once, sampled on the target.
    let sampler = {
        let target = connect(&target_url).await;
        let stop = stop_writers.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                let open = count(
                    &target,
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND xact_start IS NOT NULL",
                )
                .await;
                most = most.max(open);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    for _ in 0..kills {
        tokio::time::sleep(rng.millis(300, 2500)).await;
        kill9(&mut child);
        tokio::time::sleep(rng.millis(0, 500)).await;
        child = pair.spawn();
    }
    tokio::time::sleep(rng.millis(500, 1500)).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut committed = 0;
    for writer in writers {
        committed += writer.await.expect("writer");
    }
    let most_open = sampler.await.expect("sampler");
    pair.wait_caught_up(&mut child).await;
    let (status, _) = stop(&mut child);
    assert!(status.success(), "{status}:\n{}", pair.log());
    pair.assert_identical().await;
    // Nothing doubled in the table without a key.
    let target = connect(&target_url).await;
    let ledger = "SELECT count(*) FROM ledger";
    assert_eq!(count(&target, ledger).await, count(&source, ledger).await);
    let log = pair.log();
    println!(
        "{committed} source transactions, {kills} kills, {} stretch(es) applied again on one connection, \
         at most {most_open} target transactions open at once",
        log.matches("applying again on one connection").count()
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(most_open >= 2, "the apply connections never had transactions open at the same time");
}
