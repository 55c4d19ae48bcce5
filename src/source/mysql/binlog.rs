//! The binlog as a change stream: `COM_BINLOG_DUMP` from a file and offset,
//! rows events decoded by `mysql_common` and rewritten by the same mapping as
//! the snapshot, transactions delimited by `BEGIN` and `XID` / `COMMIT`.
//!
//! Positions: a transaction is ordered by the offset of its `BEGIN` event and
//! resumes after the end of its commit event (the header's `log_pos`, the next
//! event's offset), so a restart from a checkpoint re-reads nothing applied.
//! DDL: `TRUNCATE` of a replicated table is applied; `ALTER TABLE … ADD` re-reads
//! the table from `information_schema` and adds the columns; any other DDL on a
//! replicated table stops the stream at its position.
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event as BinlogEvent, EventData, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::{GnoInterval, Sid};

use super::{catalog, MysqlParams, MysqlTable};
use crate::change::{Change, Event, Row, TableName, TableSchema, Value};
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

/// A binlog stream of one database.
pub struct BinlogChangeStream<E = mysql_async::BinlogStream> {
    binlog: E,
    params: MysqlParams,
    /// Reads a table's new definition after `ALTER TABLE … ADD`; opened when first needed.
    catalog: Option<mysql_async::Conn>,
    tables: HashMap<TableName, MysqlTable>,
    file: String,
    pending: VecDeque<Event>,
    /// Tables as rows with fewer columns than `information_schema` shows see them.
    prefixes: HashMap<(TableName, usize), Arc<TableSchema>>,
    /// The GTID state after the last commit, when the stream started from one.
    gtid_state: Option<GtidSet>,
    /// The GTID of the transaction being read, until it commits.
    current_gtid: Option<Gtid>,
    /// Between a transaction's BEGIN (or MariaDB GTID event) and its COMMIT / XID.
    in_transaction: bool,
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
        tables: HashMap<TableName, MysqlTable>,
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
        Ok(BinlogChangeStream::over(binlog, params.clone(), tables, from))
    }
}

impl<E: BinlogEvents> BinlogChangeStream<E> {
    /// A stream of `binlog`'s events, which begin after `from`.
    pub fn over(
        binlog: E,
        params: MysqlParams,
        tables: HashMap<TableName, MysqlTable>,
        from: &BinlogPosition,
    ) -> BinlogChangeStream<E> {
        BinlogChangeStream {
            binlog,
            params,
            catalog: None,
            tables,
            file: from.file.clone(),
            pending: VecDeque::new(),
            prefixes: HashMap::new(),
            gtid_state: from.gtid.clone(),
            current_gtid: None,
            in_transaction: false,
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
    fn standalone(&mut self, start: Position, end: Position, time: SystemTime, change: Change) {
        self.pending.push_back(Event::Begin { position: start, commit_time: time });
        self.pending.push_back(Event::Change(change));
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
            "TRUNCATE" | "ALTER" | "DROP" | "RENAME" | "CREATE" => {
                let name_index = match (word(0), word(1)) {
                    ("TRUNCATE", "TABLE") => 2,
                    ("TRUNCATE", _) => 1,
                    (_, "TABLE") => 2,
                    _ => return Ok(()),
                };
                let raw = query.split_whitespace().nth(name_index).unwrap_or("");
                let raw = raw.trim_end_matches([';', '(']);
                let (db, table) = match raw.split_once('.') {
                    Some((db, table)) => (db.trim_matches('`').to_string(), table.trim_matches('`').to_string()),
                    None => (schema.to_string(), raw.trim_matches('`').to_string()),
                };
                let name = TableName::new(db, table);
                let Some(known) = self.tables.get(&name).cloned() else { return Ok(()) };
                let destructive = ["DROP", "MODIFY", "CHANGE", "RENAME", "ALTER COLUMN", "CONVERT"];
                let upper = words.join(" ");
                if word(0) == "TRUNCATE" {
                    let change =
                        Change::Truncate { tables: vec![known.schema], cascade: false, restart_identity: false };
                    self.standalone(start, end, time, change);
                } else if word(0) == "ALTER"
                    && upper.contains(" ADD ")
                    && !destructive.iter().any(|d| upper.contains(d))
                {
                    let catalog = match &mut self.catalog {
                        Some(catalog) => catalog,
                        None => self.catalog.insert(self.params.connect().await?),
                    };
                    let (schema, encodings) =
                        catalog::read_tables(catalog, &self.params.database, |t| t == &name).await?;
                    let definition = schema.tables.into_iter().next().with_context(|| format!("{name} is gone"))?;
                    let before = &known.schema.columns;
                    if definition
                        .schema
                        .columns
                        .get(..before.len())
                        .map(|c| c.iter().map(|c| &c.name).collect::<Vec<_>>())
                        != Some(before.iter().map(|c| &c.name).collect())
                    {
                        anyhow::bail!(
                            "`{query}` at {start} changed more of {name} than appending columns; cutover stops here. \
                             Apply the same change on the target by hand, then start over from a new snapshot"
                        );
                    }
                    let table = MysqlTable {
                        schema: Arc::new(definition.schema),
                        encodings: encodings.get(&name).cloned().unwrap_or_default(),
                        key_span: known.key_span,
                    };
                    self.tables.insert(name, table.clone());
                    self.standalone(start, end, time, Change::Relation(table.schema));
                } else {
                    anyhow::bail!(
                        "`{query}` at {start} changes replicated table {name} in a way cutover cannot follow \
                         (it follows ALTER TABLE … ADD COLUMN and TRUNCATE); cutover stopped at its last checkpoint. \
                         Apply the change on the target by hand and start over from a new snapshot"
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The table as a row of `columns` columns sees it. Read after a restart,
    /// `information_schema` may already show columns an `ALTER TABLE … ADD` appended
    /// later in the binlog; rows written before it carry the leading columns only.
    fn as_of(&mut self, table: &MysqlTable, columns: usize, at: &Position) -> anyhow::Result<Arc<TableSchema>> {
        if columns == table.schema.columns.len() {
            return Ok(table.schema.clone());
        }
        if columns > table.schema.columns.len() {
            anyhow::bail!(
                "{} has {columns} columns in the binlog at {at} but {} in cutover's schema: a DDL change cutover did not \
                 see; start over from a new snapshot",
                table.schema.name,
                table.schema.columns.len()
            );
        }
        let key = (table.schema.name.clone(), columns);
        let schema = self.prefixes.entry(key).or_insert_with(|| {
            let mut prefix = (*table.schema).clone();
            prefix.columns.truncate(columns);
            Arc::new(prefix)
        });
        Ok(schema.clone())
    }

    fn row(table: &MysqlTable, row: Option<BinlogRow>, at: &Position) -> anyhow::Result<Option<Row>> {
        let Some(mut row) = row else { return Ok(None) };
        let mut values = Vec::with_capacity(row.len());
        for (i, encoding) in table.encodings.iter().enumerate().take(row.len()) {
            values.push(match row.take(i) {
                // Not in the row image (binlog_row_image = MINIMAL): the target keeps its value.
                None => Value::Unchanged,
                Some(value) => match encode_binlog(encoding, value).with_context(|| {
                    format!("{}, column {} at {at}", table.schema.name, table.schema.columns[i].name)
                })? {
                    Some(text) => Value::Text(text),
                    None => Value::Null,
                },
            });
        }
        Ok(Some(values))
    }
}

/// A binlog file name (`base.000042`) from a rotate event. The server's first,
/// artificial rotate event arrives before the format description, so its body
/// still carries the 4-byte checksum: keep the name up to its numeric suffix.
fn binlog_file_name(raw: &str) -> String {
    let Some(dot) = raw.rfind('.') else { return raw.to_string() };
    let digits = raw[dot + 1..].bytes().take_while(u8::is_ascii_digit).count();
    raw[..dot + 1 + digits].to_string()
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
                    crate::pipeline::ConnectionLost(format!(
                        "the MySQL server ended the binlog stream in {}",
                        self.file
                    ))
                })?
                .with_context(|| format!("reading the binlog in {}", self.file))?;
            let header = event.header();
            let start = self.position(header.log_pos().saturating_sub(header.event_size()));
            let time = UNIX_EPOCH + Duration::from_secs(u64::from(header.timestamp()));
            let data = event.read_data().with_context(|| format!("decoding a binlog event at {start}"))?;
            match data {
                Some(EventData::RotateEvent(rotate)) => self.file = binlog_file_name(&rotate.name()),
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
                    // (DDL) begins with its query event.
                    if flags & GTID_STANDALONE == 0 {
                        self.in_transaction = true;
                        let position = self.begin_position(start);
                        self.pending.push_back(Event::Begin { position, commit_time: time });
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
                }
                Some(EventData::AnonymousGtidEvent(_)) => self.current_gtid = None,
                Some(EventData::RowsEvent(rows_event)) => {
                    if let RowsEventData::PartialUpdateRowsEvent(_) = rows_event {
                        anyhow::bail!(
                            "the update at {start} carries partial JSON (binlog_row_value_options = PARTIAL_JSON), \
                             which does not hold whole rows; set binlog_row_value_options = '' on the source"
                        );
                    }
                    let Some(tme) = self.binlog.table_map(rows_event.table_id()) else {
                        anyhow::bail!("a rows event at {start} names a table the binlog never mapped")
                    };
                    let name = TableName::new(tme.database_name().into_owned(), tme.table_name().into_owned());
                    if name.schema != self.params.database {
                        continue;
                    }
                    let Some(table) = self.tables.get(&name).cloned() else { continue };
                    let columns = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                    let schema = self.as_of(&table, columns, &start)?;
                    if let RowsEventData::PartialUpdateRowsEvent(_) = rows_event {
                        anyhow::bail!(
                            "the update at {start} carries partial JSON (binlog_row_value_options = PARTIAL_JSON), \
                             which does not hold whole rows; set binlog_row_value_options = '' on the source"
                        );
                    }
                    let Some(tme) = self.binlog.table_map(rows_event.table_id()) else { continue };
                    for row in rows_event.rows(tme) {
                        let (before, after) = row.with_context(|| format!("decoding a row of {name} at {start}"))?;
                        let before = Self::row(&table, before, &start)?;
                        let after = Self::row(&table, after, &start)?;
                        let change = match (&rows_event, before, after) {
                            (RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_), _, Some(row)) => {
                                Change::Insert { table: schema.clone(), row }
                            }
                            (RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_), Some(old), _) => {
                                Change::Delete { table: schema.clone(), old }
                            }
                            (_, old, Some(new)) => Change::Update { table: schema.clone(), old, new },
                            _ => anyhow::bail!("a rows event of {name} at {start} has no row image"),
                        };
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

    use super::{binlog_file_name, BinlogChangeStream, BinlogEvents};
    use crate::change::{Change, Column, Event, Identity, TableName, TableSchema, Value};
    use crate::position::{BinlogPosition, GtidSet, Position};
    use crate::schema::mysql::Encoding;
    use crate::source::mysql::{MysqlParams, MysqlTable};
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

        /// A rows event: v2 (30 write, 31 update, 32 delete) or v1 (23, 24, 25).
        fn rows(&mut self, event_type: u8, rows: &[&[(i32, Option<&str>)]]) -> u32 {
            let mut body = TABLE_ID.to_le_bytes()[..6].to_vec();
            body.extend(1u16.to_le_bytes()); // STMT_END
            if event_type >= 30 {
                body.extend(2u16.to_le_bytes()); // extra data: just its own length
            }
            body.push(2); // column count
            body.push(0b11); // columns in the before (or only) image
            if matches!(event_type, 24 | 31) {
                body.push(0b11); // columns in the after image
            }
            for images in rows {
                for (id, name) in images.iter() {
                    body.push(if name.is_some() { 0 } else { 0b10 });
                    body.extend(id.to_le_bytes());
                    if let Some(name) = name {
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
            BinlogChangeStream::over(fixture, params(), tables(), &from)
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
        MysqlParams {
            opts: mysql_async::Opts::default(),
            database: "shop".into(),
            endpoint: "fixture".into(),
            tls_optional: true,
            tls_refused: Default::default(),
        }
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
        let table = MysqlTable {
            schema: Arc::new(schema),
            encodings: Arc::new(vec![Encoding::Same, Encoding::Same]),
            key_span: None,
        };
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
                Err(e) => return (seen, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn mysql_gtid_transactions_with_v1_and_v2_rows_events_decode() {
        let mut binlog = Binlog::new();
        let first = binlog.gtid(77);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.rows(30, &[&[(1, Some("héllo 🎉"))], &[(2, None)]]);
        binlog.rows(24, &[&[(1, Some("héllo 🎉")), (1, Some("bye"))]]);
        binlog.rows(32, &[&[(2, None)]]);
        let commit = binlog.xid();
        let ddl = binlog.gtid(78);
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
                format!("begin binlog.000001:{};gtid={UUID}:79", truncate + 19 + 42),
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
        let first = binlog.gtid(5);
        binlog.query("", "BEGIN");
        binlog.table_map();
        binlog.rows(30, &[&[(1, Some("a"))]]);
        let commit = binlog.xid();
        let (seen, _) = read_all(&mut binlog.stream("binlog.000001:4")).await;
        assert_eq!(seen[0], format!("begin binlog.000001:{first};gtid={UUID}:5"));
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

    #[test]
    fn rotate_names_lose_a_trailing_checksum() {
        assert_eq!(binlog_file_name("binlog.000001tlw\u{1}"), "binlog.000001");
        assert_eq!(binlog_file_name("mysql-bin.000042"), "mysql-bin.000042");
    }
}
