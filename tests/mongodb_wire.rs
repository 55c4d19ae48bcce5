//! The MongoDB wire-protocol test server driven through the official `mongodb` driver: every test compares
//! what the driver gets back (documents, counts, change events, errors) with what a real server returns.

mod mongo_server;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{doc, Bson, Document, Timestamp};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::{ClientOptions, FullDocumentType};
use mongodb::{Client, Collection, Database};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mongo_server::MongoTestServer;

type Events = ChangeStream<ChangeStreamEvent<Document>>;
/// Commands a client started: (command name, command document with document sequences merged in).
type CommandLog = Arc<Mutex<Vec<(String, Document)>>>;

/// How long a test waits for an event it expects before failing.
const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn client(server: &MongoTestServer) -> Client {
    client_with_log(server, None).await
}

/// A client whose started commands (name and command document) are appended to `log`.
async fn client_with_log(server: &MongoTestServer, log: Option<CommandLog>) -> Client {
    let mut options = ClientOptions::parse(server.uri("app")).await.expect("parse the server's URI");
    // Fail fast instead of the driver's 30 s default if the handshake is ever broken.
    options.server_selection_timeout = Some(Duration::from_secs(5));
    if let Some(log) = log {
        options.command_event_handler = Some(EventHandler::callback(move |event: CommandEvent| {
            if let CommandEvent::Started(started) = event {
                log.lock().unwrap().push((started.command_name, started.command));
            }
        }));
    }
    Client::with_options(options).expect("client")
}

/// The names of the commands logged since the log was last drained.
fn drain_names(log: &CommandLog) -> Vec<String> {
    log.lock().unwrap().drain(..).map(|(name, _)| name).collect()
}

async fn setup() -> (MongoTestServer, Client, Database) {
    let server = MongoTestServer::start();
    let client = client(&server).await;
    let db = client.database("app");
    (server, client, db)
}

/// The next change event, failing the test if none arrives within [`EVENT_WAIT`].
async fn next_event(stream: &mut Events) -> ChangeStreamEvent<Document> {
    tokio::time::timeout(EVENT_WAIT, stream.next())
        .await
        .expect("timed out waiting for a change event")
        .expect("change stream ended")
        .expect("change stream error")
}

/// Asserts that the server has no further event for `stream` (one getMore, bounded by its maxAwaitTime).
async fn assert_no_more_events(stream: &mut Events) {
    let extra = stream.next_if_any().await.expect("getMore");
    assert!(extra.is_none(), "unexpected extra event: {extra:?}");
}

fn ns_of(event: &ChangeStreamEvent<Document>) -> (String, Option<String>) {
    let ns = event.ns.as_ref().expect("event has ns");
    (ns.db.clone(), ns.coll.clone())
}

fn key_of(event: &ChangeStreamEvent<Document>) -> Bson {
    event.document_key.as_ref().and_then(|k| k.get("_id")).cloned().expect("event has documentKey._id")
}

fn command_error(err: &mongodb::error::Error) -> (i32, String) {
    match &*err.kind {
        ErrorKind::Command(e) => (e.code, e.code_name.clone()),
        other => panic!("expected a command error, got {other:?}"),
    }
}

async fn all(coll: &Collection<Document>, filter: Document) -> Vec<Document> {
    coll.find(filter).sort(doc! { "_id": 1 }).await.expect("find").try_collect().await.expect("read cursor")
}

#[tokio::test]
async fn crud_round_trips_through_the_driver() {
    let server = MongoTestServer::start();
    let log = Arc::new(Mutex::new(Vec::new()));
    let client = client_with_log(&server, Some(log.clone())).await;
    let db = client.database("app");
    let items = db.collection::<Document>("items");

    let one = items.insert_one(doc! { "_id": 1, "name": "one", "tags": ["a", "b"] }).await.unwrap();
    assert_eq!(one.inserted_id, Bson::Int32(1));
    let docs: Vec<Document> = (2..=7).map(|i| doc! { "_id": i, "name": format!("n{i}"), "even": i % 2 == 0 }).collect();
    let many = items.insert_many(docs).await.unwrap();
    assert_eq!(many.inserted_ids.len(), 6);
    // The driver sends inserts with the documents in an OP_MSG kind-1 sequence (shown merged here).
    let sent = log.lock().unwrap().drain(..).collect::<Vec<_>>();
    assert_eq!(sent.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), vec!["insert", "insert"]);
    assert_eq!(sent[1].1.get_array("documents").map(Vec::len), Ok(6));
    // The driver adds an ObjectId _id itself when the document has none.
    let generated = items.insert_one(doc! { "name": "no id" }).await.unwrap();
    assert!(matches!(generated.inserted_id, Bson::ObjectId(_)));
    items.delete_one(doc! { "name": "no id" }).await.unwrap();

    // A batch size of 2 makes the driver page through getMore; every document comes back once.
    let ids: Vec<Bson> = items
        .find(doc! {})
        .batch_size(2)
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.get("_id").cloned().unwrap())
        .collect();
    assert_eq!(ids, (1..=7).map(Bson::Int32).collect::<Vec<_>>());
    // 7 documents in batches of 2: the first from find, then three getMores, the last closing the cursor.
    assert_eq!(drain_names(&log), vec!["insert", "delete", "find", "getMore", "getMore", "getMore"]);

    let by_id = items.find_one(doc! { "_id": 4 }).await.unwrap();
    assert_eq!(by_id, Some(doc! { "_id": 4, "name": "n4", "even": true }));
    let even: Vec<Bson> =
        all(&items, doc! { "even": true }).await.into_iter().map(|d| d.get("_id").cloned().unwrap()).collect();
    assert_eq!(even, vec![Bson::Int32(2), Bson::Int32(4), Bson::Int32(6)]);
    // Equality on an array field matches an element, as on the real server.
    assert_eq!(all(&items, doc! { "tags": "b" }).await.len(), 1);
    let sorted = items.find(doc! { "_id": { "$gte": 5 } }).sort(doc! { "_id": -1 }).limit(2).await.unwrap();
    let sorted: Vec<Document> = sorted.try_collect().await.unwrap();
    assert_eq!(sorted.iter().map(|d| d.get_i32("_id").unwrap()).collect::<Vec<_>>(), vec![7, 6]);

    db.collection::<Document>("other").insert_one(doc! { "x": 1 }).await.unwrap();
    let mut names = db.list_collection_names().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["items", "other"]);
    assert_eq!(items.count_documents(doc! { "even": false }).await.unwrap(), 3);
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 7);
    assert_eq!(items.estimated_document_count().await.unwrap(), 7);

    let updated = items
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "address.city": "Oslo", "name": "uno" }, "$unset": { "tags": "" }, "$inc": { "visits": 2 } })
        .await
        .unwrap();
    assert_eq!((updated.matched_count, updated.modified_count), (1, 1));
    items.update_one(doc! { "_id": 1 }, doc! { "$inc": { "visits": 3 } }).await.unwrap();
    assert_eq!(
        items.find_one(doc! { "_id": 1 }).await.unwrap(),
        Some(doc! { "_id": 1, "name": "uno", "address": { "city": "Oslo" }, "visits": 5 })
    );
    // Setting a value it already has changes nothing, and the server says so.
    let noop = items.update_one(doc! { "_id": 1 }, doc! { "$set": { "name": "uno" } }).await.unwrap();
    assert_eq!((noop.matched_count, noop.modified_count), (1, 0));
    let missing = items.update_one(doc! { "_id": 99 }, doc! { "$set": { "a": 1 } }).await.unwrap();
    assert_eq!((missing.matched_count, missing.modified_count, missing.upserted_id), (0, 0, None));
    let upsert = items.update_one(doc! { "_id": 99 }, doc! { "$set": { "a": 1 } }).upsert(true).await.unwrap();
    assert_eq!(upsert.upserted_id, Some(Bson::Int32(99)));
    assert_eq!(items.find_one(doc! { "_id": 99 }).await.unwrap(), Some(doc! { "_id": 99, "a": 1 }));

    let replaced = items.replace_one(doc! { "_id": 2 }, doc! { "name": "two", "v": 2 }).await.unwrap();
    assert_eq!(replaced.modified_count, 1);
    assert_eq!(items.find_one(doc! { "_id": 2 }).await.unwrap(), Some(doc! { "_id": 2, "name": "two", "v": 2 }));
    let many_updated = items.update_many(doc! { "even": true }, doc! { "$set": { "flag": 1 } }).await.unwrap();
    assert_eq!(many_updated.modified_count, 2); // _id 2 lost its "even" field to the replacement

    assert_eq!(items.delete_one(doc! { "_id": 3 }).await.unwrap().deleted_count, 1);
    assert_eq!(items.delete_one(doc! { "_id": 3 }).await.unwrap().deleted_count, 0);
    assert_eq!(items.delete_many(doc! { "even": { "$exists": true } }).await.unwrap().deleted_count, 4);
    let left: Vec<Bson> = all(&items, doc! {}).await.into_iter().map(|d| d.get("_id").cloned().unwrap()).collect();
    assert_eq!(left, vec![Bson::Int32(1), Bson::Int32(2), Bson::Int32(99)]);

    // A duplicate _id is a write error with the real code, and the server keeps the first document.
    let dup = items.insert_one(doc! { "_id": 1, "name": "again" }).await.unwrap_err();
    match &*dup.kind {
        ErrorKind::Write(WriteFailure::WriteError(e)) => assert_eq!(e.code, 11000),
        other => panic!("expected a duplicate key write error, got {other:?}"),
    }
    assert_eq!(items.find_one(doc! { "_id": 1 }).await.unwrap().unwrap().get_str("name").unwrap(), "uno");
    // Changing _id through an update is refused like on the real server.
    let immutable = items.update_one(doc! { "_id": 1 }, doc! { "$set": { "_id": 5 } }).await.unwrap_err();
    match &*immutable.kind {
        ErrorKind::Write(WriteFailure::WriteError(e)) => assert_eq!(e.code, 66),
        other => panic!("expected an ImmutableField write error, got {other:?}"),
    }

    items.drop().await.unwrap();
    assert_eq!(db.list_collection_names().await.unwrap(), vec!["other"]);
    assert_eq!(items.estimated_document_count().await.unwrap(), 0);

    let unknown = db.run_command(doc! { "frobnicate": 1 }).await.unwrap_err();
    assert_eq!(command_error(&unknown), (59, "CommandNotFound".to_string()));
}

#[tokio::test]
async fn change_stream_opened_before_writes_sees_them_in_order() {
    let (_server, _client, db) = setup().await;
    let people = db.collection::<Document>("people");
    let mut stream = db.watch().full_document(FullDocumentType::UpdateLookup).await.unwrap();

    people
        .insert_one(doc! { "_id": 1, "name": "Ada", "address": { "city": "London", "zip": "N1" }, "n": 1 })
        .await
        .unwrap();
    people
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "address.city": "Paris" }, "$unset": { "address.zip": "" }, "$inc": { "n": 1 } },
        )
        .await
        .unwrap();

    let insert = next_event(&mut stream).await;
    assert_eq!(insert.operation_type, OperationType::Insert);
    assert_eq!(ns_of(&insert), ("app".to_string(), Some("people".to_string())));
    assert_eq!(key_of(&insert), Bson::Int32(1));
    assert_eq!(
        insert.full_document,
        Some(doc! { "_id": 1, "name": "Ada", "address": { "city": "London", "zip": "N1" }, "n": 1 })
    );
    assert!(insert.cluster_time.is_some() && insert.wall_time.is_some());

    let update = next_event(&mut stream).await;
    assert_eq!(update.operation_type, OperationType::Update);
    assert_eq!(key_of(&update), Bson::Int32(1));
    let description = update.update_description.as_ref().expect("updateDescription");
    assert_eq!(description.updated_fields, doc! { "address.city": "Paris", "n": 2 });
    assert_eq!(description.removed_fields, vec!["address.zip".to_string()]);
    // updateLookup: the document as it is after the update.
    assert_eq!(update.full_document, Some(doc! { "_id": 1, "name": "Ada", "address": { "city": "Paris" }, "n": 2 }));
    assert!(update.cluster_time > insert.cluster_time);

    people.replace_one(doc! { "_id": 1 }, doc! { "name": "Ada L." }).await.unwrap();
    people.insert_one(doc! { "_id": 2, "name": "Bob" }).await.unwrap();
    people.update_one(doc! { "_id": 2 }, doc! { "$set": { "name": "Robert" } }).await.unwrap();
    people.delete_one(doc! { "_id": 2 }).await.unwrap();

    let replace = next_event(&mut stream).await;
    assert_eq!(replace.operation_type, OperationType::Replace);
    assert_eq!(replace.full_document, Some(doc! { "_id": 1, "name": "Ada L." }));
    assert_eq!(key_of(&replace), Bson::Int32(1));
    assert_eq!(next_event(&mut stream).await.operation_type, OperationType::Insert);
    let gone = next_event(&mut stream).await;
    assert_eq!(gone.operation_type, OperationType::Update);
    // The lookup happens when the event is read: the document was deleted since, so there is none.
    assert_eq!(gone.full_document, None);
    assert_eq!(gone.update_description.unwrap().updated_fields, doc! { "name": "Robert" });
    let delete = next_event(&mut stream).await;
    assert_eq!(delete.operation_type, OperationType::Delete);
    assert_eq!(key_of(&delete), Bson::Int32(2));
    assert_eq!(ns_of(&delete), ("app".to_string(), Some("people".to_string())));
    assert_eq!(delete.full_document, None);

    // A stream on one collection sees only that collection, with the default fullDocument (no lookup).
    let mut only_people = people.watch().max_await_time(Duration::from_millis(200)).await.unwrap();
    db.collection::<Document>("elsewhere").insert_one(doc! { "_id": 1 }).await.unwrap();
    people.update_one(doc! { "_id": 1 }, doc! { "$set": { "x": 1 } }).await.unwrap();
    let update = next_event(&mut only_people).await;
    assert_eq!((update.operation_type, update.full_document), (OperationType::Update, None));
    assert_no_more_events(&mut only_people).await;
}

#[tokio::test]
async fn resuming_after_a_token_returns_exactly_the_later_events() {
    let (_server, _client, db) = setup().await;
    let items = db.collection::<Document>("items");
    let mut stream = db.watch().max_await_time(Duration::from_millis(200)).await.unwrap();
    items.insert_many((1..=5).map(|i| doc! { "_id": i })).await.unwrap();
    assert_eq!(key_of(&next_event(&mut stream).await), Bson::Int32(1));
    assert_eq!(key_of(&next_event(&mut stream).await), Bson::Int32(2));
    // Mid-batch, the stream's token is that of the last event handed out.
    let token = stream.resume_token().expect("resume token");
    drop(stream);
    items.insert_many((6..=7).map(|i| doc! { "_id": i })).await.unwrap();

    let mut resumed = db.watch().resume_after(token.clone()).max_await_time(Duration::from_millis(200)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 3..=7 {
        seen.push(key_of(&next_event(&mut resumed).await));
    }
    assert_eq!(seen, (3..=7).map(Bson::Int32).collect::<Vec<_>>());
    assert_no_more_events(&mut resumed).await;

    // Once caught up, the token is the postBatchResumeToken: resuming from it yields only newer writes.
    let caught_up = resumed.resume_token().expect("post-batch resume token");
    assert_ne!(caught_up, token);
    drop(resumed);
    items.delete_one(doc! { "_id": 7 }).await.unwrap();
    let mut again = db.watch().resume_after(caught_up).max_await_time(Duration::from_millis(200)).await.unwrap();
    let delete = next_event(&mut again).await;
    assert_eq!((delete.operation_type.clone(), key_of(&delete)), (OperationType::Delete, Bson::Int32(7)));
    assert_no_more_events(&mut again).await;

    let bad = db.watch().resume_after(serde_token("not a token")).await.unwrap_err();
    assert_eq!(command_error(&bad).0, 260);
}

/// A token built by hand, as a client that stored a corrupted one would send it.
fn serde_token(data: &str) -> ResumeToken {
    bson::from_bson(Bson::Document(doc! { "_data": data })).expect("token from BSON")
}

#[tokio::test]
async fn start_at_operation_time_includes_the_event_at_that_time() {
    let (_server, _client, db) = setup().await;
    let items = db.collection::<Document>("items");
    let mut stream = db.watch().await.unwrap();
    items.insert_many((1..=3).map(|i| doc! { "_id": i })).await.unwrap();
    let _first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    let at: Timestamp = second.cluster_time.expect("clusterTime");

    let mut from_time =
        db.watch().start_at_operation_time(at).max_await_time(Duration::from_millis(200)).await.unwrap();
    assert_eq!(key_of(&next_event(&mut from_time).await), Bson::Int32(2));
    assert_eq!(key_of(&next_event(&mut from_time).await), Bson::Int32(3));
    assert_no_more_events(&mut from_time).await;
}

#[tokio::test]
async fn drop_and_rename_produce_events_and_invalidate_collection_streams() {
    let (_server, client, db) = setup().await;
    let a = db.collection::<Document>("a");
    a.insert_one(doc! { "_id": 1 }).await.unwrap();
    let mut on_db = db.watch().max_await_time(Duration::from_millis(200)).await.unwrap();
    let mut on_a = a.watch().await.unwrap();

    a.insert_one(doc! { "_id": 2 }).await.unwrap();
    client.database("admin").run_command(doc! { "renameCollection": "app.a", "to": "app.b" }).await.unwrap();
    let mut names = db.list_collection_names().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["b"]);
    let b = db.collection::<Document>("b");
    assert_eq!(b.count_documents(doc! {}).await.unwrap(), 2);

    assert_eq!(next_event(&mut on_a).await.operation_type, OperationType::Insert);
    let rename = next_event(&mut on_a).await;
    assert_eq!(rename.operation_type, OperationType::Rename);
    assert_eq!(ns_of(&rename), ("app".to_string(), Some("a".to_string())));
    let to = rename.to.as_ref().expect("rename event has 'to'");
    assert_eq!((to.db.as_str(), to.coll.as_deref()), ("app", Some("b")));
    let invalidate = next_event(&mut on_a).await;
    assert_eq!(invalidate.operation_type, OperationType::Invalidate);
    // After an invalidate the server closes the cursor and the stream ends.
    assert!(tokio::time::timeout(EVENT_WAIT, on_a.next()).await.unwrap().is_none());
    assert!(!on_a.is_alive());

    // Resuming after an invalidate is refused; starting after it is how a client carries on.
    let err = a.watch().resume_after(invalidate.id.clone()).await.unwrap_err();
    assert_eq!(command_error(&err).0, 260);
    let mut after =
        a.watch().start_after(invalidate.id.clone()).max_await_time(Duration::from_millis(200)).await.unwrap();
    a.insert_one(doc! { "_id": 10 }).await.unwrap();
    assert_eq!(key_of(&next_event(&mut after).await), Bson::Int32(10));
    assert_no_more_events(&mut after).await;

    let mut on_b = b.watch().await.unwrap();
    b.drop().await.unwrap();
    let dropped = next_event(&mut on_b).await;
    assert_eq!(
        (dropped.operation_type.clone(), ns_of(&dropped)),
        (OperationType::Drop, ("app".to_string(), Some("b".to_string())))
    );
    assert_eq!(next_event(&mut on_b).await.operation_type, OperationType::Invalidate);

    // The database stream sees all of it, and a collection drop does not invalidate it.
    let kinds: Vec<(OperationType, Option<String>)> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            let e = next_event(&mut on_db).await;
            out.push((e.operation_type.clone(), ns_of(&e).1));
        }
        out
    };
    assert_eq!(
        kinds,
        vec![
            (OperationType::Insert, Some("a".to_string())),
            (OperationType::Rename, Some("a".to_string())),
            (OperationType::Insert, Some("a".to_string())),
            (OperationType::Drop, Some("b".to_string())),
        ]
    );
    assert_no_more_events(&mut on_db).await;
    assert!(on_db.is_alive());

    // Dropping the database ends database streams: drop per collection, dropDatabase, invalidate.
    db.drop().await.unwrap();
    let ends: Vec<OperationType> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(next_event(&mut on_db).await.operation_type);
        }
        out
    };
    assert_eq!(ends, vec![OperationType::Drop, OperationType::DropDatabase, OperationType::Invalidate]);
}

#[tokio::test]
async fn resuming_from_forgotten_history_fails_with_history_lost() {
    let (server, _client, db) = setup().await;
    let items = db.collection::<Document>("items");
    let mut stream = db.watch().await.unwrap();
    items.insert_many((1..=3).map(|i| doc! { "_id": i })).await.unwrap();
    let first = next_event(&mut stream).await;
    drop(stream);

    server.forget_history_before_now();
    let err = db.watch().resume_after(first.id.clone()).await.unwrap_err();
    assert_eq!(command_error(&err), (286, "ChangeStreamHistoryLost".to_string()));
    let err = db.watch().start_at_operation_time(first.cluster_time.unwrap()).await.unwrap_err();
    assert_eq!(command_error(&err), (286, "ChangeStreamHistoryLost".to_string()));

    // A new stream starts at the present and works as before.
    let mut fresh = db.watch().await.unwrap();
    items.insert_one(doc! { "_id": 4 }).await.unwrap();
    assert_eq!(key_of(&next_event(&mut fresh).await), Bson::Int32(4));
}

/// Builds a raw OP_MSG with one kind-0 section.
fn op_msg(request_id: i32, body: &Document) -> Vec<u8> {
    let mut doc = Vec::new();
    body.to_writer(&mut doc).unwrap();
    let mut msg = Vec::new();
    msg.extend_from_slice(&((16 + 4 + 1 + doc.len()) as i32).to_le_bytes());
    msg.extend_from_slice(&request_id.to_le_bytes());
    msg.extend_from_slice(&0i32.to_le_bytes());
    msg.extend_from_slice(&2013i32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.push(0);
    msg.extend_from_slice(&doc);
    msg
}

/// Reads one reply and returns (opCode, responseTo, the reply document).
async fn read_reply(stream: &mut tokio::net::TcpStream) -> (i32, i32, Document) {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).await.unwrap();
    let len = i32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    let response_to = i32::from_le_bytes(header[8..12].try_into().unwrap());
    let op = i32::from_le_bytes(header[12..16].try_into().unwrap());
    let mut body = vec![0u8; len - 16];
    stream.read_exact(&mut body).await.unwrap();
    // OP_MSG: flags + kind byte; OP_REPLY: flags, cursor id, starting from, number returned.
    let skip = if op == 2013 { 5 } else { 20 };
    (op, response_to, Document::from_reader(&body[skip..]).unwrap())
}

#[tokio::test]
async fn legacy_handshake_and_malformed_messages() {
    let server = MongoTestServer::start();
    let addr = format!("127.0.0.1:{}", server.port());

    // OP_QUERY isMaster on admin.$cmd gets an OP_REPLY, as legacy drivers expect.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut query = Vec::new();
    doc! { "isMaster": 1, "helloOk": true }.to_writer(&mut query).unwrap();
    let mut body = 0i32.to_le_bytes().to_vec();
    body.extend_from_slice(b"admin.$cmd\0");
    body.extend_from_slice(&0i32.to_le_bytes());
    body.extend_from_slice(&(-1i32).to_le_bytes());
    body.extend_from_slice(&query);
    let mut msg = ((16 + body.len()) as i32).to_le_bytes().to_vec();
    msg.extend_from_slice(&7i32.to_le_bytes());
    msg.extend_from_slice(&0i32.to_le_bytes());
    msg.extend_from_slice(&2004i32.to_le_bytes());
    msg.extend_from_slice(&body);
    conn.write_all(&msg).await.unwrap();
    let (op, response_to, reply) = read_reply(&mut conn).await;
    assert_eq!((op, response_to), (1, 7));
    assert_eq!(reply.get_bool("ismaster"), Ok(true));
    assert_eq!(reply.get_str("setName"), Ok("rs0"));
    assert!(!reply.contains_key("compression"));

    // A well-framed OP_MSG whose document is garbage gets an error reply; the connection stays usable.
    let mut broken = op_msg(8, &doc! { "ping": 1, "$db": "admin" });
    broken[16 + 4 + 1 + 4] = 0x55; // the first element's type byte: no such BSON type
    conn.write_all(&broken).await.unwrap();
    let (_, response_to, reply) = read_reply(&mut conn).await;
    assert_eq!((response_to, reply.get_f64("ok")), (8, Ok(0.0)));
    conn.write_all(&op_msg(9, &doc! { "ping": 1, "$db": "admin" })).await.unwrap();
    let (op, response_to, reply) = read_reply(&mut conn).await;
    assert_eq!((op, response_to, reply.get_f64("ok")), (2013, 9, Ok(1.0)));

    // Framed correctly but malformed inside: each gets an error reply, never a crash or a hang.
    let malformed: [&[u8]; 5] = [
        &[0, 0, 0, 0],                                  // flags and no section at all
        &[0, 0, 0, 0, 9, 1, 2, 3],                      // unknown section kind
        &[0, 0, 0, 0, 1, 0xe8, 0x03, 0, 0, b'x', 0],    // kind-1 section longer than the message
        &[1, 0, 0, 0],                                  // checksum flag without room for a checksum
        &[0, 0, 0, 0, 0, 0xfb, 0xff, 0xff, 0xff, 0, 0], // negative document length
    ];
    for (i, body) in malformed.iter().enumerate() {
        let request_id = 100 + i as i32;
        let mut msg = ((16 + body.len()) as i32).to_le_bytes().to_vec();
        msg.extend_from_slice(&request_id.to_le_bytes());
        msg.extend_from_slice(&0i32.to_le_bytes());
        msg.extend_from_slice(&2013i32.to_le_bytes());
        msg.extend_from_slice(body);
        conn.write_all(&msg).await.unwrap();
        let (_, response_to, reply) = read_reply(&mut conn).await;
        assert_eq!((response_to, reply.get_f64("ok")), (request_id, Ok(0.0)), "case {i}: {reply}");
    }
    conn.write_all(&op_msg(10, &doc! { "ping": 1, "$db": "admin" })).await.unwrap();
    assert_eq!(read_reply(&mut conn).await.2.get_f64("ok"), Ok(1.0));

    // A header with an impossible length closes that connection only.
    let mut bad = tokio::net::TcpStream::connect(&addr).await.unwrap();
    bad.write_all(&[3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xd5, 0x07, 0, 0]).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(EVENT_WAIT, bad.read(&mut buf)).await.expect("server closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)));

    let client = client(&server).await;
    client.database("admin").run_command(doc! { "ping": 1 }).await.unwrap();
    let build = client.database("admin").run_command(doc! { "buildInfo": 1 }).await.unwrap();
    assert_eq!(build.get_str("version"), Ok("7.0.0"));
}

#[tokio::test]
async fn cluster_stream_sees_every_database() {
    let (_server, client, db) = setup().await;
    let mut everything = client.watch().max_await_time(Duration::from_millis(200)).await.unwrap();
    db.collection::<Document>("x").insert_one(doc! { "_id": 1 }).await.unwrap();
    client.database("other").collection::<Document>("y").insert_one(doc! { "_id": 2 }).await.unwrap();
    let first = next_event(&mut everything).await;
    let second = next_event(&mut everything).await;
    assert_eq!(ns_of(&first), ("app".to_string(), Some("x".to_string())));
    assert_eq!(ns_of(&second), ("other".to_string(), Some("y".to_string())));
    assert_no_more_events(&mut everything).await;
    let mut names = client.list_database_names().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["app", "other"]);
}

#[tokio::test]
async fn dropping_the_server_closes_its_connections() {
    let server = MongoTestServer::start();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.unwrap();
    conn.write_all(&op_msg(1, &doc! { "ping": 1, "$db": "admin" })).await.unwrap();
    assert_eq!(read_reply(&mut conn).await.2.get_f64("ok"), Ok(1.0));
    drop(server);
    // Drop has joined the server thread, so the socket is already closed: the read sees end of stream.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(EVENT_WAIT, conn.read(&mut buf)).await.expect("connection closed");
    assert!(matches!(read, Ok(0) | Err(_)));
}
