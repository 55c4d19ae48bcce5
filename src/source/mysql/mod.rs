//! MySQL / MariaDB source: consistent snapshot pinned to a binlog position.
//!
//! Why the snapshot is consistent: a coordinator connection takes
//! `FLUSH TABLES WITH READ LOCK`, which waits for running writes and blocks new
//! ones; while it holds the lock every copy worker opens
//! `START TRANSACTION WITH CONSISTENT SNAPSHOT` and the coordinator reads the
//! binlog position (`SHOW MASTER STATUS`). All workers therefore see exactly the
//! transactions written to the binlog before that position, and the stream
//! starts there. The lock is released as soon as the workers are open
//! (milliseconds), the same dance mydumper does.
//!
//! Values are read with the text protocol in a `+00:00` session and rewritten
//! into PostgreSQL's text `COPY` format by [`crate::schema::mysql`], the one
//! mapping rule the stream will share.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use mysql_async::prelude::Queryable;
use tokio::sync::{mpsc, watch, Mutex};

mod binlog;
mod catalog;
mod ddl;
mod fence;

use super::{ChangeStream, LogEnd, SnapshotPoint, Source, TableReader, TableRewritten};
use crate::change::{Identity, TableName, TableSchema};
use crate::checkpoint::{PipelineIdentity, TableProgress};
use crate::config::TableFilter;
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::finding::Finding;
use crate::myconn::{binlog_position, MysqlParams};
use crate::position::{BinlogPosition, Position};
use crate::schema::mysql::{encode, Encoding};
use crate::schema::{push_copy_field, SourceSchema, TableDefinition};

/// A replicated table: its columns and how each column's values are rewritten.
#[derive(Clone)]
pub struct MysqlTable {
    schema: Arc<TableSchema>,
    encodings: Arc<Vec<Encoding>>,
    /// Its indexes and unique constraints as the target creates them: an `ALTER TABLE`
    /// or `CREATE`/`DROP INDEX` is followed by the difference.
    keys: Vec<catalog::TableKey>,
}

impl MysqlTable {
    /// Its columns (name, type, key) and how each is rewritten: what a rows event must
    /// agree with to be read under it.
    fn shape(&self) -> String {
        let columns: Vec<String> =
            self.schema.columns.iter().map(|c| format!("{} {} {}", c.name, c.type_name, c.is_key)).collect();
        format!("{:?} {:?} {:?}", columns, self.schema.identity, self.encodings)
    }
}

/// Tables with more (estimated) rows than this are copied in key ranges.
const SPLIT_ROWS: u64 = 200_000;

/// A MySQL or MariaDB database as a source.
pub struct MysqlSource {
    params: MysqlParams,
    filter: TableFilter,
    conn: mysql_async::Conn,
    /// The replica id the binlog dump registers with: unique per pipeline.
    server_id: u32,
    tables: HashMap<TableName, MysqlTable>,
    /// The connection holding `FLUSH TABLES WITH READ LOCK` while workers open.
    locked: Option<mysql_async::Conn>,
}

impl MysqlSource {
    pub async fn connect(params: MysqlParams, filter: TableFilter, pipeline: &str) -> anyhow::Result<MysqlSource> {
        let conn = params.connect().await?;
        // A stable id per pipeline, clear of the small ids servers usually have.
        let hash = pipeline.bytes().fold(2_166_136_261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16_777_619));
        let server_id = 1_000_000 + hash % 1_000_000_000;
        Ok(MysqlSource { params, filter, conn, server_id, tables: HashMap::new(), locked: None })
    }

    async fn server_identity(&mut self) -> anyhow::Result<String> {
        let row: Option<(String, u64)> =
            self.conn.query_first("SELECT @@version, @@server_id").await.context("reading the source's server id")?;
        let (version, server_id) = row.context("the source returned no server id")?;
        Ok(format!("mysql server_id {server_id} ({version}) database {}", self.params.database))
    }
}

#[async_trait]
impl Source for MysqlSource {
    fn dialect(&self) -> SourceDialect {
        SourceDialect::Mysql
    }

    async fn schema(&mut self) -> anyhow::Result<SourceSchema> {
        let filter = self.filter.clone();
        let (mut schema, tables) =
            catalog::read_tables(&mut self.conn, &self.params.database, catalog::CatalogRead::Settled, |name| {
                filter.includes(&name.to_string())
            })
            .await?;
        self.tables.clear();
        for t in &mut schema.tables {
            let key = t.schema.key_indexes();
            let integer_key = key.len() == 1
                && matches!(t.schema.columns[key[0]].type_name.as_str(), "smallint" | "integer" | "bigint");
            t.key_span = if integer_key && t.estimated_rows > SPLIT_ROWS {
                let column = t.schema.columns[key[0]].name.replace('`', "``");
                let table = format!(
                    "`{}`.`{}`",
                    t.schema.name.schema.replace('`', "``"),
                    t.schema.name.name.replace('`', "``")
                );
                let span: Option<(Option<i64>, Option<i64>)> = self
                    .conn
                    .query_first(format!("SELECT MIN(`{column}`), MAX(`{column}`) FROM {table}"))
                    .await
                    .with_context(|| format!("reading the key range of {}", t.schema.name))?;
                match span {
                    Some((Some(min), Some(max))) => Some((min, max)),
                    _ => None,
                }
            } else {
                None
            };
        }
        self.tables = tables;
        Ok(schema)
    }

    async fn preflight(&mut self, schema: &SourceSchema) -> anyhow::Result<Vec<Finding>> {
        let settings: Option<(Option<String>, Option<String>, Option<String>, Option<u64>)> = self
            .conn
            .query_first("SELECT CAST(@@log_bin AS CHAR), @@binlog_format, @@binlog_row_image, @@server_id")
            .await
            .context("reading the source's binlog settings")?;
        let (log_bin, format, row_image, server_id) = settings.context("the source returned no settings")?;
        let mut findings = Vec::new();
        let mut check = |setting: &str, value: Option<String>, required: &str, fix: &str| {
            let value = value.unwrap_or_default();
            if !value.eq_ignore_ascii_case(required) {
                findings.push(Finding::error("source", format!("{setting} = {value}"), required, fix.to_string()));
            }
        };
        check(
            "log_bin",
            log_bin.map(|v| if v == "1" { "ON".into() } else { v }),
            "ON",
            "add log-bin = mysql-bin under [mysqld] in my.cnf and restart the server",
        );
        check(
            "binlog_format",
            format,
            "ROW",
            "SET GLOBAL binlog_format = 'ROW'; and binlog_format = ROW under [mysqld] in my.cnf",
        );
        check(
            "binlog_row_image",
            row_image,
            "FULL",
            "SET GLOBAL binlog_row_image = 'FULL'; and binlog_row_image = FULL under [mysqld] in my.cnf",
        );
        if server_id.unwrap_or(0) == 0 {
            findings.push(Finding::error(
                "source",
                "server_id = 0".into(),
                "a non-zero server_id",
                "server_id = 1 under [mysqld] in my.cnf, then restart".into(),
            ));
        }
        let grants: Vec<String> = self.conn.query("SHOW GRANTS").await.context("SHOW GRANTS")?;
        let grants = grants.join("\n").to_uppercase();
        if !grants.contains("ALL PRIVILEGES ON *.*") {
            let user: Option<String> =
                self.conn.query_first("SELECT CURRENT_USER()").await.context("reading the user")?;
            let user = user.unwrap_or_default();
            for (privilege, alternative) in [
                ("REPLICATION SLAVE", "REPLICATION SLAVE"),
                ("REPLICATION CLIENT", "BINLOG MONITOR"),
                ("RELOAD", "RELOAD"),
            ] {
                if !grants.contains(privilege) && !grants.contains(alternative) {
                    findings.push(Finding::error(
                        "source",
                        format!("user {user} lacks {privilege}"),
                        privilege,
                        format!("GRANT {privilege} ON *.* TO {user};"),
                    ));
                }
            }
        }
        for table in schema.tables.iter().filter(|t| t.schema.identity != Identity::Key) {
            findings.push(Finding::warning(
                "source",
                format!("table {} has no primary key", table.schema.name),
                "a primary key for fast, exact UPDATE and DELETE",
                "works as is: updates and deletes match one row on all its old values; add a primary key to speed them up".into(),
            ));
        }
        Ok(findings)
    }

    async fn create_stream(
        &mut self,
        _tables: &[TableDefinition],
    ) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)> {
        let snapshot = self.new_snapshot().await?;
        let identity = PipelineIdentity {
            source: self.server_identity().await?,
            stream: "binlog".into(),
            consistent_point: snapshot.position.clone(),
        };
        Ok((identity, snapshot))
    }

    async fn resume_stream(&mut self, identity: &PipelineIdentity, _tables: &[TableDefinition]) -> anyhow::Result<()> {
        identity.check_source(&self.server_identity().await?)
    }

    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint> {
        let mut lock = self.params.connect().await?;
        lock.query_drop("FLUSH TABLES WITH READ LOCK").await.with_context(|| {
            format!("FLUSH TABLES WITH READ LOCK on {} (needs the RELOAD privilege)", self.params.endpoint)
        })?;
        let position = Position::Binlog(binlog_position(&mut lock).await?);
        // The copy reads the tables with the columns `schema()` read before the lock: DDL in
        // between would have it read other columns than the snapshot's, or none at all.
        let filter = self.filter.clone();
        let (_, now) = catalog::read_tables(&mut lock, &self.params.database, catalog::CatalogRead::Locked, |name| {
            filter.includes(&name.to_string())
        })
        .await?;
        let changed = now.len() != self.tables.len()
            || now.iter().any(|(name, table)| self.tables.get(name).is_none_or(|read| read.shape() != table.shape()));
        if changed {
            if let Err(e) = lock.query_drop("UNLOCK TABLES").await {
                tracing::warn!("UNLOCK TABLES failed ({e}); the lock ends with the connection");
            }
            return Err(crate::retry::ResumeFromCheckpoint(
                "the source's tables changed between reading its catalog and pinning the snapshot (DDL running): \
                 reading the catalog again"
                    .into(),
            )
            .into());
        }
        self.locked = Some(lock);
        let shapes = self.tables.iter().map(|(name, table)| (name.to_string(), table.shape())).collect();
        Ok(SnapshotPoint { position, id: String::new(), untracked: HashMap::new(), shapes })
    }

    async fn snapshot_reader(&self, _snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>> {
        let mut conn = self.params.connect().await?;
        // A TRUNCATE waiting for a table another reader holds makes this reader's read of it
        // wait behind it (metadata locks queue), and the TRUNCATE waits for the copy: give up
        // on the table soon and copy it again under the next snapshot instead.
        conn.query_drop(format!("SET SESSION lock_wait_timeout = {}", READ_LOCK_WAIT.as_secs()))
            .await
            .context("setting lock_wait_timeout on a copy connection")?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .context("opening a consistent-snapshot transaction on the source")?;
        let encodings = self.tables.iter().map(|(name, t)| (name.clone(), t.encodings.clone())).collect();
        Ok(Box::new(MysqlTableReader { conn: Arc::new(Mutex::new(conn)), encodings }))
    }

    async fn release_snapshot(&mut self) {
        if let Some(mut lock) = self.locked.take() {
            if let Err(e) = lock.query_drop("UNLOCK TABLES").await {
                tracing::warn!("UNLOCK TABLES failed ({e}); the lock ends with the connection");
            }
        }
    }

    /// A positional skip entry names a transaction by where it begins: its GTID (or
    /// Anonymous_GTID) event, `# at N` in `mysqlbinlog`; read the event at each such
    /// position to tell.
    async fn check_skip(&mut self, entries: &[(String, Position)]) -> anyhow::Result<Vec<Finding>> {
        let mut findings = Vec::new();
        for (entry, position) in entries {
            let Position::Binlog(BinlogPosition { file, pos, .. }) = position else { continue };
            if file.is_empty() {
                continue; // names a GTID
            }
            // SHOW statements take no placeholders.
            let sql =
                format!("SHOW BINLOG EVENTS IN {} FROM {pos} LIMIT 1", crate::sql::SqlDialect::Mysql.literal(file));
            let event: Result<Option<mysql_async::Row>, _> = self.conn.query_first(sql).await;
            let event = event.ok().flatten();
            let kind: Option<String> = event.as_ref().and_then(|e| e.get_opt(2)).and_then(Result::ok);
            let info: String = event.as_ref().and_then(|e| e.get_opt(5)).and_then(Result::ok).unwrap_or_default();
            let problem = match kind.as_deref() {
                Some("Gtid" | "Anonymous_Gtid") => continue,
                Some("Query") if info.trim().eq_ignore_ascii_case("BEGIN") => Some(
                    "names a BEGIN; where a GTID event comes before it (MySQL 5.7+, MariaDB) the transaction begins at \
                     that event"
                        .to_string(),
                ),
                Some(kind) => Some(format!("names a {kind} event, not where a transaction begins")),
                None => Some("names no event in the source's binlog (file purged, or not an event's position)".into()),
            };
            if let Some(problem) = problem {
                findings.push(Finding::error(
                    "source",
                    format!("[stream] skip entry {entry} {problem}"),
                    "the position of the transaction's GTID event",
                    "take `# at N` of the transaction's GTID / Anonymous_GTID event from mysqlbinlog, or name its GTID \
                     (gtid:…)"
                        .into(),
                ));
            }
        }
        Ok(findings)
    }

    /// The end of the binlog (`SHOW MASTER STATUS`): a transaction is in the binlog
    /// before its commit returns, so every one committed before `clock` lies before it.
    /// `read_only` (and `super_read_only` where it exists), client sessions killed and
    /// waited for, who can still write named, then the binlog position.
    async fn fence(&mut self) -> anyhow::Result<super::fence::Fence> {
        fence::fence(&self.params).await
    }

    async fn log_end(&mut self) -> anyhow::Result<Option<LogEnd>> {
        // The clock first: what committed before it is in the binlog read after it.
        let micros: Option<i64> = self
            .conn
            .query_first("SELECT CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)")
            .await
            .context("reading the source's clock")?;
        let position = Position::Binlog(binlog_position(&mut self.conn).await?);
        let micros = u64::try_from(micros.unwrap_or(0)).unwrap_or(0);
        Ok(Some(LogEnd { position, clock: std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros) }))
    }

    fn chunks(&self, table: &TableDefinition, workers: usize) -> Vec<Chunk> {
        match table.key_span.filter(|_| workers > 1) {
            Some(span) => Chunk::key_ranges(span, workers),
            None => vec![Chunk::Whole],
        }
    }

    async fn start_stream(
        &mut self,
        from: &Position,
        _confirmed: watch::Receiver<Position>,
        copies: &HashMap<String, TableProgress>,
    ) -> anyhow::Result<Box<dyn ChangeStream>> {
        // The binlog keeps no per-reader state on the server: nothing to confirm.
        let Position::Binlog(from) = from else {
            anyhow::bail!("a MySQL binlog resumes from a file:offset position, not from {from}")
        };
        let copied_at = copies.iter().map(|(name, copy)| (name.clone(), copy.copied_at.clone())).collect();
        let stale = self
            .tables
            .iter()
            .filter(|(name, table)| {
                let copied = copies.get(&name.to_string()).and_then(|copy| copy.shape.as_ref());
                copied.is_some_and(|shape| *shape != table.shape())
            })
            .map(|(name, _)| name.clone())
            .collect();
        let followed = binlog::Followed { tables: self.tables.clone(), copied_at, stale, filter: self.filter.clone() };
        let stream = binlog::BinlogChangeStream::start(&self.params, followed, from, self.server_id).await?;
        Ok(Box::new(stream))
    }
}

/// Bytes per chunk handed to the sink.
const COPY_CHUNK: usize = 256 * 1024;

/// A copy connection inside the consistent snapshot.
struct MysqlTableReader {
    conn: Arc<Mutex<mysql_async::Conn>>,
    encodings: HashMap<TableName, Arc<Vec<Encoding>>>,
}

#[async_trait]
impl TableReader for MysqlTableReader {
    async fn read_rows(
        &mut self,
        table: &TableDefinition,
        condition: &str,
    ) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let name = &table.schema.name;
        let encodings = self.encodings.get(name).cloned().with_context(|| format!("no column mapping for {name}"))?;
        let rows: Vec<mysql_async::Row> = self
            .conn
            .lock()
            .await
            .query(copy_select(table, Some(condition)))
            .await
            .with_context(|| format!("reading rows of {name}"))?;
        let columns: Vec<String> = table.schema.columns.iter().map(|c| c.name.clone()).collect();
        let key = table.schema.key_indexes();
        rows.iter().map(|row| Ok(pg_text_row(row, &encodings, name, &columns, &key)?.0)).collect()
    }

    async fn read(&mut self, table: &TableDefinition, chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        anyhow::ensure!(format == CopyFormat::PostgresText, "a MySQL source copies into PostgreSQL's text format only");
        let name = table.schema.name.clone();
        let encodings = self.encodings.get(&name).cloned().with_context(|| format!("no column mapping for {name}"))?;
        let key = table.schema.key_indexes();
        let column = key.first().map(|&k| format!("`{}`", table.schema.columns[k].name.replace('`', "``")));
        let sql = copy_select(table, column.and_then(|column| chunk.key_condition(&column)).as_deref());
        let columns: Vec<String> = table.schema.columns.iter().map(|c| c.name.clone()).collect();
        let mut conn = self.conn.clone().lock_owned().await;
        let (tx, mut rx) = mpsc::channel::<anyhow::Result<Bytes>>(8);
        // Whether the read started, told by its first row (or its end): a table truncated or
        // altered after the snapshot was pinned fails right there (ER_TABLE_DEF_CHANGED); so
        // does one that a TRUNCATE is waiting for (ER_LOCK_WAIT_TIMEOUT).
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                let first = match conn.query_iter(sql).await {
                    Ok(mut rows) => rows.next().await.map(|first| (rows, first)),
                    Err(e) => Err(e),
                };
                let (mut rows, mut next) = match first {
                    Ok(started) => {
                        let _ = started_tx.send(Ok(()));
                        started
                    }
                    Err(mysql_async::Error::Server(e)) if [ER_TABLE_DEF_CHANGED, ER_LOCK_WAIT_TIMEOUT].contains(&e.code) => {
                        let _ = started_tx.send(Err(TableRewritten(name.clone()).into()));
                        return Ok(());
                    }
                    // The table, or one of the columns read, dropped or renamed since the snapshot
                    // was pinned (names resolve against the table as it is now): the next
                    // attempt reads the catalog again.
                    Err(mysql_async::Error::Server(e)) if [ER_NO_SUCH_TABLE, ER_BAD_FIELD].contains(&e.code) => {
                        let why = format!(
                            "{name}, or a column of it, was dropped or renamed on the source while it was to be copied"
                        );
                        let _ = started_tx.send(Err(crate::retry::ResumeFromCheckpoint(why).into()));
                        return Ok(());
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::Error::new(e).context(format!("reading {name} from the source"))));
                        return Ok(());
                    }
                };
                let mut buffer = BytesMut::with_capacity(COPY_CHUNK);
                let mut line = Vec::new();
                let mut zero_dates = 0u64;
                while let Some(row) = next.take() {
                    line.clear();
                    let (values, zeros) = pg_text_row(&row, &encodings, &name, &columns, &key)
                        .map_err(|e| e.context("cutover stopped before loading the table"))?;
                    zero_dates += zeros;
                    for (i, value) in values.iter().enumerate() {
                        if i > 0 {
                            line.push(b'\t');
                        }
                        push_copy_field(&mut line, value.as_deref());
                    }
                    line.push(b'\n');
                    buffer.extend_from_slice(&line);
                    if buffer.len() >= COPY_CHUNK && tx.send(Ok(buffer.split().freeze())).await.is_err() {
                        return Ok(());
                    }
                    next = rows.next().await.with_context(|| format!("reading {name} from the source"))?;
                }
                if !buffer.is_empty() {
                    let _ = tx.send(Ok(buffer.freeze())).await;
                }
                if zero_dates > 0 {
                    tracing::warn!(table = %name, zero_dates, "zero dates (0000-00-00 and the like) became NULL on the target");
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        started_rx.await.context("the copy task ended before its query started")??;
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}

/// `SELECT` of a table's columns as the copy reads them, where `condition` holds.
fn copy_select(table: &TableDefinition, condition: Option<&str>) -> String {
    let name = &table.schema.name;
    // A FLOAT prints with 6 significant digits over the text protocol; as a DOUBLE it
    // prints the exact value, which the target's real (or FLOAT) reads back bit for bit.
    let columns: Vec<String> = table
        .schema
        .columns
        .iter()
        .map(|c| match c.type_name.as_str() {
            // `* 1e0` is a double on every MySQL version (CAST … AS DOUBLE needs 8.0.17) and keeps -0.
            "real" => format!("`{}` * 1e0", c.name.replace('`', "``")),
            _ => format!("`{}`", c.name.replace('`', "``")),
        })
        .collect();
    let mut sql = format!(
        "SELECT {} FROM `{}`.`{}`",
        columns.join(", "),
        name.schema.replace('`', "``"),
        name.name.replace('`', "``")
    );
    if let Some(condition) = condition {
        sql.push_str(&format!(" WHERE {condition}"));
    }
    sql
}

/// A row read by [`copy_select`] in PostgreSQL's text form, and how many zero dates in it
/// became NULL; a value that does not map is named by the row's key.
fn pg_text_row(
    row: &mysql_async::Row,
    encodings: &[Encoding],
    name: &TableName,
    columns: &[String],
    key: &[usize],
) -> anyhow::Result<(Vec<Option<String>>, u64)> {
    let mut values = Vec::with_capacity(encodings.len());
    let mut zero_dates = 0;
    for (i, encoding) in encodings.iter().enumerate() {
        let value = match row.as_ref(i) {
            None | Some(mysql_async::Value::NULL) => None,
            Some(mysql_async::Value::Bytes(bytes)) => {
                let value = encode(encoding, bytes).map_err(|e| {
                    let key: Vec<String> = key
                        .iter()
                        .map(|&k| match row.as_ref(k) {
                            Some(mysql_async::Value::Bytes(b)) => {
                                format!("{}={}", columns[k], String::from_utf8_lossy(b))
                            }
                            _ => format!("{}=NULL", columns[k]),
                        })
                        .collect();
                    anyhow::anyhow!(
                        "table {name}, row ({}), column {}: {e}",
                        if key.is_empty() { "no key".to_string() } else { key.join(", ") },
                        columns[i]
                    )
                })?;
                zero_dates += u64::from(value.is_none());
                value
            }
            Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
        };
        values.push(value);
    }
    Ok((values, zero_dates))
}

/// "Table definition has changed, please retry transaction": the table was truncated or
/// altered after this transaction's consistent snapshot was taken.
const ER_TABLE_DEF_CHANGED: u16 = 1412;

/// "Table doesn't exist".
const ER_NO_SUCH_TABLE: u16 = 1146;

/// "Unknown column": a column the copy names is gone from the table.
const ER_BAD_FIELD: u16 = 1054;

/// "Lock wait timeout exceeded": a consistent read takes no row locks, so this is the
/// table's metadata lock, which a waiting TRUNCATE or ALTER holds up.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// How long a copy connection waits for a table's metadata lock.
const READ_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
