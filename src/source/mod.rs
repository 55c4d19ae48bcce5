//! Sources: where rows and changes come from.
//!
//! A source pins a snapshot and the point in its change log where that snapshot
//! ends, lets copy workers read tables inside the snapshot, and streams every
//! committed transaction from a position on. The pipeline drives these traits
//! and knows no database by name.

pub mod fence;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::change::Event;
use crate::checkpoint::{PipelineIdentity, TableProgress};
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::position::Position;
use crate::schema::{SourceSchema, TableDefinition};

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
    /// Per table (display name), its definition as the copy reads it, in a form of the
    /// source's own, for a stream that must tell whether the table changed between its
    /// copy and where the stream starts (MySQL: the binlog's rows carry no column names).
    /// Stored with each table's copy progress.
    pub shapes: HashMap<String, String>,
}

/// Where a source's change log ended at some moment, by the source's own clock.
#[derive(Clone, Debug)]
pub struct LogEnd {
    /// Everything the source committed before `clock` lies before this position.
    pub position: Position,
    pub clock: SystemTime,
}

/// A change source.
///
/// The contract, as the pipeline drives it:
/// - Call order per attempt: [`Source::schema`], then on the first run
///   [`Source::create_stream`] (which pins a snapshot where the stream begins) or on later
///   runs [`Source::resume_stream`] (and [`Source::new_snapshot`] for tables still to
///   copy); [`Source::snapshot_reader`] once per copy worker; [`Source::release_snapshot`]
///   once every reader has opened; then [`Source::start_stream`]. While the stream runs the
///   pipeline may still call [`Source::log_end`].
/// - An instance is dropped after any error, and a new one connected for the next
///   attempt: no method needs to recover from a failure of its own.
/// - [`Source::create_stream`] and [`Source::resume_stream`] must be safe to repeat after a
///   crash between them and the first checkpoint; [`Source::cleanup`] must be safe to repeat.
/// - Readers ([`TableReader`]) run concurrently, each on its own connection, all inside
///   the same pinned snapshot.
#[async_trait]
pub trait Source: Send + Sync {
    fn dialect(&self) -> SourceDialect;

    /// The tables to replicate, with everything needed to recreate them.
    async fn schema(&mut self) -> anyhow::Result<SourceSchema>;

    /// Whether the stream carries schema changes (PostgreSQL's DDL capture, once
    /// [`Source::create_stream`] or [`Source::resume_stream`] installed it).
    fn captures_schema_changes(&self) -> bool {
        false
    }

    /// What the source must allow for the pipeline (settings, privileges, tables
    /// without a key): one finding per problem.
    async fn preflight(&mut self, schema: &SourceSchema) -> anyhow::Result<Vec<crate::finding::Finding>>;

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

    /// Makes the source refuse writes for a switchover — read-only, every other client
    /// session ended and waited for until gone — and returns its log's position after
    /// that. Refuses, fencing nothing, while prepared transactions exist (they commit
    /// whenever their coordinator says so). Not supported by default.
    async fn fence(&mut self) -> anyhow::Result<fence::Fence> {
        anyhow::bail!("this source takes no writes to fence for a switchover")
    }

    /// The position up to which the source itself records the target as having applied
    /// (PostgreSQL: the slot's `confirmed_flush_lsn`); `None` where it keeps no such record,
    /// the default (then the running daemon says).
    async fn confirmed_position(&mut self) -> anyhow::Result<Option<Position>> {
        Ok(None)
    }

    /// What `cutover check` says of `[stream] skip` entries that name positions: each
    /// must be where a transaction begins, or it never matches. Nothing by default.
    async fn check_skip(&mut self, _entries: &[(String, Position)]) -> anyhow::Result<Vec<crate::finding::Finding>> {
        Ok(Vec::new())
    }

    /// How to split a table so several workers can copy it; whole by default.
    fn chunks(&self, _table: &TableDefinition, _workers: usize) -> Vec<Chunk> {
        vec![Chunk::Whole]
    }

    /// Streams every transaction that commits after `from`. `confirmed` carries
    /// the position up to which the target has durably applied, so the source
    /// may release its log up to there. `copies` holds each copied table's copy
    /// (by `schema.name`): the position of the snapshot it was copied under (the
    /// pipeline leaves out its changes ordered before that, so a stream need not even
    /// decode them: they may predate the table's present shape) and its
    /// [`SnapshotPoint::untracked`] count (the stream fails as soon as one grows).
    async fn start_stream(
        &mut self,
        from: &Position,
        confirmed: watch::Receiver<Position>,
        copies: &HashMap<String, TableProgress>,
    ) -> anyhow::Result<Box<dyn ChangeStream>>;
}

/// Reads tables inside a pinned snapshot.
#[async_trait]
pub trait TableReader: Send {
    /// A stream of the chunk's rows; [`TableRewritten`] (before any row) when the table
    /// changed under the snapshot in a way the snapshot cannot see past.
    async fn read(&mut self, table: &TableDefinition, chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream>;

    /// The rows of `table` that `condition` (SQL of the source's dialect, on its columns)
    /// selects, inside the snapshot, each value in PostgreSQL's text form as the copy carries
    /// it: what `verify --repair` gives the target. A source without SQL has none.
    async fn read_rows(
        &mut self,
        table: &TableDefinition,
        _condition: &str,
    ) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        anyhow::bail!("{}: this source's rows cannot be selected by SQL", table.schema.name)
    }
}

/// The table was emptied or rewritten after the snapshot was pinned (PostgreSQL: TRUNCATE
/// or a rewriting ALTER TABLE, which are not MVCC-safe; MySQL: ER_TABLE_DEF_CHANGED), so
/// the snapshot cannot read it as it was at its position; or such a statement waits for
/// the table, and reading it would wait behind that statement, which waits for the copy.
/// The pipeline copies such a table again under a new snapshot.
#[derive(Debug, thiserror::Error)]
#[error("{0} was truncated or rewritten on the source after the snapshot was pinned, or a TRUNCATE waits for it")]
pub struct TableRewritten(pub crate::change::TableName);

/// A source's committed transactions, in commit order.
///
/// The contract: every change of a transaction comes between its `Begin` and its
/// `Commit`, in the order the source made them; transactions come in commit order, never
/// interleaved; positions never go backwards (a `Begin` orders its transaction against
/// snapshot positions, a `Commit` is where a restart resumes after it); a `Heartbeat`
/// comes only between transactions and promises that everything before its position has
/// been sent. The stream runs on a task of its own that the pipeline aborts when it stops,
/// at any await point: nothing it holds may need a clean shutdown to stay correct (the
/// source releases its log only up to what the `confirmed` channel of
/// [`Source::start_stream`] says).
#[async_trait]
pub trait ChangeStream: Send {
    /// The next event. Errors when the stream breaks or sends something bad;
    /// nothing after the last confirmed position is lost then.
    async fn next(&mut self) -> anyhow::Result<Event>;
}
