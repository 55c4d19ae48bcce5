//! Sinks: where rows and changes go.
//!
//! A sink creates the tables, bulk-loads snapshot copies, builds keys and
//! indexes after the data, and applies streamed changes idempotently in target
//! transactions that end only on source transaction boundaries, each carrying
//! the source position it reaches (the exactly-once marker).

pub mod mysql;
pub mod postgres;

use std::time::SystemTime;

use async_trait::async_trait;

use crate::change::{Change, SchemaOp, TableName, TableSchema};
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::position::Position;
use crate::schema::{SourceSchema, TableDefinition};

/// How long an apply connection waits for a lock while others run beside it.
pub const LOCK_WAIT_BOUND_SECONDS: u32 = 5;

/// Which schema changes a sink makes in place ([`Sink::in_place`]).
pub type InPlace = Box<dyn Fn(&SchemaOp) -> bool + Send + Sync>;

/// The name of apply connection `lane`'s progress record, for a pipeline whose record is
/// named `base`: the first keeps `base` (as records written before there were several).
pub(crate) fn lane_record(base: &str, lane: usize) -> String {
    match lane {
        0 => base.to_string(),
        lane => format!("{base}#{lane}"),
    }
}

/// Every apply connection's progress record name, for a pipeline whose record is `base`.
pub(crate) fn lane_records(base: &str) -> Vec<String> {
    (0..crate::config::MAX_APPLY_CONNECTIONS).map(|lane| lane_record(base, lane)).collect()
}

/// A change sink.
///
/// The contract, as the pipeline drives it:
/// - Snapshot: [`Sink::create_tables`], then [`Sink::table_writer`] once per copy worker
///   (the writers run concurrently, each on its own connection), then
///   [`Sink::finish_snapshot`], which must be safe to repeat (it adds only what is missing).
/// - Streaming: [`Sink::begin`], any number of [`Sink::apply`] calls, then
///   [`Sink::commit`]. A target transaction holds whole source transactions only; `apply`
///   gets changes in source order and may be called several times per transaction (a
///   batch flushed by size). `commit` records its position atomically with the rows, and
///   [`Sink::applied_position`] reads that record back: a replay after a crash then starts
///   exactly after what the target has. Changes must apply idempotently by key.
/// - Several instances may apply at once, one per apply connection (`[pipeline]
///   apply_connections`), each in its own target transactions, committed one
///   at a time in source order: each records its position apart ([`lane_record`]), and
///   `applied_position` is the highest of them.
/// - An instance is dropped after any error (an open transaction rolls back with it) and a
///   new one connected: no method needs to recover from a failure of its own.
/// - [`Sink::cleanup`] must be safe to repeat.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The copy format this sink wants for a table coming from a `source` dialect.
    fn copy_format(&self, table: &TableDefinition, source: SourceDialect) -> CopyFormat;

    /// What the target must allow for the pipeline: one finding per problem.
    /// `schema` is what will be replicated; `copy_bytes` the size of the source tables
    /// the snapshot will copy; `apply_connections` how many connections apply changes.
    async fn preflight(
        &mut self,
        schema: &SourceSchema,
        copy_bytes: u64,
        apply_connections: usize,
    ) -> anyhow::Result<Vec<crate::finding::Finding>>;

    /// The position of the last source transaction committed here, as recorded
    /// in the same target transactions as the rows.
    async fn applied_position(&mut self) -> anyhow::Result<Option<Position>>;

    /// Creates what the tables need and the bare tables. With `fresh`, a table
    /// that already exists must be empty: cutover never overwrites data it did not write.
    async fn create_tables(
        &mut self,
        schema: &SourceSchema,
        tables: &[&TableDefinition],
        fresh: bool,
    ) -> anyhow::Result<()>;

    /// A connection for copying tables and building their indexes (one per worker).
    async fn table_writer(&self) -> anyhow::Result<Box<dyn TableWriter>>;

    /// Foreign keys and sequence values, once every table holds its rows.
    async fn finish_snapshot(&mut self, schema: &SourceSchema) -> anyhow::Result<()>;

    /// At the switchover, once the target has every change: puts back what the sink set
    /// aside to apply them (user triggers it disabled); returns what it put back. Safe
    /// to repeat.
    async fn hand_over(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// The tables on the target whose foreign keys reference one of `tables` and are not
    /// among them: [`TableWriter::truncate`] cannot empty `tables` without them. None by
    /// default (a target that empties tables without checking foreign keys).
    async fn referencing_tables(&mut self, _tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        Ok(Vec::new())
    }

    /// Those of `tables` the target does not have.
    async fn missing_tables(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>>;

    /// Drops those of `tables` the target has, with what depends on them there (foreign
    /// keys pointing at them): tables the source no longer has under these names.
    async fn drop_tables(&mut self, tables: &[TableName]) -> anyhow::Result<()>;

    /// Those of `tables` that are partitions on the target (kept partitioning).
    async fn partitions_of(&mut self, _tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        Ok(Vec::new())
    }

    /// Drops what the pipeline created on the target besides the replicated tables
    /// (its exactly-once markers); returns what it dropped.
    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>>;

    /// Which steps of a [`crate::change::SchemaChange`] [`Sink::apply`] carries out on the
    /// table as it stands, rows kept exactly. For the others the pipeline copies the table
    /// again (the change it gets then is one [`SchemaOp::DropTable`]). `DropTable` must
    /// always apply, and succeed when the table is not there.
    fn in_place(&self) -> InPlace;

    /// Whether changes to different tables in one target transaction may reach it in
    /// another order than the source made them: nothing between tables (a foreign key) is
    /// checked before the commit. Parallel apply then lets a table's changes go ahead of
    /// another's that wait. No, by default.
    fn reorders_tables(&self) -> bool {
        false
    }

    /// Forgets what it read about `tables` on the target: another apply connection
    /// changed their shape.
    fn forget_tables(&mut self, _tables: &[TableName]) {}

    /// Bounds how long a statement waits for a lock ([`LOCK_WAIT_BOUND_SECONDS`]) while other
    /// apply connections run beside this one, or lets it wait as long as the target's
    /// settings say: a long wait beside them may be on a later transaction that waits for
    /// this one's commit.
    async fn bound_lock_waits(&mut self, _bounded: bool) -> anyhow::Result<()> {
        Ok(())
    }

    /// Opens a target transaction.
    async fn begin(&mut self) -> anyhow::Result<()>;

    /// Applies changes, in order, inside the open transaction.
    async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()>;

    /// Commits the open transaction, recording `position` in it.
    async fn commit(&mut self, position: &Position, commit_time: SystemTime) -> anyhow::Result<()>;
}

/// A column of a table on the target, as the target's catalog describes it.
#[derive(Clone, Debug)]
pub struct TargetColumn {
    pub name: String,
    /// The type as the target names it (PostgreSQL: `format_type`; MySQL: `DATA_TYPE`).
    pub type_name: String,
    /// Computed by the target: no source describes it.
    pub generated: bool,
    /// PostgreSQL's `GENERATED ALWAYS AS IDENTITY`: an insert writes it (`OVERRIDING
    /// SYSTEM VALUE`), an update cannot.
    pub identity_always: bool,
}

/// A column the target holds data in (of `target`, generated ones left out) that the
/// source's description of the table no longer has was dropped or renamed on the source,
/// and the change log does not say which: adding the new name and keeping the old would
/// split the column's values silently. The error says how to go on.
pub fn check_no_column_gone(table: &TableSchema, target: &[TargetColumn]) -> anyhow::Result<()> {
    let gone: Vec<&str> = target
        .iter()
        .filter(|t| !t.generated && !table.columns.iter().any(|c| c.name == t.name))
        .map(|t| t.name.as_str())
        .collect();
    if gone.is_empty() {
        return Ok(());
    }
    let new: Vec<&str> =
        table.columns.iter().map(|c| c.name.as_str()).filter(|name| !target.iter().any(|t| t.name == *name)).collect();
    anyhow::bail!(
        "column(s) {} of {} are no longer in the source's description of the table{}: dropped or renamed on the \
         source (the change log does not say which). Nothing of it was applied. Run `cutover resync --config … \
         --table {}`: the table is created again with the source's columns and copied again",
        gone.join(", "),
        table.name,
        match new.is_empty() {
            true => String::new(),
            false => format!(", which now has {}", new.join(", ")),
        },
        table.name
    )
}

/// The condition that selects the rows of `chunks` of a table by its (first) key column,
/// quoted by `quote`: `TRUE` when one of them is the whole table, `FALSE` for none.
pub(crate) fn chunks_condition(table: &TableDefinition, chunks: &[Chunk], quote: fn(&str) -> String) -> String {
    let key = table.schema.key_indexes();
    let column = key.first().map(|&k| quote(&table.schema.columns[k].name)).unwrap_or_default();
    let conditions: Option<Vec<String>> = chunks.iter().map(|c| c.key_condition(&column)).collect();
    match conditions {
        None => "TRUE".to_string(),
        Some(c) if c.is_empty() => "FALSE".to_string(),
        Some(c) => format!("({})", c.join(") OR (")),
    }
}

/// Bulk loading on a connection of its own.
#[async_trait]
pub trait TableWriter: Send {
    /// Empties tables before they are copied (again), together: a table a foreign key
    /// references can be emptied with the tables that reference it.
    async fn truncate(&mut self, tables: &[TableName]) -> anyhow::Result<()>;

    /// How many rows of a table lie in key ranges, and how many it holds; one scan.
    async fn count_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<(u64, u64)>;

    /// Deletes the rows of key ranges of a table before they are copied again: a copy cut
    /// short may have left some of them (its last write landed, its record did not).
    async fn delete_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<()>;

    /// Loads a copy stream; returns the rows loaded.
    async fn write(&mut self, table: &TableDefinition, rows: CopyStream) -> anyhow::Result<u64>;

    /// Primary key, unique constraints and indexes, after the data.
    async fn build_indexes(&mut self, table: &TableDefinition) -> anyhow::Result<()>;
}
