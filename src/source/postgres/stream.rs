//! The decoded change stream over the walsender connection: pgoutput into events, relations, standby status updates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use tokio::sync::watch;

use super::ddl;
use super::insert_only::InsertOnlyWatch;
use super::pgoutput::{self, Message, OldTuple, PG_EPOCH_OFFSET_MICROS};
use super::replication::{ReplicationConnection, ReplicationMessage};
use crate::change::{Change, Column, Event, Identity, TableName, TableSchema};
use crate::config::TableFilter;
use crate::position::{Lsn, Position};
use crate::source::ChangeStream;

/// The decoded pgoutput stream of one slot.
pub(super) struct PostgresChangeStream {
    pub(super) conn: ReplicationConnection,
    pub(super) catalog: tokio_postgres::Client,
    /// Which tables the pipeline's are (renamed ones stay in the publication until a restart).
    pub(super) filter: TableFilter,
    /// The key the DDL capture signs its messages with; `None` when not capturing.
    pub(super) ddl_key: Option<String>,
    pub(super) relations: HashMap<u32, Arc<TableSchema>>,
    /// Relations the filter selects, decided when each is described (not per change).
    pub(super) selected: std::collections::HashSet<u32>,
    /// Relations described but not passed on yet: one goes out right before the first
    /// change that uses it. (Published via the partition root, pgoutput also describes
    /// the partition a change hit, which no change then names.)
    pub(super) unannounced: std::collections::HashSet<u32>,
    /// Events decoded from one message and not returned yet.
    pub(super) queued: std::collections::VecDeque<Event>,
    pub(super) type_names: HashMap<(u32, i32), String>,
    pub(super) confirmed: watch::Receiver<Position>,
    pub(super) last_commit_end: Lsn,
    pub(super) reported_flush: Lsn,
    pub(super) in_transaction: bool,
    pub(super) last_status: Instant,
    pub(super) last_housekeeping: Instant,
    pub(super) watched: InsertOnlyWatch,
}

/// How often the server hears from us even when nothing changes.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often confirmed positions are passed on and watched tables checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

impl PostgresChangeStream {
    fn confirmed_lsn(&self) -> Lsn {
        // The pipeline only ever confirms positions this stream produced: LSNs.
        self.confirmed.borrow().lsn().unwrap_or_default()
    }

    async fn send_status(&mut self, received: Lsn, flushed: Lsn, reply: bool) -> anyhow::Result<()> {
        self.conn.send_status(received.max(flushed), flushed, reply).await?;
        self.reported_flush = flushed;
        self.last_status = Instant::now();
        Ok(())
    }

    async fn type_name(&mut self, oid: u32, modifier: i32) -> anyhow::Result<String> {
        if let Some(name) = self.type_names.get(&(oid, modifier)) {
            return Ok(name.clone());
        }
        let name: String = self
            .catalog
            .query_one("SELECT format_type($1, $2)", &[&oid, &modifier])
            .await
            .with_context(|| format!("looking up the name of type OID {oid}"))?
            .get(0);
        self.type_names.insert((oid, modifier), name.clone());
        Ok(name)
    }

    async fn relation(&mut self, rel: pgoutput::Relation) -> anyhow::Result<Arc<TableSchema>> {
        // One catalog read per Relation: each column's default and primary-key membership.
        let catalog: HashMap<String, (Option<String>, bool)> = self
            .catalog
            .query(
                "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid), coalesce(a.attnum = ANY(i.indkey), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&rel.relid],
            )
            .await
            .with_context(|| format!("looking up the columns of {}.{} on the source", rel.namespace, rel.name))?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let mut columns = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            columns.push(Column {
                name: c.name.clone(),
                type_name: self.type_name(c.type_oid, c.type_modifier).await?,
                type_oid: c.type_oid,
                is_key: c.is_key,
                default: catalog.get(&c.name).and_then(|(default, _)| default.clone()),
            });
        }
        let identity = match rel.replica_identity {
            // FULL flags every column; when a primary key exists, match by it instead.
            b'f' => {
                for column in &mut columns {
                    column.is_key = catalog.get(&column.name).is_some_and(|(_, in_key)| *in_key);
                }
                if columns.iter().any(|c| c.is_key) {
                    Identity::Key
                } else {
                    Identity::Full
                }
            }
            _ if columns.iter().any(|c| c.is_key) => Identity::Key,
            _ => Identity::Nothing,
        };
        let schema = Arc::new(TableSchema { name: TableName::new(rel.namespace, rel.name), columns, identity });
        match self.filter.includes(&schema.name.to_string()) {
            true => self.selected.insert(rel.relid),
            false => self.selected.remove(&rel.relid),
        };
        self.relations.insert(rel.relid, schema.clone());
        Ok(schema)
    }

    fn table(&self, relid: u32, at: Lsn) -> anyhow::Result<Arc<TableSchema>> {
        self.relations.get(&relid).cloned().with_context(|| {
            format!("the source sent a change for relation {relid} at {at} before describing it (protocol error)")
        })
    }

    /// Turns one pgoutput message into an event, if it is one.
    async fn event(&mut self, message: Message, at: Lsn) -> anyhow::Result<Option<Event>> {
        Ok(Some(match message {
            Message::Begin { final_lsn, commit_time, .. } => {
                self.in_transaction = true;
                Event::Begin { position: Position::Lsn(Lsn(final_lsn)), commit_time: pg_time(commit_time) }
            }
            Message::Commit { end_lsn, commit_time, .. } => {
                self.in_transaction = false;
                self.last_commit_end = Lsn(end_lsn);
                Event::Commit { position: Position::Lsn(Lsn(end_lsn)), commit_time: pg_time(commit_time) }
            }
            Message::Relation(rel) => {
                let relid = rel.relid;
                self.relation(rel).await?;
                self.unannounced.insert(relid);
                return Ok(None);
            }
            Message::Insert { relid, new } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                Event::Change(Change::Insert { table, row: new })
            }
            Message::Update { relid, old, new } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                let old = old.map(|o| match o {
                    OldTuple::Key(row) | OldTuple::Full(row) => row,
                });
                Event::Change(Change::Update { table, old, new })
            }
            Message::Delete { relid, old: OldTuple::Key(old) | OldTuple::Full(old) } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                Event::Change(Change::Delete { table, old })
            }
            Message::Truncate { relids, cascade, restart_identity } => {
                let mut tables = Vec::new();
                for relid in relids {
                    tables.extend(self.selected_table(relid, at)?);
                }
                if tables.is_empty() {
                    return Ok(None);
                }
                Event::Change(Change::Truncate { tables, cascade, restart_identity })
            }
            Message::Message { transactional: true, prefix, content, .. } if prefix == ddl::MESSAGE_PREFIX => {
                let filter = &self.filter;
                let Some(key) = self.ddl_key.as_deref() else { return Ok(None) };
                let changes = ddl::schema_changes(&content, key, |name| filter.includes(&name.to_string()))
                    .with_context(|| format!("at {at}"))?;
                for change in changes {
                    tracing::info!(
                        table = %change.table,
                        ops = ?change.ops.iter().map(|op| op.kind()).collect::<Vec<_>>(),
                        at = %at,
                        "schema change on the source"
                    );
                    self.queued.push_back(Event::Change(Change::Schema(change)));
                }
                return Ok(None);
            }
            Message::Type { .. } | Message::Origin { .. } | Message::Message { .. } => return Ok(None),
        }))
    }

    /// The table a change names, if the selection matches it (a table renamed out of the
    /// selection stays in the publication until the next start syncs it), with a
    /// `Relation` event queued before the change when it was not passed on since it was described.
    fn selected_table(&mut self, relid: u32, at: Lsn) -> anyhow::Result<Option<Arc<TableSchema>>> {
        let table = self.table(relid, at)?;
        if !self.selected.contains(&relid) {
            return Ok(None);
        }
        if self.unannounced.remove(&relid) {
            self.queued.push_back(Event::Change(Change::Relation(table.clone())));
        }
        Ok(Some(table))
    }
}

#[async_trait]
impl ChangeStream for PostgresChangeStream {
    async fn next(&mut self) -> anyhow::Result<Event> {
        if let Some(event) = self.queued.pop_front() {
            return Ok(event);
        }
        loop {
            let housekeeping = tokio::time::sleep_until((self.last_housekeeping + HOUSEKEEPING_INTERVAL).into());
            tokio::select! {
                message = self.conn.recv() => match message? {
                    ReplicationMessage::XLogData { wal_start, data } => {
                        let decoded = pgoutput::decode(&data)
                            .with_context(|| format!("decoding the replication stream at {wal_start}"))?;
                        if let Some(event) = self.event(decoded, wal_start).await? {
                            // The relations it uses first.
                            self.queued.push_back(event);
                        }
                        if let Some(event) = self.queued.pop_front() {
                            return Ok(event);
                        }
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        let confirmed = self.confirmed_lsn();
                        // Idle and fully applied: the server's own position is safe to confirm.
                        let idle = !self.in_transaction && self.last_commit_end <= confirmed;
                        let flushed = if idle { confirmed.max(wal_end) } else { confirmed };
                        crate::metrics::METRICS.lag_bytes.set(i64::try_from(wal_end.0.saturating_sub(flushed.0)).unwrap_or(i64::MAX));
                        if reply_requested || flushed != self.reported_flush || self.last_status.elapsed() >= STATUS_INTERVAL {
                            self.send_status(wal_end, flushed, false).await?;
                        }
                        // wal_end is where the walsender has read to: every transaction that
                        // committed before it has been sent.
                        if !self.in_transaction {
                            return Ok(Event::Heartbeat { position: Position::Lsn(wal_end) });
                        }
                    }
                },
                _ = housekeeping => {
                    self.last_housekeeping = Instant::now();
                    let confirmed = self.confirmed_lsn();
                    if confirmed > self.reported_flush || self.last_status.elapsed() >= STATUS_INTERVAL {
                        // Asks for a keepalive back: an idle server sends none of its own while
                        // it hears from us, and its wal_end is what a replay to a time waits for.
                        self.send_status(self.last_commit_end, confirmed.max(self.reported_flush), true).await?;
                    }
                    self.watched.check(&self.catalog).await?;
                }
            }
        }
    }
}

fn pg_time(micros_since_2000: i64) -> SystemTime {
    let micros = micros_since_2000.saturating_add(PG_EPOCH_OFFSET_MICROS);
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}
