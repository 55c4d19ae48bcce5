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
//!
//! Its parts: [`snapshot`] copies tables, [`apply`] streams changes; this module runs
//! them and retries what is transient.

mod apply;
mod lanes;
mod snapshot;

pub use snapshot::{copy_consistently, CopyOptions, CopySummary, LAST_COPY};

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::checkpoint::{CheckpointStore, PipelineIdentity, TableProgress};
use crate::config::{Config, SnapshotMode};
use crate::metrics::METRICS;
use crate::position::Position;
use crate::retry::{is_resume, is_transient};
use crate::sink::Sink;

/// Where the source's change log is now.
pub async fn source_position(config: &Config) -> anyhow::Result<Position> {
    let mut source = crate::connect::source(config).await?;
    match source.log_end().await? {
        Some(end) => Ok(end.position),
        None => anyhow::bail!("a {:?} source has no change log position", config.source.kind),
    }
}

/// Waits until the target holds everything the source wrote before `position`
/// (or `timeout` passes): whether it does, and the position last seen applied.
/// The position the source has confirmed (PostgreSQL: the slot's, which keepalives move
/// across idle stretches), else the running daemon's applied position.
pub async fn wait_until_applied(
    config: &Config,
    position: &Position,
    timeout: Duration,
) -> anyhow::Result<(bool, Option<String>)> {
    let started = Instant::now();
    let mut source = crate::connect::source(config).await?;
    loop {
        let applied = match source.confirmed_position().await? {
            Some(confirmed) => Some(confirmed.to_string()),
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
    // Bumped by `cutover resync`: the stream drains and the pipeline resumes, copying again.
    let (resync_tx, mut resync) = watch::channel(0u64);
    // Set by `verify --repair` while it writes to the target.
    let hold = Arc::new(crate::hold::Hold::default());
    let controls = crate::status::Controls { stop: stop_tx.clone(), resync: Arc::new(resync_tx), hold: hold.clone() };
    let control = crate::status::serve(&config.state.dir, store.clone(), controls).await?;
    let signal = tokio::spawn(async move {
        shutdown.await;
        crate::notify::notify("STOPPING=1");
        let _ = stop_tx.send(true);
    });
    let mut delay = Duration::from_secs(1);
    let mut failing_since: Option<Instant> = None;
    // After failures on several apply connections: which groups run on one.
    let mut serial = lanes::Serial::No;
    let mut parallel_failures = 0;
    let result = loop {
        let attempt = Instant::now();
        // A request made before this attempt is served by it: its copies are already forgotten.
        resync.borrow_and_update();
        let signals = apply::Signals { stop: stop.clone(), resync: resync.clone(), hold: hold.clone() };
        let error = match run_once(config, &store, signals, serial.clone()).await {
            Ok(()) => break Ok(()),
            Err(e) if e.is::<lanes::ParallelApplyFailed>() => {
                METRICS.errors.with_label_values(&["parallel_apply"]).inc();
                crate::status::set_last_error(Some(format!("{e:#}")));
                parallel_failures += 1;
                serial = match e.downcast_ref::<lanes::ParallelApplyFailed>() {
                    Some(failed) if parallel_failures < MAX_PARALLEL_FAILURES => {
                        lanes::Serial::Until(failed.until.clone())
                    }
                    _ => {
                        tracing::warn!(
                            "applying on one connection from now on: applying beside others failed {parallel_failures} \
                             times (set [pipeline] apply_connections = 1 to start so)"
                        );
                        lanes::Serial::Always
                    }
                };
                tracing::warn!(reason = format!("{e:#}"), "resuming from the last checkpoint");
                continue;
            }
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

/// Failures beside other apply connections after which a daemon applies on one for good.
const MAX_PARALLEL_FAILURES: u32 = 3;

/// Where the stream begins: after the last transaction the target committed (its record
/// wins over the checkpoint store's, which it brings up to date), else where the
/// configuration or the first snapshot says.
async fn stream_start(
    sink: &mut dyn Sink,
    store: &CheckpointStore,
    config: &Config,
    identity: &PipelineIdentity,
) -> anyhow::Result<Position> {
    Ok(match (sink.applied_position().await?, store.position()?) {
        (Some(target), checkpoint) => {
            if checkpoint.as_ref() != Some(&target) {
                tracing::info!(%target, "the target is ahead of the checkpoint store: taking the target's position");
                store.save_position(&target)?;
            }
            target
        }
        (None, Some(checkpoint)) => checkpoint,
        (None, None) => config.stream.start().unwrap_or_else(|| identity.consistent_point.clone()),
    })
}

/// Resolves once the pipeline is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once it has said stop.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// One attempt: connect, copy what is missing, stream until stopped or broken.
async fn run_once(
    config: &Config,
    store: &Arc<CheckpointStore>,
    signals: apply::Signals,
    serial: lanes::Serial,
) -> anyhow::Result<()> {
    let store = store.clone();
    let (mut source, mut sink) = crate::connect::source_and_sink(config).await?;
    METRICS.set_healthy(true);
    crate::notify::notify("READY=1\nSTATUS=connected to source and target");
    let schema = source.schema().await?;
    crate::failpoint::hit("schema-read");
    if schema.tables.is_empty() {
        anyhow::bail!("[source] tables / exclude select no table on the source: nothing to replicate");
    }
    let workers = config.snapshot.workers;

    if config.snapshot.mode == SnapshotMode::Only {
        let pending =
            snapshot::pending_tables(&store, sink.as_mut(), &schema, source.captures_schema_changes()).await?;
        if !pending.is_empty() {
            let fresh = store.tables()?.is_empty();
            sink.create_tables(&schema, &pending, fresh).await?;
            let snapshot = source.new_snapshot().await?;
            // No stream follows to bring ranges copied at different moments together.
            let options = CopyOptions { workers, truncate_first: !fresh, resume_from: None };
            let summary =
                copy_consistently(source.as_mut(), sink.as_ref(), &store, snapshot, &pending, &options).await?;
            snapshot::log_copy(&summary);
        }
        // Also when every table was copied before a restart: the process may have died before this.
        sink.finish_snapshot(&schema).await?;
        // No stream follows: what the copy set aside (user triggers) comes back now.
        for trigger in sink.hand_over().await? {
            tracing::info!(%trigger, "user trigger enabled again");
        }
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

    let left_out = match (config.snapshot.mode, source.captures_schema_changes()) {
        (SnapshotMode::Initial, true) => {
            snapshot::drop_gone_tables(&store, sink.as_mut(), &schema, &config.table_filter()).await?
        }
        _ => HashSet::new(),
    };
    let pending = match config.snapshot.mode {
        SnapshotMode::Initial => {
            snapshot::pending_tables(&store, sink.as_mut(), &schema, source.captures_schema_changes()).await?
        }
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
        // The copy holds the stream back, so where it begins is known now.
        let resume_from = Some(stream_start(sink.as_mut(), &store, config, &identity).await?);
        let options = CopyOptions { workers, truncate_first: !fresh, resume_from };
        let summary = copy_consistently(source.as_mut(), sink.as_ref(), &store, snapshot, &pending, &options).await?;
        snapshot::log_copy(&summary);
        match fresh {
            true => sink.finish_snapshot(&schema).await?,
            // Copied under a later snapshot than the tables around them, these may not satisfy
            // a foreign key until the stream catches up: say so, stream on.
            false => {
                if let Err(e) = sink.finish_snapshot(&schema).await {
                    tracing::warn!(
                        "foreign keys or sequence values not set on the target yet ({e:#}); the next start and the \
                         switchover try again"
                    );
                }
            }
        }
    }

    let start = stream_start(sink.as_mut(), &store, config, &identity).await?;
    // The target has everything before where the stream starts: say so before a transaction
    // comes (status, and a verify waiting for an idle source, read it).
    if store.position()?.is_none() {
        store.save_position(&start)?;
    }
    let copies: HashMap<String, TableProgress> = store.tables()?.into_iter().collect();
    let (confirmed, confirmed_rx) = watch::channel(start.clone());
    let changes = source.start_stream(&start, confirmed_rx, &copies).await?;
    let mut sinks = vec![sink];
    for lane in 1..config.pipeline.apply_connections() {
        sinks.push(crate::connect::apply_sink(config, lane).await?);
    }
    apply::stream(
        changes,
        source.as_mut(),
        sinks,
        &store,
        start,
        confirmed,
        copies.clone(),
        left_out,
        config,
        signals,
        serial,
    )
    .await
}
