//! The binlog as a change stream: `COM_BINLOG_DUMP` from a file and offset,
//! rows events decoded by `mysql_common` and rewritten by the same mapping as
//! the snapshot, transactions delimited by `BEGIN` and `XID` / `COMMIT`.
//!
//! Positions: a transaction is ordered by the offset of its `BEGIN` event and
//! resumes after the end of its commit event (the header's `log_pos`, the next
//! event's offset), so a restart from a checkpoint re-reads nothing applied.
//! DDL (its head read by [`super::ddl`]): `TRUNCATE` of a replicated table is applied;
//! after `ALTER TABLE` the table is read again from `information_schema`: columns
//! appended are added, any other change to its columns or key copies it again (the
//! binlog's rows before and after are in two shapes); `DROP`, `CREATE` and `RENAME
//! TABLE` make tables leave or join. Rows and DDL a table's copy already holds are
//! not decoded (they may predate its shape), and a table whose definition changed
//! between its copy and the stream's start is copied again at its first event.
//!
//! GTIDs: MySQL's GTID events are decoded by `mysql_common`; MariaDB sends its
//! own (types 160–163) only to a replica that asks (`@mariadb_slave_capability = 4`),
//! and `mysql_common` does not decode them, so they are decoded here. A
//! transaction's begin position carries its GTID (for `skip` and `stop_at`). When
//! the stream started from a GTID state, each commit position carries the state
//! after it, and a restart resumes by GTID (MariaDB `@slave_connect_state`, MySQL
//! `COM_BINLOG_DUMP_GTID`), which survives binlog files being renamed or purged and
//! a failover. A stream started from a bare `file:offset` keeps file offsets:
//! a GTID state built from the middle of the history would be incomplete.
//!
//! The events come through [`BinlogEvents`]: the server's dump stream, or byte
//! fixtures in the tests (no MySQL 8 server is installable here).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event as BinlogEvent, EventData, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::BinlogChecksumAlg;
use mysql_async::{GnoInterval, Sid};

use super::ddl::{self, Ddl};
use super::{catalog, MysqlTable};
use crate::change::{Change, Column, Event, Identity, Row, SchemaChange, SchemaOp, TableName, TableSchema, Value};
use crate::config::TableFilter;
use crate::myconn::MysqlParams;
use crate::position::{BinlogPosition, Gtid, GtidSet, Position};
use crate::schema::mysql::encode_binlog;
use crate::source::ChangeStream;

/// Where binlog events come from, with the table maps seen so far.
#[async_trait]
pub trait BinlogEvents: Send {
    /// The next event; `None` when the server ended the stream.
    async fn next_event(&mut self) -> Option<anyhow::Result<BinlogEvent>>;
    /// The table map event a rows event refers to.
    fn table_map(&self, table_id: u64) -> Option<&TableMapEvent<'static>>;
}

#[async_trait]
impl BinlogEvents for mysql_async::BinlogStream {
    async fn next_event(&mut self) -> Option<anyhow::Result<BinlogEvent>> {
        self.next().await.map(|event| event.map_err(anyhow::Error::from))
    }

    fn table_map(&self, table_id: u64) -> Option<&TableMapEvent<'static>> {
        self.get_tme(table_id)
    }
}

/// What a binlog stream follows.
pub struct Followed {
    /// The replicated tables as the stream starts.
    pub tables: HashMap<TableName, MysqlTable>,
    /// Where each table the pipeline copied (by `schema.name`) was copied, also one the
    /// source no longer has under that name: its drop or rename may lie ahead.
    pub copied_at: HashMap<String, Position>,
    /// Tables defined otherwise now than when they were copied: the binlog ahead may hold
    /// their rows in a shape `information_schema` no longer shows.
    pub stale: HashSet<TableName>,
    /// `[source] tables` / `exclude`.
    pub filter: TableFilter,
}

/// A binlog stream of one database.
pub struct BinlogChangeStream<E = mysql_async::BinlogStream> {
    binlog: E,
    params: MysqlParams,
    /// Reads a table's new definition after `ALTER TABLE … ADD`; opened when first needed.
    catalog: Option<mysql_async::Conn>,
    tables: HashMap<TableName, MysqlTable>,
    /// Where each copied table's copy was taken: its rows and DDL before that are in the
    /// copy, so they are neither decoded (they may be in an earlier shape) nor followed.
    copied_at: HashMap<String, Position>,
    /// Tables whose rows ahead may be in an earlier shape ([`Followed::stale`]): each
    /// event of theirs copies them again instead of being read.
    stale: HashSet<TableName>,
    /// `[source] tables`: a table created or renamed under a name it matches joins.
    filter: TableFilter,
    file: String,
    pending: VecDeque<Event>,
    /// The GTID state after the last commit, when the stream started from one.
    gtid_state: Option<GtidSet>,
    /// The GTID of the transaction being read, until it commits.
    current_gtid: Option<Gtid>,
    /// Between a transaction's BEGIN (or MariaDB GTID event) and its COMMIT / XID.
    in_transaction: bool,
    /// Where the GTID (or Anonymous_GTID) event of the transaction being read starts: the
    /// transaction's position, as `mysqlbinlog` shows it (`# at N`), for `skip` and ordering.
    gtid_event_at: Option<Position>,
    /// A format description event has been read: from then on the decoder knows whether
    /// events carry checksums, and cuts them.
    format_known: bool,
    /// The rotate event that opens a dump, read before the format description event
    /// that says whether it ends in a checksum; its file name is read once that is known.
    opening_rotate: Option<BinlogEvent>,
}

/// MariaDB's GTID event (type 162).
const MARIADB_GTID_EVENT: u8 = 162;
/// Its flag for a statement outside any transaction (DDL): no BEGIN and no COMMIT follow.
const GTID_STANDALONE: u8 = 1;

/// A MariaDB GTID event's body: (domain, sequence, flags).
fn decode_gtid_event(body: &[u8]) -> Option<(u32, u64, u8)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    Some((domain, seq, *body.get(12)?))
}

impl BinlogChangeStream {
    /// Opens the binlog after `from` as replica `server_id`: by GTID when `from`
    /// carries a GTID state, else at its file and offset.
    pub async fn start(
        params: &MysqlParams,
        followed: Followed,
        from: &BinlogPosition,
        server_id: u32,
    ) -> anyhow::Result<BinlogChangeStream> {
        let mut conn = params.connect().await?;
        use mysql_async::prelude::Queryable;
        // Heartbeats every second keep an idle stream's connection and lag alive; MariaDB
        // sends its GTID events only to a replica that says it understands them.
        conn.query_drop("SET @master_heartbeat_period = 1000000000, @mariadb_slave_capability = 4")
            .await
            .context("setting up the binlog session")?;
        let request = mysql_async::BinlogStreamRequest::new(server_id);
        let request = match &from.gtid {
            None => request.with_filename(from.file.as_bytes()).with_pos(from.pos),
            Some(state @ GtidSet::MariaDb(_)) => {
                conn.query_drop(format!(
                    "SET @slave_connect_state = '{state}', @slave_gtid_strict_mode = 0, @slave_gtid_ignore_duplicates = 0"
                ))
                .await
                .context("setting the GTID to resume from")?;
                request
            }
            Some(GtidSet::Mysql(sets)) => request.with_gtid().with_gtid_set(sets.iter().map(|(uuid, intervals)| {
                Sid::new(*uuid).with_intervals(
                    intervals.iter().map(|&(start, end)| GnoInterval::new(start, end.saturating_add(1))).collect(),
                )
            })),
        };
        let binlog = conn.get_binlog_stream(request).await.with_context(|| {
            format!(
                "starting the binlog stream after {} (needs REPLICATION SLAVE; is that binlog still on the server?)",
                Position::Binlog(from.clone())
            )
        })?;
        Ok(BinlogChangeStream::over(binlog, params.clone(), followed, from))
    }
}

impl<E: BinlogEvents> BinlogChangeStream<E> {
    /// A stream of `binlog`'s events, which begin after `from`.
    pub fn over(binlog: E, params: MysqlParams, followed: Followed, from: &BinlogPosition) -> BinlogChangeStream<E> {
        BinlogChangeStream {
            binlog,
            params,
            catalog: None,
            tables: followed.tables,
            copied_at: followed.copied_at,
            stale: followed.stale,
            filter: followed.filter,
            file: from.file.clone(),
            pending: VecDeque::new(),
            gtid_state: from.gtid.clone(),
            current_gtid: None,
            in_transaction: false,
            gtid_event_at: None,
            format_known: false,
            opening_rotate: None,
        }
    }

    fn position(&self, pos: u32) -> Position {
        Position::Binlog(BinlogPosition::new(self.file.clone(), u64::from(pos)))
    }

    /// Where the transaction being read begins, with its own GTID.
    fn begin_position(&self, start: Position) -> Position {
        match (start, self.current_gtid) {
            (Position::Binlog(mut position), Some(gtid)) => {
                position.gtid = Some(GtidSet::of(gtid));
                Position::Binlog(position)
            }
            (start, _) => start,
        }
    }

    /// The position after a commit, with the GTID state it leaves; the committed
    /// transaction's GTID joins that state.
    fn commit_position(&mut self, pos: u32) -> Position {
        if let (Some(state), Some(gtid)) = (&mut self.gtid_state, self.current_gtid.take()) {
            state.add(gtid);
        }
        Position::Binlog(BinlogPosition { file: self.file.clone(), pos: u64::from(pos), gtid: self.gtid_state.clone() })
    }

    /// A statement that is a transaction of its own (DDL).
    fn standalone(&mut self, start: Position, end: Position, time: SystemTime, changes: Vec<Change>) {
        self.pending.push_back(Event::Begin { position: start, commit_time: time });
        self.pending.extend(changes.into_iter().map(Event::Change));
        self.pending.push_back(Event::Commit { position: end, commit_time: time });
    }

    async fn query(
        &mut self,
        query: &str,
        schema: &str,
        start: Position,
        end_pos: u32,
        time: SystemTime,
    ) -> anyhow::Result<()> {
        // A transaction (or a statement that is one) begins at its GTID event, if it has one.
        let start = self.gtid_event_at.take().unwrap_or(start);
        let start = self.begin_position(start);
        // Every statement but BEGIN ends a transaction (COMMIT) or is one (DDL).
        let end = if query.trim().eq_ignore_ascii_case("BEGIN") {
            self.position(end_pos)
        } else {
            self.commit_position(end_pos)
        };
        let words: Vec<String> = query.split_whitespace().map(str::to_uppercase).collect();
        let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        let queued = self.pending.len();
        self.statement(query, schema, &words, start.clone(), end.clone(), time).await?;
        // A statement that is its own transaction (GRANT, DDL on other tables, …) still moves
        // the position and the GTID state: applied as an empty transaction, so a wait for the
        // source's position (switchover, verify) ends.
        if self.pending.len() == queued && !self.in_transaction && !matches!(word(0), "BEGIN" | "COMMIT") {
            self.pending.push_back(Event::Begin { position: start, commit_time: time });
            self.pending.push_back(Event::Commit { position: end, commit_time: time });
        }
        Ok(())
    }

    /// One statement's events: BEGIN, COMMIT, and DDL on a replicated table.
    async fn statement(
        &mut self,
        query: &str,
        schema: &str,
        words: &[String],
        start: Position,
        end: Position,
        time: SystemTime,
    ) -> anyhow::Result<()> {
        let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        match word(0) {
            "BEGIN" => {
                self.in_transaction = true;
                self.pending.push_back(Event::Begin { position: start, commit_time: time });
            }
            "COMMIT" => {
                self.in_transaction = false;
                self.pending.push_back(Event::Commit { position: end, commit_time: time });
            }
            _ => self.ddl(query, schema, start, end, time).await?,
        }
        Ok(())
    }

    /// A DDL statement's changes to replicated tables, as a transaction of its own: a
    /// `TRUNCATE`; columns appended (the new definition read from `information_schema`);
    /// a table dropped, created or renamed (in or out of the selection); any other
    /// change to a table's columns copies it again (its rows in the binlog before and
    /// after are in two shapes cutover cannot map one onto the other). A statement
    /// ordered before a table's copy is left alone: the copy already holds it.
    async fn ddl(
        &mut self,
        query: &str,
        schema: &str,
        start: Position,
        end: Position,
        time: SystemTime,
    ) -> anyhow::Result<()> {
        let resolve = |t: &ddl::TableRef| TableName::new(t.schema.as_deref().unwrap_or(schema), t.name.as_str());
        let mut changes = Vec::new();
        let parsed = ddl::parse(query);
        if let Ddl::Truncate(table) | Ddl::Alter { table, renamed_to: None } = &parsed {
            let table = resolve(table);
            if self.stale.contains(&table) && self.followed(&table, &start).is_some() {
                self.standalone(start.clone(), end, time, vec![copy_again(table, &start, STALE)]);
                return Ok(());
            }
        }
        match parsed {
            Ddl::Truncate(table) => {
                if let Some(known) = self.followed(&resolve(&table), &start) {
                    changes.push(Change::Truncate {
                        tables: vec![known.schema],
                        cascade: false,
                        restart_identity: false,
                    });
                }
            }
            Ddl::Alter { table, renamed_to: Some(new) } => {
                changes.extend(self.renamed(&resolve(&table), resolve(&new), &start, query));
            }
            Ddl::Alter { table, renamed_to: None } => {
                if let Some(known) = self.followed(&resolve(&table), &start) {
                    changes.extend(self.altered(known, query, &start).await?);
                }
            }
            Ddl::Rename(pairs) => {
                for (from, to) in &pairs {
                    changes.extend(self.renamed(&resolve(from), resolve(to), &start, query));
                }
            }
            Ddl::Drop(tables) => {
                for table in tables.iter().map(resolve) {
                    if self.leaves(&table, &start) {
                        changes.push(schema_change(table, query, SchemaOp::DropTable));
                    }
                }
            }
            Ddl::Create(table) => {
                let table = resolve(&table);
                if self.joins(&table, &start) {
                    changes.push(schema_change(table, query, SchemaOp::CreateTable));
                }
            }
            Ddl::Other => {}
        }
        if !changes.is_empty() {
            self.standalone(start, end, time, changes);
        }
        Ok(())
    }

    /// Whether `table`'s copy was taken after `at`: its changes there are in the copy.
    fn copied_after(&self, table: &TableName, at: &Position) -> bool {
        self.copied_at.get(&table.to_string()).is_some_and(|copied| at < copied)
    }

    /// A replicated table whose changes at `at` the pipeline applies.
    fn followed(&self, table: &TableName, at: &Position) -> Option<MysqlTable> {
        self.tables.get(table).filter(|_| !self.copied_after(table, at)).cloned()
    }

    /// Whether a table leaving at `at` (dropped, renamed) goes from the target too: any of
    /// the selection, also one this stream does not follow (gone from the source before it
    /// started reading, or created on the target before a copy that never finished); the
    /// target drops it only if it has it.
    fn leaves(&mut self, table: &TableName, at: &Position) -> bool {
        if !self.in_selection(table) || self.copied_after(table, at) {
            return false;
        }
        self.tables.remove(table);
        true
    }

    fn in_selection(&self, table: &TableName) -> bool {
        table.schema == self.params.database && self.filter.includes(&table.to_string())
    }

    /// Whether a table that appears at `at` under this name joins the pipeline.
    fn joins(&self, table: &TableName, at: &Position) -> bool {
        table.schema == self.params.database
            && self.filter.includes(&table.to_string())
            && !self.copied_after(table, at)
    }

    /// A table renamed: it leaves the pipeline under its old name, and joins under the
    /// new one when the selection matches that (copied under a snapshot of its own).
    fn renamed(&mut self, from: &TableName, to: TableName, at: &Position, query: &str) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.leaves(from, at) {
            changes.push(schema_change(from.clone(), query, SchemaOp::DropTable));
        }
        if self.joins(&to, at) {
            changes.push(schema_change(to, query, SchemaOp::CreateTable));
        }
        changes
    }

    /// `ALTER TABLE` (or `CREATE`/`DROP INDEX`) of a replicated table: the table's
    /// definition is read again. Columns only appended (or none changed) are followed in
    /// place, and so are its indexes and unique constraints (dropped, created); any other
    /// change to its columns or key copies the table again. Read after the fact, the
    /// definition may show later statements too: a difference they make copies the table
    /// again, and a shape they restore still shows in its rows' column count, checked at
    /// every rows event (a count-preserving change undone later is not seen: rows between
    /// are read under today's names and types).
    async fn altered(&mut self, known: MysqlTable, query: &str, at: &Position) -> anyhow::Result<Vec<Change>> {
        let name = known.schema.name.clone();
        let catalog = match &mut self.catalog {
            Some(catalog) => catalog,
            None => self.catalog.insert(self.params.connect().await?),
        };
        let (_, mut read) =
            catalog::read_tables(catalog, &self.params.database, catalog::CatalogRead::Settled, |t| t == &name).await?;
        let copy_again = |why: String| vec![schema_change(name.clone(), query, SchemaOp::CopyAgain { why })];
        let Some(table) = read.remove(&name) else {
            return Ok(copy_again(format!("it changed at {at} and is gone from the source since")));
        };
        let same = |a: &Column, b: &Column| a.name == b.name && a.type_name == b.type_name && a.is_key == b.is_key;
        let before = &known.schema.columns;
        let appended = table.schema.columns.len() >= before.len()
            && before.iter().zip(&table.schema.columns).all(|(a, b)| same(a, b))
            && table.encodings.get(..known.encodings.len()) == Some(&known.encodings[..])
            && table.schema.identity == known.schema.identity;
        if !appended {
            return Ok(copy_again(format!(
                "ALTER TABLE at {at} changed its columns or key in a way the binlog's rows do not carry"
            )));
        }
        let mut changes = Vec::new();
        if table.schema.columns.len() > before.len() {
            changes.push(Change::Relation(table.schema.clone()));
        }
        let keys = catalog::TableKey::changes(&known.keys, &table.keys);
        if !keys.is_empty() {
            changes.push(Change::Schema(SchemaChange { table: name.clone(), statement: query.to_string(), ops: keys }));
        }
        self.tables.insert(name, table);
        Ok(changes)
    }

    /// A row image's values under the table's columns. An image holds the columns its
    /// bitmap sets, packed in column order (`binlog_row_image` MINIMAL, NOBLOB and
    /// FULL_NODUP leave columns out); a column it leaves out is `None`.
    fn image(
        table: &MysqlTable,
        row: Option<BinlogRow>,
        present: Option<&[bool]>,
        columns: usize,
        at: &Position,
    ) -> anyhow::Result<Option<Vec<Option<Value>>>> {
        let (Some(mut row), Some(present)) = (row, present) else { return Ok(None) };
        let mut values = Vec::with_capacity(columns);
        let mut packed = 0;
        for i in 0..columns {
            if !present.get(i).copied().unwrap_or(false) {
                values.push(None);
                continue;
            }
            let (Some(value), Some(encoding)) = (row.take(packed), table.encodings.get(i)) else {
                anyhow::bail!(
                    "a row image of {} at {at} holds fewer values than its column bitmap sets (protocol error)",
                    table.schema.name
                );
            };
            packed += 1;
            let value = encode_binlog(encoding, value)
                .with_context(|| format!("{}, column {} at {at}", table.schema.name, table.schema.columns[i].name))?;
            values.push(Some(value.map_or(Value::Null, Value::Text)));
        }
        if packed != row.len() {
            anyhow::bail!(
                "a row image of {} at {at} holds more values than its column bitmap sets (protocol error)",
                table.schema.name
            );
        }
        Ok(Some(values))
    }

    /// One row of a rows event as a change. Columns a partial image leaves out are
    /// taken exactly or refused: an UPDATE's after image keeps what the before image
    /// shows (or, for a table with a key, leaves the column as the target has it); a
    /// row is found by a key the before image must hold; an INSERT must be whole
    /// (the source filled the missing columns with defaults cutover cannot know).
    fn change(
        schema: &Arc<TableSchema>,
        kind: RowsKind,
        before: Option<Vec<Option<Value>>>,
        after: Option<Vec<Option<Value>>>,
        at: &Position,
    ) -> anyhow::Result<Change> {
        let partial = |what: &str, column: usize| {
            anyhow::anyhow!(
                "the binlog at {at} holds a partial row image of {}: the {what} lacks column {}. The source \
                 session wrote it with binlog_row_image other than FULL, which cutover cannot apply exactly here; \
                 cutover stopped at its last checkpoint. Set binlog_row_image = FULL for every session writing to \
                 this table (SET GLOBAL binlog_row_image = 'FULL', and reconnect the application), then copy the \
                 table again",
                schema.name,
                schema.columns.get(column).map_or("?", |c| c.name.as_str())
            )
        };
        // Every column the change is matched by: the key, or the whole row without one.
        let identifying = |column: usize| schema.identity != Identity::Key || schema.columns[column].is_key;
        let identity_of = |image: Vec<Option<Value>>, what: &str| -> anyhow::Result<Row> {
            image
                .into_iter()
                .enumerate()
                .map(|(i, value)| match value {
                    Some(value) => Ok(value),
                    None if identifying(i) => Err(partial(what, i)),
                    // Not needed to find the row.
                    None => Ok(Value::Null),
                })
                .collect()
        };
        Ok(match (kind, before, after) {
            (RowsKind::Write, _, Some(row)) => {
                let row = row
                    .into_iter()
                    .enumerate()
                    .map(|(i, value)| value.ok_or_else(|| partial("inserted row", i)))
                    .collect::<anyhow::Result<Row>>()?;
                Change::Insert { table: schema.clone(), row }
            }
            (RowsKind::Delete, Some(old), _) => {
                Change::Delete { table: schema.clone(), old: identity_of(old, "before image")? }
            }
            (RowsKind::Update, Some(old), Some(new)) => {
                let new = new
                    .into_iter()
                    .zip(&old)
                    .enumerate()
                    .map(|(i, (new, old))| match (new, old) {
                        (Some(value), _) => Ok(value),
                        // Left out of the after image: the update did not change it.
                        (None, Some(value)) => Ok(value.clone()),
                        (None, None) if schema.identity == Identity::Key && !schema.columns[i].is_key => {
                            Ok(Value::Unchanged)
                        }
                        (None, None) => Err(partial("after image", i)),
                    })
                    .collect::<anyhow::Result<Row>>()?;
                Change::Update { table: schema.clone(), old: Some(identity_of(old, "before image")?), new }
            }
            _ => anyhow::bail!("a rows event of {} at {at} has no row image", schema.name),
        })
    }
}

/// Why a table whose definition changed between its copy and the stream's start is copied
/// again at its first event: the binlog ahead holds its rows in shapes only a schema
/// history could tell.
const STALE: &str = "its definition changed after it was copied and before the stream's start";

/// A table whose rows at `at` cannot be read under its present definition: copied again,
/// its changes until then left out.
fn copy_again(table: TableName, at: &Position, why: &str) -> Change {
    let why = format!("{why}, so its rows at {at} may be in an earlier shape");
    schema_change(table, "(rows in another shape than the table's definition)", SchemaOp::CopyAgain { why })
}

/// One step of a source statement on one table.
fn schema_change(table: TableName, statement: &str, op: SchemaOp) -> Change {
    Change::Schema(SchemaChange { table, statement: statement.to_string(), ops: vec![op] })
}

/// A rows event's column bitmap as one flag per column.
fn bitmap<B: std::ops::Deref<Target = bool>>(bits: Option<impl IntoIterator<Item = B>>) -> Option<Vec<bool>> {
    bits.map(|bits| bits.into_iter().map(|bit| *bit).collect())
}

/// What a rows event does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowsKind {
    Write,
    Update,
    Delete,
}

/// The binlog file a rotate event names. `trailing_crc32`: the event was read before the
/// format description event, which said its binlog carries CRC32 checksums, so the
/// decoder left the event's 4 checksum bytes at the end of the name: they are checked
/// against the event and cut, exactly. A name that is still no binlog file name
/// (`base.000042`) is an error, never a position.
fn rotate_file_name(event: &BinlogEvent, trailing_crc32: bool) -> anyhow::Result<String> {
    let header = event.header();
    let at = header.log_pos();
    let name = event.data().get(8..).with_context(|| format!("a rotate event (log_pos {at}) is too short"))?;
    let name = if trailing_crc32 {
        let split = name.len().checked_sub(4).with_context(|| format!("a rotate event (log_pos {at}) is too short"))?;
        let (name, crc) = name.split_at(split);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header.timestamp().to_le_bytes());
        hasher.update(&[header.event_type_raw()]);
        hasher.update(&header.server_id().to_le_bytes());
        hasher.update(&header.event_size().to_le_bytes());
        hasher.update(&header.log_pos().to_le_bytes());
        hasher.update(&header.flags_raw().to_le_bytes());
        hasher.update(&event.data()[..8 + split]);
        if hasher.finalize().to_le_bytes() != crc {
            anyhow::bail!("the rotate event opening the binlog dump fails its CRC32 checksum (corrupt stream)");
        }
        name
    } else {
        name
    };
    let name = std::str::from_utf8(name).ok().filter(|n| is_binlog_file_name(n)).with_context(|| {
        format!(
            "a rotate event names binlog file {:?}, which is no binlog file name (base.NNNNNN); cutover stopped \
             at its last checkpoint",
            String::from_utf8_lossy(name)
        )
    })?;
    Ok(name.to_string())
}

/// `base.000042`: printable ASCII without path separators, and a numeric extension.
fn is_binlog_file_name(name: &str) -> bool {
    let Some((base, number)) = name.rsplit_once('.') else { return false };
    !base.is_empty()
        && base.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
}

#[async_trait]
impl<E: BinlogEvents> ChangeStream for BinlogChangeStream<E> {
    async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let event = self
                .binlog
                .next_event()
                .await
                .ok_or_else(|| {
                    crate::retry::ConnectionLost(format!("the MySQL server ended the binlog stream in {}", self.file))
                })?
                .with_context(|| format!("reading the binlog in {}", self.file))?;
            let header = event.header();
            let start = self.position(header.log_pos().saturating_sub(header.event_size()));
            let time = UNIX_EPOCH + Duration::from_secs(u64::from(header.timestamp()));
            let data = event.read_data().with_context(|| format!("decoding a binlog event at {start}"))?;
            match data {
                // Read before the format description event, the dump's first rotate event
                // may end in a checksum the decoder did not know to cut: that event says.
                Some(EventData::RotateEvent(_)) if !self.format_known => self.opening_rotate = Some(event),
                Some(EventData::RotateEvent(_)) => self.file = rotate_file_name(&event, false)?,
                Some(EventData::FormatDescriptionEvent(format)) => {
                    self.format_known = true;
                    if let Some(rotate) = self.opening_rotate.take() {
                        let crc32 = matches!(
                            format.footer().get_checksum_alg(),
                            Ok(Some(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_CRC32))
                        );
                        self.file = rotate_file_name(&rotate, crc32)?;
                    }
                }
                // Sent only while the dump waits at the end of the binlog.
                Some(EventData::HeartbeatEvent) if !self.in_transaction => {
                    return Ok(Event::Heartbeat { position: self.position(header.log_pos()) });
                }
                Some(EventData::QueryEvent(query)) => {
                    let (text, schema) = (query.query().into_owned(), query.schema().into_owned());
                    self.query(&text, &schema, start, header.log_pos(), time).await?;
                }
                Some(EventData::XidEvent(_)) => {
                    self.in_transaction = false;
                    let position = self.commit_position(header.log_pos());
                    self.pending.push_back(Event::Commit { position, commit_time: time });
                }
                None if header.event_type_raw() == MARIADB_GTID_EVENT => {
                    let (domain, seq, flags) = decode_gtid_event(event.data())
                        .with_context(|| format!("a MariaDB GTID event at {start} is too short"))?;
                    self.current_gtid = Some(Gtid::MariaDb { domain, server: header.server_id(), seq });
                    // MariaDB's GTID event stands in for BEGIN; a standalone statement
                    // (DDL) begins with its query event, at this event's position.
                    if flags & GTID_STANDALONE == 0 {
                        self.in_transaction = true;
                        let position = self.begin_position(start);
                        self.pending.push_back(Event::Begin { position, commit_time: time });
                    } else {
                        self.gtid_event_at = Some(start);
                    }
                }
                // MySQL: the GTID comes first, then BEGIN (or the DDL statement).
                Some(EventData::GtidEvent(gtid)) => {
                    if let Some(tag) = gtid.tag() {
                        anyhow::bail!(
                            "the transaction at {start} has a tagged GTID (tag `{tag}`, MySQL 8.4), which cutover does \
                             not follow yet; stop tagging transactions (gtid_next) on the source"
                        );
                    }
                    self.current_gtid = Some(Gtid::Mysql { uuid: gtid.sid(), gno: gtid.gno() });
                    self.gtid_event_at = Some(start);
                }
                Some(EventData::AnonymousGtidEvent(_)) => {
                    self.current_gtid = None;
                    self.gtid_event_at = Some(start);
                }
                Some(EventData::RowsEvent(rows_event)) => {
                    let kind = match &rows_event {
                        RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => RowsKind::Write,
                        RowsEventData::UpdateRowsEvent(_) | RowsEventData::UpdateRowsEventV1(_) => RowsKind::Update,
                        RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => RowsKind::Delete,
                        RowsEventData::PartialUpdateRowsEvent(_) => anyhow::bail!(
                            "the update at {start} carries partial JSON (binlog_row_value_options = PARTIAL_JSON), \
                             which does not hold whole rows; set binlog_row_value_options = '' on the source"
                        ),
                    };
                    let Some(tme) = self.binlog.table_map(rows_event.table_id()) else {
                        anyhow::bail!("a rows event at {start} names a table the binlog never mapped")
                    };
                    let name = TableName::new(tme.database_name().into_owned(), tme.table_name().into_owned());
                    if name.schema != self.params.database {
                        continue;
                    }
                    // Rows a table's copy already holds may be in an earlier shape: not decoded.
                    let Some(table) = self.followed(&name, &start) else { continue };
                    if self.stale.contains(&name) {
                        self.pending.push_back(Event::Change(copy_again(name, &start, STALE)));
                        continue;
                    }
                    // Rows in another shape than the table has now: written before or after DDL
                    // that `information_schema`, read later, no longer shows.
                    let columns = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                    if columns != table.schema.columns.len() {
                        let why = format!(
                            "its rows there have {columns} columns, its definition now {}",
                            table.schema.columns.len()
                        );
                        self.pending.push_back(Event::Change(copy_again(name, &start, &why)));
                        continue;
                    }
                    let schema = table.schema.clone();
                    let (before_columns, after_columns) =
                        (bitmap(rows_event.columns_before_image()), bitmap(rows_event.columns_after_image()));
                    let Some(tme) = self.binlog.table_map(rows_event.table_id()) else { continue };
                    for row in rows_event.rows(tme) {
                        let (before, after) = row.with_context(|| format!("decoding a row of {name} at {start}"))?;
                        let before = Self::image(&table, before, before_columns.as_deref(), columns, &start)?;
                        let after = Self::image(&table, after, after_columns.as_deref(), columns, &start)?;
                        let change = Self::change(&schema, kind, before, after, &start)?;
                        self.pending.push_back(Event::Change(change));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! MySQL-only events from byte fixtures written after the documented formats
    //! (MySQL's "Binary Log" internals: event header, GTID, QUERY, TABLE_MAP, ROWS v1/v2,
    //! XID), fed through the same stream code the server's events go through.

    use std::collections::{HashMap, VecDeque};
    use std::sync::Arc;

    use async_trait::async_trait;
    use mysql_async::binlog::events::{Event as BinlogEvent, FormatDescriptionEvent, TableMapEvent};
    use mysql_async::binlog::BinlogVersion;

    use super::{BinlogChangeStream, BinlogEvents};
    use crate::change::{Change, Column, Event, Identity, TableName, TableSchema, Value};
    use crate::config::TableFilter;
    use crate::myconn::MysqlParams;
    use crate::position::{BinlogPosition, GtidSet, Position};
    use crate::schema::mysql::Encoding;
    use crate::source::mysql::MysqlTable;
    use crate::source::ChangeStream;

    const UUID: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const TABLE_ID: u64 = 108;

    /// Events as a server would send them, from raw bytes.
    struct Fixture {
        fde: FormatDescriptionEvent<'static>,
        events: VecDeque<Vec<u8>>,
        tables: HashMap<u64, TableMapEvent<'static>>,
    }

    #[async_trait]
    impl BinlogEvents for Fixture {
        async fn next_event(&mut self) -> Option<anyhow::Result<BinlogEvent>> {
            let bytes = self.events.pop_front()?;
            let event = match BinlogEvent::read(&self.fde, &bytes[..]) {
                Ok(event) => event,
                Err(e) => return Some(Err(e.into())),
            };
            if event.header().event_type_raw() == 19 {
                match event.read_event::<TableMapEvent<'_>>() {
                    Ok(tme) => {
                        self.tables.insert(tme.table_id(), tme.into_owned());
                    }
                    Err(e) => return Some(Err(e.into())),
                }
            }
            Some(Ok(event))
        }

        fn table_map(&self, table_id: u64) -> Option<&TableMapEvent<'static>> {
            self.tables.get(&table_id)
        }
    }

    /// One row image of `shop.items`: each column's value, or `None` where the image leaves it out.
    type Image<'a> = (Option<i32>, Option<Option<&'a str>>);

    /// Builds a binlog from event bodies: headers with running `log_pos` offsets.
    struct Binlog {
        events: VecDeque<Vec<u8>>,
        offset: u32,
    }

    impl Binlog {
        fn new() -> Binlog {
            Binlog { events: VecDeque::new(), offset: 4 }
        }

        /// Appends an event; returns its end offset (the next event's position).
        fn push(&mut self, event_type: u8, body: &[u8]) -> u32 {
            let size = 19 + body.len() as u32;
            self.offset += size;
            let mut event = 1_764_075_780u32.to_le_bytes().to_vec(); // timestamp
            event.push(event_type);
            event.extend(1u32.to_le_bytes()); // server id
            event.extend(size.to_le_bytes());
            event.extend(self.offset.to_le_bytes()); // log_pos: where the next event starts
            event.extend(0u16.to_le_bytes()); // flags
            event.extend(body);
            self.events.push_back(event);
            self.offset
        }

        fn gtid(&mut self, gno: u64) -> u32 {
            let mut body = vec![0u8]; // flags
            body.extend(uuid());
            body.extend(gno.to_le_bytes());
            body.push(2); // logical timestamp typecode
            body.extend(0u64.to_le_bytes()); // last_committed
            body.extend(1u64.to_le_bytes()); // sequence_number
            self.push(33, &body)
        }

        fn query(&mut self, schema: &str, sql: &str) -> u32 {
            let mut body = 7u32.to_le_bytes().to_vec(); // thread id
            body.extend(0u32.to_le_bytes()); // execution time
            body.push(schema.len() as u8);
            body.extend(0u16.to_le_bytes()); // error code
            body.extend(0u16.to_le_bytes()); // status variables length
            body.extend(schema.as_bytes());
            body.push(0);
            body.extend(sql.as_bytes());
            self.push(2, &body)
        }

        /// `shop.items (id int, name varchar(10) utf8mb4)`.
        fn table_map(&mut self) -> u32 {
            let mut body = TABLE_ID.to_le_bytes()[..6].to_vec();
            body.extend(1u16.to_le_bytes());
            for name in ["shop", "items"] {
                body.push(name.len() as u8);
                body.extend(name.as_bytes());
                body.push(0);
            }
            body.push(2); // column count
            body.extend([3, 15]); // MYSQL_TYPE_LONG, MYSQL_TYPE_VARCHAR
            body.push(2); // metadata length
            body.extend(40u16.to_le_bytes()); // varchar: max bytes
            body.push(0b10); // name is nullable
            self.push(19, &body)
        }

        /// A rows event with full images: v2 (30 write, 31 update, 32 delete) or v1 (23, 24, 25).
        fn rows(&mut self, event_type: u8, rows: &[&[(i32, Option<&str>)]]) -> u32 {
            let rows: Vec<Vec<Image<'_>>> =
                rows.iter().map(|images| images.iter().map(|&(id, name)| (Some(id), Some(name))).collect()).collect();
            let rows: Vec<&[Image<'_>]> = rows.iter().map(Vec::as_slice).collect();
            self.partial_rows(event_type, &rows)
        }

        /// A rows event whose images hold only the columns given (`None`: left out, as
        /// `binlog_row_image = MINIMAL` does); each image's column bitmap says which.
        /// The two images of an update share the event's two bitmaps, from its first row.
        fn partial_rows(&mut self, event_type: u8, rows: &[&[Image<'_>]]) -> u32 {
            let mut body = TABLE_ID.to_le_bytes()[..6].to_vec();
            body.extend(1u16.to_le_bytes()); // STMT_END
            if event_type >= 30 {
                body.extend(2u16.to_le_bytes()); // extra data: just its own length
            }
            body.push(2); // column count
            let bits = |(id, name): &(Option<i32>, Option<Option<&str>>)| {
                u8::from(id.is_some()) | u8::from(name.is_some()) << 1
            };
            let first = rows.first().copied().unwrap_or_default();
            for image in first {
                body.push(bits(image)); // columns in the before image, then the after image
            }
            for images in rows {
                for (id, name) in images.iter() {
                    // The null bitmap counts only the columns present.
                    let name_bit = if id.is_some() { 0b10 } else { 0b01 };
                    body.push(if matches!(name, Some(None)) { name_bit } else { 0 });
                    if let Some(id) = id {
                        body.extend(id.to_le_bytes());
                    }
                    if let Some(Some(name)) = name {
                        body.push(name.len() as u8);
                        body.extend(name.as_bytes());
                    }
                }
            }
            self.push(event_type, &body)
        }

        fn xid(&mut self) -> u32 {
            self.push(16, &42u64.to_le_bytes())
        }

        fn stream(self, from: &str) -> BinlogChangeStream<Fixture> {
            let fixture = Fixture {
                fde: FormatDescriptionEvent::new(BinlogVersion::Version4),
                events: self.events,
                tables: HashMap::new(),
            };
            let Ok(Position::Binlog(from)) = from.parse::<Position>() else { panic!("a binlog position: {from}") };
            let followed = super::Followed {
                tables: tables(),
                copied_at: HashMap::new(),
                stale: Default::default(),
                filter: TableFilter::default(),
            };
            BinlogChangeStream::over(fixture, params(), followed, &from)
        }
    }

    fn uuid() -> [u8; 16] {
        let hex: String = UUID.chars().filter(|c| *c != '-').collect();
        let mut uuid = [0u8; 16];
        for (i, byte) in uuid.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        uuid
    }

    fn params() -> MysqlParams {
        MysqlParams::unconnected("shop")
    }

    fn tables() -> HashMap<TableName, MysqlTable> {
        let column = |name: &str, is_key| Column {
            name: name.into(),
            type_name: String::new(),
            type_oid: 0,
            is_key,
            default: None,
        };
        let name = TableName::new("shop", "items");
        let schema = TableSchema {
            name: name.clone(),
            columns: vec![column("id", true), column("name", false)],
            identity: Identity::Key,
        };
        let encodings = Arc::new(vec![Encoding::Same, Encoding::Same]);
        let table = MysqlTable { schema: Arc::new(schema), encodings, keys: Vec::new() };
        HashMap::from([(name, table)])
    }

    fn text(value: &str) -> Value {
        Value::Text(value.into())
    }

    /// What the stream yields, written down: `begin <pos>`, `insert [..]`, `commit <pos>`.
    async fn read_all(stream: &mut BinlogChangeStream<Fixture>) -> (Vec<String>, Option<anyhow::Error>) {
        let mut seen = Vec::new();
        loop {
            match stream.next().await {
                Ok(Event::Begin { position, .. }) => seen.push(format!("begin {position}")),
                Ok(Event::Commit { position, .. }) => seen.push(format!("commit {position}")),
                Ok(Event::Change(Change::Insert { row, .. })) => seen.push(format!("insert {row:?}")),
                Ok(Event::Change(Change::Update { old, new, .. })) => seen.push(format!("update {old:?} {new:?}")),
                Ok(Event::Change(Change::Delete { old, .. })) => seen.push(format!("delete {old:?}")),
                Ok(Event::Change(Change::Truncate { tables, .. })) => {
                    seen.push(format!("truncate {}", tables.iter().map(|t| t.name.to_string()).collect::<String>()))
                }
                Ok(Event::Change(Change::Relation(table))) => seen.push(format!("relation {}", table.name)),
                Ok(Event::Change(Change::Schema(change))) => seen.push(format!("schema {}", change.table)),
                Ok(Event::Heartbeat { position }) => seen.push(format!("heartbeat {position}")),
                Err(e) => return (seen, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn mysql_gtid_transactions_with_v1_and_v2_rows_events_decode() {
        let mut binlog = Binlog::new();
        let first = 4; // the GTID event's own position, as mysqlbinlog prints it (`# at 4`)
        binlog.gtid(77);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.rows(30, &[&[(1, Some("héllo 🎉"))], &[(2, None)]]);
        binlog.rows(24, &[&[(1, Some("héllo 🎉")), (1, Some("bye"))]]);
        binlog.rows(32, &[&[(2, None)]]);
        let commit = binlog.xid();
        let ddl = commit;
        binlog.gtid(78);
        let truncate = binlog.query("shop", "TRUNCATE TABLE items");
        binlog.gtid(79);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.rows(23, &[&[(3, Some("v1"))]]);
        let last = binlog.xid();

        let mut stream = binlog.stream(&format!("binlog.000001:4;gtid={UUID}:1-76"));
        let (seen, error) = read_all(&mut stream).await;
        let null = Value::Null;
        assert_eq!(
            seen,
            vec![
                format!("begin binlog.000001:{first};gtid={UUID}:77"),
                format!("insert {:?}", vec![text("1"), text("héllo 🎉")]),
                format!("insert {:?}", vec![text("2"), null.clone()]),
                format!("update {:?} {:?}", Some(vec![text("1"), text("héllo 🎉")]), vec![text("1"), text("bye")]),
                format!("delete {:?}", vec![text("2"), null]),
                format!("commit binlog.000001:{commit};gtid={UUID}:1-77"),
                format!("begin binlog.000001:{ddl};gtid={UUID}:78"),
                "truncate shop.items".to_string(),
                format!("commit binlog.000001:{truncate};gtid={UUID}:1-78"),
                format!("begin binlog.000001:{truncate};gtid={UUID}:79"),
                format!("insert {:?}", vec![text("3"), text("v1")]),
                format!("commit binlog.000001:{last};gtid={UUID}:1-79"),
            ]
        );
        // The fixture ran out: the stream says the server ended it, it does not hang or panic.
        let error = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("ended the binlog stream"), "{error}");
    }

    #[tokio::test]
    async fn a_stream_started_at_an_offset_keeps_offsets_and_transaction_gtids() {
        let mut binlog = Binlog::new();
        binlog.gtid(5);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.rows(30, &[&[(1, Some("a"))]]);
        let commit = binlog.xid();
        let (seen, _) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        assert_eq!(seen[0], format!("begin binlog.000001:4;gtid={UUID}:5"));
        // A set built from the middle of the history would resume from its start.
        assert_eq!(seen[2], format!("commit binlog.000001:{commit}"));
    }

    #[tokio::test]
    async fn garbled_events_stop_with_the_position_instead_of_panicking() {
        // A rows event for a table no table map named.
        let mut binlog = Binlog::new();
        binlog.gtid(1);
        let begin = binlog.query("", "BEGIN");
        binlog.rows(30, &[&[(1, Some("a"))]]);
        let (_, error) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        let error = error.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains(&format!("at binlog.000001:{begin}")) && error.contains("never mapped"), "{error}");

        // A rows event whose row is cut short.
        let mut binlog = Binlog::new();
        binlog.table_map();
        binlog.rows(30, &[&[(1, Some("a"))]]);
        if let Some(rows) = binlog.events.back_mut() {
            let size = rows.len() as u32 - 3;
            rows.truncate(rows.len() - 3);
            rows[9..13].copy_from_slice(&size.to_le_bytes());
        }
        let (_, error) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        let error = error.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("shop.items"), "{error}");

        // A MySQL GTID event too short to hold its UUID and number.
        let mut binlog = Binlog::new();
        binlog.push(33, &[0, 1, 2]);
        let (_, error) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        assert!(error.is_some_and(|e| format!("{e:#}").contains("decoding a binlog event at binlog.000001:4")));
    }

    #[tokio::test]
    async fn a_gtid_stop_point_and_skip_entry_name_mysql_transactions() {
        use crate::position::StopAt;
        let begin = |gno: u64| -> Position {
            let Ok(Position::Binlog(mut p)) = "binlog.000001:900".parse::<Position>() else { panic!("position") };
            p.gtid = GtidSet::parse(&format!("{UUID}:{gno}")).ok();
            Position::Binlog(p)
        };
        let Ok(stop) = format!("gtid:{UUID}:1-77").parse::<StopAt>() else { panic!("stop point") };
        assert!(!stop.is_past(&begin(77), std::time::UNIX_EPOCH));
        assert!(stop.is_past(&begin(78), std::time::UNIX_EPOCH));
        let Ok(skip) = format!("gtid:{}:78", UUID.to_uppercase()).parse::<Position>() else { panic!("skip") };
        assert!(skip.names(&begin(78)) && !skip.names(&begin(77)));
        let Ok(mariadb) = "gtid:0-1-1200".parse::<StopAt>() else { panic!("stop point") };
        let mut at = BinlogPosition::new("binlog.000001", 4);
        at.gtid = GtidSet::parse("0-1-1201").ok();
        assert!(mariadb.is_past(&Position::Binlog(at), std::time::UNIX_EPOCH));
    }

    #[test]
    fn mariadb_gtid_events_decode() {
        let mut body = 100u64.to_le_bytes().to_vec();
        body.extend(3u32.to_le_bytes());
        body.push(1);
        assert_eq!(super::decode_gtid_event(&body), Some((3, 100, 1)));
        assert_eq!(super::decode_gtid_event(&body[..12]), None);
    }

    #[tokio::test]
    async fn partial_row_images_are_read_through_their_column_bitmaps() {
        // binlog_row_image = MINIMAL: an update's before image holds the key, its after
        // image the changed column; a delete's before image holds the key.
        let mut binlog = Binlog::new();
        binlog.gtid(1);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.partial_rows(31, &[&[(Some(1), None), (None, Some(Some("bye")))]]);
        binlog.partial_rows(31, &[&[(Some(2), None), (None, Some(None))]]);
        // FULL_NODUP: the whole before image, and only what changed after it.
        binlog.partial_rows(31, &[&[(Some(3), Some(Some("old"))), (Some(4), None)]]);
        binlog.partial_rows(32, &[&[(Some(5), None)]]);
        binlog.xid();
        let (seen, _) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        let null = Value::Null;
        assert_eq!(
            seen[1..5],
            [
                format!("update {:?} {:?}", Some(vec![text("1"), null.clone()]), vec![text("1"), text("bye")]),
                format!("update {:?} {:?}", Some(vec![text("2"), null.clone()]), vec![text("2"), null.clone()]),
                format!("update {:?} {:?}", Some(vec![text("3"), text("old")]), vec![text("4"), text("old")]),
                format!("delete {:?}", vec![text("5"), null]),
            ]
        );

        // An insert without every column, or an update whose before image lacks the key,
        // cannot be applied exactly: the stream stops and says why and where.
        for (event_type, images) in
            [(30u8, vec![(Some(7), None)]), (31, vec![(None, Some(Some("a"))), (None, Some(Some("b")))])]
        {
            let mut binlog = Binlog::new();
            binlog.gtid(1);
            binlog.query("", "BEGIN");
            let rows_at = binlog.table_map();
            binlog.partial_rows(event_type, &[&images]);
            let (_, error) = read_all(&mut binlog.stream("binlog.000001:4")).await;
            let error = error.map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(
                error.contains("binlog_row_image")
                    && error.contains("shop.items")
                    && error.contains(&format!("binlog.000001:{rows_at}")),
                "{error}"
            );
        }
    }

    /// The artificial rotate event a dump opens with: timestamp and log_pos 0, the
    /// artificial flag, and (`crc32`) the 4-byte checksum the server appends.
    fn opening_rotate(name: &[u8], position: u64, crc32: bool) -> Vec<u8> {
        let size = 19 + 8 + name.len() as u32 + if crc32 { 4 } else { 0 };
        let mut event = 0u32.to_le_bytes().to_vec();
        event.push(4);
        event.extend(1u32.to_le_bytes());
        event.extend(size.to_le_bytes());
        event.extend(0u32.to_le_bytes());
        event.extend(0x20u16.to_le_bytes());
        event.extend(position.to_le_bytes());
        event.extend(name);
        if crc32 {
            let crc = crc32fast::hash(&event);
            event.extend(crc.to_le_bytes());
        }
        event
    }

    /// A format description event as MariaDB 10.11 writes it, saying whether events carry CRC32.
    fn format_description(crc32: bool) -> Vec<u8> {
        let mut body = 4u16.to_le_bytes().to_vec();
        let mut version = b"10.11.6-MariaDB-log".to_vec();
        version.resize(50, 0);
        body.extend(version);
        body.extend(0u32.to_le_bytes());
        body.push(19);
        body.extend([0u8; 40]); // post-header lengths
        body.push(u8::from(crc32));
        body.extend([0u8; 4]); // its own checksum (not checked by the decoder)
        let mut event = 0u32.to_le_bytes().to_vec();
        event.push(15);
        event.extend(1u32.to_le_bytes());
        event.extend((19 + body.len() as u32).to_le_bytes());
        event.extend(0u32.to_le_bytes());
        event.extend(0u16.to_le_bytes());
        event.extend(body);
        event
    }

    async fn file_after(events: Vec<Vec<u8>>) -> anyhow::Result<String> {
        let mut stream = Binlog { events: events.into(), offset: 4 }.stream("binlog.000001:4");
        match stream.next().await {
            Err(e) if format!("{e:#}").contains("ended the binlog stream") => Ok(stream.file),
            Err(e) => Err(e),
            Ok(event) => anyhow::bail!("unexpected {event:?}"),
        }
    }

    #[tokio::test]
    async fn rotate_names_lose_exactly_their_checksum() {
        // Checksums whose first byte is a digit or a dot: a name cut after its digits kept them.
        for wanted in [b'0', b'7', b'.'] {
            let checksum_starts_with = |p: u64| {
                let event = opening_rotate(b"binlog.000007", p, true);
                event[event.len() - 4] == wanted
            };
            let position = (4u64..).find(|&p| checksum_starts_with(p)).unwrap_or(4);
            let event = opening_rotate(b"binlog.000007", position, true);
            let file = file_after(vec![event, format_description(true)]).await;
            assert_eq!(file.ok().as_deref(), Some("binlog.000007"), "checksum starting with {}", wanted as char);
        }
        // No checksums on this binlog: nothing is cut.
        let file = file_after(vec![opening_rotate(b"mysql-bin.000042", 4, false), format_description(false)]).await;
        assert_eq!(file.ok().as_deref(), Some("mysql-bin.000042"));
        // A checksum that does not match, or a name that is no binlog file name: an error, not a position.
        let mut corrupt = opening_rotate(b"binlog.000007", 4, true);
        if let Some(last) = corrupt.last_mut() {
            *last ^= 1;
        }
        for events in [
            vec![corrupt, format_description(true)],
            vec![opening_rotate(b"binlog.000007\x01", 4, true), format_description(true)],
            vec![opening_rotate(b"binlog", 4, false), format_description(false)],
        ] {
            assert!(file_after(events).await.is_err());
        }
    }
}
