//! Parallel apply: `[pipeline] apply_connections` target connections ("lanes"), each
//! running groups of whole source transactions in target transactions of its own.
//!
//! Why nothing is lost, doubled or reordered:
//! - A group is a run of consecutive source transactions; groups are numbered in source
//!   order and go to the lanes in turn. A lane commits its group only after every
//!   earlier group committed, so the target always holds a prefix of the source's
//!   transactions: each lane records its last group's end in the group's own target
//!   transaction ([`crate::sink::Sink::commit`]), and the highest such record is exactly
//!   where a restart resumes. Foreign keys hold at every commit, as on the source.
//! - What runs in parallel is the statements. A change whose key (table and key values;
//!   for a table without a key, any delete or update in it) an earlier group on another
//!   lane also touches is sent only once that group has committed: an UPDATE or DELETE
//!   does not see, nor wait for, a row another transaction inserted and has not committed
//!   yet. A TRUNCATE or a schema change waits for every earlier group in the same way, and
//!   every later change waits for it.
//! - Locks the keys do not show (a secondary unique index, a foreign key check) can still
//!   make an earlier group wait for a later one, which waits for its turn: lanes run with
//!   a lock timeout, and a group that fails while others are in flight makes the pipeline
//!   resume from its checkpoint on one lane up to where the failure was
//!   ([`ParallelApplyFailed`]): only an error that comes back there stops it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::stopped;

use crate::change::{Change, Identity, Row, TableName, TableSchema};
use crate::position::Position;
use crate::sink::Sink;

/// A group failed while others were in flight: the pipeline resumes from its checkpoint
/// and applies on one connection up to `until` (the last transaction sent), where lanes
/// cannot wait on each other.
#[derive(Debug, thiserror::Error)]
#[error("applying on {lanes} connections failed ({cause}); applying again on one connection up to {until}")]
pub struct ParallelApplyFailed {
    pub until: Position,
    pub lanes: usize,
    pub cause: String,
}

/// Which groups run on one lane only, after failures beside others.
#[derive(Clone, Debug, Default)]
pub(super) enum Serial {
    #[default]
    No,
    /// Those beginning at or before this position (the last one sent before a failure).
    Until(Position),
    /// All: failures beside others came back again and again.
    Always,
}

impl Serial {
    /// Whether a group beginning with the source transaction at `position` runs alone.
    pub(super) fn covers(&self, position: &Position) -> bool {
        match self {
            Serial::No => false,
            Serial::Until(until) => position <= until,
            Serial::Always => true,
        }
    }
}

/// What a lane is told, in order.
enum Command {
    /// Another lane changes these tables' shape: what was read about them is stale.
    Forget(Vec<TableName>),
    /// Opens a group; `beside_others`: other lanes may run groups meanwhile.
    Begin {
        beside_others: bool,
    },
    Apply(Vec<Change>),
    Commit {
        seq: u64,
        position: Position,
        commit_time: SystemTime,
    },
}

/// What a lane says back.
enum Report {
    Committed(u64),
    Failed(anyhow::Error),
}

/// The keys, tables or everything a group's changes touch.
#[derive(Default)]
struct Footprint {
    rows: HashSet<u64>,
    /// Tables with row changes by key, or inserts without one.
    tables: HashSet<TableName>,
    /// Tables with changes to rows without a key (matched by their values).
    whole_tables: HashSet<TableName>,
    /// A TRUNCATE or a schema change: everything.
    everything: bool,
}

impl Footprint {
    /// Whether a change touching `other` must wait for a group with this footprint.
    fn overlaps(&self, other: &Footprint) -> bool {
        (other.everything && !self.is_empty())
            || self.everything
            || other.whole_tables.iter().any(|t| self.tables.contains(t) || self.whole_tables.contains(t))
            || other.tables.iter().any(|t| self.whole_tables.contains(t))
            || other.rows.iter().any(|r| self.rows.contains(r))
    }

    fn is_empty(&self) -> bool {
        !self.everything && self.tables.is_empty() && self.whole_tables.is_empty()
    }

    /// The tables it names.
    fn touched_tables(&self) -> impl Iterator<Item = &TableName> {
        self.tables.iter().chain(&self.whole_tables)
    }

    fn add(&mut self, other: Footprint) {
        self.rows.extend(other.rows);
        self.tables.extend(other.tables);
        self.whole_tables.extend(other.whole_tables);
        self.everything |= other.everything;
    }

    /// What one change touches.
    fn of(change: &Change) -> Footprint {
        let mut footprint = Footprint::default();
        let mut by_key = |table: &TableSchema, rows: &[Option<&Row>]| {
            let key = table.key_indexes();
            if key.is_empty() || table.identity == Identity::Full {
                footprint.whole_tables.insert(table.name.clone());
                return;
            }
            footprint.tables.insert(table.name.clone());
            for row in rows.iter().flatten() {
                let mut hasher = DefaultHasher::new();
                table.name.hash(&mut hasher);
                for &k in &key {
                    row.get(k).hash(&mut hasher);
                }
                footprint.rows.insert(hasher.finish());
            }
        };
        match change {
            Change::Insert { table, row } => match table.key_indexes().is_empty() {
                // Appended rows of a table without a key touch nothing another change waits for.
                true => {
                    footprint.tables.insert(table.name.clone());
                }
                false => by_key(table, &[Some(row)]),
            },
            Change::Update { table, old, new } => by_key(table, &[old.as_ref(), Some(new)]),
            Change::Delete { table, old } => by_key(table, &[Some(old)]),
            Change::Truncate { .. } | Change::Relation(_) | Change::Schema(_) => footprint.everything = true,
        }
        footprint
    }
}

/// Changes sent together, and what they touch.
#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    footprint: Footprint,
}

/// A group sent to a lane and not committed yet.
struct InFlight<T> {
    seq: u64,
    lane: usize,
    footprint: Footprint,
    /// What the applier gets back once the group committed.
    done: T,
}

/// The group being filled.
struct Open {
    seq: u64,
    lane: usize,
    footprint: Footprint,
}

/// The apply connections and the groups in flight on them. `T` is what the applier
/// keeps about a group until it has committed.
pub(super) struct Lanes<T> {
    commands: Vec<mpsc::Sender<Command>>,
    tasks: Vec<JoinHandle<()>>,
    /// Tells the lanes to stop (a failing lane tells the others): what they run is cut
    /// short, but not a commit under way.
    stop: std::sync::Arc<watch::Sender<bool>>,
    reports: mpsc::UnboundedReceiver<Report>,
    in_flight: VecDeque<InFlight<T>>,
    open: Option<Open>,
    /// Groups committed, in order, not yet taken by the applier.
    committed: VecDeque<T>,
    next_seq: u64,
    /// How many lanes new groups go to: one while applying serially after a failure.
    active: usize,
    /// A lane failed while groups were in flight on more than one lane.
    failed_in_parallel: bool,
    /// The sinks take a table's changes ahead of another's ([`Sink::reorders_tables`]).
    reorders_tables: bool,
}

/// Commands a lane holds before the applier waits: about two batches, so memory stays bounded.
const LANE_QUEUE: usize = 2;

impl<T> Lanes<T> {
    /// Starts one lane per sink.
    pub(super) fn start(sinks: Vec<Box<dyn Sink>>) -> Lanes<T> {
        let reorders_tables = sinks.iter().all(|sink| sink.reorders_tables());
        let (report_tx, reports) = mpsc::unbounded_channel();
        // The number of the last group committed: a lane's turn comes when it is the one before its group.
        let (turn_tx, turn) = watch::channel(0u64);
        let turn_tx = std::sync::Arc::new(turn_tx);
        let stop = std::sync::Arc::new(watch::channel(false).0);
        let mut commands = Vec::new();
        let mut tasks = Vec::new();
        for sink in sinks {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            commands.push(tx);
            let ends = LaneEnd { reports: report_tx.clone(), stop: stop.clone(), said: false };
            // Subscribed here, not in the task: a stop sent before the task first runs is seen.
            let stopping = stop.subscribe();
            tasks.push(tokio::spawn(run_lane(sink, rx, turn.clone(), turn_tx.clone(), ends, stopping)));
        }
        let active = commands.len();
        Lanes {
            commands,
            tasks,
            stop,
            reports,
            in_flight: VecDeque::new(),
            open: None,
            committed: VecDeque::new(),
            next_seq: 1,
            active,
            failed_in_parallel: false,
            reorders_tables,
        }
    }

    /// The number of apply connections.
    pub(super) fn count(&self) -> usize {
        self.commands.len()
    }

    /// Sends the groups begun from now on to one lane (`serial`) or to all in turn.
    pub(super) fn set_serial(&mut self, serial: bool) {
        self.active = if serial { 1 } else { self.commands.len() };
    }

    /// Whether groups run on more than one lane at this moment.
    fn parallel(&self) -> bool {
        let mut lanes: HashSet<usize> = self.in_flight.iter().map(|g| g.lane).collect();
        lanes.extend(self.open.as_ref().map(|g| g.lane));
        lanes.len() > 1
    }

    /// Whether a lane failed while groups were in flight on others too.
    pub(super) fn failed_in_parallel(&self) -> bool {
        self.failed_in_parallel
    }

    /// No group open or in flight.
    pub(super) fn idle(&self) -> bool {
        self.open.is_none() && self.in_flight.is_empty()
    }

    /// Opens a group on the next lane, once fewer than two groups per lane are in flight.
    pub(super) async fn begin(&mut self) -> anyhow::Result<()> {
        while self.in_flight.len() >= 2 * self.commands.len() {
            self.next_report().await?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let lane = usize::try_from(seq).unwrap_or(0) % self.active.max(1);
        self.send(lane, Command::Begin { beside_others: self.active > 1 }).await?;
        self.open = Some(Open { seq, lane, footprint: Footprint::default() });
        Ok(())
    }

    /// Sends changes to the open group's lane: at once those that touch nothing an earlier
    /// group on another lane has still to commit, then, once those groups have, the rest.
    /// A group so waits only where it must (the hot rows of a workload), not from its
    /// first such change on. Changes of one table keep their order (from the first that
    /// waits, the table's later ones wait with it; rows are per table), and what follows a
    /// waiting TRUNCATE or schema change waits with it. Where the sinks keep the source's
    /// order across tables (a foreign key checked at once), everything after the first
    /// change that waits waits with it.
    pub(super) async fn apply(&mut self, changes: Vec<Change>) -> anyhow::Result<()> {
        let Some(lane) = self.open.as_ref().map(|g| g.lane) else {
            anyhow::bail!("internal error: changes to apply with no target transaction open")
        };
        let (mut ready, mut waiting) = (Batch::default(), Batch::default());
        let mut waiting_tables: HashSet<TableName> = HashSet::new();
        for change in changes {
            let footprint = Footprint::of(&change);
            let waits = waiting.footprint.everything
                || ((footprint.everything || !self.reorders_tables) && !waiting.changes.is_empty())
                || footprint.touched_tables().chain(change.table()).any(|t| waiting_tables.contains(t))
                || self.in_flight.iter().any(|g| g.lane != lane && g.footprint.overlaps(&footprint));
            let batch = match waits {
                true => {
                    waiting_tables.extend(footprint.touched_tables().chain(change.table()).cloned());
                    &mut waiting
                }
                false => &mut ready,
            };
            batch.changes.push(change);
            batch.footprint.add(footprint);
        }
        for batch in [ready, waiting] {
            if batch.changes.is_empty() {
                continue;
            }
            while self.in_flight.iter().any(|g| g.lane != lane && g.footprint.overlaps(&batch.footprint)) {
                self.next_report().await?;
            }
            self.send_batch(lane, batch).await?;
        }
        Ok(())
    }

    /// Sends changes no earlier group on another lane still to commit touches.
    async fn send_batch(&mut self, lane: usize, batch: Batch) -> anyhow::Result<()> {
        let Batch { changes, footprint } = batch;
        if footprint.everything {
            // Every earlier group on another lane has committed and no later group exists:
            // the other lanes forget before they apply anything after this.
            let reshaped: Vec<TableName> = changes
                .iter()
                .filter(|c| matches!(c, Change::Relation(_) | Change::Schema(_)))
                .filter_map(|c| c.table().cloned())
                .collect();
            for other in (0..self.commands.len()).filter(|&other| other != lane && !reshaped.is_empty()) {
                self.send(other, Command::Forget(reshaped.clone())).await?;
            }
        }
        if let Some(open) = self.open.as_mut() {
            open.footprint.add(footprint);
        }
        self.send(lane, Command::Apply(changes)).await
    }

    /// Ends the open group: its lane commits it at `position` in its turn; `done` comes
    /// back from [`Lanes::take_committed`] then.
    pub(super) async fn commit(&mut self, position: Position, commit_time: SystemTime, done: T) -> anyhow::Result<()> {
        let Some(open) = self.open.take() else {
            anyhow::bail!("internal error: a commit with no target transaction open")
        };
        self.send(open.lane, Command::Commit { seq: open.seq, position, commit_time }).await?;
        self.in_flight.push_back(InFlight { seq: open.seq, lane: open.lane, footprint: open.footprint, done });
        Ok(())
    }

    /// What the groups committed since the last call carried, in commit (= source) order.
    pub(super) fn take_committed(&mut self) -> impl Iterator<Item = T> + '_ {
        self.committed.drain(..)
    }

    /// Waits until every group sent has committed.
    pub(super) async fn settle(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.next_report().await?;
        }
        Ok(())
    }

    /// Waits for what a lane says next and takes it in; an error if a lane failed.
    /// Cancel-safe: nothing is lost if the future is dropped before it resolves.
    pub(super) async fn next_report(&mut self) -> anyhow::Result<()> {
        let report = self.reports.recv().await;
        self.take_report(report)
    }

    fn take_report(&mut self, report: Option<Report>) -> anyhow::Result<()> {
        match report {
            Some(Report::Committed(seq)) => match self.in_flight.pop_front() {
                Some(group) if group.seq == seq => self.committed.push_back(group.done),
                _ => anyhow::bail!("internal error: target transactions committed out of order"),
            },
            Some(Report::Failed(error)) => {
                self.failed_in_parallel = self.parallel();
                return Err(error);
            }
            None => anyhow::bail!("internal error: every apply connection's task ended"),
        }
        Ok(())
    }

    /// Stops every lane and waits until it has: groups not committed roll back with their
    /// connections, a commit under way is seen through. The target's progress records are
    /// final once this returns, so a restart reads where the target really stands. (A
    /// statement cut short may still hold its locks on the server until its connection's
    /// end reaches it.)
    pub(super) async fn shutdown(&mut self) {
        // Kept even with no receiver yet (send would drop it).
        self.stop.send_replace(true);
        self.join().await;
    }

    /// Lets every lane run what it was sent, then end.
    #[cfg(test)]
    pub(super) async fn finish(&mut self) {
        self.commands.clear();
        self.join().await;
    }

    /// Waits until every lane's task has ended.
    async fn join(&mut self) {
        for task in &mut self.tasks {
            let _ = task.await;
        }
    }

    /// Sends a command to a lane, taking in what the lanes say while its queue is full: a
    /// lane that failed stops the others, which then take no command.
    async fn send(&mut self, lane: usize, command: Command) -> anyhow::Result<()> {
        /// What happened first.
        enum Ready {
            Sent,
            LaneEnded,
            Report(Option<Report>),
        }
        let mut command = Some(command);
        loop {
            let Some(sender) = self.commands.get(lane) else {
                anyhow::bail!("internal error: no apply connection {lane}")
            };
            let ready = tokio::select! {
                permit = sender.reserve() => match (permit, command.take()) {
                    (Ok(permit), Some(command)) => {
                        permit.send(command);
                        Ready::Sent
                    }
                    _ => Ready::LaneEnded,
                },
                report = self.reports.recv() => Ready::Report(report),
            };
            match ready {
                Ready::Sent => return Ok(()),
                // It failed or was stopped, and a report says why.
                Ready::LaneEnded => {
                    let report = self.reports.recv().await;
                    return self.take_report(report);
                }
                Ready::Report(report) => self.take_report(report)?,
            }
        }
    }
}

impl<T> Drop for Lanes<T> {
    /// Open target transactions roll back with their connections (after
    /// [`Lanes::shutdown`], there are none).
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How a lane's task ends, said to the others: a lane that ends on an error, or
/// unexpectedly (a panic), stops the others and reports why.
struct LaneEnd {
    reports: mpsc::UnboundedSender<Report>,
    stop: std::sync::Arc<watch::Sender<bool>>,
    said: bool,
}

impl LaneEnd {
    fn failed(mut self, error: anyhow::Error) {
        let _ = self.reports.send(Report::Failed(error));
        self.stop.send_replace(true);
        self.said = true;
    }
}

impl Drop for LaneEnd {
    fn drop(&mut self) {
        if !self.said && !*self.stop.borrow() {
            let _ = self.reports.send(Report::Failed(anyhow::anyhow!("an apply connection's task ended unexpectedly")));
            self.stop.send_replace(true);
        }
    }
}

/// One lane: runs the commands it is sent on its sink, committing each group in its turn,
/// until its commands end or it is told to stop.
async fn run_lane(
    mut sink: Box<dyn Sink>,
    mut commands: mpsc::Receiver<Command>,
    mut turn: watch::Receiver<u64>,
    turn_tx: std::sync::Arc<watch::Sender<u64>>,
    mut end: LaneEnd,
    mut stop: watch::Receiver<bool>,
) {
    // Whether lock waits are bounded now (other lanes beside this one).
    let mut bounded = false;
    loop {
        let command = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let result = match command {
            Command::Forget(tables) => {
                sink.forget_tables(&tables);
                Ok(())
            }
            Command::Begin { beside_others } => tokio::select! {
                result = async {
                    if beside_others != bounded {
                        sink.bound_lock_waits(beside_others).await?;
                        bounded = beside_others;
                    }
                    sink.begin().await
                } => result,
                _ = stopped(&mut stop) => break,
            },
            Command::Apply(changes) => tokio::select! {
                result = sink.apply(&changes) => result,
                _ = stopped(&mut stop) => break,
            },
            Command::Commit { seq, position, commit_time } => {
                tokio::select! {
                    // The sender lives as long as the lanes.
                    _ = turn.wait_for(|&last| last + 1 >= seq) => {}
                    _ = stopped(&mut stop) => break,
                }
                // Never cut short once sent: whoever reads the target's progress next must
                // find the commit's outcome there, not have it land after.
                let committed = sink.commit(&position, commit_time).await;
                if committed.is_ok() {
                    // Said before the turn passes on, so the reports arrive in commit order.
                    let _ = end.reports.send(Report::Committed(seq));
                    turn_tx.send_replace(seq);
                }
                committed
            }
        };
        if let Err(error) = result {
            end.failed(error);
            return;
        }
    }
    end.said = true;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Footprint;
    use crate::change::{Change, Column, Identity, TableName, TableSchema, Value};

    fn table(name: &str, keyed: bool) -> Arc<TableSchema> {
        let column = |name: &str, is_key| Column {
            name: name.into(),
            type_name: "text".into(),
            type_oid: 25,
            is_key,
            default: None,
        };
        Arc::new(TableSchema {
            name: TableName::new("public", name),
            columns: vec![column("id", keyed), column("v", false)],
            identity: if keyed { Identity::Key } else { Identity::Full },
        })
    }

    fn row(id: &str) -> Vec<Value> {
        vec![Value::Text(id.into()), Value::Null]
    }

    fn of(change: Change) -> Footprint {
        Footprint::of(&change)
    }

    #[test]
    fn changes_overlap_by_key_by_table_without_a_key_and_around_schema_changes() {
        let t = table("t", true);
        let insert = |id| of(Change::Insert { table: t.clone(), row: row(id) });
        assert!(insert("1").overlaps(&insert("1")));
        assert!(!insert("1").overlaps(&insert("2")));
        // A key change touches both keys.
        let moved = of(Change::Update { table: t.clone(), old: Some(row("1")), new: row("3") });
        assert!(moved.overlaps(&insert("1")) && moved.overlaps(&insert("3")) && !moved.overlaps(&insert("2")));
        // The same key in another table is another row.
        let u = table("u", true);
        assert!(!insert("1").overlaps(&of(Change::Insert { table: u.clone(), row: row("1") })));
        // Without a key: appends pass each other, a delete waits for every change to the table.
        let k = table("k", false);
        let append = || of(Change::Insert { table: k.clone(), row: row("1") });
        let delete = of(Change::Delete { table: k.clone(), old: row("1") });
        assert!(!append().overlaps(&append()));
        assert!(delete.overlaps(&append()) && append().overlaps(&delete));
        assert!(!delete.overlaps(&insert("1")));
        // A TRUNCATE or a schema change overlaps everything before and after it.
        let truncate = of(Change::Truncate { tables: vec![u], cascade: false, restart_identity: false });
        assert!(truncate.overlaps(&insert("9")) && insert("9").overlaps(&truncate));
        assert!(!Footprint::default().overlaps(&truncate));
    }
}
