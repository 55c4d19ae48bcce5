//! The in-memory databases and the ordered change log that change streams read, like an oplog.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bson::{doc, Bson, DateTime, Document, Timestamp};

use super::query::{get_path, matches};
use super::update::UpdateDescription;
use super::CommandError;

/// One collection: documents in natural (insertion) order, plus an `_id` index.
#[derive(Default)]
pub struct Collection {
    records: BTreeMap<u64, Document>,
    by_id: HashMap<Vec<u8>, u64>,
    next_record: u64,
}

/// A hashable key for an `_id` under which `1`, `1i64` and `1.0` are the same value, as in an index.
fn id_key(id: &Bson) -> Vec<u8> {
    match id {
        Bson::Int32(v) => format!("i{v}").into_bytes(),
        Bson::Int64(v) => format!("i{v}").into_bytes(),
        Bson::Double(v) if v.fract() == 0.0 && v.abs() < 9.0e18 => format!("i{}", *v as i64).into_bytes(),
        other => {
            let mut bytes = b"b".to_vec();
            // Serializing a one-field document cannot fail for a value that came out of BSON.
            let _ = doc! { "": other.clone() }.to_writer(&mut bytes);
            bytes
        }
    }
}

impl Collection {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn get_by_id(&self, id: &Bson) -> Option<&Document> {
        self.by_id.get(&id_key(id)).and_then(|r| self.records.get(r))
    }

    /// Inserts a document that already has an `_id`; fails on a duplicate key like a unique index.
    pub fn insert(&mut self, ns: &str, doc: Document) -> Result<(), CommandError> {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        if self.by_id.contains_key(&key) {
            return Err(CommandError::new(
                11000,
                "DuplicateKey",
                format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}"),
            ));
        }
        self.next_record += 1;
        self.by_id.insert(key, self.next_record);
        self.records.insert(self.next_record, doc);
        Ok(())
    }

    /// Record ids of the documents matching `filter`, in natural order; `{_id: v}` uses the index.
    pub fn find_ids(&self, filter: &Document) -> Result<Vec<u64>, CommandError> {
        if filter.len() == 1 {
            if let Some(id) = filter.get("_id").filter(|v| !is_operator_doc(v)) {
                return Ok(self.by_id.get(&id_key(id)).copied().into_iter().collect());
            }
        }
        let mut out = Vec::new();
        for (record, doc) in &self.records {
            if matches(doc, filter)? {
                out.push(*record);
            }
        }
        Ok(out)
    }

    pub fn get(&self, record: u64) -> Option<&Document> {
        self.records.get(&record)
    }

    /// Replaces the document in `record` (same `_id`, so the index does not change).
    pub fn put(&mut self, record: u64, doc: Document) {
        self.records.insert(record, doc);
    }

    pub fn remove(&mut self, record: u64) -> Option<Document> {
        let doc = self.records.remove(&record)?;
        self.by_id.remove(&id_key(doc.get("_id").unwrap_or(&Bson::Null)));
        Some(doc)
    }

    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.records.values()
    }
}

fn is_operator_doc(value: &Bson) -> bool {
    matches!(value, Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')))
}

/// What happened in one change-log entry.
pub enum Change {
    Insert(Document),
    Update { id: Bson, description: UpdateDescription },
    Replace(Document),
    Delete { id: Bson },
    Drop,
    Rename { to_db: String, to_coll: String },
    DropDatabase,
}

/// One change-log entry; `seq` orders entries and is what resume tokens carry.
pub struct LogEntry {
    pub seq: u64,
    pub time: Timestamp,
    pub wall: DateTime,
    pub db: String,
    /// None for database-wide entries (`dropDatabase`).
    pub coll: Option<String>,
    pub change: Change,
}

/// What a change stream watches.
#[derive(Clone, Debug)]
pub enum Scope {
    Cluster,
    Database(String),
    Collection(String, String),
}

/// An open change stream cursor: where it is in the log and how it renders events.
pub struct ChangeCursor {
    pub ns: String,
    pub scope: Scope,
    /// The `seq` of the last log entry this stream has passed (shown or filtered out).
    pub position: u64,
    pub lookup: bool,
    pub matches: Vec<Document>,
}

/// A cursor held between `getMore`s.
pub enum Cursor {
    Find { ns: String, remaining: VecDeque<Document> },
    Change(ChangeCursor),
}

/// A resume token: the log position it resumes after, and whether it is an `invalidate` event's token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Token {
    pub seq: u64,
    pub invalidate: bool,
}

impl Token {
    /// Renders as `{_data: "82<16 hex seq><2 hex kind>"}`: opaque to clients, and string order is log order.
    pub fn to_bson(self) -> Document {
        doc! { "_data": format!("82{:016X}{:02X}", self.seq, u8::from(self.invalidate)) }
    }

    pub fn parse(value: &Bson) -> Result<Token, CommandError> {
        let invalid = || CommandError::new(260, "InvalidResumeToken", format!("malformed resume token: {value}"));
        let data = match value {
            Bson::Document(d) => d.get_str("_data").map_err(|_| invalid())?,
            _ => return Err(invalid()),
        };
        // ASCII first: slicing a string with multi-byte characters at byte offsets would panic.
        if data.len() != 20 || !data.is_ascii() || !data.starts_with("82") {
            return Err(invalid());
        }
        let seq = u64::from_str_radix(&data[2..18], 16).map_err(|_| invalid())?;
        let invalidate = match &data[18..] {
            "00" => false,
            "01" => true,
            _ => return Err(invalid()),
        };
        Ok(Token { seq, invalidate })
    }
}

/// Everything the server holds; guarded by one mutex, never held across an await.
#[derive(Default)]
pub struct State {
    pub dbs: BTreeMap<String, BTreeMap<String, Collection>>,
    log: VecDeque<LogEntry>,
    pub last_seq: u64,
    /// Entries up to and including this `seq` were dropped by `forget_history_before_now`.
    pub forgotten_through: u64,
    forgotten_time: Option<Timestamp>,
    last_time: Option<Timestamp>,
    pub cursors: HashMap<i64, Cursor>,
    next_cursor_id: i64,
}

pub fn history_lost() -> CommandError {
    CommandError::new(
        286,
        "ChangeStreamHistoryLost",
        "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
    )
}

impl State {
    pub fn collection(&self, db: &str, coll: &str) -> Option<&Collection> {
        self.dbs.get(db)?.get(coll)
    }

    pub fn collection_mut(&mut self, db: &str, coll: &str) -> &mut Collection {
        self.dbs.entry(db.to_string()).or_default().entry(coll.to_string()).or_default()
    }

    pub fn register_cursor(&mut self, cursor: Cursor) -> i64 {
        self.next_cursor_id += 1;
        // Real cursor ids are large and non-sequential; a recognisable offset keeps them distinct from counts.
        let id = 7_000_000_000 + self.next_cursor_id;
        self.cursors.insert(id, cursor);
        id
    }

    /// The cluster time now: strictly increasing, seconds from the wall clock, increment within the second.
    pub fn tick(&mut self) -> Timestamp {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0);
        let next = match self.last_time {
            Some(last) if last.time >= now => Timestamp { time: last.time, increment: last.increment + 1 },
            _ => Timestamp { time: now, increment: 1 },
        };
        self.last_time = Some(next);
        next
    }

    /// The latest cluster time, reported as `operationTime`.
    pub fn operation_time(&mut self) -> Timestamp {
        match self.last_time {
            Some(t) => t,
            None => self.tick(),
        }
    }

    /// Appends a change-log entry with a fresh cluster time.
    pub fn record(&mut self, db: &str, coll: Option<&str>, change: Change) {
        let time = self.tick();
        self.last_seq += 1;
        self.log.push_back(LogEntry {
            seq: self.last_seq,
            time,
            wall: DateTime::now(),
            db: db.to_string(),
            coll: coll.map(str::to_string),
            change,
        });
    }

    /// Drops the whole retained log, so that only streams positioned at its end can still go on.
    pub fn forget_history(&mut self) {
        if let Some(last) = self.log.back() {
            self.forgotten_time = Some(last.time);
        }
        self.forgotten_through = self.last_seq;
        self.log.clear();
    }

    /// The position (last passed `seq`) for a stream starting at cluster time `at`: the first event it shows
    /// is the first one at or after `at`.
    pub fn position_at_time(&self, at: Timestamp) -> Result<u64, CommandError> {
        let before = |t: Timestamp| (t.time, t.increment) < (at.time, at.increment);
        if self.forgotten_time.is_some_and(|t| !before(t)) {
            return Err(history_lost());
        }
        Ok(self.log.iter().take_while(|e| before(e.time)).last().map_or(self.forgotten_through, |e| e.seq))
    }

    /// The next batch of a change stream, advancing its position; the flag is true when the batch ends with
    /// an `invalidate` and the cursor must close.
    pub fn change_batch(&self, cursor: &mut ChangeCursor, limit: usize) -> Result<(Vec<Document>, bool), CommandError> {
        if cursor.position < self.forgotten_through {
            return Err(history_lost());
        }
        let mut batch = Vec::new();
        let first = self.log.partition_point(|e| e.seq <= cursor.position);
        for entry in self.log.range(first..) {
            if batch.len() >= limit {
                break;
            }
            cursor.position = entry.seq;
            if !in_scope(&cursor.scope, entry) {
                continue;
            }
            let event = self.render(entry, cursor.lookup);
            let mut shown = true;
            for filter in &cursor.matches {
                shown &= matches(&event, filter)?;
            }
            if shown {
                batch.push(event);
            }
            if invalidates(&cursor.scope, entry) {
                batch.push(doc! {
                    "_id": Token { seq: entry.seq, invalidate: true }.to_bson(),
                    "operationType": "invalidate",
                    "clusterTime": entry.time,
                    "wallTime": entry.wall,
                });
                return Ok((batch, true));
            }
        }
        Ok((batch, false))
    }

    fn render(&self, entry: &LogEntry, lookup: bool) -> Document {
        let mut event = doc! {
            "_id": Token { seq: entry.seq, invalidate: false }.to_bson(),
            "operationType": match entry.change {
                Change::Insert(_) => "insert",
                Change::Update { .. } => "update",
                Change::Replace(_) => "replace",
                Change::Delete { .. } => "delete",
                Change::Drop => "drop",
                Change::Rename { .. } => "rename",
                Change::DropDatabase => "dropDatabase",
            },
            "clusterTime": entry.time,
            "wallTime": entry.wall,
        };
        let coll = entry.coll.clone().unwrap_or_default();
        match &entry.change {
            Change::Insert(doc) | Change::Replace(doc) => {
                event.insert("fullDocument", doc.clone());
            }
            Change::Update { id, .. } if lookup => {
                // updateLookup reads the document as it is now, not as it was after this update.
                let current = self.collection(&entry.db, &coll).and_then(|c| c.get_by_id(id)).cloned();
                event.insert("fullDocument", current.map_or(Bson::Null, Bson::Document));
            }
            _ => {}
        }
        event.insert(
            "ns",
            match &entry.coll {
                Some(c) => doc! { "db": &entry.db, "coll": c },
                None => doc! { "db": &entry.db },
            },
        );
        match &entry.change {
            Change::Insert(doc) | Change::Replace(doc) => {
                event.insert("documentKey", doc! { "_id": doc.get("_id").cloned().unwrap_or(Bson::Null) });
            }
            Change::Delete { id } => {
                event.insert("documentKey", doc! { "_id": id.clone() });
            }
            Change::Update { id, description } => {
                event.insert("documentKey", doc! { "_id": id.clone() });
                event.insert(
                    "updateDescription",
                    doc! {
                        "updatedFields": description.updated_fields.clone(),
                        "removedFields": description.removed_fields.clone(),
                        "truncatedArrays": [],
                    },
                );
            }
            Change::Rename { to_db, to_coll } => {
                event.insert("to", doc! { "db": to_db, "coll": to_coll });
            }
            Change::Drop | Change::DropDatabase => {}
        }
        event
    }
}

fn in_scope(scope: &Scope, entry: &LogEntry) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Database(db) => &entry.db == db,
        Scope::Collection(db, coll) => &entry.db == db && entry.coll.as_deref() == Some(coll),
    }
}

/// A collection stream ends when its collection is dropped or renamed away; a database stream when the
/// database is dropped. Cluster streams are never invalidated.
fn invalidates(scope: &Scope, entry: &LogEntry) -> bool {
    match scope {
        Scope::Cluster => false,
        Scope::Database(_) => matches!(entry.change, Change::DropDatabase),
        Scope::Collection(..) => matches!(entry.change, Change::Drop | Change::Rename { .. }),
    }
}

/// The `_id` of a stored document, for `documentKey`s.
pub fn doc_id(doc: &Document) -> Bson {
    get_path(doc, "_id").cloned().unwrap_or(Bson::Null)
}
