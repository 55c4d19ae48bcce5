//! MongoDB source: collection snapshot, then the database's change stream.
//!
//! Why nothing is lost: [`Source::schema`] first opens a change stream on the database and keeps its
//! resume token (the server's high-water mark) as the snapshot position, and only then reads the
//! collections — once to learn each collection's columns, once more to copy them. Every write the reads
//! may have missed, or seen half-way, commits after that token, so the stream, which resumes after it,
//! brings it again. Applying is idempotent (upsert and delete by `_id`, the post-image of each update),
//! so the overlap between the copy and the stream is harmless: each document ends as its last event
//! left it. A document read by the copy that no longer fits the learnt columns was written after the
//! token too, so the copy writes what fits and the stream brings the whole document (and the column it
//! needs). The resume token of each applied event is the checkpoint; a restart resumes after it.
//!
//! MongoDB has no schema: with `mapping = "flatten"` the columns are learnt by reading every document
//! at each start (see [`mapping`]), and the stream adds a column, or turns one into jsonb, before the
//! first change that needs it.

mod mapping;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use bson::{doc, Bson, Document, RawDocumentBuf};
use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::ErrorKind;
use mongodb::options::ClientOptions;
use tokio::sync::{mpsc, watch};

use super::{ChangeStream, SnapshotPoint, Source, TableReader};
use crate::change::TableName;
use crate::checkpoint::PipelineIdentity;
use crate::config::{ConnUrl, Endpoint, MongoMapping, TableFilter};
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::finding::Finding;
use crate::position::Position;
use crate::retry::ConnectionLost;
use crate::schema::{push_copy_field, ColumnDefinition, SourceSchema, TableDefinition};
use mapping::{id_text, Shape};

/// A MongoDB database (the URL's) as a source.
pub struct MongoSource {
    db: mongodb::Database,
    url: ConnUrl,
    filter: TableFilter,
    mapping: MongoMapping,
    /// Per selected collection, the columns learnt by [`Source::schema`].
    shapes: HashMap<String, Shape>,
    /// The change stream's position taken before the collections were read.
    snapshot: Option<Position>,
}

impl MongoSource {
    /// Connects to the server the URL names; the URL's path is the replicated database.
    pub async fn connect(endpoint: Endpoint<'_>, filter: TableFilter, mapping: MongoMapping) -> anyhow::Result<Self> {
        let url = endpoint.url.clone();
        let mut options = ClientOptions::parse(url.for_driver())
            .await
            .map_err(|e| anyhow::anyhow!("url {url} is not a MongoDB URL: {}", e.kind))?;
        let database = options.default_database.clone().with_context(|| {
            format!("url {url} names no database: add it as the path (mongodb://user@host:27017/shop?replicaSet=rs0)")
        })?;
        if let Some(password) = endpoint.external_password()? {
            let credential = options.credential.get_or_insert_with(Default::default);
            anyhow::ensure!(
                credential.username.is_some(),
                "url {url}: a password is configured but the URL names no user"
            );
            credential.password = Some(password);
        }
        // Fail within seconds when the server is unreachable, instead of the driver's 30 s.
        options.server_selection_timeout.get_or_insert(Duration::from_secs(10));
        options.app_name.get_or_insert_with(|| "cutover".into());
        let client = mongodb::Client::with_options(options).map_err(|e| classify(e, format!("connecting to {url}")))?;
        let db = client.database(&database);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| classify(e, format!("connecting to MongoDB at {url}")))?;
        Ok(MongoSource { db, url, filter, mapping, shapes: HashMap::new(), snapshot: None })
    }

    /// The server's `hello`: replica set name or mongos marker.
    async fn hello(&self) -> anyhow::Result<Document> {
        self.db.run_command(doc! { "hello": 1 }).await.map_err(|e| classify(e, format!("hello on {}", self.url)))
    }

    /// Which deployment and database this is, for the pipeline identity.
    async fn server_identity(&self) -> anyhow::Result<String> {
        let hello = self.hello().await?;
        let deployment = match (hello.get_str("setName"), hello.get_str("msg")) {
            (Ok(set), _) => format!("replica set {set}"),
            (_, Ok("isdbgrid")) => "mongos".to_string(),
            _ => "standalone server".to_string(),
        };
        Ok(format!("mongodb {deployment} database {}", self.db.name()))
    }

    /// The change stream's current position: the resume token of a stream opened now.
    async fn current_position(&self) -> anyhow::Result<Position> {
        let stream =
            self.db.watch().await.map_err(|e| classify(e, format!("opening a change stream on {}", self.url)))?;
        let token = stream.resume_token().with_context(|| {
            format!("the change stream on {} returned no resume token (is it a replica set?)", self.url)
        })?;
        token_position(&token)
    }

    /// The selected collections, by name.
    async fn collections(&self) -> anyhow::Result<Vec<String>> {
        let mut names = self
            .db
            .list_collection_names()
            .filter(doc! { "type": "collection" })
            .await
            .map_err(|e| classify(e, format!("listing the collections of {}", self.db.name())))?;
        let db = self.db.name();
        names.retain(|name| !name.starts_with("system.") && self.filter.includes(&format!("{db}.{name}")));
        names.sort();
        Ok(names)
    }
}

/// A resume token as a position: `mongo:<_data hex>`.
fn token_position(token: &ResumeToken) -> anyhow::Result<Position> {
    let value = bson::to_bson(token).context("reading a resume token")?;
    match value.as_document().and_then(|d| d.get_str("_data").ok()) {
        Some(data) if !data.is_empty() && data.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Position::Mongo(data.into()))
        }
        _ => anyhow::bail!("the server sent a resume token cutover cannot store: {value}"),
    }
}

/// A position back into the resume token it came from.
fn position_token(position: &Position) -> anyhow::Result<ResumeToken> {
    let Position::Mongo(data) = position else {
        anyhow::bail!("a MongoDB change stream resumes from a resume token (mongo:…), not from {position}")
    };
    bson::from_bson(Bson::Document(doc! { "_data": data.as_str() })).context("rebuilding a resume token")
}

/// A driver error with what cutover was doing; lost connections become [`ConnectionLost`] (retried).
fn classify(error: mongodb::error::Error, what: String) -> anyhow::Error {
    let transient = matches!(
        *error.kind,
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. }
    ) || error.contains_label("ResumableChangeStreamError");
    if transient {
        anyhow::Error::new(ConnectionLost(format!("{what}: {error}")))
    } else {
        anyhow::Error::new(error).context(what)
    }
}

/// The server's error code, for command errors.
fn error_code(error: &mongodb::error::Error) -> Option<i32> {
    match &*error.kind {
        ErrorKind::Command(e) => Some(e.code),
        _ => None,
    }
}

#[async_trait]
impl Source for MongoSource {
    fn dialect(&self) -> SourceDialect {
        SourceDialect::Mongodb
    }

    async fn schema(&mut self) -> anyhow::Result<SourceSchema> {
        // The position first: whatever the reads below miss commits after it (see the module comment).
        let position = self.current_position().await?;
        let db = self.db.name().to_string();
        let mut schema = SourceSchema::default();
        self.shapes.clear();
        for name in self.collections().await? {
            let mut shape = Shape::new(self.mapping);
            let (mut documents, mut bytes) = (0u64, 0u64);
            if self.mapping == MongoMapping::Flatten {
                let mut cursor = self
                    .db
                    .collection::<RawDocumentBuf>(&name)
                    .find(doc! {})
                    .batch_size(1000)
                    .await
                    .map_err(|e| classify(e, format!("reading collection {db}.{name}")))?;
                while let Some(raw) =
                    cursor.try_next().await.map_err(|e| classify(e, format!("reading collection {db}.{name}")))?
                {
                    bytes += raw.as_bytes().len() as u64;
                    documents += 1;
                    let document =
                        raw.to_document().with_context(|| format!("a document of {db}.{name} is not valid BSON"))?;
                    shape.observe(&document).map_err(|e| {
                        let id = document.get("_id").map_or_else(|| "none".into(), id_text);
                        anyhow::anyhow!("collection {db}.{name}, document _id {id}: {e}")
                    })?;
                }
            } else {
                documents = self
                    .db
                    .collection::<Document>(&name)
                    .estimated_document_count()
                    .await
                    .map_err(|e| classify(e, format!("counting the documents of {db}.{name}")))?;
            }
            shape.settle();
            let table = shape.table_schema(TableName::new(&db, &name));
            let columns = (0..table.columns.len())
                .map(|i| {
                    let (source_type, loss) = shape.describe(i);
                    ColumnDefinition { not_null: i == 0, identity: None, source_type, loss }
                })
                .collect();
            schema.tables.push(TableDefinition {
                schema: table,
                columns,
                primary_key: Some((format!("{name}_pkey"), "PRIMARY KEY (\"_id\")".into())),
                constraints: Vec::new(),
                foreign_keys: Vec::new(),
                indexes: Vec::new(),
                estimated_rows: documents,
                pages: bytes / 8192,
                has_user_types: false,
                partitioning: None,
                inherits: Vec::new(),
                key_span: None,
                generated: Vec::new(),
            });
            self.shapes.insert(name, shape);
        }
        self.snapshot = Some(position);
        Ok(schema)
    }

    async fn preflight(&mut self, _schema: &SourceSchema) -> anyhow::Result<Vec<Finding>> {
        let hello = self.hello().await?;
        let mut findings = Vec::new();
        if hello.get_str("setName").is_err() && hello.get_str("msg") != Ok("isdbgrid") {
            findings.push(Finding::error(
                "source",
                format!("replication: {} is a standalone server (hello has no setName)", self.url),
                "a replica set member or mongos (change streams need the oplog)",
                "start mongod with --replSet rs0 (replication.replSetName in mongod.conf), run rs.initiate() \
                 once in mongosh, and add ?replicaSet=rs0 to the URL"
                    .into(),
            ));
            return Ok(findings);
        }
        if let Err(e) = self.db.watch().await {
            findings.push(Finding::error(
                "source",
                format!("change stream on database {}: {e}", self.db.name()),
                "the user may open change streams and read every collection",
                format!("grant the user the read role on {} (actions find and changeStream)", self.db.name()),
            ));
        }
        Ok(findings)
    }

    async fn create_stream(
        &mut self,
        _tables: &[TableDefinition],
    ) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)> {
        let snapshot = self.new_snapshot().await?;
        let identity = PipelineIdentity {
            source: self.server_identity().await?,
            stream: "change stream".into(),
            consistent_point: snapshot.position.clone(),
        };
        Ok((identity, snapshot))
    }

    async fn resume_stream(&mut self, identity: &PipelineIdentity, _tables: &[TableDefinition]) -> anyhow::Result<()> {
        identity.check_source(&self.server_identity().await?)
    }

    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint> {
        // The position taken before `schema` read the collections: the copy below reads them after it.
        let position = match &self.snapshot {
            Some(position) => position.clone(),
            None => self.current_position().await?,
        };
        Ok(SnapshotPoint { position, id: String::new(), untracked: HashMap::new(), shapes: HashMap::new() })
    }

    async fn snapshot_reader(&self, _snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>> {
        Ok(Box::new(MongoTableReader { db: self.db.clone(), shapes: Arc::new(self.shapes.clone()) }))
    }

    async fn start_stream(
        &mut self,
        from: &Position,
        _confirmed: watch::Receiver<Position>,
        _copies: &HashMap<String, crate::checkpoint::TableProgress>,
    ) -> anyhow::Result<Box<dyn ChangeStream>> {
        // The oplog keeps no per-reader state: nothing to confirm.
        let stream =
            stream::MongoChangeStream::open(&self.db, &self.url, self.shapes.clone(), self.filter.clone(), from)
                .await?;
        Ok(Box::new(stream))
    }
}

/// Bytes per chunk handed to the sink.
const COPY_CHUNK: usize = 256 * 1024;

/// Reads collections for the copy. MongoDB has no snapshot to share between connections; the reads
/// start after the snapshot position, which is what the handoff needs.
struct MongoTableReader {
    db: mongodb::Database,
    shapes: Arc<HashMap<String, Shape>>,
}

#[async_trait]
impl TableReader for MongoTableReader {
    async fn read(&mut self, table: &TableDefinition, _chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        anyhow::ensure!(
            format == CopyFormat::PostgresText,
            "a MongoDB source copies into PostgreSQL's text format only"
        );
        let name = table.schema.name.clone();
        let shapes = self.shapes.clone();
        let shape = shapes.get(&name.name).with_context(|| format!("no column mapping for collection {name}"))?;
        let coll = self.db.collection::<Document>(&name.name);
        let mut cursor =
            coll.find(doc! {}).batch_size(1000).await.map_err(|e| classify(e, format!("reading collection {name}")))?;
        let shape = shape.clone();
        let (tx, mut rx) = mpsc::channel::<anyhow::Result<Bytes>>(8);
        tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                let mut buffer = BytesMut::with_capacity(COPY_CHUNK);
                let mut line = Vec::new();
                let mut misfits = 0u64;
                while let Some(document) =
                    cursor.try_next().await.map_err(|e| classify(e, format!("reading collection {name}")))?
                {
                    let (row, fits) = shape.row(&document).map_err(|e| {
                        let id = document.get("_id").map_or_else(|| "none".into(), id_text);
                        anyhow::anyhow!("collection {name}, document _id {id}: {e}; cutover stopped before loading it")
                    })?;
                    misfits += u64::from(!fits);
                    line.clear();
                    for (i, value) in row.iter().enumerate() {
                        if i > 0 {
                            line.push(b'\t');
                        }
                        push_copy_field(&mut line, value.as_deref());
                    }
                    line.push(b'\n');
                    buffer.extend_from_slice(&line);
                    if buffer.len() >= COPY_CHUNK && tx.send(Ok(buffer.split().freeze())).await.is_err() {
                        return Ok(());
                    }
                }
                if !buffer.is_empty() {
                    let _ = tx.send(Ok(buffer.freeze())).await;
                }
                if misfits > 0 {
                    tracing::info!(
                        collection = %name,
                        documents = misfits,
                        "documents changed shape while being copied: the change stream brings them whole"
                    );
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}
