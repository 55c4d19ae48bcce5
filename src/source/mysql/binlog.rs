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
//! MariaDB GTIDs: the session asks for MariaDB's own GTID events
//! (`@mariadb_slave_capability = 4`), which `mysql_common` does not decode, so
//! they are decoded here. Each commit position carries the GTID state after it,
//! and a position with a GTID state resumes by GTID (`@slave_connect_state`), which
//! survives binlog files being renamed, purged into new ones or a failover.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;

use super::{catalog, MysqlParams, MysqlTable};
use crate::change::{Change, Event, Row, TableName, TableSchema, Value};
use crate::position::{BinlogPosition, Position};
use crate::schema::mysql::encode_binlog;
use crate::source::ChangeStream;

/// A binlog stream of one database.
pub struct BinlogChangeStream {
    binlog: mysql_async::BinlogStream,
    catalog: mysql_async::Conn,
    database: String,
    tables: HashMap<TableName, MysqlTable>,
    file: String,
    pending: VecDeque<Event>,
    /// Tables as rows with fewer columns than `information_schema` shows see them.
    prefixes: HashMap<(TableName, usize), Arc<TableSchema>>,
    /// MariaDB GTID state: per domain, the server and sequence number of its last commit.
    gtid_state: BTreeMap<u32, (u32, u64)>,
    /// The GTID of the transaction being read, until it commits.
    current_gtid: Option<(u32, u32, u64)>,
}

/// MariaDB's GTID event (type 162).
const MARIADB_GTID_EVENT: u8 = 162;
/// Its flag for a statement outside any transaction (DDL): no BEGIN and no COMMIT follow.
const GTID_STANDALONE: u8 = 1;

/// `0-1-100,1-2-7` → domain → (server, sequence).
pub fn parse_gtid_state(text: &str) -> anyhow::Result<BTreeMap<u32, (u32, u64)>> {
    let mut state = BTreeMap::new();
    for gtid in text.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let parts: Vec<&str> = gtid.split('-').collect();
        let [domain, server, seq] = parts.as_slice() else {
            anyhow::bail!("`{gtid}` is not a MariaDB GTID (domain-server-sequence, like 0-1-100)")
        };
        let bad = || anyhow::anyhow!("`{gtid}` is not a MariaDB GTID (domain-server-sequence, like 0-1-100)");
        state.insert(
            domain.parse().map_err(|_| bad())?,
            (server.parse().map_err(|_| bad())?, seq.parse().map_err(|_| bad())?),
        );
    }
    Ok(state)
}

fn format_gtid_state(state: &BTreeMap<u32, (u32, u64)>) -> String {
    state.iter().map(|(domain, (server, seq))| format!("{domain}-{server}-{seq}")).collect::<Vec<_>>().join(",")
}

/// A MariaDB GTID event's body: (domain, sequence, flags).
fn decode_gtid_event(body: &[u8]) -> Option<(u32, u64, u8)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    Some((domain, seq, *body.get(12)?))
}

impl BinlogChangeStream {
    /// Opens the binlog after `from` as replica `server_id`: by GTID when `from`
    /// carries a GTID state (MariaDB), else at its file and offset.
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
        let gtid_state = match &from.gtid {
            Some(gtid) => parse_gtid_state(gtid)?,
            None => BTreeMap::new(),
        };
        let request = mysql_async::BinlogStreamRequest::new(server_id);
        let request = if gtid_state.is_empty() {
            request.with_filename(from.file.as_bytes()).with_pos(from.pos)
        } else {
            let connect_state = format_gtid_state(&gtid_state);
            conn.query_drop(format!(
                "SET @slave_connect_state = '{connect_state}', @slave_gtid_strict_mode = 0, @slave_gtid_ignore_duplicates = 0"
            ))
            .await
            .context("setting the GTID to resume from")?;
            request
        };
        let binlog = conn.get_binlog_stream(request).await.with_context(|| {
            format!(
                "starting the binlog stream after {} (needs REPLICATION SLAVE; is that binlog still on the server?)",
                Position::Binlog(from.clone())
            )
        })?;
        Ok(BinlogChangeStream {
            binlog,
            catalog: params.connect().await?,
            database: params.database.clone(),
            tables,
            file: from.file.clone(),
            pending: VecDeque::new(),
            prefixes: HashMap::new(),
            gtid_state,
            current_gtid: None,
        })
    }

    fn position(&self, pos: u32) -> Position {
        Position::Binlog(BinlogPosition::new(self.file.clone(), u64::from(pos)))
    }

    /// The position after a commit, with the GTID state it leaves; the committed
    /// transaction's GTID joins that state.
    fn commit_position(&mut self, pos: u32) -> Position {
        if let Some((domain, server, seq)) = self.current_gtid.take() {
            self.gtid_state.insert(domain, (server, seq));
        }
        let gtid = (!self.gtid_state.is_empty()).then(|| format_gtid_state(&self.gtid_state));
        Position::Binlog(BinlogPosition { file: self.file.clone(), pos: u64::from(pos), gtid })
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
        // Every statement but BEGIN ends a transaction (COMMIT) or is one (DDL).
        let end = if query.trim().eq_ignore_ascii_case("BEGIN") {
            self.position(end_pos)
        } else {
            self.commit_position(end_pos)
        };
        let words: Vec<String> = query.split_whitespace().map(str::to_uppercase).collect();
        let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        match word(0) {
            "BEGIN" => self.pending.push_back(Event::Begin { position: start, commit_time: time }),
            "COMMIT" => self.pending.push_back(Event::Commit { position: end, commit_time: time }),
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
                    let (schema, encodings) =
                        catalog::read_tables(&mut self.catalog, &self.database, |t| t == &name).await?;
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
impl ChangeStream for BinlogChangeStream {
    async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let event = self
                .binlog
                .next()
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
                    let position = self.commit_position(header.log_pos());
                    self.pending.push_back(Event::Commit { position, commit_time: time });
                }
                None if header.event_type_raw() == MARIADB_GTID_EVENT => {
                    let (domain, seq, flags) = decode_gtid_event(event.data())
                        .with_context(|| format!("a MariaDB GTID event at {start} is too short"))?;
                    self.current_gtid = Some((domain, header.server_id(), seq));
                    // A standalone statement (DDL) is handled with its query event.
                    if flags & GTID_STANDALONE == 0 {
                        // The transaction's own GTID rides on its start position, for `skip`.
                        let Position::Binlog(mut position) = start else { continue };
                        position.gtid = Some(format!("{domain}-{}-{seq}", header.server_id()));
                        self.pending
                            .push_back(Event::Begin { position: Position::Binlog(position), commit_time: time });
                    }
                }
                Some(EventData::RowsEvent(rows_event)) => {
                    let Some(tme) = self.binlog.get_tme(rows_event.table_id()) else {
                        anyhow::bail!("a rows event at {start} names a table the binlog never mapped")
                    };
                    let name = TableName::new(tme.database_name().into_owned(), tme.table_name().into_owned());
                    if name.schema != self.database {
                        continue;
                    }
                    let Some(table) = self.tables.get(&name).cloned() else { continue };
                    let columns = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                    let schema = self.as_of(&table, columns, &start)?;
                    let Some(tme) = self.binlog.get_tme(rows_event.table_id()) else { continue };
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
    use super::binlog_file_name;

    #[test]
    fn gtid_states_and_events_decode() {
        let state = super::parse_gtid_state("1-2-7, 0-1-100").expect("valid");
        assert_eq!(super::format_gtid_state(&state), "0-1-100,1-2-7");
        assert!(super::parse_gtid_state("0-1").is_err());
        assert!(super::parse_gtid_state("0-1-x").is_err());
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
