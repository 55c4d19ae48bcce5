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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;

use super::{catalog, MysqlParams, MysqlTable};
use crate::change::{Change, Event, Row, TableName, TableSchema, Value};
use crate::position::Position;
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
}

impl BinlogChangeStream {
    /// Opens the binlog at `file:pos` as replica `server_id`.
    pub async fn start(
        params: &MysqlParams,
        tables: HashMap<TableName, MysqlTable>,
        file: &str,
        pos: u64,
        server_id: u32,
    ) -> anyhow::Result<BinlogChangeStream> {
        let mut conn = params.connect().await?;
        use mysql_async::prelude::Queryable;
        // Heartbeats every second keep an idle stream's connection and lag alive.
        conn.query_drop("SET @master_heartbeat_period = 1000000000").await.context("setting the heartbeat period")?;
        let request = mysql_async::BinlogStreamRequest::new(server_id)
            .with_filename(file.as_bytes())
            .with_pos(pos);
        let binlog = conn.get_binlog_stream(request).await.with_context(|| {
            format!("starting the binlog stream at {file}:{pos} (needs REPLICATION SLAVE; is the file still on the server?)")
        })?;
        Ok(BinlogChangeStream {
            binlog,
            catalog: params.connect().await?,
            database: params.database.clone(),
            tables,
            file: file.to_string(),
            pending: VecDeque::new(),
            prefixes: HashMap::new(),
        })
    }

    fn position(&self, pos: u32) -> Position {
        Position::Binlog { file: self.file.clone(), pos: u64::from(pos) }
    }

    /// A statement that is a transaction of its own (DDL).
    fn standalone(&mut self, start: Position, end: Position, time: SystemTime, change: Change) {
        self.pending.push_back(Event::Begin { position: start, commit_time: time });
        self.pending.push_back(Event::Change(change));
        self.pending.push_back(Event::Commit { position: end, commit_time: time });
    }

    async fn query(&mut self, query: &str, schema: &str, start: Position, end: Position, time: SystemTime) -> anyhow::Result<()> {
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
                    let change = Change::Truncate { tables: vec![known.schema], cascade: false, restart_identity: false };
                    self.standalone(start, end, time, change);
                } else if word(0) == "ALTER" && upper.contains(" ADD ") && !destructive.iter().any(|d| upper.contains(d)) {
                    let (schema, encodings) =
                        catalog::read_tables(&mut self.catalog, &self.database, |t| t == &name).await?;
                    let definition = schema.tables.into_iter().next().with_context(|| format!("{name} is gone"))?;
                    let before = &known.schema.columns;
                    if definition.schema.columns.get(..before.len()).map(|c| c.iter().map(|c| &c.name).collect::<Vec<_>>())
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
                .ok_or_else(|| crate::pipeline::ConnectionLost(format!("the MySQL server ended the binlog stream in {}", self.file)))?
                .with_context(|| format!("reading the binlog in {}", self.file))?;
            let header = event.header();
            let end = self.position(header.log_pos());
            let start = self.position(header.log_pos().saturating_sub(header.event_size()));
            let time = UNIX_EPOCH + Duration::from_secs(u64::from(header.timestamp()));
            let data = event.read_data().with_context(|| format!("decoding a binlog event at {start}"))?;
            match data {
                Some(EventData::RotateEvent(rotate)) => self.file = binlog_file_name(&rotate.name()),
                Some(EventData::QueryEvent(query)) => {
                    let (text, schema) = (query.query().into_owned(), query.schema().into_owned());
                    self.query(&text, &schema, start, end, time).await?;
                }
                Some(EventData::XidEvent(_)) => self.pending.push_back(Event::Commit { position: end, commit_time: time }),
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
    fn rotate_names_lose_a_trailing_checksum() {
        assert_eq!(binlog_file_name("binlog.000001tlw\u{1}"), "binlog.000001");
        assert_eq!(binlog_file_name("mysql-bin.000042"), "mysql-bin.000042");
    }
}
