//! The database's change stream → [`Event`]s: each change event is one source transaction, ordered and
//! checkpointed by its resume token.
//!
//! insert, replace and update become upserts of the post-image (`fullDocument: updateLookup`: the
//! document as it is when the event is read; a later event brings any later state, and an update whose
//! document is gone is followed by its delete, so it is skipped). delete deletes by `_id`. Before the
//! first change to a collection in this run, and before each change that needs a new column or a
//! column turned jsonb, the table's columns go out as a `Relation`. drop, rename, dropDatabase and
//! invalidate stop the pipeline: the target cannot follow them by itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bson::Document;
use futures_util::StreamExt;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::options::FullDocumentType;

use super::mapping::{id_text, Shape};
use super::{classify, error_code, position_token, token_position};
use crate::change::{Change, Event, TableName, TableSchema, Value};
use crate::config::{ConnUrl, TableFilter};
use crate::position::Position;
use crate::retry::ConnectionLost;
use crate::source::ChangeStream;

/// MongoDB's `ChangeStreamHistoryLost`: the oplog no longer reaches back to the resume token.
const HISTORY_LOST: i32 = 286;

/// The change stream of one database, as the pipeline reads it.
pub struct MongoChangeStream {
    stream: mongodb::change_stream::ChangeStream<ChangeStreamEvent<Document>>,
    database: String,
    url: ConnUrl,
    filter: TableFilter,
    shapes: HashMap<String, Shape>,
    /// The columns last sent to the sink per collection, in this run.
    announced: HashMap<String, Arc<TableSchema>>,
    /// Events of the change being handed out.
    pending: VecDeque<Event>,
    /// The last position handed out, for error messages.
    last: Position,
}

impl MongoChangeStream {
    /// Opens the stream after `from` (a resume token).
    pub async fn open(
        db: &mongodb::Database,
        url: &ConnUrl,
        shapes: HashMap<String, Shape>,
        filter: TableFilter,
        from: &Position,
    ) -> anyhow::Result<MongoChangeStream> {
        let token = position_token(from)?;
        let stream = db
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(token)
            .await
            .map_err(|e| stream_error(e, url, from))?;
        Ok(MongoChangeStream {
            stream,
            database: db.name().to_string(),
            url: url.clone(),
            filter,
            shapes,
            announced: HashMap::new(),
            pending: VecDeque::new(),
            last: from.clone(),
        })
    }

    fn selected(&self, coll: &str) -> bool {
        !coll.starts_with("system.") && self.filter.includes(&format!("{}.{coll}", self.database))
    }

    /// One change event → `Begin`, its changes, `Commit` (queued in `pending`).
    fn translate(&mut self, event: ChangeStreamEvent<Document>) -> anyhow::Result<()> {
        let position = token_position(&event.id)?;
        let commit_time = match (event.wall_time, event.cluster_time) {
            (Some(wall), _) => wall.to_system_time(),
            (None, Some(cluster)) => UNIX_EPOCH + Duration::from_secs(u64::from(cluster.time)),
            (None, None) => SystemTime::now(),
        };
        let db = &self.database;
        let coll = event.ns.as_ref().and_then(|ns| ns.coll.clone()).unwrap_or_default();
        let stop = |what: String| {
            anyhow::anyhow!(
                "{what} at {position}: cutover stopped there (the target has every change before it). \
                 The target cannot follow this by itself: exclude the collection in [source] exclude and run \
                 again, or take a new snapshot (delete the [state] dir and the target's tables in schema {db}, \
                 then run again)"
            )
        };
        let changes = match event.operation_type {
            OperationType::Insert | OperationType::Replace | OperationType::Update => {
                match (self.selected(&coll), event.full_document) {
                    (false, _) | (true, None) => Vec::new(),
                    (true, Some(document)) => self.upsert(&coll, document, &position)?,
                }
            }
            OperationType::Delete if self.selected(&coll) => {
                let id = event.document_key.as_ref().and_then(|key| key.get("_id")).ok_or_else(|| {
                    anyhow::anyhow!("a delete event on {db}.{coll} at {position} has no documentKey._id")
                })?;
                let (mut changes, table) = self.table(&coll, false)?;
                let mut old = vec![Value::Null; table.columns.len()];
                old[0] = Value::Text(id_text(id));
                changes.push(Change::Delete { table, old });
                changes
            }
            OperationType::Drop if self.selected(&coll) => {
                return Err(stop(format!("collection {db}.{coll} was dropped")))
            }
            OperationType::Rename if self.selected(&coll) => {
                let to = event
                    .to
                    .as_ref()
                    .map_or_else(String::new, |to| format!(" to {}.{}", to.db, to.coll.as_deref().unwrap_or_default()));
                return Err(stop(format!("collection {db}.{coll} was renamed{to}")));
            }
            OperationType::DropDatabase => return Err(stop(format!("database {db} was dropped"))),
            OperationType::Invalidate => {
                return Err(stop(format!("the change stream on {db} was invalidated (a drop or rename)")))
            }
            // Other collections, and event types only shown on request (createIndexes, …).
            _ => Vec::new(),
        };
        self.pending.push_back(Event::Begin { position: position.clone(), commit_time });
        self.pending.extend(changes.into_iter().map(Event::Change));
        self.pending.push_back(Event::Commit { position: position.clone(), commit_time });
        self.last = position;
        Ok(())
    }

    /// The changes that upsert `document`: a `Relation` first when its table needs new columns.
    fn upsert(&mut self, coll: &str, document: Document, position: &Position) -> anyhow::Result<Vec<Change>> {
        let db = &self.database;
        let described = |e: &dyn std::fmt::Display| {
            let id = document.get("_id").map_or_else(|| "none".into(), id_text);
            anyhow::anyhow!("collection {db}.{coll}, document _id {id}, at {position}: {e}")
        };
        let shape = self.shapes.get_mut(coll).ok_or_else(|| new_collection(db, coll))?;
        let widened = shape.observe(&document).map_err(|e| described(&e))?;
        let (row, _) = shape.row(&document).map_err(|e| described(&e))?;
        let (mut changes, table) = self.table(coll, widened)?;
        let row = row.into_iter().map(|v| v.map_or(Value::Null, Value::Text)).collect();
        changes.push(Change::Insert { table, row });
        Ok(changes)
    }

    /// The collection's table as the sink knows it, with the `Relation` that tells it first (first sight
    /// in this run, or columns `changed`).
    fn table(&mut self, coll: &str, changed: bool) -> anyhow::Result<(Vec<Change>, Arc<TableSchema>)> {
        if let (false, Some(table)) = (changed, self.announced.get(coll)) {
            return Ok((Vec::new(), table.clone()));
        }
        let shape = self.shapes.get(coll).ok_or_else(|| new_collection(&self.database, coll))?;
        let table = Arc::new(shape.table_schema(TableName::new(&self.database, coll)));
        self.announced.insert(coll.to_string(), table.clone());
        Ok((vec![Change::Relation(table.clone())], table))
    }
}

/// A selected collection that was not there at the snapshot: reconnecting copies it (its changes are
/// applied from its own copy position on).
fn new_collection(db: &str, coll: &str) -> anyhow::Error {
    anyhow::Error::new(ConnectionLost(format!(
        "collection {db}.{coll} appeared after the snapshot: reconnecting, which copies it"
    )))
}

/// A change stream error, with what to do when the history is gone.
fn stream_error(error: mongodb::error::Error, url: &ConnUrl, from: &Position) -> anyhow::Error {
    if error_code(&error) == Some(HISTORY_LOST) {
        return anyhow::anyhow!(
            "the change stream on {url} cannot resume after {from}: the oplog no longer holds it \
             (ChangeStreamHistoryLost). A new snapshot is needed: stop cutover, delete the [state] dir and \
             the target's tables for this database, then run again (and size the oplog for the longest pause)"
        );
    }
    classify(error, format!("reading the change stream on {url} after {from}"))
}

#[async_trait::async_trait]
impl ChangeStream for MongoChangeStream {
    async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            match self.stream.next().await {
                Some(Ok(event)) => self.translate(event)?,
                Some(Err(e)) => return Err(stream_error(e, &self.url, &self.last)),
                None => anyhow::bail!("the change stream on {} ended after {}", self.url, self.last),
            }
        }
    }
}
