//! The pipeline: snapshot, then stream, with checkpoints.
//!
//! It knows no database by name: it drives a [`Source`] and a [`Sink`].
//!
//! Order of work, and why it is safe:
//! 1. The target's own record of the last applied position wins over RocksDB's.
//! 2. The first run sets up the change stream and pins a snapshot at the point
//!    the stream begins; tables are copied inside it. A later run copies the
//!    tables it does not have yet under a new snapshot, and each table
//!    remembers the position of the snapshot it was copied under.
//! 3. Streaming applies a change to a table only if its transaction is ordered
//!    at or after the table's copy position, and skips transactions the target
//!    already has. Whole source transactions are grouped into target
//!    transactions that carry their end position; after each commit the
//!    position goes to RocksDB and back to the source as confirmed.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::change::{Change, Event, TableName};
use crate::checkpoint::{CheckpointStore, TableProgress};
use crate::config::{Config, SnapshotMode, SourceKind, TargetKind};
use crate::metrics::METRICS;
use crate::pgconn::ConnectParams;
use crate::position::{Position, StopAt};
use crate::progress::{Reporter, TableCopy};
use crate::retry::{is_resume, is_transient};
use crate::schema::{SourceSchema, TableDefinition};
use crate::sink::{postgres::PostgresSink, Sink};
use crate::source::mysql::{MysqlParams, MysqlSource};
use crate::source::{postgres::PostgresSource, ChangeStream, Chunk, SnapshotPoint, Source};

/// What a finished snapshot copied.
#[derive(Clone, Debug, Default)]
pub struct CopySummary {
    pub tables: usize,
    pub rows: u64,
    pub elapsed: Duration,
}

/// Opens the configured source and sink.
pub async fn connect(config: &Config) -> anyhow::Result<(Box<dyn Source>, Box<dyn Sink>)> {
    Ok((connect_source(config).await?, connect_sink(config).await?))
}

/// Opens the configured source.
pub async fn connect_source(config: &Config) -> anyhow::Result<Box<dyn Source>> {
    Ok(match config.source.kind {
        SourceKind::Postgres => {
            let params = ConnectParams::from_endpoint(config.source.endpoint()).context("[source] url")?;
            Box::new(PostgresSource::connect(params, config.table_filter(), &config.name).await?)
        }
        SourceKind::Mysql => {
            let params = MysqlParams::from_endpoint(config.source.endpoint()).context("[source] url")?;
            Box::new(MysqlSource::connect(params, config.table_filter(), &config.name).await?)
        }
        SourceKind::Sqlite => {
            let path = crate::source::sqlite::path_from_url(config.source.url.expose()).context("[source] url")?;
            let on_mismatch = config.source.on_type_mismatch.unwrap_or_default();
            Box::new(crate::source::sqlite::SqliteSource::open(path, config.table_filter(), on_mismatch)?)
        }
        SourceKind::Mongodb => {
            let mapping = config.source.mapping.unwrap_or_default();
            let source =
                crate::source::mongodb::MongoSource::connect(config.source.endpoint(), config.table_filter(), mapping);
            Box::new(source.await.context("[source] url")?)
        }
    })
}

/// Opens the configured sink.
pub async fn connect_sink(config: &Config) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match config.target.kind {
        TargetKind::Postgres => {
            let params = ConnectParams::from_endpoint(config.target.endpoint()).context("[target] url")?;
            Box::new(PostgresSink::connect(params, &config.name).await?)
        }
        TargetKind::Mysql => {
            let params = MysqlParams::from_endpoint(config.target.endpoint()).context("[target] url")?;
            Box::new(crate::sink::mysql::MysqlSink::connect(params, &config.name, &home_schema(config)?).await?)
        }
    })
}

/// The source schema that lands in a MySQL target URL's own database: a MySQL
/// source's database, as PostgreSQL's `public` does.
fn home_schema(config: &Config) -> anyhow::Result<String> {
    Ok(match config.source.kind {
        SourceKind::Mysql => MysqlParams::from_endpoint(config.source.endpoint())?.database,
        _ => "public".to_string(),
    })
}

/// The MySQL target database a source schema's tables land in.
pub fn target_database(config: &Config, schema: &str) -> anyhow::Result<String> {
    let url_database = MysqlParams::from_endpoint(config.target.endpoint()).context("[target] url")?.database;
    Ok(crate::sink::mysql::database_for(&url_database, &home_schema(config)?, schema))
}

/// Where the source's change log is now.
pub async fn source_position(config: &Config) -> anyhow::Result<Position> {
    match config.source.kind {
        SourceKind::Postgres => {
            let client =
                ConnectParams::from_endpoint(config.source.endpoint()).context("[source] url")?.connect().await?;
            let lsn: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .context("reading the source's WAL position")?
                .get(0);
            Ok(format!("lsn:{lsn}").parse()?)
        }
        SourceKind::Mysql => {
            let mut conn =
                MysqlParams::from_endpoint(config.source.endpoint()).context("[source] url")?.connect().await?;
            Ok(Position::Binlog(crate::source::mysql::binlog_position(&mut conn).await?))
        }
        other => anyhow::bail!("a {other:?} source has no change log position"),
    }
}

/// Waits until the target holds everything the source wrote before `position`
/// (or `timeout` passes): whether it does, and the position last seen applied.
/// PostgreSQL: the slot's confirmed position, which keepalives move across idle
/// stretches; MySQL: the running daemon's applied position.
pub async fn wait_until_applied(
    config: &Config,
    position: &Position,
    timeout: Duration,
) -> anyhow::Result<(bool, Option<String>)> {
    let started = Instant::now();
    let slot_client = match config.source.kind {
        SourceKind::Postgres => {
            Some(ConnectParams::from_endpoint(config.source.endpoint()).context("[source] url")?.connect().await?)
        }
        _ => None,
    };
    loop {
        let applied = match &slot_client {
            Some(client) => client
                .query_opt(
                    "SELECT 'lsn:' || confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&crate::source::postgres::slot_name(&config.name)],
                )
                .await
                .context("reading the slot's confirmed position")?
                .and_then(|row| row.get::<_, Option<String>>(0)),
            None => crate::status::daemon_status(&config.state.dir).await?.applied_position,
        };
        if applied.as_deref().and_then(|p| p.parse::<Position>().ok()).is_some_and(|a| position.is_reached_by(&a)) {
            return Ok((true, applied));
        }
        if started.elapsed() >= timeout {
            return Ok((false, applied));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the pipeline until `shutdown` resolves (or, with `mode = "only"`, until the copy
/// is done). A lost connection to either server is retried with exponential backoff
/// (capped at 30 s) from the last checkpoint, for up to `[pipeline] max_retry_time`.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // `cutover status` on a stopped pipeline holds the store for a moment: wait it out.
    let mut attempts = 0;
    let store = loop {
        match CheckpointStore::open(&config.state.dir) {
            Ok(store) => break Arc::new(store),
            Err(_) if attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // After a switchover the old source is no source any more (with fallback it is the
    // fallback stream's target): starting the forward stream again would apply the fallback's
    // writes back and reset the new primary's sequences to the old source's values.
    if let Some(record) = store.switchover()? {
        tracing::info!(final_position = %record.final_position, "this pipeline switched over: the forward stream is over");
        METRICS.set_phase("switched-over");
        return Ok(());
    }
    let metrics_server = config.metrics.address().map(|listen| tokio::spawn(crate::metrics::serve(listen)));
    let (stop_tx, mut stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let control = crate::status::serve(&config.state.dir, store.clone(), stop_tx.clone()).await?;
    let signal = tokio::spawn(async move {
        shutdown.await;
        crate::notify::notify("STOPPING=1");
        let _ = stop_tx.send(true);
    });
    let mut delay = Duration::from_secs(1);
    let mut failing_since: Option<Instant> = None;
    let result = loop {
        let attempt = Instant::now();
        let error = match run_once(config, &store, stop.clone()).await {
            Ok(()) => break Ok(()),
            Err(e) if is_resume(&e) => {
                tracing::info!(reason = format!("{e:#}"), "resuming from the last checkpoint");
                continue;
            }
            Err(e) if is_transient(&e) => e,
            Err(e) => {
                METRICS.errors.with_label_values(&["fatal"]).inc();
                break Err(e);
            }
        };
        METRICS.errors.with_label_values(&["connection"]).inc();
        METRICS.set_healthy(false);
        crate::status::set_last_error(Some(format!("{error:#}")));
        // An attempt that ran for a while was a recovery: the retry budget starts over.
        if attempt.elapsed() > Duration::from_secs(60) {
            failing_since = None;
            delay = Duration::from_secs(1);
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= config.pipeline.max_retry_time() {
            break Err(error.context(format!(
                "gave up after retrying for {} s ([pipeline] max_retry_time)",
                since.elapsed().as_secs()
            )));
        }
        tracing::warn!(
            error = format!("{error:#}"),
            retry_in_seconds = delay.as_secs(),
            "connection lost; resuming from the last checkpoint"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => break Ok(()),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
        // Which server went away, as far as the error says.
        let side = if format!("{error:#}").contains("target") { "target" } else { "source" };
        METRICS.reconnects.with_label_values(&[side]).inc();
    };
    signal.abort();
    control.abort();
    let _ = std::fs::remove_file(crate::status::socket_path(&config.state.dir));
    if let Some(server) = metrics_server {
        server.abort();
    }
    METRICS.set_phase(if store.switchover()?.is_some() { "switched-over" } else { "stopped" });
    METRICS.set_healthy(result.is_ok());
    result
}

/// Resolves once the pipeline is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once it has said stop.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// One attempt: connect, copy what is missing, stream until stopped or broken.
async fn run_once(config: &Config, store: &Arc<CheckpointStore>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let store = store.clone();
    let (mut source, mut sink) = connect(config).await?;
    METRICS.set_healthy(true);
    crate::notify::notify("READY=1\nSTATUS=connected to source and target");
    let schema = source.schema().await?;
    if schema.tables.is_empty() {
        anyhow::bail!("[source] tables / exclude select no table on the source: nothing to replicate");
    }
    let workers = config.snapshot.workers;

    if config.snapshot.mode == SnapshotMode::Only {
        let pending = pending_tables(&store, &schema)?;
        if !pending.is_empty() {
            let fresh = store.tables()?.is_empty();
            sink.create_tables(&schema, &pending, fresh).await?;
            let snapshot = source.new_snapshot().await?;
            let summary =
                copy_tables(source.as_mut(), sink.as_ref(), &store, &snapshot, &pending, workers, !fresh).await?;
            log_copy(&summary);
        }
        // Also when every table was copied before a restart: the process may have died before this.
        sink.finish_snapshot(&schema).await?;
        tracing::info!("snapshot complete (mode = \"only\"): exiting");
        return Ok(());
    }

    let (identity, first_snapshot) = match store.identity()? {
        Some(identity) => {
            source.resume_stream(&identity, &schema.tables).await?;
            (identity, None)
        }
        None => {
            let (identity, snapshot) = source.create_stream(&schema.tables).await?;
            store.save_identity(&identity)?;
            (identity, Some(snapshot))
        }
    };

    let pending = match config.snapshot.mode {
        SnapshotMode::Initial => pending_tables(&store, &schema)?,
        SnapshotMode::Never | SnapshotMode::Only => Vec::new(),
    };
    if pending.is_empty() {
        source.release_snapshot().await;
        // Every table was copied, but the process may have died before the foreign keys and
        // sequence values went in; finish_snapshot adds only what is missing. Tables copied at
        // different snapshots may not satisfy a key until the stream catches up: say so, stream on.
        if config.snapshot.mode == SnapshotMode::Initial {
            if let Err(e) = sink.finish_snapshot(&schema).await {
                tracing::warn!(
                    "foreign keys or sequence values not set on the target yet ({e:#}); the next start tries again"
                );
            }
        }
    } else {
        let fresh = first_snapshot.is_some();
        sink.create_tables(&schema, &pending, fresh).await?;
        let snapshot = match first_snapshot {
            Some(snapshot) => snapshot,
            None => source.new_snapshot().await?,
        };
        let summary = copy_tables(source.as_mut(), sink.as_ref(), &store, &snapshot, &pending, workers, !fresh).await?;
        sink.finish_snapshot(&schema).await?;
        log_copy(&summary);
    }

    let start = match (sink.applied_position().await?, store.position()?) {
        (Some(target), checkpoint) => {
            if checkpoint.as_ref() != Some(&target) {
                tracing::info!(%target, "the target is ahead of the checkpoint store: taking the target's position");
                store.save_position(&target)?;
            }
            target
        }
        (None, Some(checkpoint)) => checkpoint,
        (None, None) => config.stream.start().unwrap_or_else(|| identity.consistent_point.clone()),
    };
    let mut copied_at = HashMap::new();
    let mut untracked = HashMap::new();
    for (name, progress) in store.tables()? {
        if let Some(count) = progress.untracked {
            untracked.insert(name.clone(), count);
        }
        copied_at.insert(name, progress.copied_at);
    }
    let (confirmed, confirmed_rx) = watch::channel(start.clone());
    let changes = source.start_stream(&start, confirmed_rx, &untracked).await?;
    stream(changes, source.as_mut(), sink.as_mut(), &store, start, confirmed, copied_at, config, stop).await
}

/// The last snapshot this process copied (for the demo's figures).
pub static LAST_COPY: std::sync::Mutex<Option<CopySummary>> = std::sync::Mutex::new(None);

fn log_copy(summary: &CopySummary) {
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

/// Tables whose copy has not finished.
fn pending_tables<'a>(store: &CheckpointStore, schema: &'a SourceSchema) -> anyhow::Result<Vec<&'a TableDefinition>> {
    let mut pending = Vec::new();
    for table in &schema.tables {
        if store.table(&table.schema.name)?.is_none() {
            pending.push(table);
        }
    }
    Ok(pending)
}

/// Copies tables inside `snapshot` with `workers` connections on each side,
/// largest first and big ones in chunks, building each table's keys and indexes
/// on a connection of its own as soon as its last chunk lands.
pub async fn copy_tables(
    source: &mut dyn Source,
    sink: &dyn Sink,
    store: &Arc<CheckpointStore>,
    snapshot: &SnapshotPoint,
    tables: &[&TableDefinition],
    workers: usize,
    truncate_first: bool,
) -> anyhow::Result<CopySummary> {
    let started = Instant::now();
    let mut readers = Vec::with_capacity(workers);
    for _ in 0..workers {
        readers.push(source.snapshot_reader(snapshot).await?);
    }
    // Every reader holds the snapshot now; the exporting session may go.
    source.release_snapshot().await;

    let mut sorted: Vec<Arc<TableDefinition>> = tables.iter().map(|t| Arc::new((*t).clone())).collect();
    sorted.sort_by_key(|t| std::cmp::Reverse(t.pages));
    if truncate_first {
        let mut writer = sink.table_writer().await?;
        for table in &sorted {
            writer.truncate(&table.schema.name).await?;
        }
    }
    METRICS.set_phase("snapshot");
    METRICS.snapshot_tables.with_label_values(&["pending"]).add(sorted.len() as i64);
    let dialect = source.dialect();
    let mut queue = VecDeque::new();
    let mut remaining = HashMap::new();
    for table in &sorted {
        let chunks = source.chunks(table, workers);
        remaining.insert(table.schema.name.clone(), (chunks.len(), 0u64));
        let format = sink.copy_format(table, dialect);
        queue.extend(chunks.into_iter().map(|chunk| (table.clone(), chunk, format)));
    }
    let queue = Arc::new(Mutex::new(queue));
    let remaining = Arc::new(Mutex::new(remaining));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Arc<TableDefinition>, u64)>();
    let mut index_writer = sink.table_writer().await?;
    let index_store = store.clone();
    let position = snapshot.position.clone();
    let untracked = snapshot.untracked.clone();
    let indexer = tokio::spawn(async move {
        let mut total = 0u64;
        while let Some((table, rows)) = done_rx.recv().await {
            let started = Instant::now();
            index_writer.build_indexes(&table).await?;
            let progress = TableProgress {
                copied_at: position.clone(),
                rows,
                untracked: untracked.get(&table.schema.name.to_string()).copied(),
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
    let progress = Arc::new(CopyProgress {
        started: Instant::now(),
        tables: sorted
            .iter()
            .map(|t| TableCopy::new(t.schema.name.to_string(), t.estimated_rows, t.pages.saturating_mul(8192)))
            .collect(),
        estimated_bytes: sorted.iter().map(|t| t.pages.saturating_mul(8192)).sum(),
        bytes: Default::default(),
        rows: Default::default(),
        done: Default::default(),
    });
    let table_index: Arc<HashMap<TableName, usize>> =
        Arc::new(sorted.iter().enumerate().map(|(i, t)| (t.schema.name.clone(), i)).collect());
    if let Ok(mut current) = SNAPSHOT_PROGRESS.lock() {
        *current = Some(progress.clone());
    }
    let mut tasks = JoinSet::new();
    for mut reader in readers {
        let mut writer = sink.table_writer().await?;
        let queue = queue.clone();
        let remaining = remaining.clone();
        let done_tx = done_tx.clone();
        let progress = progress.clone();
        let table_index = table_index.clone();
        tasks.spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            loop {
                let next = queue.lock().map_err(|_| anyhow::anyhow!("copy queue poisoned"))?.pop_front();
                let Some((table, chunk, format)) = next else { return anyhow::Ok(()) };
                let index = table_index.get(&table.schema.name).copied().unwrap_or_default();
                let mut rows = reader.read(&table, chunk, format).await?;
                let counter = progress.clone();
                rows.data = Box::pin(futures_util::TryStreamExt::inspect_ok(rows.data, move |bytes| {
                    counter.bytes.fetch_add(bytes.len() as u64, Relaxed);
                    if let Some(table) = counter.tables.get(index) {
                        table.bytes.fetch_add(bytes.len() as u64, Relaxed);
                    }
                }));
                let copied = writer.write(&table, rows).await?;
                progress.rows.fetch_add(copied, Relaxed);
                if let Some(table) = progress.tables.get(index) {
                    table.rows.fetch_add(copied, Relaxed);
                }
                METRICS.snapshot_rows.with_label_values(&[&table.schema.name.to_string()]).inc_by(copied);
                if chunk != Chunk::Whole {
                    tracing::debug!(table = %table.schema.name, ?chunk, rows = copied, "chunk copied");
                }
                let finished = {
                    let mut remaining = remaining.lock().map_err(|_| anyhow::anyhow!("copy progress poisoned"))?;
                    let entry = remaining.entry(table.schema.name.clone()).or_insert((1, 0));
                    entry.0 -= 1;
                    entry.1 += copied;
                    (entry.0 == 0).then_some(entry.1)
                };
                if let Some(rows) = finished {
                    // The indexer only stops when every sender is gone.
                    progress.done.fetch_add(1, Relaxed);
                    if let Some(table) = progress.tables.get(index) {
                        table.finished.store(rows, Relaxed);
                    }
                    let _ = done_tx.send((table, rows));
                }
            }
        });
    }
    drop(done_tx);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut display = tokio::time::interval(Duration::from_millis(250));
    let mut reporter = Reporter::new(progress.estimated_bytes);
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
    Ok(CopySummary { tables: sorted.len(), rows, elapsed: started.elapsed() })
}

/// What the copy workers have moved so far.
pub struct CopyProgress {
    started: Instant,
    /// Every table being copied.
    tables: Vec<TableCopy>,
    /// The tables' size on disk: the yardstick for the ETA.
    estimated_bytes: u64,
    /// Bytes streamed from source to target.
    bytes: std::sync::atomic::AtomicU64,
    /// Rows in finished chunks.
    rows: std::sync::atomic::AtomicU64,
    /// Tables whose every chunk is copied.
    done: std::sync::atomic::AtomicUsize,
}

/// The snapshot in progress, for `status`; `None` when no copy runs.
pub static SNAPSHOT_PROGRESS: std::sync::Mutex<Option<Arc<CopyProgress>>> = std::sync::Mutex::new(None);

impl CopyProgress {
    /// Where the copy stands.
    pub fn status(&self) -> crate::status::SnapshotStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = self.bytes.load(Relaxed);
        let rate = bytes as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let remaining = self.estimated_bytes.saturating_sub(bytes) as f64;
        crate::status::SnapshotStatus {
            tables_done: self.done.load(Relaxed),
            tables_total: self.tables.len(),
            rows: self.rows.load(Relaxed),
            megabytes: bytes / 1_000_000,
            megabytes_per_second: rate / 1e6,
            eta_seconds: (rate > 0.0).then(|| (remaining / rate).round() as u64),
            tables: self.tables.iter().map(|t| (t.name.clone(), t.rows.load(Relaxed), t.estimated_rows)).collect(),
        }
    }

    /// Bytes streamed from source to target so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tables being copied, with their live counters.
    pub fn tables(&self) -> &[TableCopy] {
        &self.tables
    }

    /// One log line: tables, rows, bytes, rate and a rough ETA from the tables' on-disk size.
    pub fn report(&self) {
        let status = self.status();
        tracing::info!(
            tables_copied = format!("{}/{}", status.tables_done, status.tables_total),
            rows = status.rows,
            megabytes = status.megabytes,
            megabytes_per_second = format!("{:.1}", status.megabytes_per_second),
            eta_seconds = status.eta_seconds.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()),
            "snapshot in progress"
        );
    }
}

/// The apply side of streaming: groups source transactions into target transactions.
struct Applier<'a> {
    sink: &'a mut dyn Sink,
    store: &'a CheckpointStore,
    confirmed: watch::Sender<Position>,
    copied_at: HashMap<String, Position>,
    max_changes: usize,
    max_bytes: usize,
    max_group: Duration,
    /// Changes not yet handed to the sink, and about how many bytes they hold.
    buffer: Vec<Change>,
    buffer_bytes: usize,
    /// A target transaction is open.
    open: bool,
    /// The last source transaction in the open target transaction that ended.
    ended: Option<(Position, SystemTime)>,
    group_started: Instant,
    /// Where the current source transaction is ordered; `None` between transactions.
    current: Option<Position>,
    /// The current source transaction is already on the target.
    skipping: bool,
    applied: Position,
    /// Where this run's stream began.
    started_at: Position,
    transactions: u64,
    last_report: Instant,
    last_commit_time: Option<SystemTime>,
    /// `[stream] stop_at`, and whether the stream has gone past it.
    stop_at: Option<StopAt>,
    reached_stop: bool,
    /// For a `stop_at` time: where the source's log ended once its clock had passed
    /// that time. Every transaction committed before the time lies before it.
    log_end_after_stop: Option<Position>,
    /// The last heartbeat: the source has sent every transaction before this position.
    sent_up_to: Option<Position>,
    /// `[stream] skip`: (entry as written, what it names, whether it was seen).
    skip: Vec<(String, Position, bool)>,
    /// The skip entry naming the current transaction, and its changes left out.
    skipping_for: Option<(String, u64)>,
    /// Source transactions and changes per (table, op) in the open target transaction.
    grouped: u64,
    grouped_changes: HashMap<(String, &'static str), u64>,
}

impl<'a> Applier<'a> {
    fn new(
        sink: &'a mut dyn Sink,
        store: &'a CheckpointStore,
        confirmed: watch::Sender<Position>,
        copied_at: HashMap<String, Position>,
        config: &Config,
        start: Position,
    ) -> Applier<'a> {
        Applier {
            sink,
            store,
            confirmed,
            copied_at,
            max_changes: config.pipeline.max_batch_changes,
            max_bytes: config.pipeline.max_batch_bytes,
            max_group: Duration::from_millis(config.pipeline.max_batch_ms),
            buffer: Vec::new(),
            buffer_bytes: 0,
            open: false,
            ended: None,
            group_started: Instant::now(),
            current: None,
            skipping: false,
            applied: start.clone(),
            started_at: start,
            transactions: 0,
            last_report: Instant::now(),
            last_commit_time: None,
            stop_at: config.stream.stop_at(),
            reached_stop: false,
            log_end_after_stop: None,
            sent_up_to: None,
            skip: config.stream.skip().into_iter().map(|(text, position)| (text, position, false)).collect(),
            skipping_for: None,
            grouped: 0,
            grouped_changes: HashMap::new(),
        }
    }

    /// Takes one event from the source; `more_waiting` says whether others are queued
    /// behind it, which decides whether the open target transaction may wait for them.
    async fn handle(&mut self, event: Event, more_waiting: bool) -> anyhow::Result<()> {
        self.take(event, more_waiting).await?;
        // Between transactions with nothing queued, a group kept open for the next
        // transaction commits now, whatever ended the last one (a commit, a skipped
        // transaction, a heartbeat): else its rows stay invisible and its locks held.
        if self.current.is_none() && !more_waiting && !self.reached_stop {
            self.commit().await?;
        }
        Ok(())
    }

    async fn take(&mut self, event: Event, more_waiting: bool) -> anyhow::Result<()> {
        match event {
            Event::Begin { position, commit_time } => {
                if self.stop_at.as_ref().is_some_and(|stop| stop.is_past(&position, commit_time)) {
                    // Everything before the stop point is in; this transaction and all after stay out.
                    self.reached_stop = true;
                    return Ok(());
                }
                if self.ended.is_some() && (!more_waiting || self.group_started.elapsed() >= self.max_group) {
                    self.commit().await?;
                }
                // Ordered before the end of the last applied one: the target has it.
                self.skipping = position < self.applied;
                if !self.skipping {
                    if let Some(entry) = self.skip.iter_mut().find(|(_, named, _)| named.names(&position)) {
                        entry.2 = true;
                        self.skipping = true;
                        self.skipping_for = Some((entry.0.clone(), 0));
                    }
                }
                self.current = Some(position);
                if !self.skipping && !self.open {
                    self.sink.begin().await?;
                    self.open = true;
                    self.group_started = Instant::now();
                }
            }
            Event::Change(change) => {
                if self.skipping {
                    if let Some((_, changes)) = self.skipping_for.as_mut() {
                        *changes += 1;
                    }
                    return Ok(());
                }
                if let Some(change) = self.filter(change) {
                    let op = match &change {
                        Change::Insert { .. } => Some("insert"),
                        Change::Update { .. } => Some("update"),
                        Change::Delete { .. } => Some("delete"),
                        Change::Truncate { .. } => Some("truncate"),
                        Change::Relation(_) => None,
                    };
                    if let (Some(op), Some(table)) = (op, change.table()) {
                        *self.grouped_changes.entry((table.to_string(), op)).or_default() += 1;
                    }
                    self.buffer_bytes += change.approx_bytes();
                    self.buffer.push(change);
                    if self.buffer.len() >= self.max_changes || self.buffer_bytes >= self.max_bytes {
                        self.apply_buffer().await?;
                    }
                }
            }
            Event::Commit { position, commit_time } => {
                self.current = None;
                if let Some((entry, changes)) = self.skipping_for.take() {
                    tracing::warn!(skip = %entry, changes, ended_at = %position, "left out a transaction listed in [stream] skip");
                }
                if std::mem::take(&mut self.skipping) {
                    return Ok(());
                }
                self.ended = Some((position, commit_time));
                self.transactions += 1;
                self.grouped += 1;
                if self.group_started.elapsed() >= self.max_group {
                    self.commit().await?;
                }
            }
            Event::Heartbeat { position } => {
                if self.current.is_none() {
                    self.sent_up_to = Some(position);
                }
            }
        }
        Ok(())
    }

    /// Hands the buffered changes to the sink, inside the open target transaction.
    async fn apply_buffer(&mut self) -> anyhow::Result<()> {
        if !self.buffer.is_empty() {
            self.sink.apply(&self.buffer).await?;
            self.buffer.clear();
            self.buffer_bytes = 0;
        }
        Ok(())
    }

    /// A `stop_at` time is reached once a heartbeat shows the source has sent everything
    /// before the log's end read after that time, between transactions. Decided by the
    /// source's own positions, never by the wall clock: a decoder that is behind (reading
    /// through a large transaction of another table, a slow link) sends no such heartbeat.
    fn passed_stop_time(&self) -> bool {
        self.current.is_none()
            && matches!((&self.log_end_after_stop, &self.sent_up_to), (Some(end), Some(sent)) if sent >= end)
    }

    /// Drops changes to tables whose copy is newer than the transaction.
    fn filter(&self, change: Change) -> Option<Change> {
        let current = self.current.as_ref()?;
        let copied_later = |name: &TableName| self.copied_at.get(&name.to_string()).is_some_and(|at| current < at);
        match change {
            Change::Relation(_) => Some(change),
            Change::Truncate { tables, cascade, restart_identity } => {
                let tables: Vec<_> = tables.into_iter().filter(|t| !copied_later(&t.name)).collect();
                (!tables.is_empty()).then_some(Change::Truncate { tables, cascade, restart_identity })
            }
            other => match other.table() {
                Some(name) if copied_later(name) => None,
                _ => Some(other),
            },
        }
    }

    /// Skip entries that named no transaction this run: a typo, not reached yet, or
    /// (MySQL) a position that is not where a transaction begins.
    fn report_unseen_skips(&self) {
        for (entry, _, seen) in &self.skip {
            if !seen {
                tracing::warn!(skip = %entry, from = %self.started_at, "no transaction matched this [stream] skip entry in this run");
                println!("skip entry {entry} matched no transaction (streamed from {})", self.started_at);
            }
        }
    }

    /// Commits what is complete before the stop point and reports where the replay stopped.
    async fn finish_at_stop(&mut self) -> anyhow::Result<()> {
        self.commit().await?;
        let time = self.last_commit_time.map(crate::position::format_rfc3339).unwrap_or_else(|| "none".into());
        let message = format!(
            "reached stop_at: the target has every transaction up to {} (last commit time: {time}); {} transaction(s) applied in this run",
            self.applied, self.transactions
        );
        tracing::info!("{message}");
        println!("{message}");
        Ok(())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        let Some((position, commit_time)) = self.ended.take() else { return Ok(()) };
        self.apply_buffer().await?;
        self.sink.commit(&position, commit_time).await?;
        self.open = false;
        METRICS.apply_batch_seconds.observe(self.group_started.elapsed().as_secs_f64());
        METRICS.transactions_applied.inc_by(std::mem::take(&mut self.grouped));
        for ((table, op), n) in self.grouped_changes.drain() {
            METRICS.changes_applied.with_label_values(&[&table, op]).inc_by(n);
        }
        METRICS.lag_seconds.set(commit_time.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0));
        self.store.save_position(&position)?;
        self.applied = position.clone();
        self.last_commit_time = Some(commit_time);
        let _ = self.confirmed.send(position);
        if self.last_report.elapsed() >= Duration::from_secs(10) {
            let lag = self.last_commit_time.and_then(|t| t.elapsed().ok()).unwrap_or_default();
            tracing::info!(
                applied = %self.applied,
                transactions = self.transactions,
                lag_seconds = format!("{:.3}", lag.as_secs_f64()),
                "streaming"
            );
            self.last_report = Instant::now();
        }
        Ok(())
    }
}

/// Bytes of decoded events the decode → apply channel holds at most (one larger event
/// passes alone): with `[pipeline] max_batch_bytes`, what bounds streaming's memory.
const CHANNEL_BYTES: usize = 64 << 20;

/// How far past a `stop_at` time the source's clock must be before its log's end is
/// read: a commit stamped before the time is flushed by then (asynchronous commits
/// within a few `wal_writer_delay`s).
const STOP_TIME_MARGIN: Duration = Duration::from_secs(2);

/// Where the source's log ends once its own clock has passed `time`; `None` if the
/// source cannot tell.
async fn log_end_after(source: &mut dyn Source, time: SystemTime) -> anyhow::Result<Option<Position>> {
    let until = time + STOP_TIME_MARGIN;
    loop {
        if let Ok(wait) = until.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let Some(end) = source.log_end().await? else { return Ok(None) };
        match until.duration_since(end.clock) {
            // The source's clock is behind ours: wait for it.
            Ok(behind) => tokio::time::sleep(behind.clamp(Duration::from_millis(100), Duration::from_secs(5))).await,
            Err(_) => return Ok(Some(end.position)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    mut changes: Box<dyn ChangeStream>,
    source: &mut dyn Source,
    sink: &mut dyn Sink,
    store: &CheckpointStore,
    start: Position,
    confirmed: watch::Sender<Position>,
    copied_at: HashMap<String, Position>,
    config: &Config,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(from = %start, "streaming changes");
    let (tx, mut rx) = mpsc::channel::<(Event, OwnedSemaphorePermit)>(8192);
    // Decoding runs beside applying; the channel, bounded by events and by bytes, is the backpressure.
    let budget = Arc::new(Semaphore::new(CHANNEL_BYTES));
    let mut reader = tokio::spawn(async move {
        loop {
            let event = changes.next().await?;
            let bytes = u32::try_from(event.approx_bytes().min(CHANNEL_BYTES)).unwrap_or(u32::MAX);
            let permit = budget.clone().acquire_many_owned(bytes).await?;
            if tx.send((event, permit)).await.is_err() {
                return anyhow::Ok(());
            }
        }
    });
    let mut applier = Applier::new(sink, store, confirmed, copied_at, config, start);
    METRICS.set_phase("catch-up");
    let stop_time = match &applier.stop_at {
        Some(StopAt::Time(time)) => Some(*time),
        _ => None,
    };
    let mut probing = stop_time.is_some();
    let probe = async move {
        match stop_time {
            Some(time) => log_end_after(source, time).await,
            None => Ok(None),
        }
    };
    tokio::pin!(probe);
    // Told to stop, the applier finishes the source transaction it is in (for up to
    // DRAIN_TIMEOUT), commits, and returns; past the deadline the open target
    // transaction is rolled back, which loses nothing: a restart resumes before it.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = idle_check.tick() => {
                // Nothing received and nothing open: caught up.
                let caught_up = rx.is_empty() && applier.current.is_none() && applier.ended.is_none();
                if caught_up {
                    METRICS.lag_seconds.set(0.0);
                    METRICS.set_phase("streaming");
                }
                // Sent from the apply loop itself: if it wedges, systemd restarts the daemon.
                crate::notify::notify(&format!(
                    "WATCHDOG=1\nSTATUS={}, applied up to {}, lag {:.1} s",
                    if caught_up { "streaming" } else { "catching up" },
                    applier.applied,
                    METRICS.lag_seconds.get()
                ));
            }
            end = &mut probe, if probing => {
                probing = false;
                match end {
                    Ok(Some(end)) => {
                        tracing::info!(log_end = %end, "the source's clock is past stop_at: replaying up to where its log ended then");
                        applier.log_end_after_stop = Some(end);
                        if applier.passed_stop_time() {
                            break applier.finish_at_stop().await;
                        }
                    }
                    Ok(None) => tracing::warn!(
                        "this source cannot tell where its log ends: the replay stops at the first transaction past stop_at"
                    ),
                    Err(e) => break Err(e.context("reading where the source's log ends, for stop_at")),
                }
            }
            event = rx.recv() => match event {
                Some((event, permit)) => {
                    let more_waiting = !rx.is_empty();
                    let handled = applier.handle(event, more_waiting).await;
                    drop(permit);
                    if let Err(e) = handled {
                        break Err(e);
                    }
                    if applier.reached_stop || applier.passed_stop_time() {
                        break applier.finish_at_stop().await;
                    }
                    if drain_deadline.is_some() && applier.current.is_none() {
                        break applier.commit().await;
                    }
                }
                None => {
                    break match (&mut reader).await {
                        Ok(Err(e)) => Err(e.context(format!("the change stream stopped; the target has everything up to {}", applier.applied))),
                        Ok(Ok(())) => Ok(()),
                        Err(e) => Err(anyhow::anyhow!("the change stream task failed: {e}")),
                    };
                }
            },
            _ = stopped(&mut stop), if drain_deadline.is_none() => {
                if applier.current.is_none() {
                    break applier.commit().await;
                }
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                tracing::warn!("the source transaction in progress did not end in time; it is rolled back on the target and re-read at the next start");
                break Ok(());
            }
        }
    };
    reader.abort();
    // A skip entry that named nothing is said whenever the daemon stops, for any reason
    // (not when it only resumes from its checkpoint).
    if result.as_ref().err().is_none_or(|e| !is_transient(e) && !is_resume(e)) {
        applier.report_unseen_skips();
    }
    if result.is_ok() {
        tracing::info!(applied = %applier.applied, "stopped: the target has everything up to the applied position");
    }
    result
}

/// How long a stop waits for the source transaction in progress to end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

#[cfg(test)]
mod tests {
    //! The applier against a memory sink: what reaches the target, and when, for given
    //! event sequences. Milliseconds each; the real-server tests only hit these by chance.

    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use async_trait::async_trait;
    use tokio::sync::watch;

    use super::Applier;
    use crate::change::{Change, Column, Event, Identity, TableName, TableSchema, Value};
    use crate::checkpoint::CheckpointStore;
    use crate::config::Config;
    use crate::position::{Lsn, Position};
    use crate::schema::{SourceSchema, TableDefinition};
    use crate::sink::{Sink, TableWriter};
    use crate::source::{CopyFormat, Dialect};

    /// Records what the applier asks of a target: `begin`, `apply N`, `commit <position>`.
    #[derive(Default)]
    struct MemorySink {
        log: Vec<String>,
    }

    #[async_trait]
    impl Sink for MemorySink {
        fn copy_format(&self, _table: &TableDefinition, _source: Dialect) -> CopyFormat {
            CopyFormat::PostgresText
        }
        async fn preflight(&mut self, _: &SourceSchema, _: u64) -> anyhow::Result<Vec<crate::preflight::Finding>> {
            Ok(Vec::new())
        }
        async fn applied_position(&mut self) -> anyhow::Result<Option<Position>> {
            Ok(None)
        }
        async fn create_tables(&mut self, _: &SourceSchema, _: &[&TableDefinition], _: bool) -> anyhow::Result<()> {
            Ok(())
        }
        async fn table_writer(&self) -> anyhow::Result<Box<dyn TableWriter>> {
            anyhow::bail!("a memory sink copies nothing")
        }
        async fn finish_snapshot(&mut self, _: &SourceSchema) -> anyhow::Result<()> {
            Ok(())
        }
        async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
            Ok(Vec::new())
        }
        async fn begin(&mut self) -> anyhow::Result<()> {
            self.log.push("begin".into());
            Ok(())
        }
        async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
            self.log.push(format!("apply {}", changes.len()));
            Ok(())
        }
        async fn commit(&mut self, position: &Position, _: SystemTime) -> anyhow::Result<()> {
            self.log.push(format!("commit {position}"));
            Ok(())
        }
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            "[source]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
             [target]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1:2/db\"\n\
             [state]\ndir = \"/nonexistent\"\n{extra}"
        );
        match Config::parse(&text, std::path::Path::new("test.toml")) {
            Ok(config) => config,
            Err(e) => panic!("test config: {e}"),
        }
    }

    fn lsn(n: u64) -> Position {
        Position::Lsn(Lsn(n))
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn insert(table: &str, bytes: usize) -> Event {
        let schema = TableSchema {
            name: TableName::new("public", table),
            columns: vec![Column {
                name: "v".into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: true,
                default: None,
            }],
            identity: Identity::Key,
        };
        Event::Change(Change::Insert { table: Arc::new(schema), row: vec![Value::Text("x".repeat(bytes))] })
    }

    /// A transaction's events: begin at `begin`, one insert into `table`, commit at `end`.
    fn transaction(begin: u64, end: u64, time: u64, table: &str) -> Vec<Event> {
        vec![
            Event::Begin { position: lsn(begin), commit_time: at(time) },
            insert(table, 10),
            Event::Commit { position: lsn(end), commit_time: at(time) },
        ]
    }

    /// Runs `events` through an applier; `None` in the list marks "the channel is
    /// empty after the previous event". Returns the sink's log and the applier's
    /// verdicts (reached stop / passed the stop time) after the last event.
    async fn run(
        config: &Config,
        events: Vec<Option<Event>>,
        log_end_after_stop: Option<Position>,
    ) -> (Vec<String>, bool) {
        let dir = std::env::temp_dir().join(format!(
            "cutover-applier-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = match CheckpointStore::open(&dir) {
            Ok(store) => store,
            Err(e) => panic!("store: {e}"),
        };
        let mut sink = MemorySink::default();
        let (confirmed, _rx) = watch::channel(lsn(0));
        let copied_at = HashMap::from([("public.late".to_string(), lsn(500))]);
        let mut stopped = false;
        {
            let mut applier = Applier::new(&mut sink, &store, confirmed, copied_at, config, lsn(0));
            applier.log_end_after_stop = log_end_after_stop;
            let mut events = events.into_iter().peekable();
            while let Some(event) = events.next() {
                let Some(event) = event else { continue };
                let more_waiting = matches!(events.peek(), Some(Some(_)));
                if let Err(e) = applier.handle(event, more_waiting).await {
                    panic!("applier: {e:#}");
                }
                if applier.reached_stop || applier.passed_stop_time() {
                    stopped = true;
                    if let Err(e) = applier.finish_at_stop().await {
                        panic!("finish: {e:#}");
                    }
                    break;
                }
            }
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        (sink.log, stopped)
    }

    fn queued(groups: Vec<Vec<Event>>) -> Vec<Option<Event>> {
        groups.into_iter().flatten().map(Some).collect()
    }

    #[tokio::test]
    async fn transactions_that_arrive_together_are_grouped_into_one_target_transaction() {
        let events =
            queued(vec![transaction(10, 20, 1, "t"), transaction(30, 40, 2, "t"), transaction(50, 60, 3, "t")]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(log, ["begin", "apply 3", "commit lsn:0/3C"]);
    }

    #[tokio::test]
    async fn a_skipped_transaction_after_a_deferred_commit_still_commits_the_group() {
        // The first transaction's commit waits for the next one, which [stream] skip leaves out.
        let config = config("[stream]\nskip = [\"lsn:0/1E\"]\n");
        let events = queued(vec![transaction(10, 20, 1, "t"), transaction(30, 40, 2, "t")]);
        let (log, _) = run(&config, events, None).await;
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/14"]);
        // Also when a heartbeat is the last thing queued behind a transaction.
        let mut events = queued(vec![transaction(10, 20, 1, "t")]);
        events.push(Some(Event::Heartbeat { position: lsn(25) }));
        let (log, _) = run(&config, events, None).await;
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/14"]);
    }

    #[tokio::test]
    async fn changes_to_a_table_copied_later_than_the_transaction_are_left_out() {
        let events = queued(vec![transaction(10, 20, 1, "late"), transaction(600, 610, 2, "late")]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/262"]);
    }

    #[tokio::test]
    async fn a_batch_is_flushed_by_its_size_before_the_transaction_ends() {
        let config = config("[pipeline]\nmax_batch_bytes = 1000\n");
        let mut events = vec![Some(Event::Begin { position: lsn(10), commit_time: at(1) })];
        events.extend((0..10).map(|_| Some(insert("t", 300))));
        events.push(Some(Event::Commit { position: lsn(20), commit_time: at(1) }));
        let (log, _) = run(&config, events, None).await;
        // 300-byte values (about 400 bytes each as held): a flush every third change.
        assert_eq!(log, ["begin", "apply 3", "apply 3", "apply 3", "apply 1", "commit lsn:0/14"]);
    }

    #[tokio::test]
    async fn stop_at_a_time_waits_for_the_source_to_pass_its_log_end_not_for_a_quiet_moment() {
        let config = config("[stream]\nstop_at = \"2001-01-01T00:00:00Z\"\n");
        let stop = 978_307_200;
        // A source that is behind: the channel runs empty between transactions, and its
        // heartbeats are short of where the log ended after the stop time.
        let mut events = vec![];
        events.extend(transaction(10, 20, stop - 60, "t").into_iter().map(Some));
        events.push(None);
        events.push(Some(Event::Heartbeat { position: lsn(50) }));
        events.push(None);
        events.extend(transaction(60, 70, stop - 30, "t").into_iter().map(Some));
        events.push(Some(Event::Heartbeat { position: lsn(99) }));
        let (log, stopped) = run(&config, events.clone(), Some(lsn(100))).await;
        assert!(!stopped, "stopped early: {log:?}");
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/14", "begin", "apply 1", "commit lsn:0/46"]);
        // A heartbeat at the log's end ends the replay...
        events.push(Some(Event::Heartbeat { position: lsn(100) }));
        let (_, stopped) = run(&config, events, Some(lsn(100))).await;
        assert!(stopped);
        // ...and so does the first transaction at or past the stop time, which stays out.
        let mut events = queued(vec![transaction(10, 20, stop - 1, "t"), transaction(30, 40, stop, "t")]);
        events.push(Some(Event::Heartbeat { position: lsn(1000) }));
        let (log, stopped) = run(&config, events, None).await;
        assert!(stopped);
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/14"]);
    }
}
