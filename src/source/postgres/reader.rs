//! The snapshot readers: a table split into chunks, each copied out inside the exported snapshot.

use std::collections::HashSet;

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::TryStreamExt;
use tokio_postgres::error::SqlState;

use crate::change::TableName;
use crate::copy::{Chunk, CopyFormat, CopyStream};
use crate::retry::ResumeFromCheckpoint;
use crate::schema::{quote_ident, quote_table, TableDefinition};
use crate::source::{TableReader, TableRewritten};

/// Tables larger than this many 8 kB pages are copied in page ranges by several workers.
pub(super) const CHUNK_MIN_PAGES: u64 = 8192;

/// How [`Source::chunks`](crate::source::Source::chunks) splits a table for `workers`
/// copy workers: a chunk per partition that holds rows, or ranges of its single integer
/// key (a copy cut short resumes from those it finished), or ranges of pages.
pub(super) fn chunks(table: &TableDefinition, workers: usize) -> Vec<Chunk> {
    // A partitioned table: a chunk per partition that holds rows (none: the table, empty).
    if table.partitioning.is_some() {
        let holders = table.row_holders().len();
        return if holders == 0 { vec![Chunk::Whole] } else { (0..holders).map(Chunk::Partition).collect() };
    }
    if workers < 2 || table.pages < 2 * CHUNK_MIN_PAGES {
        return vec![Chunk::Whole];
    }
    if let Some(span) = table.key_span {
        return Chunk::key_ranges(span, workers);
    }
    let per_chunk = (table.pages / (workers as u64 * 2).max(1)).max(CHUNK_MIN_PAGES);
    let mut chunks = Vec::new();
    let mut start = 0u64;
    while start < table.pages {
        let end = start + per_chunk;
        // The last chunk is open-ended: the table may have grown since it was measured.
        let end = if end >= table.pages { u32::MAX } else { u32::try_from(end).unwrap_or(u32::MAX) };
        chunks.push(Chunk::Pages { start: u32::try_from(start).unwrap_or(u32::MAX), end });
        start += per_chunk;
    }
    chunks
}

/// A copy connection inside the exported snapshot.
pub(super) struct PostgresTableReader {
    pub(super) client: tokio_postgres::Client,
    /// Tables the snapshot's catalog shows with the columns the copy reads.
    pub(super) checked: HashSet<TableName>,
}

/// The copy names the table and its columns as the catalog was read before the snapshot
/// was pinned; DDL since then makes the next attempt read the catalog again.
fn changed_since_read(table: &TableName) -> anyhow::Error {
    ResumeFromCheckpoint(format!(
        "{table}, or a column of it, was created, dropped, renamed or retyped on the source while it was to be \
         copied (DDL running): reading the catalog again"
    ))
    .into()
}

/// A name the copy uses resolves to nothing now (names resolve against the catalog as it
/// is, not as the snapshot has it): dropped or renamed since the snapshot was pinned.
fn names_gone(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_COLUMN)
}

impl PostgresTableReader {
    /// Whether the snapshot can read `name` (the table or a partition of it) as it was:
    /// the table's columns as the snapshot's catalog shows them are the ones read (the
    /// definition was read before the snapshot was pinned: DDL in between would have other
    /// columns read, or none), and its file is the one the snapshot's catalog names.
    /// `only`: the lock takes `name` alone, not its partitions.
    async fn check_readable(&mut self, table: &TableDefinition, name: &TableName, only: bool) -> anyhow::Result<()> {
        if !self.checked.contains(&table.schema.name) {
            let seen = super::catalog::signature_as_seen(&self.client, &table.schema.name).await?;
            if seen.is_none_or(|seen| seen != table.signature()) {
                return Err(changed_since_read(&table.schema.name));
            }
            self.checked.insert(table.schema.name.clone());
        }
        let qualified = quote_table(name);
        // Lock the table (its read would, until this transaction ends), then compare the
        // file the snapshot's catalog names with the table's file now: TRUNCATE swaps the
        // file, and the snapshot would read the new one (empty of what it can see). Without
        // waiting: a TRUNCATE queued for a table another reader holds would make this one
        // wait behind it, and the TRUNCATE waits for the copy to end. (A failed statement
        // ends a transaction: inside a savepoint.)
        let checking = || format!("checking that {name} was not truncated since the snapshot");
        let only = if only { "ONLY " } else { "" };
        let lock = format!(
            "SAVEPOINT cutover_lock; LOCK TABLE {only}{qualified} IN ACCESS SHARE MODE NOWAIT; RELEASE SAVEPOINT cutover_lock"
        );
        match self.client.batch_execute(&lock).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                self.client.batch_execute("ROLLBACK TO SAVEPOINT cutover_lock").await.with_context(checking)?;
                return Err(TableRewritten(name.clone()).into());
            }
            Err(e) if names_gone(&e) => return Err(changed_since_read(&table.schema.name)),
            Err(e) => return Err(e).with_context(checking),
        }
        let rewritten = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_class c WHERE c.oid = $1::text::regclass \
                 AND pg_relation_filenode(c.oid) IS NOT DISTINCT FROM nullif(c.relfilenode, 0)",
                &[&qualified],
            )
            .await
            .with_context(checking)?
            .is_none();
        if rewritten {
            return Err(TableRewritten(name.clone()).into());
        }
        Ok(())
    }
}

#[async_trait]
impl TableReader for PostgresTableReader {
    async fn read_rows(
        &mut self,
        table: &TableDefinition,
        condition: &str,
    ) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        // A partitioned table: locked with its partitions first, parent before partitions as
        // a TRUNCATE or ALTER of it locks them (the other order could deadlock with one).
        if table.partitioning.is_some() {
            self.check_readable(table, &table.schema.name, false).await?;
        }
        for holder in table.row_holders() {
            self.check_readable(table, holder, true).await?;
        }
        // The text protocol prints each value by its type's output function, as text COPY does.
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let only = if table.partitioning.is_some() { "" } else { "ONLY " };
        let sql =
            format!("SELECT {} FROM {only}{} WHERE {condition}", columns.join(", "), quote_table(&table.schema.name));
        let messages =
            self.client.simple_query(&sql).await.with_context(|| format!("reading rows of {}", table.schema.name))?;
        Ok(messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    async fn read(&mut self, table: &TableDefinition, chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        // The table that holds the chunk's rows: a partition, or the table itself.
        let name = match chunk {
            Chunk::Partition(n) => table
                .row_holders()
                .get(n)
                .map(|&p| p.clone())
                .with_context(|| format!("{} has no partition {n} that holds rows", table.schema.name))?,
            _ => table.schema.name.clone(),
        };
        let qualified = quote_table(&name);
        let source = match chunk {
            // A partitioned table without partitions: COPY reads no partitioned table itself.
            Chunk::Whole if table.partitioning.is_some() => {
                format!("(SELECT {} FROM {qualified})", columns.join(", "))
            }
            Chunk::Whole | Chunk::Partition(_) => format!("{qualified} ({})", columns.join(", ")),
            Chunk::KeyRange { .. } => {
                let key = table.schema.key_indexes();
                let [key] = key[..] else {
                    anyhow::bail!("{name} is split by key ranges but has no single key column")
                };
                let filter = match chunk.key_condition(&quote_ident(&table.schema.columns[key].name)) {
                    Some(condition) => format!(" WHERE {condition}"),
                    None => String::new(),
                };
                format!("(SELECT {} FROM ONLY {qualified}{filter})", columns.join(", "))
            }
            Chunk::Pages { start, end } => {
                let upper = if end == u32::MAX { String::new() } else { format!(" AND ctid < '({end},0)'::tid") };
                format!("(SELECT {} FROM ONLY {qualified} WHERE ctid >= '({start},0)'::tid{upper})", columns.join(", "))
            }
        };
        let options = match format {
            CopyFormat::PostgresBinary => "FORMAT binary",
            CopyFormat::PostgresText => "FORMAT text",
        };
        self.check_readable(table, &name, true).await?;
        let stream = match self.client.copy_out(&format!("COPY {source} TO STDOUT ({options})")).await {
            Ok(stream) => stream,
            Err(e) if names_gone(&e) => return Err(changed_since_read(&table.schema.name)),
            Err(e) => return Err(e).with_context(|| format!("starting to copy {name} out of the source")),
        };
        let stream = stream.map_err(move |e| anyhow::anyhow!("copying {name} out of the source: {e:#}"));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}
