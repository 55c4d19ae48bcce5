//! SQLite → PostgreSQL one-shot copies against a real target: every value read
//! back from the target is compared with the value in the SQLite file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{connect, count};
use cutover::sandbox::{free_port, PostgresServer};

const SCHEMA: &str = r#"
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    name VARCHAR(40) NOT NULL UNIQUE,
    price DECIMAL(12,2),
    weight REAL,
    active BOOLEAN,
    created DATE,
    updated DATETIME,
    payload BLOB,
    notes TEXT,
    untyped,
    meta JSON
);
CREATE INDEX items_weight ON items (weight);
CREATE INDEX items_lower_name ON items (lower(name));
CREATE TABLE tags (item_id INTEGER REFERENCES items (id) ON DELETE CASCADE, tag TEXT, PRIMARY KEY (item_id, tag)) WITHOUT ROWID;
CREATE TABLE log (at TIMESTAMP, line TEXT);
"#;

fn make_file(dir: &Path) -> PathBuf {
    let path = dir.join("app.db");
    let db = rusqlite::Connection::open(&path).expect("sqlite file");
    db.execute_batch(SCHEMA).expect("schema");
    let insert = "INSERT INTO items VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
    use rusqlite::types::Value::{Blob, Integer, Null, Real, Text};
    let rows: Vec<[rusqlite::types::Value; 11]> = vec![
        [
            Integer(i64::MIN),
            Text("min".into()),
            Text("-9999999999.99".into()),
            Real(0.1),
            Integer(0),
            Text("0001-01-01".into()),
            Text("1999-12-31 23:59:59.999999".into()),
            Blob(vec![0, 1, 255]),
            Text("tab\tnewline\nbackslash\\ emoji 🦀".into()),
            Integer(42),
            Text(r#"{"a": [1, null]}"#.into()),
        ],
        [
            Integer(i64::MAX),
            Text("max".into()),
            Real(12.5),
            Real(1e300),
            Integer(1),
            Integer(1_795_615_380),
            Integer(1_795_615_380),
            Blob(Vec::new()),
            Text(String::new()),
            Real(2.5),
            Text("[]".into()),
        ],
        [Integer(3), Text("nulls".into()), Null, Null, Null, Null, Null, Null, Null, Null, Null],
        [
            Integer(4),
            Text("iso".into()),
            Integer(7),
            Real(1_234.567_890_123_456_7),
            Text("true".into()),
            Text("2024-02-29".into()),
            Text("2026-11-25T14:03:00.5+01:00".into()),
            Text("as text".into()),
            Text("ünïcödé".into()),
            Text("free text".into()),
            Integer(5),
        ],
    ];
    for row in &rows {
        db.execute(insert, rusqlite::params_from_iter(row.iter())).expect("row");
    }
    db.execute_batch(
        "INSERT INTO tags VALUES (3, 'a'), (3, 'b'), (4, 'c');
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 20000)
         INSERT INTO log SELECT datetime(1700000000 + n, 'unixepoch'), 'line ' || n FROM g;",
    )
    .expect("more rows");
    path
}

fn write_config(dir: &Path, name: &str, file: &Path, target: &str, source_extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nkind = \"sqlite\"\nurl = \"sqlite://{}\"\n{source_extra}[target]\nkind = \"postgres\"\nurl = \"{target}\"\n\
             [state]\ndir = \"{}\"\n[metrics]\nlisten = \"off\"\n",
            file.display(),
            dir.join(format!("{name}-state")).display()
        ),
    )
    .expect("config");
    path
}

fn cutover(command: &str, config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cutover")).args([command, "--config"]).arg(config).output().expect("cutover runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn test_dir(name: &str) -> PathBuf {
    common::test_dir(&format!("cutover-test-sqlite-{name}-{}", free_port().expect("port")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_is_copied_with_its_types_keys_and_indexes() {
    let dir = test_dir("copy");
    let file = make_file(&dir);
    let target = PostgresServer::start(&[]).expect("target");
    let config = write_config(&dir, "app", &file, &target.url("postgres"), "");

    let plan = cutover("check", &config);
    let plan_text = text(&plan);
    assert!(plan.status.success(), "{plan_text}");
    assert!(plan_text.contains("REAL") && plan_text.contains("double precision"), "{plan_text}");
    assert!(plan_text.contains("index items_lower_name on items (an expression or partial index)"), "{plan_text}");

    let run = cutover("run", &config);
    assert!(run.status.success(), "{}", text(&run));

    // Every value, read back from the target as text, against the file.
    let pg = connect(&target.url("postgres")).await;
    let got: Vec<Vec<Option<String>>> = pg
        .query(
            "SELECT id::text, name, price::text, weight::text, active::text, created::text, updated::text, \
                    encode(payload, 'hex'), notes, untyped, meta::text FROM public.items ORDER BY id",
            &[],
        )
        .await
        .expect("items")
        .iter()
        .map(|r| (0..11).map(|i| r.get::<_, Option<String>>(i)).collect())
        .collect();
    let some = |s: &str| Some(s.to_string());
    let expected: Vec<Vec<Option<String>>> = vec![
        vec![
            some(&i64::MIN.to_string()),
            some("min"),
            some("-9999999999.99"),
            some("0.1"),
            some("false"),
            some("0001-01-01"),
            some("1999-12-31 23:59:59.999999"),
            some("0001ff"),
            some("tab\tnewline\nbackslash\\ emoji 🦀"),
            some("42"),
            some(r#"{"a": [1, null]}"#),
        ],
        vec![some("3"), some("nulls"), None, None, None, None, None, None, None, None, None],
        vec![
            some("4"),
            some("iso"),
            some("7.00"),
            some("1234.5678901234567"),
            some("true"),
            some("2024-02-29"),
            some("2026-11-25 13:03:00.5"),
            some(&"as text".bytes().map(|b| format!("{b:02x}")).collect::<String>()),
            some("ünïcödé"),
            some("free text"),
            some("5"),
        ],
        vec![
            some(&i64::MAX.to_string()),
            some("max"),
            some("12.50"),
            some("1e+300"),
            some("true"),
            some("2026-11-25"),
            some("2026-11-25 14:03:00"),
            some(""),
            some(""),
            some("2.5"),
            some("[]"),
        ],
    ];
    assert_eq!(got, expected);
    // A REAL comes back bit for bit (pgloader's `real` would keep 7 digits).
    let weight: f64 = pg.query_one("SELECT weight FROM public.items WHERE id = 4", &[]).await.expect("weight").get(0);
    assert_eq!(weight.to_bits(), 1_234.567_890_123_456_7_f64.to_bits());
    assert_eq!(count(&pg, "SELECT count(*) FROM public.tags").await, 3);
    assert_eq!(count(&pg, "SELECT count(*) FROM public.log").await, 20_000);
    assert_eq!(count(&pg, "SELECT count(DISTINCT at) FROM public.log").await, 20_000);
    // Keys, the unique constraint, the index and the foreign key are there, and enforced.
    let objects: Vec<String> = pg
        .query(
            "SELECT conname::text || ' ' || contype::text FROM pg_constraint WHERE conrelid IN ('public.items'::regclass, 'public.tags'::regclass) \
             UNION ALL SELECT indexname::text FROM pg_indexes WHERE indexname = 'items_weight' ORDER BY 1",
            &[],
        )
        .await
        .expect("catalog")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(objects, vec!["items_name_key u", "items_pkey p", "items_weight", "tags_fk0 f", "tags_pkey p"]);
    assert!(pg.execute("INSERT INTO public.tags VALUES (99, 'orphan')", &[]).await.is_err());
    pg.execute("DELETE FROM public.items WHERE id = 3", &[]).await.expect("cascade");
    assert_eq!(count(&pg, "SELECT count(*) FROM public.tags").await, 1);

    // verify names what the target lost and gained; --repair gives the target the file's
    // rows again, parents kept in place (a delete would cascade to rows already repaired).
    pg.batch_execute(
        "UPDATE public.items SET notes = 'drift', payload = '\\x00' WHERE id = 4;
         DELETE FROM public.log WHERE line LIKE '%7'; INSERT INTO public.log VALUES (now(), 'extra');",
    )
    .await
    .expect("drift");
    let drifted = cutover("verify", &config);
    let report = text(&drifted);
    assert_eq!(drifted.status.code(), Some(1), "{report}");
    assert!(
        report.contains("public.items") && report.contains("public.tags") && report.contains("public.log"),
        "{report}"
    );
    let repair = || {
        let output = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["verify", "--repair", "--config"])
            .arg(&config)
            .output()
            .expect("cutover verify --repair runs");
        let report = text(&output);
        assert!(output.status.success() && report.contains("3 tables, 3 match"), "{report}");
    };
    repair();
    assert_eq!(count(&pg, "SELECT count(*) FROM public.tags").await, 3);
    assert_eq!(count(&pg, "SELECT count(*) FROM public.log").await, 20_000);
    // Only the parent differs now: its repair leaves the children that reference it alone.
    pg.execute("UPDATE public.items SET notes = 'drift again' WHERE id = 4", &[]).await.expect("drift");
    repair();
    assert_eq!(count(&pg, "SELECT count(*) FROM public.tags").await, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_fit_its_declared_type_is_named_or_widened() {
    let dir = test_dir("mismatch");
    let file = dir.join("bad.db");
    let db = rusqlite::Connection::open(&file).expect("sqlite file");
    db.execute_batch(
        "CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER, price DECIMAL(8,2));
         INSERT INTO stock VALUES ('a', 1, 1.5), ('b', 'several', 2), ('c', 3, 2.25);",
    )
    .expect("file");
    let target = PostgresServer::start(&[]).expect("target");

    let strict = write_config(&dir, "strict", &file, &target.url("postgres"), "");
    let run = cutover("run", &strict);
    let message = text(&run);
    assert!(!run.status.success(), "{message}");
    assert!(
        message.contains("table public.stock, rowid 2, column qty: text 'several' does not fit bigint")
            && message.contains("on_type_mismatch"),
        "{message}"
    );

    let pg = connect(&target.url("postgres")).await;
    pg.batch_execute("DROP TABLE public.stock").await.expect("drop");
    let lenient = write_config(&dir, "lenient", &file, &target.url("postgres"), "on_type_mismatch = \"text\"\n");
    let plan = text(&cutover("check", &lenient));
    assert!(plan.contains("qty") && plan.contains("copied as text"), "{plan}");
    let run = cutover("run", &lenient);
    assert!(run.status.success(), "{}", text(&run));
    let rows: Vec<(String, Option<String>, Option<String>)> = pg
        .query("SELECT sku, qty, price::text FROM public.stock ORDER BY sku", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let row = |sku: &str, qty: &str, price: &str| (sku.to_string(), Some(qty.to_string()), Some(price.to_string()));
    assert_eq!(rows, vec![row("a", "1", "1.50"), row("b", "several", "2.00"), row("c", "3", "2.25")]);
    let _ = std::fs::remove_dir_all(&dir);
}
