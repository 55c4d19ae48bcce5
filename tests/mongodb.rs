//! MongoDB → PostgreSQL: `cutover run` as a child process, from the wire-protocol test server (or the real
//! replica set `CUTOVER_TEST_MONGODB_URI` names, one fresh database per test) into a sandbox PostgreSQL.
//! Every check compares what the target holds with what the source documents say.

mod common;
mod mongo_server;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Decimal128, Document};
use futures_util::TryStreamExt;
use mongo_server::MongoTestServer;
use serde_json::{json, Value as Json};

use cutover::sandbox::PostgresServer;

/// A source database, on the test server or on the real replica set.
struct Source {
    server: Option<MongoTestServer>,
    uri: String,
    db: mongodb::Database,
}

impl Source {
    async fn start(test: &str) -> Source {
        let (server, uri) = match std::env::var("CUTOVER_TEST_MONGODB_URI") {
            Ok(real) => {
                let name = format!("cutover_{test}_{}", std::process::id());
                (None, with_database(&real, &name))
            }
            Err(_) => {
                let server = MongoTestServer::start();
                let uri = server.uri("shop");
                (Some(server), uri)
            }
        };
        let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
        let db = client.default_database().expect("the URI names a database");
        let _ = db.drop().await;
        Source { server, uri, db }
    }

    fn items(&self) -> mongodb::Collection<Document> {
        self.db.collection("items")
    }

    fn name(&self) -> String {
        self.db.name().to_string()
    }
}

/// `uri` with its database (path) replaced by `db`.
fn with_database(uri: &str, db: &str) -> String {
    let (base, query) = uri.split_once('?').map_or((uri, None), |(b, q)| (b, Some(q)));
    let host_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host = match base[host_end..].find('/') {
        Some(slash) => &base[..host_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host}/{db}?{query}"),
        None => format!("{host}/{db}"),
    }
}

/// A pipeline from the source into a sandbox PostgreSQL, logging to `cutover.log` in its directory.
struct Pipeline {
    target: PostgresServer,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Pipeline {
    fn new(test: &str, source: &Source, mapping: &str) -> Pipeline {
        let target = PostgresServer::start(&[]).expect("target server");
        let dir = common::test_dir(&format!("cutover-test-mongo-{test}-{}", target.port()));
        let config = dir.join(format!("{test}.toml"));
        let text = format!(
            "[source]\nkind = \"mongodb\"\nurl = \"{}\"\nmapping = \"{mapping}\"\n[target]\nkind = \"postgres\"\n\
             url = \"{}\"\n[state]\ndir = \"{}\"\n[metrics]\nlisten = \"off\"\n",
            source.uri,
            target.url("postgres"),
            dir.join("state").display()
        );
        std::fs::write(&config, text).expect("config");
        let log = dir.join("cutover.log");
        Pipeline { target, dir, config, log }
    }

    fn spawn(&self) -> Child {
        common::spawn_run(&self.config, &self.log, &[])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn target(&self) -> tokio_postgres::Client {
        common::connect(&self.target.url("postgres")).await
    }

    /// Waits until `done` holds on the target, failing if cutover exits or a minute passes.
    async fn wait_until(&self, child: &mut Child, what: &str, done: impl AsyncCheck) {
        let client = self.target().await;
        let started = Instant::now();
        loop {
            if done.check(&client).await {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cutover exited with {status} waiting for {what}:\n{}", self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what} never happened:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for cutover to exit by itself; its status and log.
    fn wait_exit(&self, child: &mut Child) -> (std::process::ExitStatus, String) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (status, self.log());
            }
            if started.elapsed() > Duration::from_secs(60) {
                common::kill9(child);
                panic!("cutover did not stop:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A condition on the target.
trait AsyncCheck {
    async fn check(&self, client: &tokio_postgres::Client) -> bool;
}

/// The table has exactly this many rows.
struct Rows<'a>(&'a str, i64);

impl AsyncCheck for Rows<'_> {
    async fn check(&self, client: &tokio_postgres::Client) -> bool {
        let sql = format!("SELECT count(*) FROM {}", self.0);
        client.query_one(&sql, &[]).await.is_ok_and(|r| r.get::<_, i64>(0) == self.1)
    }
}

/// A row with this `_id` exists.
struct Has<'a>(&'a str, &'a str);

impl AsyncCheck for Has<'_> {
    async fn check(&self, client: &tokio_postgres::Client) -> bool {
        let sql = format!("SELECT 1 FROM {} WHERE _id = $1", self.0);
        client.query_opt(&sql, &[&self.1]).await.is_ok_and(|r| r.is_some())
    }
}

/// Every target row as JSON (`to_jsonb` of the row), by `_id`.
async fn target_rows(client: &tokio_postgres::Client, table: &str) -> std::collections::BTreeMap<String, Json> {
    let sql = format!("SELECT _id, to_jsonb(t)::text FROM {table} t");
    let rows = client.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|r| {
            let text: String = r.get(1);
            (r.get(0), serde_json::from_str(&text).expect("json"))
        })
        .collect()
}

/// The target's column types, in order.
async fn column_types(client: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    let sql = "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
               WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum";
    let rows = client.query(sql, &[&table]).await.expect("columns");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// With `mapping = "jsonb"`: every source document against its target row (`_id` and `doc`).
async fn assert_jsonb_matches(source: &Source, client: &tokio_postgres::Client, table: &str) {
    let docs: Vec<Document> = source.items().find(doc! {}).await.expect("find").try_collect().await.expect("read");
    let expected: std::collections::BTreeMap<String, Json> = docs
        .into_iter()
        .map(|d| {
            let id = match d.get("_id") {
                Some(Bson::ObjectId(oid)) => oid.to_hex(),
                Some(other) => other.clone().into_canonical_extjson().to_string(),
                None => panic!("document without _id"),
            };
            let row = json!({ "_id": id.clone(), "doc": Bson::Document(d).into_relaxed_extjson() });
            (id, row)
        })
        .collect();
    assert_eq!(target_rows(client, table).await, expected);
}

#[tokio::test]
async fn flatten_snapshot_maps_every_bson_type_and_nested_fields() {
    let source = Source::start("flatten_snapshot").await;
    let ada = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").expect("oid");
    let bob = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60719").expect("oid");
    let decimal: Decimal128 = "12.50".parse().expect("decimal");
    source
        .items()
        .insert_many([
            doc! {
                "_id": ada, "name": "Ada", "age": 36, "big": 1i64 << 40, "score": 1.5, "price": decimal,
                "born": DateTime::from_millis(1_704_164_645_678), "ok": true,
                "blob": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 255] },
                "address": { "city": "Paris", "geo": { "lat": 48.8 } }, "tags": ["a", 1], "mixed": 1,
            },
            doc! { "_id": bob, "name": "tab\there\nnewline \\ ☃", "address": { "city": "Rome" }, "mixed": "one" },
        ])
        .await
        .expect("insert");
    let pipeline = Pipeline::new("flatten_snapshot", &source, "flatten");
    let mut child = pipeline.spawn();
    let table = format!("{}.items", source.name());
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 2)).await;
    let client = pipeline.target().await;
    assert_eq!(
        column_types(&client, &table).await,
        owned(&[
            ("_id", "text"),
            ("name", "text"),
            ("age", "integer"),
            ("big", "bigint"),
            ("score", "double precision"),
            ("price", "numeric"),
            ("born", "timestamp with time zone"),
            ("ok", "boolean"),
            ("blob", "bytea"),
            ("address_city", "text"),
            ("address_geo_lat", "double precision"),
            ("tags", "jsonb"),
            ("mixed", "jsonb"),
        ])
    );
    let rows = target_rows(&client, &table).await;
    assert_eq!(
        rows[&ada.to_hex()],
        json!({
            "_id": ada.to_hex(), "name": "Ada", "age": 36, "big": 1_099_511_627_776i64, "score": 1.5, "price": 12.50,
            "born": "2024-01-02T03:04:05.678+00:00", "ok": true, "blob": "\\x00ff", "address_city": "Paris",
            "address_geo_lat": 48.8, "tags": ["a", 1], "mixed": 1,
        })
    );
    assert_eq!(
        rows[&bob.to_hex()],
        json!({
            "_id": bob.to_hex(), "name": "tab\there\nnewline \\ ☃", "age": null, "big": null, "score": null,
            "price": null, "born": null, "ok": null, "blob": null, "address_city": "Rome", "address_geo_lat": null,
            "tags": null, "mixed": "one",
        })
    );
    common::stop(&mut child);
}

#[tokio::test]
async fn flatten_stream_applies_changes_adds_columns_and_widens_to_jsonb() {
    let source = Source::start("flatten_stream").await;
    let items = source.items();
    items
        .insert_many([doc! { "_id": 1, "name": "one", "age": 1 }, doc! { "_id": 2, "name": "two", "age": 2 }])
        .await
        .expect("seed");
    let pipeline = Pipeline::new("flatten_stream", &source, "flatten");
    let mut child = pipeline.spawn();
    let table = format!("{}.items", source.name());
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 2)).await;

    items.insert_one(doc! { "_id": 3, "name": "three", "age": 3, "extra": { "deep": true } }).await.expect("insert");
    items.update_one(doc! { "_id": 1 }, doc! { "$set": { "name": "ONE" } }).await.expect("update");
    items.replace_one(doc! { "_id": 2 }, doc! { "name": "TWO", "age": 22 }).await.expect("replace");
    items.update_one(doc! { "_id": 3 }, doc! { "$set": { "age": "three" } }).await.expect("type change");
    items.insert_one(doc! { "_id": 4, "name": "four" }).await.expect("insert");
    items.delete_one(doc! { "_id": 4 }).await.expect("delete");
    items.insert_one(doc! { "_id": "last", "name": "last" }).await.expect("last");
    pipeline.wait_until(&mut child, "the last change", Has(&table, r#""last""#)).await;

    let client = pipeline.target().await;
    assert_eq!(
        column_types(&client, &table).await,
        owned(&[("_id", "text"), ("name", "text"), ("age", "jsonb"), ("extra_deep", "boolean")])
    );
    let rows: Vec<Json> = target_rows(&client, &table).await.into_values().collect();
    let id = |n: i32| format!(r#"{{"$numberInt":"{n}"}}"#);
    let mut expected = vec![
        json!({ "_id": id(1), "name": "ONE", "age": 1, "extra_deep": null }),
        json!({ "_id": id(2), "name": "TWO", "age": 22, "extra_deep": null }),
        json!({ "_id": id(3), "name": "three", "age": "three", "extra_deep": true }),
        json!({ "_id": r#""last""#, "name": "last", "age": null, "extra_deep": null }),
    ];
    expected.sort_by_key(|row| row["_id"].as_str().map(str::to_string));
    assert_eq!(rows, expected, "{}", pipeline.log());
    common::stop(&mut child);
}

#[tokio::test]
async fn jsonb_mapping_snapshots_and_streams_whole_documents() {
    let source = Source::start("jsonb").await;
    let items = source.items();
    items
        .insert_many([
            doc! { "_id": ObjectId::new(), "a": { "b": { "c": [1, 2, { "d": DateTime::from_millis(0) }] } } },
            doc! { "_id": 7i64, "n": Decimal128::from_bytes([0; 16]), "bin": Binary { subtype: BinarySubtype::Uuid, bytes: vec![1; 16] } },
            doc! { "_id": "text id", "s": "☃", "f": f64::NAN },
        ])
        .await
        .expect("seed");
    let pipeline = Pipeline::new("jsonb", &source, "jsonb");
    let mut child = pipeline.spawn();
    let table = format!("{}.items", source.name());
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 3)).await;
    let client = pipeline.target().await;
    assert_eq!(column_types(&client, &table).await, owned(&[("_id", "text"), ("doc", "jsonb")]));
    assert_jsonb_matches(&source, &client, &table).await;

    items.insert_one(doc! { "_id": 1, "x": { "y": 1 } }).await.expect("insert");
    items.update_one(doc! { "_id": 7i64 }, doc! { "$set": { "added": [1, "two"] } }).await.expect("update");
    items.replace_one(doc! { "_id": "text id" }, doc! { "s": "replaced" }).await.expect("replace");
    items.delete_one(doc! { "_id": 1 }).await.expect("delete");
    items.insert_one(doc! { "_id": "last" }).await.expect("last");
    pipeline.wait_until(&mut child, "the last change", Has(&table, r#""last""#)).await;
    assert_jsonb_matches(&source, &client, &table).await;
    common::stop(&mut child);
}

#[tokio::test]
async fn kill9_and_restart_resume_from_the_token_with_nothing_lost_or_doubled() {
    let source = Source::start("kill9").await;
    let items = source.items();
    items.insert_many((0..200).map(|i| doc! { "_id": i, "n": i })).await.expect("seed");
    let pipeline = Pipeline::new("kill9", &source, "jsonb");
    let table = format!("{}.items", source.name());
    let mut child = pipeline.spawn();
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 200)).await;
    // Writes while cutover runs, killed half-way, and while it is down.
    let writer = {
        let items = items.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                match i % 3 {
                    0 => items.insert_one(doc! { "_id": 1000 + i, "n": i }).await.map(drop),
                    1 => items.update_one(doc! { "_id": i % 200 }, doc! { "$inc": { "n": 1000 } }).await.map(drop),
                    _ => items.delete_one(doc! { "_id": i % 200 }).await.map(drop),
                }
                .expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    common::kill9(&mut child);
    writer.await.expect("writer");
    let mut child = pipeline.spawn();
    items.insert_one(doc! { "_id": "last" }).await.expect("last");
    pipeline.wait_until(&mut child, "the last change", Has(&table, r#""last""#)).await;
    let client = pipeline.target().await;
    assert_jsonb_matches(&source, &client, &table).await;
    let log = pipeline.log();
    // The restart streamed from the checkpointed token, with no second copy.
    assert_eq!(log.matches("snapshot copied").count(), 1, "{log}");
    assert!(log.matches("streaming changes").count() >= 2 && log.contains("from=mongo:"), "{log}");
    common::stop(&mut child);
}

#[tokio::test]
async fn a_dropped_collection_stops_the_pipeline_naming_it() {
    let source = Source::start("drop").await;
    source.items().insert_one(doc! { "_id": 1 }).await.expect("seed");
    source.db.collection::<Document>("other").insert_one(doc! { "_id": 1 }).await.expect("seed");
    let pipeline = Pipeline::new("drop", &source, "flatten");
    let table = format!("{}.items", source.name());
    let mut child = pipeline.spawn();
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 1)).await;
    source.items().insert_one(doc! { "_id": 2 }).await.expect("insert");
    source.items().drop().await.expect("drop");
    let (status, log) = pipeline.wait_exit(&mut child);
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("collection {}.items was dropped", source.name())), "{log}");
    // Everything before the drop is on the target.
    let client = pipeline.target().await;
    assert_eq!(common::count(&client, &format!("SELECT count(*) FROM {table}")).await, 2, "{log}");
}

#[tokio::test]
async fn lost_history_stops_saying_a_new_snapshot_is_needed() {
    let source = Source::start("history").await;
    let Some(server) = &source.server else {
        eprintln!("skipped: a real replica set cannot be made to forget its oplog on demand");
        return;
    };
    source.items().insert_one(doc! { "_id": 1 }).await.expect("seed");
    let pipeline = Pipeline::new("history", &source, "jsonb");
    let table = format!("{}.items", source.name());
    let mut child = pipeline.spawn();
    pipeline.wait_until(&mut child, "the snapshot", Rows(&table, 1)).await;
    source.items().insert_one(doc! { "_id": 2 }).await.expect("insert");
    pipeline.wait_until(&mut child, "the insert", Rows(&table, 2)).await;
    common::stop(&mut child);
    source.items().insert_one(doc! { "_id": 3 }).await.expect("insert while stopped");
    server.forget_history_before_now();
    let mut child = pipeline.spawn();
    let (status, log) = pipeline.wait_exit(&mut child);
    assert!(!status.success(), "{log}");
    assert!(log.contains("ChangeStreamHistoryLost") && log.contains("A new snapshot is needed"), "{log}");
}

#[test]
fn mapping_is_only_for_mongodb_sources() {
    let text = "[source]\nkind = \"postgres\"\nurl = \"postgresql://a@b/c\"\nmapping = \"jsonb\"\n\
                [target]\nkind = \"postgres\"\nurl = \"postgresql://a@b/d\"\n[state]\ndir = \"/tmp/x\"\n";
    let error = cutover::config::Config::parse(text, std::path::Path::new("p.toml")).expect_err("rejected");
    assert!(error.to_string().contains("mapping: only for kind = \"mongodb\""), "{error}");
    let mongo = text.replace(
        "kind = \"postgres\"\nurl = \"postgresql://a@b/c\"",
        "kind = \"mongodb\"\nurl = \"mongodb://a:pw@b/c\"",
    );
    let config = cutover::config::Config::parse(&mongo, std::path::Path::new("p.toml")).expect("accepted");
    assert_eq!(config.source.mapping, Some(cutover::config::MongoMapping::Jsonb));
    assert!(!config.source.url.to_string().contains("pw"));
}
