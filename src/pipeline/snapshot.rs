//! The snapshot copy: tables read inside a pinned snapshot by parallel workers,
//! largest first and big ones in chunks, each table's keys and indexes built as soon as
//! its last chunk lands; per-table progress checkpointed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::change::TableName;
use crate::checkpoint::{CheckpointStore, ChunkCopy, ChunkPlan, TableProgress};
use crate::config::TableFilter;
use crate::copy::Chunk;
use crate::metrics::METRICS;
use crate::position::Position;
use crate::progress::{CopyProgress, Reporter, TableCopy, SNAPSHOT_PROGRESS};
use crate::schema::{SourceSchema, TableDefinition};
use crate::sink::{Sink, TableWriter};
use crate::source::{SnapshotPoint, Source, TableRewritten};

/// What a finished snapshot copied.
#[derive(Clone, Debug, Default)]
pub struct CopySummary {
    pub tables: usize,
    pub rows: u64,
    pub elapsed: Duration,
    /// Tables not copied: they changed under the snapshot ([`TableRewritten`]).
    pub rewritten: HashSet<TableName>,
}

/// The last snapshot this process copied (for the demo's figures).
pub static LAST_COPY: std::sync::Mutex<Option<CopySummary>> = std::sync::Mutex::new(None);

pub(super) fn log_copy(summary: &CopySummary) {
    if let Ok(mut last) = LAST_COPY.lock() {
        *last = Some(summary.clone());
    }
    let secs = summary.elapsed.as_secs_f64().max(0.001);
    tracing::info!(
        tables = summary.tables,
        rows = summary.rows,
        seconds = format!("{secs:.1}"),
        rows_per_second = (summary.rows as f64 / secs) as u64,
        "snapshot copied"
    );
}

/// The copy's shared state, locked; a poisoned lock (a worker panicked holding it) is an error.
fn locked<'a, T>(mutex: &'a Mutex<T>, what: &str) -> anyhow::Result<std::sync::MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| anyhow::anyhow!("{what} poisoned"))
}

/// Tables whose copy has not finished, and tables copied before that the target no longer
/// has (dropped there to be copied again by a schema change whose transaction committed
/// just before the process ended): their copies are forgotten.
///
/// With `schema_changes_streamed`, a new table that is a partition on the target was
/// detached on the source after the checkpoint: it is left to the stream, whose changes
/// before the detach still name its partitioned table (they go into the partition), and
/// whose detach then copies it. Copied now, those changes would land beside it.
pub(super) async fn pending_tables<'a>(
    store: &CheckpointStore,
    sink: &mut dyn Sink,
    schema: &'a SourceSchema,
    schema_changes_streamed: bool,
) -> anyhow::Result<Vec<&'a TableDefinition>> {
    let mut pending = Vec::new();
    let mut copied = Vec::new();
    for table in &schema.tables {
        match store.table(&table.schema.name)? {
            None => pending.push(table),
            Some(_) => copied.push(table),
        }
    }
    if schema_changes_streamed && !pending.is_empty() {
        let names: Vec<TableName> = pending.iter().map(|t| t.schema.name.clone()).collect();
        let detached = sink.partitions_of(&names).await?;
        for name in &detached {
            tracing::info!(table = %name, "detached on the source after the checkpoint: the stream's detach copies it");
        }
        pending.retain(|t| !detached.contains(&t.schema.name));
    }
    let names: Vec<TableName> = copied.iter().map(|t| t.schema.name.clone()).collect();
    let missing = sink.missing_tables(&names).await?;
    for table in copied.into_iter().filter(|t| missing.contains(&t.schema.name)) {
        tracing::warn!(table = %table.schema.name, "copied before, but the target no longer has it: copied again");
        store.forget_table(&table.schema.name.to_string())?;
        pending.push(table);
    }
    Ok(pending)
}

/// Tables copied before that the source no longer holds under their names although the
/// selection still matches them: dropped or renamed while the pipeline was not streaming.
/// The stream drops them at their position; they go from the target now, before a table
/// copied now needs one of their names (a renamed table keeps its index names), and the
/// applier leaves out their changes until then (a renamed table's rows come with the copy
/// under its new name). Their checkpoint entries stay, so a restart drops them again; a
/// table created under such a name later is missing on the target, and copied.
pub(super) async fn drop_gone_tables(
    store: &CheckpointStore,
    sink: &mut dyn Sink,
    schema: &SourceSchema,
    filter: &TableFilter,
) -> anyhow::Result<HashSet<TableName>> {
    let present: HashSet<String> = schema
        .tables
        .iter()
        .flat_map(|t| {
            let partitions = t.partitioning.iter().flat_map(|p| p.partitions.iter().map(|p| p.name.to_string()));
            std::iter::once(t.schema.name.to_string()).chain(partitions)
        })
        .collect();
    let mut gone = Vec::new();
    for (name, _) in store.tables()? {
        if present.contains(&name) || !filter.includes(&name) {
            continue;
        }
        // The store keys tables as `schema.name`: with more than one dot, which table it
        // names is not certain, and the stream's own drop is left to remove it.
        match name.split('.').collect::<Vec<_>>()[..] {
            [schema, table] => gone.push(TableName::new(schema, table)),
            _ => tracing::warn!(table = %name, "gone from the source; its name is ambiguous, so the stream drops it"),
        }
    }
    if !gone.is_empty() {
        let names: Vec<String> = gone.iter().map(ToString::to_string).collect();
        tracing::info!(tables = %names.join(", "), "dropped or renamed on the source since the checkpoint: dropped on the target now");
        sink.drop_tables(&gone).await?;
    }
    Ok(gone.into_iter().collect())
}

/// How a snapshot copy goes.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Copy connections on each side.
    pub workers: usize,
    /// Empty the tables on the target first (they may hold rows of a copy cut short).
    pub truncate_first: bool,
    /// Where the stream that follows begins, when one does: a table's copy cut short
    /// resumes from its finished key ranges if each was copied at or after it (the stream
    /// then brings each range up to date from its own snapshot on). `None`: no resuming.
    pub resume_from: Option<Position>,
}

/// How many snapshots [`copy_consistently`] takes at most before it gives up on tables
/// that are truncated again during each copy.
const COPY_ROUNDS: usize = 5;

/// [`copy_tables`], then, each under a new snapshot, the tables that changed under the
/// snapshot before (a TRUNCATE while the copy ran), until none did. Each table's copy
/// position is the snapshot it was copied under.
pub async fn copy_consistently(
    source: &mut dyn Source,
    sink: &dyn Sink,
    store: &Arc<CheckpointStore>,
    snapshot: SnapshotPoint,
    tables: &[&TableDefinition],
    options: &CopyOptions,
) -> anyhow::Result<CopySummary> {
    let mut summary = copy_tables(source, sink, store, &snapshot, tables, options).await?;
    for round in 2.. {
        if summary.rewritten.is_empty() {
            break;
        }
        let mut names: Vec<String> = summary.rewritten.iter().map(ToString::to_string).collect();
        names.sort();
        let names = names.join(", ");
        anyhow::ensure!(
            round <= COPY_ROUNDS,
            "{names}: truncated or rewritten on the source during each of {COPY_ROUNDS} snapshot copies; nothing of \
             them is marked copied — run cutover again once that stops"
        );
        tracing::warn!(tables = %names, "truncated or rewritten on the source after the snapshot was pinned: copying them again under a new snapshot");
        let again: Vec<&TableDefinition> =
            tables.iter().copied().filter(|t| summary.rewritten.contains(&t.schema.name)).collect();
        // Their ranges copied under the last snapshot hold rows the TRUNCATE removed.
        for table in &again {
            store.forget_chunk_plan(&table.schema.name)?;
        }
        let snapshot = source.new_snapshot().await?;
        let next = copy_tables(
            source,
            sink,
            store,
            &snapshot,
            &again,
            &CopyOptions { truncate_first: true, ..options.clone() },
        )
        .await?;
        summary = CopySummary {
            tables: summary.tables + next.tables,
            rows: summary.rows + next.rows,
            elapsed: summary.elapsed + next.elapsed,
            rewritten: next.rewritten,
        };
    }
    Ok(summary)
}

/// Whether a copy of the table may finish under another snapshot than it began: only
/// when its rows are split by key ranges and no other unique index holds them, since
/// ranges copied at different moments may hold a unique value twice until the stream
/// catches up, and the unique index is built right after the copy.
fn resumable(table: &TableDefinition, chunks: &[Chunk]) -> bool {
    chunks.len() > 1
        && chunks.iter().all(|c| matches!(c, Chunk::KeyRange { .. }))
        && !table.constraints.iter().any(|(_, d)| d.starts_with("UNIQUE") || d.starts_with("EXCLUDE"))
        && !table.indexes.iter().any(|i| i.starts_with("CREATE UNIQUE"))
}

/// What one table's copy takes on: its chunks still to copy, and (split by key ranges)
/// its plan, recorded before the first chunk so a copy cut short can resume.
struct TableWork {
    chunks: Vec<Chunk>,
    plan: Option<ChunkPlan>,
    /// Whether the target's table starts empty (else only the unfinished ranges are emptied).
    truncate: bool,
}

/// Plans one table's copy: resumes a plan a copy cut short left, if it still holds
/// (same columns and source shape, still resumable, every finished range no older than
/// where the stream begins, and the target holding exactly the rows recorded for them),
/// emptying the ranges not finished; or makes a new one. A plan not resumed is dropped
/// before anything is copied.
async fn plan_table(
    source: &dyn Source,
    store: &CheckpointStore,
    target: &mut dyn TableWriter,
    table: &TableDefinition,
    shape: Option<&String>,
    options: &CopyOptions,
) -> anyhow::Result<TableWork> {
    let name = &table.schema.name;
    let columns = table.signature();
    let previous = store.chunk_plan(name)?;
    if let (Some(plan), Some(from)) = (&previous, &options.resume_from) {
        let holds = plan.columns == columns
            && plan.shape.as_ref() == shape
            && resumable(table, &plan.chunks)
            && plan.finished.iter().all(|f| f.copied_at >= *from);
        if holds && !plan.finished.is_empty() {
            let finished: Vec<Chunk> = plan.finished.iter().map(|f| f.chunk).collect();
            let recorded: u64 = plan.finished.iter().map(|f| f.rows).sum();
            let (found, all) = target.count_chunks(table, &finished).await?;
            if found == recorded {
                let chunks: Vec<Chunk> = plan.chunks.iter().copied().filter(|c| !finished.contains(c)).collect();
                tracing::info!(table = %name, finished = finished.len(), left = chunks.len(), rows = recorded, "resuming the table's copy from its finished key ranges");
                // Rows past the finished ranges: a range that landed unrecorded.
                if all > found {
                    target.delete_chunks(table, &chunks).await?;
                }
                return Ok(TableWork { chunks, plan: previous, truncate: false });
            }
            tracing::warn!(table = %name, recorded, found, "the target does not hold the rows recorded for the table's finished key ranges: copying it from the start");
        }
    }
    let chunks = source.chunks(table, options.workers);
    let plan = (options.resume_from.is_some() && resumable(table, &chunks)).then(|| ChunkPlan {
        chunks: chunks.clone(),
        finished: Vec::new(),
        columns,
        shape: shape.cloned(),
    });
    match &plan {
        Some(plan) => store.save_chunk_plan(name, plan)?,
        None if previous.is_some() => store.forget_chunk_plan(name)?,
        None => {}
    }
    let cut_short = previous.is_some_and(|p| !p.finished.is_empty());
    Ok(TableWork { chunks, plan, truncate: options.truncate_first || cut_short })
}

/// Copies tables inside `snapshot` with `workers` connections on each side,
/// largest first and big ones in chunks, building each table's keys and indexes
/// on a connection of its own as soon as its last chunk lands.
async fn copy_tables(
    source: &mut dyn Source,
    sink: &dyn Sink,
    store: &Arc<CheckpointStore>,
    snapshot: &SnapshotPoint,
    tables: &[&TableDefinition],
    options: &CopyOptions,
) -> anyhow::Result<CopySummary> {
    let workers = options.workers;
    let started = Instant::now();
    let mut readers = Vec::with_capacity(workers);
    for _ in 0..workers {
        readers.push(source.snapshot_reader(snapshot).await?);
    }
    // Every reader holds the snapshot now; the exporting session may go.
    source.release_snapshot().await;
    crate::failpoint::hit("snapshot-pinned");

    let mut sorted: Vec<Arc<TableDefinition>> = tables.iter().map(|t| Arc::new((*t).clone())).collect();
    sorted.sort_by_key(|t| std::cmp::Reverse(t.pages));
    let mut work = HashMap::new();
    let mut target = sink.table_writer().await?;
    for table in &sorted {
        let shape = snapshot.shapes.get(&table.schema.name.to_string());
        let planned = plan_table(source, store, target.as_mut(), table, shape, options).await?;
        work.insert(table.schema.name.clone(), planned);
    }
    let truncated: Vec<TableName> = sorted
        .iter()
        .map(|t| t.schema.name.clone())
        .filter(|name| work.get(name).is_some_and(|w| w.truncate))
        .collect();
    if !truncated.is_empty() {
        target.truncate(&truncated).await?;
    }
    drop(target);
    METRICS.set_phase("snapshot");
    METRICS.snapshot_tables.with_label_values(&["pending"]).add(sorted.len() as i64);
    let dialect = source.dialect();
    let mut queue = VecDeque::new();
    let mut remaining = HashMap::new();
    let mut plans = HashMap::new();
    let mut finished_before = Vec::new();
    for table in &sorted {
        let Some(TableWork { chunks, plan, .. }) = work.remove(&table.schema.name) else { continue };
        let rows_before = plan.iter().flat_map(|p| &p.finished).map(|f| f.rows).sum();
        if chunks.is_empty() {
            // Every range landed before the process ended, the table's record did not.
            finished_before.push((table.clone(), rows_before));
        }
        remaining.insert(table.schema.name.clone(), (chunks.len(), rows_before));
        if let Some(plan) = plan {
            plans.insert(table.schema.name.clone(), plan);
        }
        let format = sink.copy_format(table, dialect);
        queue.extend(chunks.into_iter().map(|chunk| (table.clone(), chunk, format)));
    }
    let queue = Arc::new(Mutex::new(queue));
    let remaining = Arc::new(Mutex::new(remaining));
    // Key-range copies' plans, each recorded as its chunks land.
    let plans = Arc::new(Mutex::new(plans));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Arc<TableDefinition>, u64)>();
    let mut index_writer = sink.table_writer().await?;
    let index_store = store.clone();
    let position = snapshot.position.clone();
    let untracked = snapshot.untracked.clone();
    let shapes = snapshot.shapes.clone();
    let index_plans = plans.clone();
    let indexer = tokio::spawn(async move {
        let mut total = 0u64;
        while let Some((table, rows)) = done_rx.recv().await {
            let started = Instant::now();
            index_writer.build_indexes(&table).await?;
            let finished = locked(&index_plans, "chunk plans")?.remove(&table.schema.name).map(|p| p.finished);
            // Ranges copied under snapshots of their own keep their positions.
            let ranges = finished.filter(|f| f.iter().any(|f| f.copied_at != position)).unwrap_or_default();
            let progress = TableProgress {
                copied_at: ranges.iter().map(|f| &f.copied_at).min().unwrap_or(&position).clone(),
                rows,
                untracked: untracked.get(&table.schema.name.to_string()).copied(),
                shape: shapes.get(&table.schema.name.to_string()).cloned(),
                ranges,
            };
            index_store.save_table(&table.schema.name, &progress)?;
            METRICS.snapshot_tables.with_label_values(&["pending"]).dec();
            METRICS.snapshot_tables.with_label_values(&["done"]).inc();
            tracing::info!(table = %table.schema.name, rows, index_seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "table copied");
            total += rows;
        }
        anyhow::Ok(total)
    });

    crate::notify::notify(&format!("STATUS=snapshot: copying {} table(s)", sorted.len()));
    let progress = Arc::new(CopyProgress::new(
        sorted
            .iter()
            .map(|t| TableCopy::new(t.schema.name.to_string(), t.estimated_rows, t.pages.saturating_mul(8192)))
            .collect(),
    ));
    let table_index: Arc<HashMap<TableName, usize>> =
        Arc::new(sorted.iter().enumerate().map(|(i, t)| (t.schema.name.clone(), i)).collect());
    if let Ok(mut current) = SNAPSHOT_PROGRESS.lock() {
        *current = Some(progress.clone());
    }
    // Tables that changed under the snapshot: the caller copies them again.
    let rewritten: Arc<Mutex<HashSet<TableName>>> = Arc::default();
    for (table, rows) in finished_before {
        let _ = done_tx.send((table, rows));
    }
    let mut tasks = JoinSet::new();
    for mut reader in readers {
        let mut writer = sink.table_writer().await?;
        let queue = queue.clone();
        let remaining = remaining.clone();
        let done_tx = done_tx.clone();
        let progress = progress.clone();
        let table_index = table_index.clone();
        let rewritten = rewritten.clone();
        let plans = plans.clone();
        let store = store.clone();
        let position = snapshot.position.clone();
        tasks.spawn(async move {
            loop {
                let next = locked(&queue, "copy queue")?.pop_front();
                let Some((table, chunk, format)) = next else { return anyhow::Ok(()) };
                let index = table_index.get(&table.schema.name).copied().unwrap_or_default();
                let skip = locked(&rewritten, "copy state")?.contains(&table.schema.name);
                let read = match skip {
                    true => None,
                    false => match reader.read(&table, chunk, format).await {
                        Err(e) if e.downcast_ref::<TableRewritten>().is_some() => None,
                        read => Some(read?),
                    },
                };
                let copied = match read {
                    Some(mut rows) => {
                        let counter = progress.clone();
                        rows.data = Box::pin(futures_util::TryStreamExt::inspect_ok(rows.data, move |bytes| {
                            counter.moved(index, bytes.len() as u64);
                        }));
                        let copied = writer.write(&table, rows).await?;
                        crate::failpoint::hit("snapshot-chunk-written");
                        if let Some(plan) = locked(&plans, "chunk plans")?.get_mut(&table.schema.name) {
                            plan.finished.push(ChunkCopy { chunk, copied_at: position.clone(), rows: copied });
                            store.save_chunk_plan(&table.schema.name, plan)?;
                        }
                        crate::failpoint::hit("snapshot-chunk-copied");
                        progress.chunk_copied(index, copied);
                        METRICS.snapshot_rows.with_label_values(&[&table.schema.name.to_string()]).inc_by(copied);
                        if chunk != Chunk::Whole {
                            tracing::debug!(table = %table.schema.name, ?chunk, rows = copied, "chunk copied");
                        }
                        copied
                    }
                    None => {
                        locked(&rewritten, "copy state")?.insert(table.schema.name.clone());
                        0
                    }
                };
                let finished = {
                    let mut remaining = locked(&remaining, "copy progress")?;
                    let entry = remaining.entry(table.schema.name.clone()).or_insert((1, 0));
                    entry.0 -= 1;
                    entry.1 += copied;
                    let rewritten = locked(&rewritten, "copy state")?;
                    (entry.0 == 0 && !rewritten.contains(&table.schema.name)).then_some(entry.1)
                };
                if let Some(rows) = finished {
                    // The indexer only stops when every sender is gone.
                    progress.table_copied(index, rows);
                    let _ = done_tx.send((table, rows));
                }
            }
        });
    }
    drop(done_tx);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut display = tokio::time::interval(Duration::from_millis(250));
    let mut reporter = Reporter::new(progress.estimated_bytes());
    loop {
        let result = tokio::select! {
            result = tasks.join_next() => match result {
                Some(result) => result,
                None => break,
            },
            // The coordinator is alive while it waits on the workers.
            _ = heartbeat.tick() => {
                crate::notify::notify("WATCHDOG=1");
                continue;
            }
            _ = display.tick() => {
                reporter.tick(&progress);
                continue;
            }
        };
        if let Err(e) = result.context("a copy worker panicked").and_then(|r| r) {
            reporter.finish();
            tasks.abort_all();
            indexer.abort();
            return Err(e);
        }
    }
    reporter.tick(&progress);
    reporter.finish();
    let rows = indexer.await.context("the index builder panicked")??;
    if let Ok(mut current) = SNAPSHOT_PROGRESS.lock() {
        *current = None;
    }
    let rewritten = std::mem::take(&mut *locked(&rewritten, "copy state")?);
    Ok(CopySummary { tables: sorted.len() - rewritten.len(), rows, elapsed: started.elapsed(), rewritten })
}
