//! Sources: where rows and changes come from.
//!
//! A source pins a snapshot and the point in its change log where that snapshot
//! ends, lets copy workers read tables inside the snapshot, and streams every
//! committed transaction from a position on. The pipeline drives these traits
//! and knows no database by name.

pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use crate::change::Event;
use crate::checkpoint::PipelineIdentity;
use crate::position::Position;
use crate::schema::{SourceSchema, TableDefinition};

/// Which database and version the data comes from; sinks pick copy formats by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres {
        major: u32,
    },
    /// MySQL or MariaDB: values in MySQL's text form, rewritten for the target.
    Mysql,
    /// SQLite: values checked against their declared types on the way.
    Sqlite,
    /// MongoDB: documents mapped to rows in PostgreSQL's text form.
    Mongodb,
}

/// A pinned snapshot: its rows are the source exactly as of `position`.
#[derive(Clone, Debug)]
pub struct SnapshotPoint {
    pub position: Position,
    /// The source's handle for it (PostgreSQL: the exported snapshot name).
    pub id: String,
    /// Per table (display name), a count of changes the stream cannot carry,
    /// taken just before the snapshot (PostgreSQL: UPDATEs and DELETEs of tables
    /// without replica identity). Stored with each table's copy progress.
    pub untracked: HashMap<String, i64>,
}

/// The part of a table one copy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    Whole,
    /// PostgreSQL heap pages `[start, end)`, read by a TID range scan.
    Pages {
        start: u32,
        end: u32,
    },
    /// Rows whose integer primary key is in `[start, end)`; `None` is unbounded.
    KeyRange {
        start: Option<i64>,
        end: Option<i64>,
    },
}

/// The byte format of a copy stream, understood by both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    PostgresBinary,
    PostgresText,
}

/// Table rows on their way from source to sink, never parsed on the way.
pub struct CopyStream {
    pub format: CopyFormat,
    pub data: Pin<Box<dyn Stream<Item = anyhow::Result<Bytes>> + Send>>,
}

/// Where a source's change log ended at some moment, by the source's own clock.
#[derive(Clone, Debug)]
pub struct LogEnd {
    /// Everything the source committed before `clock` lies before this position.
    pub position: Position,
    pub clock: SystemTime,
}

/// A change source.
#[async_trait]
pub trait Source: Send + Sync {
    fn dialect(&self) -> Dialect;

    /// The tables to replicate, with everything needed to recreate them.
    async fn schema(&mut self) -> anyhow::Result<SourceSchema>;

    /// What the source must allow for the pipeline (settings, privileges, tables
    /// without a key): one finding per problem.
    async fn preflight(&mut self, schema: &SourceSchema) -> anyhow::Result<Vec<crate::preflight::Finding>>;

    /// Sets up the change stream for these tables the first time (PostgreSQL:
    /// publications and slot) and pins a snapshot where the stream begins.
    async fn create_stream(&mut self, tables: &[TableDefinition]) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)>;

    /// Checks that the stream set up earlier is still there and still this source's,
    /// and brings its table list up to date.
    async fn resume_stream(&mut self, identity: &PipelineIdentity, tables: &[TableDefinition]) -> anyhow::Result<()>;

    /// Pins a fresh snapshot for tables copied after the stream began; changes to
    /// them are applied from its position on.
    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint>;

    /// Opens a reader inside the pinned snapshot: one per copy worker.
    async fn snapshot_reader(&self, snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>>;

    /// Lets the pinned snapshot go, once every reader has opened. Nothing to do for a
    /// source whose readers hold their snapshot themselves.
    async fn release_snapshot(&mut self) {}

    /// Drops what the pipeline created on the source (never user data); returns what it
    /// dropped. A source read without creating anything (a binlog, a change stream, a
    /// file) has nothing to drop.
    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Where the change log ends now, with the source's clock (a `stop_at` time is
    /// reached once the stream has passed the log's end read after that time). `None`
    /// for a source that cannot tell, the default: a replay to a time then ends only
    /// at a transaction past it.
    async fn log_end(&mut self) -> anyhow::Result<Option<LogEnd>> {
        Ok(None)
    }

    /// What `cutover check` says of `[stream] skip` entries that name positions: each
    /// must be where a transaction begins, or it never matches. Nothing by default.
    async fn check_skip(&mut self, _entries: &[(String, Position)]) -> anyhow::Result<Vec<crate::preflight::Finding>> {
        Ok(Vec::new())
    }

    /// How to split a table so several workers can copy it; whole by default.
    fn chunks(&self, _table: &TableDefinition, _workers: usize) -> Vec<Chunk> {
        vec![Chunk::Whole]
    }

    /// Streams every transaction that commits after `from`. `confirmed` carries
    /// the position up to which the target has durably applied, so the source
    /// may release its log up to there. `untracked_at_copy` holds each copied
    /// table's [`SnapshotPoint::untracked`] count: the stream fails as soon as one grows.
    async fn start_stream(
        &mut self,
        from: &Position,
        confirmed: watch::Receiver<Position>,
        untracked_at_copy: &HashMap<String, i64>,
    ) -> anyhow::Result<Box<dyn ChangeStream>>;
}

/// Reads tables inside a pinned snapshot.
#[async_trait]
pub trait TableReader: Send {
    async fn read(&mut self, table: &TableDefinition, chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream>;
}

/// A source's committed transactions, in commit order.
#[async_trait]
pub trait ChangeStream: Send {
    /// The next event. Errors when the stream breaks or sends something bad;
    /// nothing after the last confirmed position is lost then.
    async fn next(&mut self) -> anyhow::Result<Event>;
}
