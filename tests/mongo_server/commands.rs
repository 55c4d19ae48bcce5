//! Command execution: one function per supported command, replies shaped like a MongoDB 7.0 replica set
//! primary's.

use std::collections::VecDeque;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};

use super::query::{matches, project, sort_documents};
use super::store::{doc_id, history_lost, Change, ChangeCursor, Cursor, Scope, State, Token};
use super::update::{apply_operators, apply_replacement, is_operator_update};
use super::{CommandError, Shared};

const DEFAULT_BATCH_SIZE: usize = 101;
/// How long a change stream `getMore` without `maxTimeMS` waits for events, as the real server's default.
const DEFAULT_AWAIT: Duration = Duration::from_millis(1000);

type Reply = Result<Document, CommandError>;

/// Runs one command and returns its reply document (errors included, as `ok: 0` replies).
pub async fn execute(shared: &Shared, command: Document, connection_id: i32) -> Document {
    let result = dispatch(shared, &command, connection_id).await;
    let mut reply = match result {
        Ok(mut reply) => {
            reply.insert("ok", 1.0);
            reply
        }
        Err(e) => e.to_reply(),
    };
    let (last_seq, time) = {
        let mut state = shared.lock();
        (state.last_seq, state.operation_time())
    };
    reply.insert("operationTime", time);
    // Wake change streams waiting in getMore if this command wrote to the log.
    shared.log_seq.send_if_modified(|seq| std::mem::replace(seq, last_seq) != last_seq);
    reply
}

async fn dispatch(shared: &Shared, cmd: &Document, connection_id: i32) -> Reply {
    let Some((name, _)) = cmd.iter().next() else {
        return Err(CommandError::new(59, "CommandNotFound", "empty command"));
    };
    let db = cmd.get_str("$db").unwrap_or("test").to_string();
    if cmd.contains_key("startTransaction") || cmd.contains_key("autocommit") {
        return Err(CommandError::new(20, "IllegalOperation", "transactions are not supported by the test server"));
    }
    match name.to_ascii_lowercase().as_str() {
        "hello" | "ismaster" => hello(shared, cmd, connection_id).await,
        "ping" | "endsessions" => Ok(Document::new()),
        "buildinfo" => Ok(doc! {
            "version": "7.0.0",
            "versionArray": [7, 0, 0, 0],
            "gitVersion": "mongo-test-server",
            "bits": 64,
            "maxBsonObjectSize": 16_777_216,
            "storageEngines": ["inMemory"],
        }),
        "listdatabases" => list_databases(&shared.lock()),
        "listcollections" => list_collections(&mut shared.lock(), &db, cmd),
        "listindexes" => list_indexes(&mut shared.lock(), &db, cmd),
        "createindexes" => create_indexes(&mut shared.lock(), &db, cmd),
        "create" => create(&mut shared.lock(), &db, cmd),
        "drop" => drop_collection(&mut shared.lock(), &db, cmd),
        "dropdatabase" => drop_database(&mut shared.lock(), &db),
        "renamecollection" => rename_collection(&mut shared.lock(), &db, cmd),
        "insert" => insert(&mut shared.lock(), &db, cmd),
        "update" => update(&mut shared.lock(), &db, cmd),
        "delete" => delete(&mut shared.lock(), &db, cmd),
        "count" => count(&shared.lock(), &db, cmd),
        "find" => find(&mut shared.lock(), &db, cmd),
        "aggregate" => aggregate(&mut shared.lock(), &db, cmd),
        "getmore" => get_more(shared, &db, cmd).await,
        "killcursors" => kill_cursors(&mut shared.lock(), cmd),
        _ => Err(CommandError::new(59, "CommandNotFound", format!("no such command: '{name}'"))),
    }
}

fn bad_value(message: impl Into<String>) -> CommandError {
    CommandError::new(2, "BadValue", message)
}

fn type_mismatch(message: impl Into<String>) -> CommandError {
    CommandError::new(14, "TypeMismatch", message)
}

/// The collection name a command targets (`{find: "coll"}`), checked to be a string.
fn target<'a>(cmd: &'a Document, field: &str) -> Result<&'a str, CommandError> {
    match cmd.get(field) {
        Some(Bson::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(CommandError::new(73, "InvalidNamespace", format!("'{field}' must be a collection name"))),
    }
}

fn opt_doc<'a>(cmd: &'a Document, field: &str) -> Result<Option<&'a Document>, CommandError> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(_) => Err(type_mismatch(format!("'{field}' must be an object"))),
    }
}

fn opt_int(cmd: &Document, field: &str) -> Result<Option<i64>, CommandError> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int32(v)) => Ok(Some(*v as i64)),
        Some(Bson::Int64(v)) => Ok(Some(*v)),
        Some(Bson::Double(v)) if v.fract() == 0.0 => Ok(Some(*v as i64)),
        Some(_) => Err(type_mismatch(format!("'{field}' must be a number"))),
    }
}

fn opt_bool(cmd: &Document, field: &str, default: bool) -> bool {
    match cmd.get(field) {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(v)) => *v != 0,
        Some(Bson::Int64(v)) => *v != 0,
        Some(Bson::Double(v)) => *v != 0.0,
        _ => default,
    }
}

fn documents<'a>(cmd: &'a Document, field: &str) -> Result<Vec<&'a Document>, CommandError> {
    let Ok(items) = cmd.get_array(field) else {
        return Err(type_mismatch(format!("'{field}' must be an array")));
    };
    items
        .iter()
        .map(|item| match item {
            Bson::Document(d) => Ok(d),
            _ => Err(type_mismatch(format!("'{field}' entries must be objects"))),
        })
        .collect()
}

async fn hello(shared: &Shared, cmd: &Document, connection_id: i32) -> Reply {
    // An awaitable hello (the driver's monitor) names the topology version it already knows; the server
    // answers only when that changes or maxAwaitTimeMS passes. Ours never changes, so it just waits.
    if let (Ok(known), Some(wait)) = (cmd.get_document("topologyVersion"), opt_int(cmd, "maxAwaitTimeMS")?) {
        if known.get_object_id("processId").ok() == Some(shared.process_id) {
            let mut shutdown = shared.shutdown.subscribe();
            let _ = tokio::time::timeout(Duration::from_millis(wait.max(0) as u64), shutdown.wait_for(|s| *s)).await;
        }
    }
    let host = format!("127.0.0.1:{}", shared.port);
    Ok(doc! {
        "topologyVersion": { "processId": shared.process_id, "counter": 0i64 },
        "hosts": [&host],
        "setName": "rs0",
        "setVersion": 1,
        "isWritablePrimary": true,
        "ismaster": true,
        "secondary": false,
        "primary": &host,
        "me": &host,
        "electionId": shared.election_id,
        "helloOk": true,
        "maxBsonObjectSize": 16_777_216,
        "maxMessageSizeBytes": super::wire::MAX_MESSAGE_SIZE,
        "maxWriteBatchSize": 100_000,
        "localTime": DateTime::now(),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": connection_id,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "readOnly": false,
    })
}

fn list_databases(state: &State) -> Reply {
    let databases: Vec<Document> = state
        .dbs
        .iter()
        .filter(|(_, colls)| !colls.is_empty())
        .map(|(name, _)| doc! { "name": name, "sizeOnDisk": 8192i64, "empty": false })
        .collect();
    Ok(doc! { "databases": databases, "totalSize": 8192i64 })
}

fn cursor_reply(id: i64, ns: &str, first: bool, batch: Vec<Document>, resume_token: Option<Document>) -> Document {
    let mut cursor = doc! { "id": id, "ns": ns };
    cursor.insert(if first { "firstBatch" } else { "nextBatch" }, batch);
    if let Some(token) = resume_token {
        cursor.insert("postBatchResumeToken", token);
    }
    doc! { "cursor": cursor }
}

fn batch_size(cmd: &Document) -> Result<Option<usize>, CommandError> {
    let size = match cmd.get("cursor") {
        Some(Bson::Document(c)) => opt_int(c, "batchSize")?,
        _ => opt_int(cmd, "batchSize")?,
    };
    match size {
        Some(n) if n < 0 => Err(bad_value("batchSize must be non-negative")),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

/// Returns the first batch of `docs` and keeps the rest in a cursor if there is any.
fn open_find_cursor(
    state: &mut State,
    ns: String,
    mut docs: VecDeque<Document>,
    batch: usize,
    single: bool,
) -> Document {
    let first: Vec<Document> = docs.drain(..batch.min(docs.len())).collect();
    let id = if docs.is_empty() || single {
        0
    } else {
        state.register_cursor(Cursor::Find { ns: ns.clone(), remaining: docs })
    };
    cursor_reply(id, &ns, true, first, None)
}

fn list_collections(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let filter = opt_doc(cmd, "filter")?.cloned().unwrap_or_default();
    let mut infos = VecDeque::new();
    for name in state.dbs.get(db).map(|c| c.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
        let info = doc! {
            "name": name,
            "type": "collection",
            "options": {},
            "info": { "readOnly": false },
            "idIndex": { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
        };
        if matches(&info, &filter)? {
            infos.push_back(info);
        }
    }
    let batch = batch_size(cmd)?.unwrap_or(usize::MAX);
    Ok(open_find_cursor(state, format!("{db}.$cmd.listCollections"), infos, batch, false))
}

fn list_indexes(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "listIndexes")?;
    if state.collection(db, coll).is_none() {
        return Err(CommandError::new(26, "NamespaceNotFound", format!("ns does not exist: {db}.{coll}")));
    }
    let indexes = VecDeque::from([doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" }]);
    Ok(open_find_cursor(state, format!("{db}.{coll}"), indexes, usize::MAX, false))
}

/// Secondary indexes are accepted and ignored: queries scan anyway, and only `_id` is unique.
fn create_indexes(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "createIndexes")?;
    let created = state.collection(db, coll).is_none();
    state.collection_mut(db, coll);
    Ok(doc! { "numIndexesBefore": 1, "numIndexesAfter": 1, "createdCollectionAutomatically": created })
}

fn create(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "create")?;
    if state.collection(db, coll).is_some() {
        return Err(CommandError::new(48, "NamespaceExists", format!("Collection {db}.{coll} already exists.")));
    }
    state.collection_mut(db, coll);
    Ok(Document::new())
}

fn drop_collection(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "drop")?;
    // Like 7.0, dropping a collection that does not exist succeeds (and logs nothing).
    if state.dbs.get_mut(db).and_then(|colls| colls.remove(coll)).is_some() {
        state.record(db, Some(coll), Change::Drop);
    }
    Ok(doc! { "ns": format!("{db}.{coll}"), "nIndexesWas": 1 })
}

fn drop_database(state: &mut State, db: &str) -> Reply {
    let colls = state.dbs.remove(db).unwrap_or_default();
    // The real server logs one drop per collection before the database-wide entry.
    for coll in colls.keys() {
        state.record(db, Some(coll), Change::Drop);
    }
    if !colls.is_empty() {
        state.record(db, None, Change::DropDatabase);
    }
    Ok(doc! { "dropped": db })
}

fn split_ns(ns: &str) -> Result<(&str, &str), CommandError> {
    ns.split_once('.')
        .filter(|(db, coll)| !db.is_empty() && !coll.is_empty())
        .ok_or_else(|| CommandError::new(73, "InvalidNamespace", format!("Invalid namespace specified '{ns}'")))
}

fn rename_collection(state: &mut State, db: &str, cmd: &Document) -> Reply {
    if db != "admin" {
        return Err(CommandError::new(
            13,
            "Unauthorized",
            "renameCollection may only be run against the admin database.",
        ));
    }
    let (from_db, from) = split_ns(target(cmd, "renameCollection")?)?;
    let (to_db, to) = split_ns(target(cmd, "to")?)?;
    if state.collection(from_db, from).is_none() {
        return Err(CommandError::new(26, "NamespaceNotFound", "Source collection does not exist"));
    }
    if (from_db, from) == (to_db, to) {
        return Err(CommandError::new(20, "IllegalOperation", "Can't rename a collection to itself"));
    }
    if state.collection(to_db, to).is_some() {
        if !opt_bool(cmd, "dropTarget", false) {
            return Err(CommandError::new(48, "NamespaceExists", "target namespace exists"));
        }
        state.dbs.get_mut(to_db).and_then(|c| c.remove(to));
        state.record(to_db, Some(to), Change::Drop);
    }
    let moved = state.dbs.get_mut(from_db).and_then(|c| c.remove(from)).unwrap_or_default();
    state.dbs.entry(to_db.to_string()).or_default().insert(to.to_string(), moved);
    state.record(from_db, Some(from), Change::Rename { to_db: to_db.to_string(), to_coll: to.to_string() });
    Ok(Document::new())
}

fn write_error(index: usize, e: CommandError) -> Document {
    doc! { "index": index as i32, "code": e.code, "codeName": e.code_name, "errmsg": e.message }
}

fn insert(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "insert")?;
    let ns = format!("{db}.{coll}");
    let ordered = opt_bool(cmd, "ordered", true);
    let mut n = 0;
    let mut errors = Vec::new();
    for (index, doc) in documents(cmd, "documents")?.into_iter().enumerate() {
        // The server adds a missing _id, and always stores it as the first field.
        let mut stored = doc! { "_id": doc.get("_id").cloned().unwrap_or_else(|| Bson::ObjectId(ObjectId::new())) };
        stored.extend(doc.iter().filter(|(k, _)| *k != "_id").map(|(k, v)| (k.clone(), v.clone())));
        match state.collection_mut(db, coll).insert(&ns, stored.clone()) {
            Ok(()) => {
                n += 1;
                state.record(db, Some(coll), Change::Insert(stored));
            }
            Err(e) => {
                errors.push(write_error(index, e));
                if ordered {
                    break;
                }
            }
        }
    }
    Ok(write_reply(n, errors))
}

/// The document an upsert starts from: the filter's top-level equality conditions.
fn upsert_seed(filter: &Document) -> Document {
    let mut seed = Document::new();
    for (k, v) in filter {
        if k.starts_with('$') || k.contains('.') {
            continue;
        }
        match v {
            Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                if let Some(eq) = d.get("$eq") {
                    seed.insert(k.clone(), eq.clone());
                }
            }
            other => {
                seed.insert(k.clone(), other.clone());
            }
        }
    }
    seed
}

/// Runs one update statement; returns (matched, modified, upserted _id).
fn update_one_statement(
    state: &mut State,
    db: &str,
    coll: &str,
    stmt: &Document,
) -> Result<(i32, i32, Option<Bson>), CommandError> {
    let filter = opt_doc(stmt, "q")?.cloned().unwrap_or_default();
    let u = match stmt.get("u") {
        Some(Bson::Document(u)) => u,
        Some(Bson::Array(_)) => {
            return Err(CommandError::new(9, "FailedToParse", "pipeline updates are not supported by the test server"))
        }
        _ => return Err(type_mismatch("'u' must be an object")),
    };
    let operators = is_operator_update(u);
    let multi = opt_bool(stmt, "multi", false);
    if multi && !operators {
        return Err(CommandError::new(
            9,
            "FailedToParse",
            "multi update is not supported for replacement-style update",
        ));
    }
    let ns = format!("{db}.{coll}");
    let records = match state.collection(db, coll) {
        Some(c) => c.find_ids(&filter)?,
        None => Vec::new(),
    };
    if records.is_empty() {
        if !opt_bool(stmt, "upsert", false) {
            return Ok((0, 0, None));
        }
        let seed = upsert_seed(&filter);
        let mut doc = if operators {
            let mut doc = seed;
            apply_operators(&mut doc, u, true)?;
            doc
        } else {
            u.clone()
        };
        if !doc.contains_key("_id") {
            doc.insert("_id", seed_id(&filter).unwrap_or_else(|| Bson::ObjectId(ObjectId::new())));
        }
        let id = doc_id(&doc);
        let mut stored = doc! { "_id": id.clone() };
        stored.extend(doc.into_iter().filter(|(k, _)| k != "_id"));
        state.collection_mut(db, coll).insert(&ns, stored.clone())?;
        state.record(db, Some(coll), Change::Insert(stored));
        return Ok((1, 0, Some(id)));
    }
    let mut modified = 0;
    let matched = if multi { records.len() } else { 1 };
    for record in records.into_iter().take(matched) {
        let Some(old) = state.collection(db, coll).and_then(|c| c.get(record)).cloned() else { continue };
        let (new, change) = if operators {
            let mut new = old.clone();
            let description = apply_operators(&mut new, u, false)?;
            let change = Change::Update { id: doc_id(&old), description };
            (new, change)
        } else {
            let new = apply_replacement(&old, u)?;
            (new.clone(), Change::Replace(new))
        };
        // A write that changes nothing is a no-op on the real server: not counted, not in the oplog.
        if new == old {
            continue;
        }
        modified += 1;
        state.collection_mut(db, coll).put(record, new);
        state.record(db, Some(coll), change);
    }
    Ok((matched as i32, modified, None))
}

fn seed_id(filter: &Document) -> Option<Bson> {
    upsert_seed(filter).get("_id").cloned()
}

fn update(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "update")?;
    let ordered = opt_bool(cmd, "ordered", true);
    let (mut n, mut n_modified) = (0, 0);
    let mut upserted = Vec::new();
    let mut errors = Vec::new();
    for (index, stmt) in documents(cmd, "updates")?.into_iter().enumerate() {
        match update_one_statement(state, db, coll, stmt) {
            Ok((matched, modified, upserted_id)) => {
                n += matched;
                n_modified += modified;
                if let Some(id) = upserted_id {
                    upserted.push(doc! { "index": index as i32, "_id": id });
                }
            }
            Err(e) => {
                errors.push(write_error(index, e));
                if ordered {
                    break;
                }
            }
        }
    }
    let mut reply = doc! { "n": n, "nModified": n_modified };
    if !upserted.is_empty() {
        reply.insert("upserted", upserted);
    }
    if !errors.is_empty() {
        reply.insert("writeErrors", errors);
    }
    Ok(reply)
}

fn delete(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "delete")?;
    let ordered = opt_bool(cmd, "ordered", true);
    let mut n = 0;
    let mut errors = Vec::new();
    for (index, stmt) in documents(cmd, "deletes")?.into_iter().enumerate() {
        let result = (|| {
            let filter = opt_doc(stmt, "q")?.cloned().unwrap_or_default();
            let limit = opt_int(stmt, "limit")?.unwrap_or(0);
            let Some(c) = state.dbs.get_mut(db).and_then(|c| c.get_mut(coll)) else { return Ok(Vec::new()) };
            let mut records = c.find_ids(&filter)?;
            if limit == 1 {
                records.truncate(1);
            }
            Ok(records.into_iter().filter_map(|r| c.remove(r)).collect::<Vec<_>>())
        })();
        match result {
            Ok(removed) => {
                for doc in removed {
                    n += 1;
                    state.record(db, Some(coll), Change::Delete { id: doc_id(&doc) });
                }
            }
            Err(e) => {
                errors.push(write_error(index, e));
                if ordered {
                    break;
                }
            }
        }
    }
    Ok(write_reply(n, errors))
}

fn count(state: &State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "count")?;
    let filter = opt_doc(cmd, "query")?.cloned().unwrap_or_default();
    let matched = match state.collection(db, coll) {
        Some(c) if filter.is_empty() => c.len(),
        Some(c) => c.find_ids(&filter)?.len(),
        None => 0,
    };
    let skip = opt_int(cmd, "skip")?.unwrap_or(0).max(0) as usize;
    let limit = opt_int(cmd, "limit")?.unwrap_or(0).unsigned_abs() as usize;
    let n = matched.saturating_sub(skip);
    Ok(doc! { "n": (if limit > 0 { n.min(limit) } else { n }) as i64 })
}

/// The matching documents of a collection, in natural order.
fn scan(state: &State, db: &str, coll: &str, filter: &Document) -> Result<Vec<Document>, CommandError> {
    let Some(c) = state.collection(db, coll) else { return Ok(Vec::new()) };
    Ok(c.find_ids(filter)?.into_iter().filter_map(|r| c.get(r).cloned()).collect())
}

fn find(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let coll = target(cmd, "find")?;
    let filter = opt_doc(cmd, "filter")?.cloned().unwrap_or_default();
    let mut docs = scan(state, db, coll, &filter)?;
    if let Some(sort) = opt_doc(cmd, "sort")? {
        sort_documents(&mut docs, sort)?;
    }
    let skip = opt_int(cmd, "skip")?.unwrap_or(0);
    let limit = opt_int(cmd, "limit")?.unwrap_or(0);
    if skip < 0 {
        return Err(bad_value("skip must be non-negative"));
    }
    // A negative limit is the legacy "single batch of at most |limit|" request.
    let single = opt_bool(cmd, "singleBatch", false) || limit < 0;
    let mut docs: VecDeque<Document> = docs.into_iter().skip(skip as usize).collect();
    if limit != 0 {
        docs.truncate(limit.unsigned_abs() as usize);
    }
    if let Some(projection) = opt_doc(cmd, "projection")? {
        docs = docs.iter().map(|d| project(d, projection)).collect::<Result<_, _>>()?;
    }
    let batch = batch_size(cmd)?.unwrap_or(DEFAULT_BATCH_SIZE);
    Ok(open_find_cursor(state, format!("{db}.{coll}"), docs, batch, single))
}

/// Non-change-stream aggregation: `$match`, `$sort`, `$skip`, `$limit`, `$project` and the `$group` that
/// `count_documents` sends (`{_id: <constant>, n: {$sum: 1}}`).
fn run_pipeline(mut docs: Vec<Document>, pipeline: &[&Document]) -> Result<Vec<Document>, CommandError> {
    for stage in pipeline {
        let Some((name, spec)) = stage.iter().next().filter(|_| stage.len() == 1) else {
            return Err(CommandError::new(
                40323,
                "Location40323",
                "A pipeline stage specification object must contain exactly one field.",
            ));
        };
        let as_doc = || match spec {
            Bson::Document(d) => Ok(d),
            _ => Err(type_mismatch(format!("{name} needs an object"))),
        };
        let as_count = || match spec {
            Bson::Int32(v) if *v >= 0 => Ok(*v as usize),
            Bson::Int64(v) if *v >= 0 => Ok(*v as usize),
            _ => Err(bad_value(format!("{name} needs a non-negative integer"))),
        };
        match name.as_str() {
            "$match" => {
                let filter = as_doc()?;
                let mut kept = Vec::new();
                for doc in docs {
                    if matches(&doc, filter)? {
                        kept.push(doc);
                    }
                }
                docs = kept;
            }
            "$sort" => sort_documents(&mut docs, as_doc()?)?,
            "$skip" => docs = docs.into_iter().skip(as_count()?).collect(),
            "$limit" => docs.truncate(as_count()?),
            "$project" => docs = docs.iter().map(|d| project(d, as_doc()?)).collect::<Result<_, _>>()?,
            "$group" => {
                let spec = as_doc()?;
                let id = spec.get("_id").cloned().unwrap_or(Bson::Null);
                let counts: Vec<(&String, &Bson)> = spec.iter().filter(|(k, _)| *k != "_id").collect();
                let is_count = |v: &Bson| matches!(v, Bson::Document(d) if d.len() == 1 && matches!(d.get("$sum"), Some(Bson::Int32(1) | Bson::Int64(1))));
                if matches!(id, Bson::String(ref s) if s.starts_with('$')) || !counts.iter().all(|(_, v)| is_count(v)) {
                    return Err(bad_value("only constant-_id counting $group stages are supported by the test server"));
                }
                if docs.is_empty() {
                    continue;
                }
                let mut group = doc! { "_id": id };
                for (field, _) in counts {
                    group.insert(field.clone(), docs.len() as i32);
                }
                docs = vec![group];
            }
            other => {
                return Err(CommandError::new(
                    40324,
                    "Location40324",
                    format!("Unrecognized pipeline stage name: '{other}' (test server)"),
                ))
            }
        }
    }
    Ok(docs)
}

fn aggregate(state: &mut State, db: &str, cmd: &Document) -> Reply {
    let pipeline = documents(cmd, "pipeline")?;
    if let Some(Bson::Document(options)) = pipeline.first().and_then(|s| s.get("$changeStream")) {
        return open_change_stream(state, db, cmd, options, &pipeline[1..]);
    }
    let coll = match cmd.get("aggregate") {
        Some(Bson::String(c)) => c.as_str(),
        _ => return Err(bad_value("database-level aggregations other than $changeStream are not supported")),
    };
    let docs = run_pipeline(scan(state, db, coll, &Document::new())?, &pipeline)?;
    let batch = batch_size(cmd)?.unwrap_or(DEFAULT_BATCH_SIZE);
    Ok(open_find_cursor(state, format!("{db}.{coll}"), docs.into(), batch, false))
}

fn open_change_stream(state: &mut State, db: &str, cmd: &Document, options: &Document, rest: &[&Document]) -> Reply {
    let cluster = opt_bool(options, "allChangesForCluster", false);
    let (scope, ns) = match cmd.get("aggregate") {
        Some(Bson::String(coll)) => (Scope::Collection(db.to_string(), coll.clone()), format!("{db}.{coll}")),
        Some(Bson::Int32(1) | Bson::Int64(1) | Bson::Double(1.0)) if cluster => {
            if db != "admin" {
                return Err(bad_value("allChangesForCluster is only valid on the admin database"));
            }
            (Scope::Cluster, "admin.$cmd.aggregate".to_string())
        }
        Some(Bson::Int32(1) | Bson::Int64(1) | Bson::Double(1.0)) => {
            if matches!(db, "admin" | "config" | "local") {
                return Err(CommandError::new(
                    73,
                    "InvalidNamespace",
                    format!("$changeStream may not be opened on the internal {db} database"),
                ));
            }
            (Scope::Database(db.to_string()), format!("{db}.$cmd.aggregate"))
        }
        _ => return Err(bad_value("'aggregate' must be a collection name or 1")),
    };
    let lookup = match options.get("fullDocument") {
        None | Some(Bson::Null) => false,
        Some(Bson::String(mode)) => match mode.as_str() {
            "default" | "whenAvailable" => false,
            "updateLookup" => true,
            other => return Err(bad_value(format!("fullDocument '{other}' is not supported by the test server"))),
        },
        Some(_) => return Err(type_mismatch("fullDocument must be a string")),
    };
    if matches!(options.get("fullDocumentBeforeChange"), Some(Bson::String(s)) if s == "required") {
        return Err(bad_value("pre-images are not supported by the test server"));
    }
    let starts: Vec<&str> = ["resumeAfter", "startAfter", "startAtOperationTime"]
        .into_iter()
        .filter(|k| options.get(k).is_some_and(|v| *v != Bson::Null))
        .collect();
    if starts.len() > 1 {
        return Err(CommandError::new(
            40674,
            "Location40674",
            format!("Only one of {} may be specified", starts.join(", ")),
        ));
    }
    let position = match starts.first().copied() {
        Some("startAtOperationTime") => match options.get("startAtOperationTime") {
            Some(Bson::Timestamp(t)) => state.position_at_time(*t)?,
            _ => return Err(type_mismatch("startAtOperationTime must be a timestamp")),
        },
        Some(field) => {
            let token = Token::parse(options.get(field).unwrap_or(&Bson::Null))?;
            if token.invalidate && field == "resumeAfter" {
                return Err(CommandError::new(
                    260,
                    "InvalidResumeToken",
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.",
                ));
            }
            token.seq
        }
        _ => state.last_seq,
    };
    if position < state.forgotten_through {
        return Err(history_lost());
    }
    let mut match_stages = Vec::new();
    for stage in rest {
        // Later stages filter or reshape events; $match is applied, reshaping is left to the reader.
        if let Some(Bson::Document(filter)) = stage.get("$match") {
            match_stages.push(filter.clone());
        }
    }
    let mut cursor = ChangeCursor { ns: ns.clone(), scope, position, lookup, matches: match_stages };
    let limit = batch_size(cmd)?.unwrap_or(DEFAULT_BATCH_SIZE);
    let (batch, invalidated) = state.change_batch(&mut cursor, limit)?;
    Ok(change_reply(state, cursor, batch, invalidated, None))
}

/// The reply to an aggregate (`existing` None) or a getMore on a change stream; the cursor is kept (under its
/// id) unless invalidated.
fn change_reply(
    state: &mut State,
    cursor: ChangeCursor,
    batch: Vec<Document>,
    invalidated: bool,
    existing: Option<i64>,
) -> Document {
    let token = match batch.last() {
        // After an invalidate, resuming must start from the invalidate itself.
        Some(last) if invalidated => last.get_document("_id").cloned().unwrap_or_default(),
        _ => Token { seq: cursor.position, invalidate: false }.to_bson(),
    };
    let ns = cursor.ns.clone();
    let id = match existing {
        _ if invalidated => 0,
        Some(id) => {
            state.cursors.insert(id, Cursor::Change(cursor));
            id
        }
        None => state.register_cursor(Cursor::Change(cursor)),
    };
    cursor_reply(id, &ns, existing.is_none(), batch, Some(token))
}

async fn get_more(shared: &Shared, db: &str, cmd: &Document) -> Reply {
    let id = match cmd.get("getMore") {
        Some(Bson::Int64(id)) => *id,
        _ => return Err(type_mismatch("getMore must be a long")),
    };
    let coll = target(cmd, "collection")?;
    let limit = batch_size(cmd)?.filter(|&n| n > 0);
    // Capped so that an absurd maxTimeMS cannot overflow the deadline; no test waits an hour.
    let wait = opt_int(cmd, "maxTimeMS")?
        .map_or(DEFAULT_AWAIT, |ms| Duration::from_millis(ms.max(0) as u64))
        .min(Duration::from_secs(3600));
    let not_found = || CommandError::new(43, "CursorNotFound", format!("cursor id {id} not found"));
    // The cursor is taken out of the table while in use, so a concurrent getMore sees it as missing.
    let cursor = shared.lock().cursors.remove(&id).ok_or_else(not_found)?;
    let mut change = match cursor {
        Cursor::Find { ns, mut remaining } => {
            // listCollections cursors come back as collection "$cmd.listCollections", so this covers them too.
            if ns != format!("{db}.{coll}") {
                shared.lock().cursors.insert(id, Cursor::Find { ns, remaining });
                return Err(CommandError::new(13, "Unauthorized", "getMore namespace does not match the cursor's"));
            }
            let batch: Vec<Document> = remaining.drain(..limit.unwrap_or(usize::MAX).min(remaining.len())).collect();
            let mut state = shared.lock();
            let next = if remaining.is_empty() { 0 } else { id };
            if next != 0 {
                state.cursors.insert(id, Cursor::Find { ns: ns.clone(), remaining });
            }
            return Ok(cursor_reply(next, &ns, false, batch, None));
        }
        Cursor::Change(change) => change,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut log_seq = shared.log_seq.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        {
            let mut state = shared.lock();
            let (batch, invalidated) = state.change_batch(&mut change, limit.unwrap_or(DEFAULT_BATCH_SIZE))?;
            if !batch.is_empty() || invalidated || tokio::time::Instant::now() >= deadline {
                return Ok(change_reply(&mut state, change, batch, invalidated, Some(id)));
            }
        }
        tokio::select! {
            _ = log_seq.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|s| *s) => return Err(CommandError::new(91, "ShutdownInProgress", "the test server is shutting down")),
        }
    }
}

fn kill_cursors(state: &mut State, cmd: &Document) -> Reply {
    let ids = cmd.get_array("cursors").map_err(|_| type_mismatch("cursors must be an array"))?;
    let (mut killed, mut not_found) = (Vec::new(), Vec::new());
    for id in ids {
        let Bson::Int64(id) = id else { return Err(type_mismatch("cursor ids must be longs")) };
        if state.cursors.remove(id).is_some() {
            killed.push(*id);
        } else {
            not_found.push(*id);
        }
    }
    Ok(doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": Vec::<i64>::new(),
        "cursorsUnknown": Vec::<i64>::new(),
    })
}

/// The reply to insert and delete: how many documents, and the per-document errors.
fn write_reply(n: i32, errors: Vec<Document>) -> Document {
    let mut reply = doc! { "n": n };
    if !errors.is_empty() {
        reply.insert("writeErrors", errors);
    }
    reply
}
