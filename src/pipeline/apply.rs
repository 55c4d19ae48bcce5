//! Streaming: the decode task feeds a channel bounded by events and by bytes; the
//! applier groups whole source transactions into target transactions, leaves out what
//! the target already has, what `[stream] skip` names and changes to tables copied later
//! than the transaction, and stops at `[stream] stop_at`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::lanes::{Lanes, ParallelApplyFailed, Serial};
use super::stopped;
use crate::change::{Change, Event, Row, SchemaChange, SchemaOp, TableName, TableSchema, Value};
use crate::checkpoint::{CheckpointStore, TableProgress};
use crate::config::Config;
use crate::hold::{self, Hold, HoldPoint};
use crate::metrics::METRICS;
use crate::position::{Position, StopAt};
use crate::retry::{is_resume, is_transient, ResumeFromCheckpoint};
use crate::sink::{InPlace, Sink};
use crate::source::{ChangeStream, Source};

/// Row changes of one table in a target transaction, per operation ([`OpCounts::OPS`]).
#[derive(Default)]
struct OpCounts([u64; 4]);

impl OpCounts {
    const OPS: [&'static str; 4] = ["insert", "update", "delete", "truncate"];

    fn add(&mut self, op: &str) {
        if let Some(i) = Self::OPS.iter().position(|o| *o == op) {
            self.0[i] += 1;
        }
    }
}

/// What the applier keeps about a target transaction until it has committed.
struct Group {
    position: Position,
    commit_time: SystemTime,
    started: Instant,
    /// Source transactions and changes per (table, op) in it.
    transactions: u64,
    changes: HashMap<TableName, OpCounts>,
    /// Tables it dropped on the target: their copies are forgotten once it commits.
    forget: Vec<TableName>,
}

/// The apply side of streaming: groups source transactions into target transactions,
/// which [`Lanes`] run on one or more target connections.
struct Applier<'a> {
    lanes: Lanes<Group>,
    /// Which schema changes the target makes in place.
    in_place: InPlace,
    store: &'a CheckpointStore,
    confirmed: watch::Sender<Position>,
    /// Each copied table's copy: changes older than it are in it already.
    copies: HashMap<String, TableProgress>,
    /// The newest snapshot any table or key range was copied under.
    newest_copy: Option<Position>,
    max_changes: usize,
    max_bytes: usize,
    max_group: Duration,
    /// Changes not yet handed to the sink, and about how many bytes they hold.
    buffer: Vec<Change>,
    buffer_bytes: usize,
    /// Changes in the open target transaction.
    group_size: usize,
    /// A target transaction is open.
    open: bool,
    /// The last source transaction begun (a failure in parallel is retried on one
    /// connection up to it), and which groups run on one connection.
    latest: Option<Position>,
    serial: Serial,
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
    grouped_changes: HashMap<TableName, OpCounts>,
    /// Tables whose changes are left out: those a schema change sent to be copied again
    /// (their copies forgotten, the target's tables dropped, until the stream resumes) and
    /// those dropped on the target before the stream began ([`super::snapshot::drop_gone_tables`]).
    left_out: HashSet<TableName>,
    /// Why the stream resumes from its checkpoint once the current transaction commits
    /// (a table to copy before streaming on).
    resume_after_commit: Option<String>,
    /// Tables dropped on the target in the open target transaction: their copies are
    /// forgotten once it commits.
    forget_after_commit: Vec<TableName>,
    /// Whether tables may be copied (`[snapshot] mode` is not `never`).
    copies_tables: bool,
}

impl<'a> Applier<'a> {
    /// An applier over `sinks`, one apply connection each (at least one).
    #[allow(clippy::too_many_arguments)]
    fn new(
        sinks: Vec<Box<dyn Sink>>,
        store: &'a CheckpointStore,
        confirmed: watch::Sender<Position>,
        copies: HashMap<String, TableProgress>,
        left_out: HashSet<TableName>,
        config: &Config,
        start: Position,
        serial: Serial,
    ) -> anyhow::Result<Applier<'a>> {
        let Some(first) = sinks.first() else { anyhow::bail!("internal error: no apply connection") };
        let in_place = first.in_place();
        Ok(Applier {
            lanes: Lanes::start(sinks),
            in_place,
            store,
            confirmed,
            newest_copy: copies
                .values()
                .flat_map(|c| std::iter::once(&c.copied_at).chain(c.ranges.iter().map(|r| &r.copied_at)))
                .max()
                .cloned(),
            copies,
            max_changes: config.pipeline.max_batch_changes,
            max_bytes: config.pipeline.max_batch_bytes,
            max_group: Duration::from_millis(config.pipeline.max_batch_ms),
            buffer: Vec::new(),
            buffer_bytes: 0,
            group_size: 0,
            open: false,
            latest: None,
            serial,
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
            left_out,
            resume_after_commit: None,
            forget_after_commit: Vec::new(),
            copies_tables: config.snapshot.mode != crate::config::SnapshotMode::Never,
        })
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
                if !self.skipping && !self.open {
                    // After a failure in parallel, up to where it was, on one connection.
                    self.lanes.set_serial(self.serial.covers(&position));
                    self.lanes.begin().await?;
                    self.open = true;
                    self.group_started = Instant::now();
                }
                if !self.skipping {
                    self.latest = Some(position.clone());
                }
                self.current = Some(position);
            }
            Event::Change(change) => {
                if self.skipping {
                    if let Some((_, changes)) = self.skipping_for.as_mut() {
                        *changes += 1;
                    }
                    return Ok(());
                }
                for change in self.filter(change)? {
                    let change = match change {
                        Change::Schema(schema) => Change::Schema(self.plan_schema_change(schema)?),
                        other => other,
                    };
                    let op = match &change {
                        Change::Insert { .. } => Some("insert"),
                        Change::Update { .. } => Some("update"),
                        Change::Delete { .. } => Some("delete"),
                        Change::Truncate { .. } => Some("truncate"),
                        Change::Relation(_) | Change::Schema(_) => None,
                    };
                    if let (Some(op), Some(table)) = (op, change.table()) {
                        // Looked up before inserted: a table's name is copied once per group.
                        match self.grouped_changes.get_mut(table) {
                            Some(counts) => counts.add(op),
                            None => self.grouped_changes.entry(table.clone()).or_default().add(op),
                        }
                    }
                    self.buffer_bytes += change.approx_bytes();
                    self.buffer.push(change);
                    self.group_size += 1;
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
                if let Some(why) = self.resume_after_commit.take() {
                    self.drain().await?;
                    return Err(ResumeFromCheckpoint(why).into());
                }
                // On more than one connection, a backlog is cut into groups of about a batch
                // each, so the connections share it.
                let full = self.lanes.count() > 1 && self.group_size >= self.max_changes;
                if full || self.group_started.elapsed() >= self.max_group {
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
            self.lanes.apply(std::mem::take(&mut self.buffer)).await?;
            self.buffer_bytes = 0;
            self.take_committed()?;
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

    /// A schema change as the sink is to apply it. One the sink cannot apply in place,
    /// or one that changed rows the log does not carry, copies the table again: the sink
    /// drops the target's table in this transaction, its copy is forgotten once that
    /// commits, and the stream resumes from the checkpoint, copying it under a new
    /// snapshot. (A crash in between leaves a table copied before that the target lacks:
    /// the next start copies it again.) A table dropped is forgotten too: one created
    /// again under its name is new.
    fn plan_schema_change(&mut self, change: SchemaChange) -> anyhow::Result<SchemaChange> {
        let copy = change.ops.iter().find_map(|op| match op {
            SchemaOp::CreateTable => Some("a table the selection matches was created".to_string()),
            SchemaOp::CopyAgain { why } => Some(why.clone()),
            op if !(self.in_place)(op) => Some(format!("the target cannot {} in place", op.kind())),
            _ => None,
        });
        let dropped = change.ops.contains(&SchemaOp::DropTable);
        if copy.is_none() && !dropped {
            return Ok(change);
        }
        if let (Some(why), false) = (&copy, self.copies_tables) {
            anyhow::bail!(
                "{} needs to be copied again ({why}; the source ran: {}), but [snapshot] mode = \"never\" copies \
                 nothing; cutover stopped at its last checkpoint, before this transaction. With mode = \"initial\" \
                 it copies such a table again by itself",
                change.table,
                change.statement
            );
        }
        self.forget_after_commit.push(change.table.clone());
        let Some(why) = copy else { return Ok(change) };
        tracing::info!(table = %change.table, %why, statement = %change.statement, "copying the table again after a schema change");
        self.resume_after_commit = Some(format!("{} is copied again: {why}", change.table));
        self.left_out.insert(change.table.clone());
        Ok(SchemaChange { ops: vec![SchemaOp::DropTable], ..change })
    }

    /// Drops changes to tables whose copy is newer than the transaction, and to tables
    /// about to be copied again. A table whose key ranges were copied under different
    /// snapshots, some before the transaction and some after, takes each row's change
    /// only where its range was copied before: a key moved between such ranges becomes
    /// the delete or the insert of the row; a TRUNCATE or a schema change copies the
    /// table again (its ranges cannot be brought to one moment).
    fn filter(&mut self, change: Change) -> anyhow::Result<Vec<Change>> {
        let Some(current) = self.current.clone() else { return Ok(Vec::new()) };
        // Past every copy and with no table left out (a stream long under way): nothing to drop.
        if self.left_out.is_empty() && self.newest_copy.as_ref().is_none_or(|newest| current >= *newest) {
            return Ok(vec![change]);
        }
        let copy = |name: &TableName| self.copies.get(&name.to_string());
        let copied_later =
            |name: &TableName| self.left_out.contains(name) || copy(name).is_some_and(|c| current < c.copied_at);
        let split = |name: &TableName| copy(name).filter(|c| c.splits_at(&current) && !self.left_out.contains(name));
        let mut kept = Vec::new();
        let mut again = Vec::new();
        match change {
            // The sink follows a description of a table (adds what the source added), so none
            // reaches it for a table it dropped to copy again, nor one that describes the table
            // before its copy (which has the shape the table had later).
            Change::Relation(table) if copied_later(&table.name) => {}
            Change::Relation(_) => kept.push(change),
            Change::Truncate { tables, cascade, restart_identity } => {
                let (split_tables, tables): (Vec<_>, Vec<_>) =
                    tables.into_iter().partition(|t| split(&t.name).is_some());
                let tables: Vec<_> = tables.into_iter().filter(|t| !copied_later(&t.name)).collect();
                if !tables.is_empty() {
                    kept.push(Change::Truncate { tables, cascade, restart_identity });
                }
                again.extend(split_tables.into_iter().map(|t| (t.name.clone(), "TRUNCATE".to_string())));
            }
            Change::Schema(schema) if split(&schema.table).is_some() => again.push((schema.table, schema.statement)),
            other => match other.table() {
                Some(name) if copied_later(name) => {}
                Some(name) => match split(name) {
                    Some(copy) => match place_by_key(copy, &current, other)? {
                        Placed::Change(change) => kept.extend(change),
                        Placed::CopyAgain(table) => again.push((table, "an UPDATE".into())),
                    },
                    None => kept.push(other),
                },
                None => kept.push(other),
            },
        }
        for (table, statement) in again {
            let why = "changed while its copy's key ranges, copied under different snapshots, were brought up to date \
                       in a way rows cannot be placed by"
                .to_string();
            kept.push(Change::Schema(SchemaChange { table, statement, ops: vec![SchemaOp::CopyAgain { why }] }));
        }
        Ok(kept)
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
        self.drain().await?;
        let time = self.last_commit_time.map(crate::position::format_rfc3339).unwrap_or_else(|| "none".into());
        let message = format!(
            "reached stop_at: the target has every transaction up to {} (last commit time: {time}); {} transaction(s) applied in this run",
            self.applied, self.transactions
        );
        tracing::info!("{message}");
        println!("{message}");
        Ok(())
    }

    /// Ends the open target transaction at the last source transaction that ended in it;
    /// its connection commits it in its turn ([`Applier::take_committed`] follows up).
    async fn commit(&mut self) -> anyhow::Result<()> {
        let Some((position, commit_time)) = self.ended.take() else { return Ok(()) };
        self.apply_buffer().await?;
        let group = Group {
            position: position.clone(),
            commit_time,
            started: self.group_started,
            transactions: std::mem::take(&mut self.grouped),
            changes: std::mem::take(&mut self.grouped_changes),
            forget: std::mem::take(&mut self.forget_after_commit),
        };
        self.lanes.commit(position, commit_time, group).await?;
        self.open = false;
        self.group_size = 0;
        self.take_committed()
    }

    /// What an error that ended the stream means: one that a target transaction met beside
    /// others (it may have waited for a lock a later one held) asks for the stretch to be
    /// applied again on one connection.
    fn explain_failure(&self, error: anyhow::Error) -> anyhow::Error {
        match &self.latest {
            Some(until) if self.lanes.failed_in_parallel() && !is_transient(&error) && !is_resume(&error) => {
                let cause = format!("{error:#}");
                ParallelApplyFailed { until: until.clone(), lanes: self.lanes.count(), cause }.into()
            }
            _ => error,
        }
    }

    /// Ends the open target transaction and waits until it and every one before it committed.
    async fn drain(&mut self) -> anyhow::Result<()> {
        self.commit().await?;
        self.settle().await
    }

    /// Waits until every target transaction sent has committed, and follows up on them.
    async fn settle(&mut self) -> anyhow::Result<()> {
        self.lanes.settle().await?;
        self.take_committed()
    }

    /// Waits for the apply connections' next word, and follows up on what committed.
    async fn next_report(&mut self) -> anyhow::Result<()> {
        self.lanes.next_report().await?;
        self.take_committed()
    }

    /// After target transactions committed (in source order): their end goes to the
    /// checkpoint store and to the source as confirmed.
    fn take_committed(&mut self) -> anyhow::Result<()> {
        let committed: Vec<Group> = self.lanes.take_committed().collect();
        for group in committed {
            METRICS.apply_batch_seconds.observe(group.started.elapsed().as_secs_f64());
            METRICS.transactions_applied.inc_by(group.transactions);
            for (table, counts) in group.changes {
                let table = table.to_string();
                for (op, n) in OpCounts::OPS.iter().zip(counts.0).filter(|(_, n)| *n > 0) {
                    METRICS.changes_applied.with_label_values(&[table.as_str(), op]).inc_by(n);
                }
            }
            METRICS.lag_seconds.set(group.commit_time.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0));
            self.store.save_position(&group.position)?;
            for table in group.forget {
                self.store.forget_table(&table.to_string())?;
            }
            self.applied = group.position.clone();
            self.last_commit_time = Some(group.commit_time);
            let _ = self.confirmed.send(group.position);
        }
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

/// A row change to a table whose key ranges were copied under different snapshots, as
/// placed by its key.
enum Placed {
    /// What reaches the target: the change, the delete or insert half of a key that moved
    /// between ranges, or nothing.
    Change(Option<Change>),
    /// A key moved into a range copied before the change, with columns the change does
    /// not carry (unchanged TOAST): the row cannot be written whole.
    CopyAgain(TableName),
}

/// The integer key of a row, as its key range holds it.
fn row_key(table: &TableSchema, row: &Row) -> anyhow::Result<i64> {
    let key = table.key_indexes();
    let value = match key[..] {
        [key] => row.get(key),
        _ => None,
    };
    match value {
        Some(Value::Text(text)) => text.parse().ok(),
        _ => None,
    }
    .with_context(|| {
        format!(
            "a change to {} carries no integer key ({value:?}) to place it among the key ranges its copy was \
             split into; cutover stopped before this transaction. Run `cutover resync --table {}`",
            table.name, table.name
        )
    })
}

/// Places a row change among a table's key ranges copied under different snapshots.
fn place_by_key(copy: &TableProgress, current: &Position, change: Change) -> anyhow::Result<Placed> {
    let applies = |table: &TableSchema, row: &Row| Ok::<_, anyhow::Error>(copy.applies(current, row_key(table, row)?));
    Ok(Placed::Change(match change {
        Change::Insert { ref table, ref row } => applies(table, row)?.then_some(change),
        Change::Delete { ref table, ref old } => applies(table, old)?.then_some(change),
        Change::Update { table, old, new } => {
            let new_applies = applies(&table, &new)?;
            let old_applies = match &old {
                Some(old) => applies(&table, old)?,
                None => new_applies,
            };
            match (old, old_applies, new_applies) {
                (old, true, true) => Some(Change::Update { table, old, new }),
                (Some(old), true, false) => Some(Change::Delete { table, old }),
                (_, false, true) if new.contains(&Value::Unchanged) => {
                    return Ok(Placed::CopyAgain(table.name.clone()))
                }
                (_, false, true) => Some(Change::Insert { table, row: new }),
                (_, false, false) | (None, true, false) => None,
            }
        }
        other => Some(other),
    }))
}

/// Bytes of decoded events the decode → apply channel holds at most (one larger event
/// passes alone): with `[pipeline] max_batch_bytes`, what bounds streaming's memory.
const CHANNEL_BYTES: usize = 64 << 20;

/// How recent (by commit time) the last applied transaction must be for the stream to
/// count as caught up while the source keeps writing: MySQL stamps commits in whole
/// seconds, so one second would miss most of them.
const CAUGHT_UP_LAG: Duration = Duration::from_secs(2);

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

/// What tells the stream to end: `stop` for good, a new `resync` generation to drain and
/// resume from the checkpoint (tables to copy again were forgotten); and `hold`, what
/// holds the applier between transactions while `verify --repair` writes.
pub(super) struct Signals {
    pub stop: watch::Receiver<bool>,
    pub resync: watch::Receiver<u64>,
    pub hold: Arc<Hold>,
}

/// What the applier receives next.
enum Next {
    Event(Option<(Event, OwnedSemaphorePermit)>),
    /// A transaction a hold keeps out, set aside until the hold lets go.
    SetAside,
}

/// The transaction set aside by a hold, else the next event from the decode task; one a
/// hold at `asked` keeps out is set aside in `pending`.
async fn next_event(
    pending: &mut Option<(Event, OwnedSemaphorePermit)>,
    rx: &mut mpsc::Receiver<(Event, OwnedSemaphorePermit)>,
    asked: Option<&HoldPoint>,
) -> Next {
    let next = match pending.take() {
        Some(event) => Some(event),
        None => rx.recv().await,
    };
    match next {
        Some((event, permit)) if hold::stops_at(asked, &event) => {
            *pending = Some((event, permit));
            Next::SetAside
        }
        next => Next::Event(next),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn stream(
    mut changes: Box<dyn ChangeStream>,
    source: &mut dyn Source,
    sinks: Vec<Box<dyn Sink>>,
    store: &CheckpointStore,
    start: Position,
    confirmed: watch::Sender<Position>,
    copies: HashMap<String, TableProgress>,
    left_out: HashSet<TableName>,
    config: &Config,
    signals: Signals,
    serial: Serial,
) -> anyhow::Result<()> {
    let Signals { mut stop, mut resync, hold } = signals;
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
    let mut applier = Applier::new(sinks, store, confirmed, copies, left_out, config, start, serial)?;
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
    let (mut resyncing, mut resync_closed) = (false, false);
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let mut asked_rx = hold.asked();
    // A transaction a hold keeps out, and the hold point last reported as held.
    let mut pending: Option<(Event, OwnedSemaphorePermit)> = None;
    let mut reported: Option<HoldPoint> = None;
    let result = loop {
        let asked = asked_rx.borrow_and_update().clone();
        let holding = applier.current.is_none()
            && match &asked {
                None => false,
                Some(HoldPoint::Next) => true,
                Some(HoldPoint::Before(before)) => {
                    pending.as_ref().is_some_and(|(event, _)| hold::stops_at(asked.as_ref(), event))
                        || applier.sent_up_to.as_ref().is_some_and(|sent| sent >= before)
                }
            };
        match &asked {
            Some(point) if holding && reported.as_ref() != Some(point) => {
                if let Err(e) = applier.drain().await {
                    break Err(e);
                }
                let applied = match (point, &applier.latest) {
                    (HoldPoint::Before(before), Some(latest)) if latest >= before => {
                        Err(format!("the target has already applied a transaction ordered at {latest}, past {before}"))
                    }
                    _ => Ok(applier.applied.clone()),
                };
                tracing::info!(at = %applier.applied, "holding the applier for a repair");
                hold.report(point.clone(), applied);
                reported = Some(point.clone());
            }
            None if reported.is_some() => {
                tracing::info!("the repair let go: applying on");
                reported = None;
            }
            _ => {}
        }
        // A transaction is set aside only between transactions (a source that began one
        // without ending it would have it set aside again and again).
        let between = applier.current.is_none();
        let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = idle_check.tick() => {
                // Caught up: nothing received and nothing open, or (a steady writer never
                // lets the stream idle) the last transaction applied is a recent one.
                let idle = rx.is_empty() && applier.current.is_none() && applier.ended.is_none() && applier.lanes.idle();
                let recent = applier.last_commit_time.and_then(|t| t.elapsed().ok()).is_some_and(|lag| lag < CAUGHT_UP_LAG);
                if idle {
                    METRICS.lag_seconds.set(0.0);
                }
                let caught_up = idle || recent;
                if caught_up {
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
            reported = applier.next_report(), if !applier.lanes.idle() => {
                if let Err(e) = reported {
                    break Err(e);
                }
            }
            _ = asked_rx.changed() => {}
            next = next_event(&mut pending, &mut rx, asked.as_ref().filter(|_| between)), if !holding => match next {
                Next::SetAside => {}
                Next::Event(Some((event, permit))) => {
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
                        break applier.drain().await;
                    }
                }
                Next::Event(None) => {
                    let ended = (&mut reader).await;
                    // What the source sent whole before its stream ended goes in first.
                    if let Err(e) = applier.drain().await {
                        break Err(e);
                    }
                    break match ended {
                        Ok(Err(e)) => Err(e.context(format!("the change stream stopped; the target has everything up to {}", applier.applied))),
                        Ok(Ok(())) => Ok(()),
                        Err(e) => Err(anyhow::anyhow!("the change stream task failed: {e}")),
                    };
                }
            },
            _ = stopped(&mut stop), if drain_deadline.is_none() => {
                if applier.current.is_none() {
                    break applier.drain().await;
                }
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            // Not while a repair holds the applier: a copy then would be newer than its snapshot.
            changed = resync.changed(), if drain_deadline.is_none() && !resync_closed && asked.is_none() => {
                // The sender lives as long as the pipeline; gone, nothing can ask any more.
                if changed.is_err() {
                    resync_closed = true;
                    continue;
                }
                resyncing = true;
                if applier.current.is_none() {
                    break applier.drain().await;
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
    hold.stream_ended();
    applier.lanes.shutdown().await;
    let result = result.map_err(|e| applier.explain_failure(e));
    // Drained for `cutover resync` (and not told to stop meanwhile): resume, copying again.
    let result = match result {
        Ok(()) if resyncing && !*stop.borrow() => Err(ResumeFromCheckpoint("asked to copy tables again".into()).into()),
        other => other,
    };
    // A skip entry that named nothing is said whenever the daemon stops, for any reason
    // (not when it only resumes from its checkpoint).
    if result.as_ref().err().is_none_or(|e| !is_transient(e) && !is_resume(e) && !e.is::<ParallelApplyFailed>()) {
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

    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use async_trait::async_trait;
    use tokio::sync::watch;

    use super::{Applier, Serial};
    use crate::change::{Change, Column, Event, Identity, Row, SchemaChange, SchemaOp, TableName, TableSchema, Value};
    use crate::checkpoint::{CheckpointStore, ChunkCopy, TableProgress};
    use crate::config::Config;
    use crate::copy::Chunk;
    use crate::copy::{CopyFormat, SourceDialect};
    use crate::position::{Lsn, Position};
    use crate::schema::{SourceSchema, TableDefinition};
    use crate::sink::{Sink, TableWriter};

    /// Records what the applier asks of a target: `begin`, `apply N` (and `schema <table>
    /// <op>` for each schema change in it, `<op> <key>` for each row change to a table
    /// with an integer key), `commit <position>`. It cannot change a column's type in place.
    #[derive(Default)]
    struct MemorySink {
        log: Arc<std::sync::Mutex<Vec<String>>>,
        /// Set when several sinks apply side by side: each takes `lane` ms per batch and
        /// logs only writes (`key=value` after `lane:`) and commits.
        lane: Option<u64>,
        /// Fails every batch, after 20 ms.
        fails: bool,
        /// Says it takes changes in the source's order across tables (as a MySQL target does).
        keeps_table_order: bool,
    }

    impl MemorySink {
        fn push(&self, entry: String) {
            if let Ok(mut log) = self.log.lock() {
                log.push(entry);
            }
        }
    }

    #[async_trait]
    impl Sink for MemorySink {
        fn copy_format(&self, _table: &TableDefinition, _source: SourceDialect) -> CopyFormat {
            CopyFormat::PostgresText
        }
        async fn preflight(
            &mut self,
            _: &SourceSchema,
            _: u64,
            _: usize,
        ) -> anyhow::Result<Vec<crate::finding::Finding>> {
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
            self.push("begin".into());
            Ok(())
        }
        async fn missing_tables(&mut self, _: &[TableName]) -> anyhow::Result<Vec<TableName>> {
            Ok(Vec::new())
        }
        async fn drop_tables(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
            for t in tables {
                self.push(format!("drop {t}"));
            }
            Ok(())
        }
        fn in_place(&self) -> crate::sink::InPlace {
            Box::new(|op| !matches!(op, SchemaOp::CreateTable | SchemaOp::CopyAgain { .. } | SchemaOp::SetType { .. }))
        }
        fn reorders_tables(&self) -> bool {
            !self.keeps_table_order
        }
        async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
            if self.fails {
                tokio::time::sleep(Duration::from_millis(20)).await;
                anyhow::bail!("a unique value taken by a transaction not yet applied");
            }
            if let Some(lane) = self.lane {
                tokio::time::sleep(Duration::from_millis(lane * 2)).await;
                for change in changes {
                    if let Change::Insert { row, .. } | Change::Update { new: row, .. } = change {
                        self.push(format!("{:?}={:?}", row[0], row[1]));
                    }
                }
                return Ok(());
            }
            self.push(format!("apply {}", changes.len()));
            for change in changes {
                match change {
                    Change::Schema(schema) => {
                        for op in &schema.ops {
                            self.push(format!("schema {} {}", schema.table, op.kind()));
                        }
                    }
                    Change::Relation(table) => self.push(format!("relation {}", table.name)),
                    change => {
                        let key = |row: &Row| match row.first() {
                            Some(Value::Text(key)) => key.clone(),
                            other => format!("{other:?}"),
                        };
                        match change {
                            Change::Insert { table, row } if table.columns[0].type_oid == 23 => {
                                self.push(format!("insert {}", key(row)));
                            }
                            Change::Update { table, old, new } if table.columns[0].type_oid == 23 => {
                                let old = old.as_ref().map(|old| format!("{} → ", key(old))).unwrap_or_default();
                                self.push(format!("update {old}{}", key(new)));
                            }
                            Change::Delete { table, old } if table.columns[0].type_oid == 23 => {
                                self.push(format!("delete {}", key(old)));
                            }
                            Change::Truncate { tables, .. } => {
                                let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
                                self.push(format!("truncate {}", names.join(", ")));
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok(())
        }
        async fn commit(&mut self, position: &Position, _: SystemTime) -> anyhow::Result<()> {
            self.push(format!("commit {position}"));
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

    fn table_schema(table: &str) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            name: TableName::new("public", table),
            columns: vec![Column {
                name: "v".into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: true,
                default: None,
            }],
            identity: Identity::Key,
        })
    }

    fn insert(table: &str, bytes: usize) -> Event {
        Event::Change(Change::Insert { table: table_schema(table), row: vec![Value::Text("x".repeat(bytes))] })
    }

    fn relation(table: &str) -> Event {
        Event::Change(Change::Relation(table_schema(table)))
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
        run_with(config, events, log_end_after_stop, Serial::No, None, false).await
    }

    /// As [`run`], with groups run on one connection as `serial` says, the sink of
    /// connection `failing` failing its batches, and sinks that keep the source's order
    /// across tables if `keeps_table_order`.
    async fn run_with(
        config: &Config,
        events: Vec<Option<Event>>,
        log_end_after_stop: Option<Position>,
        serial: Serial,
        failing: Option<u64>,
        keeps_table_order: bool,
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
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lanes = config.pipeline.apply_connections.unwrap_or(1);
        let sinks: Vec<Box<dyn Sink>> = (0..lanes)
            .map(|lane| {
                let fails = failing == Some(lane as u64);
                let lane = (lanes > 1).then_some(lane as u64);
                Box::new(MemorySink { log: log.clone(), lane, fails, keeps_table_order }) as Box<dyn Sink>
            })
            .collect();
        let (confirmed, _rx) = watch::channel(lsn(0));
        let copied = |copied_at, ranges| TableProgress { copied_at, rows: 0, untracked: None, shape: None, ranges };
        // public.ranged: keys below 100 copied at 0/64, the rest at 0/C8.
        let range = |start, end, at| ChunkCopy { chunk: Chunk::KeyRange { start, end }, copied_at: lsn(at), rows: 0 };
        let copies = HashMap::from([
            ("public.late".to_string(), copied(lsn(500), Vec::new())),
            (
                "public.ranged".to_string(),
                copied(lsn(100), vec![range(None, Some(100), 100), range(Some(100), None, 200)]),
            ),
        ]);
        let mut stopped = false;
        let mut error = None;
        {
            let applier = Applier::new(sinks, &store, confirmed, copies, HashSet::new(), config, lsn(0), serial);
            let mut applier = match applier {
                Ok(applier) => applier,
                Err(e) => panic!("applier: {e:#}"),
            };
            applier.log_end_after_stop = log_end_after_stop;
            let mut events = events.into_iter().peekable();
            while let Some(event) = events.next() {
                let Some(event) = event else { continue };
                let more_waiting = matches!(events.peek(), Some(Some(_)));
                if let Err(e) = applier.handle(event, more_waiting).await {
                    error = Some(format!("error {:#}", applier.explain_failure(e)));
                    break;
                }
                if applier.reached_stop || applier.passed_stop_time() {
                    stopped = true;
                    if let Err(e) = applier.finish_at_stop().await {
                        panic!("finish: {e:#}");
                    }
                    break;
                }
            }
            if error.is_none() {
                if let Err(e) = applier.settle().await {
                    error = Some(format!("error {:#}", applier.explain_failure(e)));
                }
            }
            // What was sent reaches the sink before the log is read.
            applier.lanes.finish().await;
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = match log.lock() {
            Ok(log) => log.clone(),
            Err(e) => panic!("log: {e}"),
        };
        log.extend(error);
        (log, stopped)
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

    fn schema_change(table: &str, op: SchemaOp) -> Event {
        Event::Change(Change::Schema(SchemaChange {
            table: TableName::new("public", table),
            statement: "ALTER TABLE …".into(),
            ops: vec![op],
        }))
    }

    #[tokio::test]
    async fn a_schema_change_the_target_cannot_make_copies_the_table_again_after_its_commit() {
        let retype = SchemaOp::SetType { column: "v".into(), type_name: "bigint".into() };
        let events = queued(vec![
            vec![
                Event::Begin { position: lsn(10), commit_time: at(1) },
                insert("t", 10),
                relation("t"),
                schema_change("t", retype),
                // After the change, t's description and rows come with the copy: left out.
                relation("t"),
                insert("t", 10),
                insert("u", 10),
                Event::Commit { position: lsn(20), commit_time: at(1) },
            ],
            transaction(30, 40, 2, "u"),
        ]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(
            log,
            [
                "begin",
                "apply 4",
                "relation public.t",
                "schema public.t drop table",
                "commit lsn:0/14",
                "error public.t is copied again: the target cannot alter column type in place"
            ]
        );
        // Streaming only, nothing copies the table: the transaction is not applied.
        let events = queued(vec![vec![
            Event::Begin { position: lsn(10), commit_time: at(1) },
            insert("t", 10),
            schema_change("t", SchemaOp::SetType { column: "v".into(), type_name: "bigint".into() }),
            Event::Commit { position: lsn(20), commit_time: at(1) },
        ]]);
        let (log, _) = run(&config("[snapshot]\nmode = \"never\"\n"), events, None).await;
        assert_eq!((log.len(), log[0].as_str()), (2, "begin"), "{log:?}");
        assert!(
            log[1].starts_with("error public.t needs to be copied again") && log[1].contains("\"never\""),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_table_dropped_or_created_in_a_transaction() {
        let events = queued(vec![
            vec![
                Event::Begin { position: lsn(10), commit_time: at(1) },
                schema_change("gone", SchemaOp::DropTable),
                schema_change("t", SchemaOp::DropColumn { name: "w".into() }),
                Event::Commit { position: lsn(20), commit_time: at(1) },
            ],
            transaction(30, 40, 2, "t"),
        ]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(
            log,
            ["begin", "apply 3", "schema public.gone drop table", "schema public.t drop column", "commit lsn:0/28"]
        );
        let events = queued(vec![vec![
            Event::Begin { position: lsn(10), commit_time: at(1) },
            schema_change("new", SchemaOp::CreateTable),
            insert("new", 10),
            Event::Commit { position: lsn(20), commit_time: at(1) },
        ]]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(
            log,
            [
                "begin",
                "apply 1",
                "schema public.new drop table",
                "commit lsn:0/14",
                "error public.new is copied again: a table the selection matches was created"
            ]
        );
    }

    #[tokio::test]
    async fn changes_to_a_table_copied_later_than_the_transaction_are_left_out() {
        let events = queued(vec![transaction(10, 20, 1, "late"), transaction(600, 610, 2, "late")]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(log, ["begin", "apply 1", "commit lsn:0/262"]);
    }

    /// A row of public.ranged (integer key `id`, one text column): `None` for a value
    /// unchanged (TOAST) that the change does not carry.
    fn ranged_row(id: i64, v: Option<&str>) -> Row {
        vec![Value::Text(id.to_string()), v.map_or(Value::Unchanged, |v| Value::Text(v.into()))]
    }

    fn ranged(change: impl FnOnce(Arc<TableSchema>) -> Change) -> Event {
        keyed("ranged", change)
    }

    /// A change to `public.<table>`, keyed by an integer `id`, with a text `v`.
    fn keyed(table: &str, change: impl FnOnce(Arc<TableSchema>) -> Change) -> Event {
        let column = |name: &str, type_name: &str, type_oid, is_key| Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid,
            is_key,
            default: None,
        };
        let table = Arc::new(TableSchema {
            name: TableName::new("public", table),
            columns: vec![column("id", "integer", 23, true), column("v", "text", 25, false)],
            identity: Identity::Key,
        });
        Event::Change(change(table))
    }

    fn ranged_transaction(begin: u64, end: u64, changes: Vec<Event>) -> Vec<Event> {
        let mut events = vec![Event::Begin { position: lsn(begin), commit_time: at(1) }];
        events.extend(changes);
        events.push(Event::Commit { position: lsn(end), commit_time: at(1) });
        events
    }

    fn update(old: Option<i64>, new: i64, v: Option<&str>) -> Event {
        ranged(|table| Change::Update { table, old: old.map(|old| ranged_row(old, None)), new: ranged_row(new, v) })
    }

    #[tokio::test]
    async fn on_several_connections_commits_keep_source_order_and_each_key_its_changes_order() {
        // Few hot keys in one table, many in another (keys changed too), transactions of one to three changes in
        // batches of four, lanes of different speeds: most batches hold changes that overlap
        // a group in flight on another connection and changes that go ahead of them.
        let seed = std::env::var("CUTOVER_LANES_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1u64);
        println!("lanes seed={seed} (replay: CUTOVER_LANES_SEED={seed})");
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let config = config("[pipeline]\napply_connections = 3\nmax_batch_changes = 4\n");
        let mut events = Vec::new();
        let mut expected_writes = Vec::new();
        for t in 0..400u64 {
            let changes: Vec<Event> = (0..1 + next() % 3)
                .map(|c| {
                    let value = format!("{t}.{c}");
                    let (table, key, moved_from) = match next() % 3 {
                        0 => ("ranged", 100 + (next() % 5) as i64, None),
                        1 => ("spread", 200 + (next() % 60) as i64, None),
                        // A key changed: it touches the old key too.
                        _ => ("spread", 200 + (next() % 60) as i64, Some(200 + (next() % 60) as i64)),
                    };
                    expected_writes.push((key, value.clone()));
                    let old = moved_from.map(|from| ranged_row(from, None));
                    keyed(table, |table| Change::Update { table, old, new: ranged_row(key, Some(&value)) })
                })
                .collect();
            events.push(ranged_transaction(1000 + 10 * t, 1005 + 10 * t, changes));
        }
        // Sinks that take a table's changes ahead of another's, and sinks that do not (whose
        // transactions then reach them with their changes in the source's order).
        for keeps_table_order in [false, true] {
            let (log, _) = run_with(&config, queued(events.clone()), None, Serial::No, None, keeps_table_order).await;
            let commits: Vec<&String> = log.iter().filter(|l| l.starts_with("commit")).collect();
            assert!(commits.len() > 10, "{log:?}");
            let last = format!("commit lsn:0/{:X}", 1005 + 10 * 399);
            assert_eq!(commits.last(), Some(&&last), "{log:?}");
            let positions: Vec<u64> = commits
                .iter()
                .filter_map(|c| u64::from_str_radix(c.trim_start_matches("commit lsn:0/"), 16).ok())
                .collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "commits out of source order: {positions:?}");
            let value = |entry: &str| {
                let (_, value) = entry.split_once("=Text(\"")?;
                Some(value.trim_end_matches("\")").to_string())
            };
            for key in (100..105).chain(200..260) {
                let wanted: Vec<&String> = expected_writes.iter().filter(|(k, _)| *k == key).map(|(_, v)| v).collect();
                let prefix = format!("Text(\"{key}\")=");
                let applied: Vec<String> =
                    log.iter().filter(|l| l.starts_with(&prefix)).filter_map(|l| value(l)).collect();
                assert_eq!(applied.iter().collect::<Vec<_>>(), wanted, "key {key}: {log:?}");
            }
            // Each transaction's changes (`t.c`) in the order it made them.
            let written: Vec<(u64, u64)> = log
                .iter()
                .filter_map(|l| value(l))
                .filter_map(|v| v.split_once('.').and_then(|(t, c)| Some((t.parse().ok()?, c.parse().ok()?))))
                .collect();
            let in_order = (0..400u64).all(|t| {
                let changes: Vec<u64> = written.iter().filter(|(wt, _)| *wt == t).map(|(_, c)| *c).collect();
                changes.windows(2).all(|w| w[0] < w[1])
            });
            assert!(in_order || !keeps_table_order, "a transaction's changes reordered across tables: {log:?}");
        }
    }

    #[tokio::test]
    async fn a_failure_beside_other_connections_is_applied_again_on_one_up_to_where_it_was() {
        let config = config("[pipeline]\napply_connections = 2\nmax_batch_changes = 1\n");
        let events = || {
            let transactions = (0..6u64).map(|t| {
                ranged_transaction(1000 + 10 * t, 1005 + 10 * t, vec![update(None, 100 + t as i64, Some("v"))])
            });
            queued(transactions.collect())
        };
        // The second connection fails while the first has a group in flight.
        let (log, _) = run_with(&config, events(), None, Serial::No, Some(1), false).await;
        let until = "applying again on one connection up to lsn:0/";
        assert!(
            log.last().is_some_and(|l| l.contains("applying on 2 connections failed") && l.contains(until)),
            "{log:?}"
        );
        // Run again up to there on one connection (the failing one is not used), then on both.
        let (log, _) = run_with(&config, events(), None, Serial::Until(lsn(1020)), None, false).await;
        let commits: Vec<&String> = log.iter().filter(|l| l.starts_with("commit")).collect();
        assert_eq!(commits.len(), 6, "{log:?}");
        let (log, _) = run_with(&config, events(), None, Serial::Always, Some(1), false).await;
        assert_eq!(log.iter().filter(|l| l.starts_with("commit")).count(), 6, "{log:?}");
    }

    #[tokio::test]
    async fn rows_of_key_ranges_copied_under_different_snapshots_take_only_newer_changes() {
        let insert = |id| ranged(|table| Change::Insert { table, row: ranged_row(id, Some("v")) });
        let delete = |id| ranged(|table| Change::Delete { table, old: ranged_row(id, None) });
        let events = queued(vec![
            // Older than every range: in the copy already.
            ranged_transaction(50, 60, vec![insert(5), delete(150)]),
            // Between the ranges' snapshots: keys below 100 take it, the others have it.
            ranged_transaction(
                150,
                160,
                vec![
                    insert(5),
                    insert(150),
                    update(None, 7, Some("w")),
                    update(None, 170, Some("w")),
                    // Keys moving across: out of the older range (a delete), into it (an insert).
                    update(Some(9), 120, Some("w")),
                    update(Some(130), 10, Some("w")),
                    update(Some(140), 141, Some("w")),
                    update(Some(11), 12, None),
                    delete(3),
                    delete(160),
                    delete(i64::MAX),
                ],
            ),
            // Newer than every range: all of it.
            ranged_transaction(200, 210, vec![insert(150), update(Some(150), 20, Some("w")), delete(i64::MIN)]),
        ]);
        let (log, _) = run(&config(""), events, None).await;
        assert_eq!(
            log,
            [
                "begin",
                "apply 9",
                "insert 5",
                "update 7",
                "delete 9",
                "insert 10",
                "update 11 → 12",
                "delete 3",
                "insert 150",
                "update 150 → 20",
                "delete -9223372036854775808",
                "commit lsn:0/D2"
            ]
        );
    }

    #[tokio::test]
    async fn a_truncate_or_a_key_moved_without_its_columns_between_range_snapshots_copies_the_table_again() {
        let truncate =
            ranged(|table| Change::Truncate { tables: vec![table], cascade: false, restart_identity: false });
        for (what, change) in [("truncate", truncate), ("moved key", update(Some(130), 10, None))] {
            let events = queued(vec![ranged_transaction(150, 160, vec![change]), transaction(170, 180, 2, "t")]);
            let (log, _) = run(&config(""), events, None).await;
            assert_eq!(
                log,
                [
                    "begin",
                    "apply 1",
                    "schema public.ranged drop table",
                    "commit lsn:0/A0",
                    "error public.ranged is copied again: changed while its copy's key ranges, copied under different \
                     snapshots, were brought up to date in a way rows cannot be placed by"
                ],
                "{what}"
            );
        }
        // After every range's snapshot, a TRUNCATE is one like any other.
        let truncate =
            ranged(|table| Change::Truncate { tables: vec![table], cascade: false, restart_identity: false });
        let (log, _) = run(&config(""), queued(vec![ranged_transaction(250, 260, vec![truncate])]), None).await;
        assert_eq!(log, ["begin", "apply 1", "truncate public.ranged", "commit lsn:0/104"]);
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
