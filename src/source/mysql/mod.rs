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

use super::{ChangeStream, Chunk, CopyFormat, CopyStream, Dialect, SnapshotPoint, Source, TableReader};
use crate::change::{Column, Identity, TableName, TableSchema};
use crate::checkpoint::PipelineIdentity;
use crate::config::{Endpoint, TableFilter};
use crate::position::Position;
use crate::schema::mysql::{encode, map_column, push_copy_field, Encoding, MysqlColumn};
use crate::schema::{quote_ident, ColumnDefinition, EnumType, Sequence, SourceSchema, TableDefinition};

/// How to reach the server, from a `mysql://` URL.
#[derive(Clone)]
pub struct MysqlParams {
    opts: mysql_async::Opts,
    /// The replicated database: the URL's path.
    pub database: String,
    endpoint: String,
}

impl MysqlParams {
    pub fn from_endpoint(endpoint: Endpoint<'_>) -> anyhow::Result<MysqlParams> {
        let opts = mysql_async::Opts::from_url(endpoint.url.expose())
            .map_err(|e| anyhow::anyhow!("url {} is not a MySQL URL: {e}", endpoint.url))?;
        let database = opts
            .db_name()
            .map(str::to_string)
            .with_context(|| format!("url {} names no database: add it as the path (mysql://user@host/shop)", endpoint.url))?;
        let mut builder = mysql_async::OptsBuilder::from_opts(opts);
        if let Some(password) = endpoint.external_password()? {
            builder = builder.pass(Some(password));
        }
        let opts = mysql_async::Opts::from(builder);
        let endpoint = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        Ok(MysqlParams { opts, database, endpoint })
    }

    /// A connection in UTC with utf8mb4, as every cutover session uses.
    pub async fn connect(&self) -> anyhow::Result<mysql_async::Conn> {
        let mut conn = mysql_async::Conn::new(self.opts.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to MySQL at {} (database {}): {e}", self.endpoint, self.database))?;
        conn.query_drop("SET time_zone = '+00:00', NAMES utf8mb4")
            .await
            .context("setting up a MySQL session")?;
        Ok(conn)
    }
}

/// A MySQL or MariaDB database as a source.
pub struct MysqlSource {
    params: MysqlParams,
    filter: TableFilter,
    conn: mysql_async::Conn,
    /// Per table, how each column's values are rewritten.
    encodings: HashMap<TableName, Arc<Vec<Encoding>>>,
    /// The connection holding `FLUSH TABLES WITH READ LOCK` while workers open.
    locked: Option<mysql_async::Conn>,
}

impl MysqlSource {
    pub async fn connect(params: MysqlParams, filter: TableFilter) -> anyhow::Result<MysqlSource> {
        let conn = params.connect().await?;
        Ok(MysqlSource { params, filter, conn, encodings: HashMap::new(), locked: None })
    }

    async fn server_identity(&mut self) -> anyhow::Result<String> {
        let row: Option<(String, u64)> = self
            .conn
            .query_first("SELECT @@version, @@server_id")
            .await
            .context("reading the source's server id")?;
        let (version, server_id) = row.context("the source returned no server id")?;
        Ok(format!("mysql server_id {server_id} ({version}) database {}", self.params.database))
    }
}

#[async_trait]
impl Source for MysqlSource {
    fn dialect(&self) -> Dialect {
        Dialect::Mysql
    }

    async fn schema(&mut self) -> anyhow::Result<SourceSchema> {
        let db = self.params.database.clone();
        let tables: Vec<(String, Option<u64>, Option<u64>, Option<u64>)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, TABLE_ROWS, DATA_LENGTH, AUTO_INCREMENT FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
                (db.clone(),),
            )
            .await
            .context("reading the source's tables")?;
        let columns: Vec<(String, String, String, String, Option<u64>, Option<u64>, Option<u64>, Option<u64>, String, String)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE, \
                        DATETIME_PRECISION, CHARACTER_MAXIMUM_LENGTH, IS_NULLABLE, EXTRA \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION",
                (db.clone(),),
            )
            .await
            .context("reading the source's columns")?;
        // MariaDB's JSON is longtext with a json_valid() check; MySQL has no such table before 8.0.16.
        let checks: Vec<(String, String)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?",
                (db.clone(),),
            )
            .await
            .unwrap_or_default();
        let indexes: Vec<(String, String, u64, String)> = self
            .conn
            .exec(
                "SELECT TABLE_NAME, INDEX_NAME, NON_UNIQUE, COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
                (db.clone(),),
            )
            .await
            .context("reading the source's indexes")?;

        let mut schema = SourceSchema::default();
        self.encodings.clear();
        for (table, rows, bytes, auto_increment) in tables {
            let name = TableName::new(db.clone(), table.clone());
            if !self.filter.includes(&name.to_string()) {
                continue;
            }
            let mut key_columns: Vec<String> = Vec::new();
            let mut index_groups: Vec<(String, bool, Vec<String>)> = Vec::new();
            for (_, index, non_unique, column) in indexes.iter().filter(|i| i.0 == table) {
                if index == "PRIMARY" {
                    key_columns.push(column.clone());
                    continue;
                }
                match index_groups.last_mut() {
                    Some((name, _, columns)) if name == index => columns.push(column.clone()),
                    _ => index_groups.push((index.clone(), *non_unique == 0, vec![column.clone()])),
                }
            }
            let mut table_columns = Vec::new();
            let mut definitions = Vec::new();
            let mut encodings = Vec::new();
            for (_, column, data_type, column_type, precision, scale, datetime_precision, length, nullable, extra) in
                columns.iter().filter(|c| c.0 == table)
            {
                let is_json = checks.iter().any(|(t, clause)| {
                    t == &table && clause.replace('`', "").trim() == format!("json_valid({column})")
                });
                let mysql = MysqlColumn {
                    name: column.clone(),
                    data_type: data_type.to_lowercase(),
                    column_type: column_type.to_lowercase(),
                    numeric_precision: *precision,
                    numeric_scale: *scale,
                    datetime_precision: *datetime_precision,
                    character_maximum_length: *length,
                    is_json,
                };
                let mapping = map_column(&mysql).with_context(|| format!("table {name}"))?;
                let type_name = match mapping.enum_labels {
                    Some(labels) => {
                        let enum_name = TableName::new(db.clone(), format!("{table}_{column}"));
                        let qualified = crate::schema::quote_table(&enum_name);
                        schema.enums.push(EnumType { name: enum_name, labels });
                        qualified
                    }
                    None => mapping.target_type,
                };
                let auto = extra.contains("auto_increment");
                if auto {
                    schema.sequences.push(Sequence {
                        name: TableName::new(db.clone(), format!("{table}_{column}_seq")),
                        data_type: String::new(),
                        start: 1,
                        increment: 1,
                        min: 1,
                        max: i64::MAX,
                        cache: 1,
                        cycle: false,
                        last_value: auto_increment.and_then(|n| i64::try_from(n).ok()).map(|n| n - 1).filter(|&n| n > 0),
                        owned_by: Some((name.clone(), column.clone())),
                        identity: true,
                    });
                }
                table_columns.push(Column {
                    name: column.clone(),
                    type_name,
                    type_oid: 0,
                    is_key: key_columns.contains(column),
                    default: None,
                });
                definitions.push(ColumnDefinition { not_null: nullable == "NO", identity: auto.then_some('d') });
                encodings.push(mapping.encoding);
            }
            let list = |columns: &[String]| columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
            let qualified = crate::schema::quote_table(&name);
            let mut constraints = Vec::new();
            let mut index_sql = Vec::new();
            for (index, unique, columns) in &index_groups {
                // MySQL index names are per table; PostgreSQL's are per schema.
                let pg_name = format!("{table}_{index}");
                if *unique {
                    constraints.push((pg_name, format!("UNIQUE ({})", list(columns))));
                } else {
                    index_sql.push(format!("CREATE INDEX {} ON {qualified} ({})", quote_ident(&pg_name), list(columns)));
                }
            }
            let identity = if key_columns.is_empty() { Identity::Full } else { Identity::Key };
            self.encodings.insert(name.clone(), Arc::new(encodings));
            schema.tables.push(TableDefinition {
                schema: TableSchema { name: name.clone(), columns: table_columns, identity },
                columns: definitions,
                primary_key: (!key_columns.is_empty()).then(|| (format!("{table}_pkey"), format!("PRIMARY KEY ({})", list(&key_columns)))),
                constraints,
                foreign_keys: Vec::new(),
                indexes: index_sql,
                estimated_rows: rows.unwrap_or(0),
                pages: bytes.unwrap_or(0) / 8192,
                has_user_types: false,
            });
        }
        Ok(schema)
    }

    async fn create_stream(&mut self, _tables: &[TableDefinition]) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)> {
        let snapshot = self.new_snapshot().await?;
        let identity = PipelineIdentity {
            source: self.server_identity().await?,
            stream: "binlog".into(),
            consistent_point: snapshot.position.clone(),
        };
        Ok((identity, snapshot))
    }

    async fn resume_stream(&mut self, identity: &PipelineIdentity, _tables: &[TableDefinition]) -> anyhow::Result<()> {
        let source = self.server_identity().await?;
        if source != identity.source {
            anyhow::bail!(
                "this state dir belongs to {}, but the source is {source}: point [state] dir at this pipeline's own directory",
                identity.source
            );
        }
        Ok(())
    }

    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint> {
        let mut lock = self.params.connect().await?;
        lock.query_drop("FLUSH TABLES WITH READ LOCK").await.with_context(|| {
            format!("FLUSH TABLES WITH READ LOCK on {} (needs the RELOAD privilege)", self.params.endpoint)
        })?;
        let status: Option<mysql_async::Row> = lock
            .query_first("SHOW MASTER STATUS")
            .await
            .context("SHOW MASTER STATUS (needs REPLICATION CLIENT / BINLOG MONITOR)")?;
        let status = status.context("the source has no binary log: set log_bin = ON (log-bin in my.cnf) and restart it")?;
        let file: String = status.get(0).context("SHOW MASTER STATUS returned no file")?;
        let pos: u64 = status.get(1).context("SHOW MASTER STATUS returned no position")?;
        self.locked = Some(lock);
        Ok(SnapshotPoint { position: Position::Binlog { file, pos }, id: String::new(), untracked: HashMap::new() })
    }

    async fn snapshot_reader(&self, _snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>> {
        let mut conn = self.params.connect().await?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .context("opening a consistent-snapshot transaction on the source")?;
        Ok(Box::new(MysqlTableReader { conn: Arc::new(Mutex::new(conn)), encodings: self.encodings.clone() }))
    }

    async fn release_snapshot(&mut self) {
        if let Some(mut lock) = self.locked.take() {
            if let Err(e) = lock.query_drop("UNLOCK TABLES").await {
                tracing::warn!("UNLOCK TABLES failed ({e}); the lock ends with the connection");
            }
        }
    }

    fn chunks(&self, _table: &TableDefinition, _workers: usize) -> Vec<Chunk> {
        vec![Chunk::Whole]
    }

    async fn start_stream(
        &mut self,
        _from: &Position,
        _confirmed: watch::Receiver<Position>,
        _untracked_at_copy: &HashMap<String, i64>,
    ) -> anyhow::Result<Box<dyn ChangeStream>> {
        anyhow::bail!("binlog streaming from MySQL / MariaDB is not built yet: use [snapshot] mode = \"only\"")
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
    async fn read(&mut self, table: &TableDefinition, _chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        anyhow::ensure!(format == CopyFormat::PostgresText, "a MySQL source copies into PostgreSQL's text format only");
        let name = table.schema.name.clone();
        let encodings = self.encodings.get(&name).cloned().with_context(|| format!("no column mapping for {name}"))?;
        let columns: Vec<String> = table.schema.columns.iter().map(|c| format!("`{}`", c.name.replace('`', "``"))).collect();
        let sql = format!("SELECT {} FROM `{}`.`{}`", columns.join(", "), name.schema.replace('`', "``"), name.name.replace('`', "``"));
        let mut conn = self.conn.clone().lock_owned().await;
        let (tx, mut rx) = mpsc::channel::<anyhow::Result<Bytes>>(8);
        tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                let mut rows = conn.query_iter(sql).await.with_context(|| format!("reading {name} from the source"))?;
                let mut buffer = BytesMut::with_capacity(COPY_CHUNK);
                let mut line = Vec::new();
                while let Some(row) = rows.next().await.with_context(|| format!("reading {name} from the source"))? {
                    line.clear();
                    for (i, encoding) in encodings.iter().enumerate() {
                        if i > 0 {
                            line.push(b'\t');
                        }
                        let value = match row.as_ref(i) {
                            None | Some(mysql_async::Value::NULL) => None,
                            Some(mysql_async::Value::Bytes(bytes)) => encode(*encoding, bytes).map_err(|_| {
                                anyhow::anyhow!("table {name}, column {}: a value is not valid UTF-8", i + 1)
                            })?,
                            Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
                        };
                        push_copy_field(&mut line, value.as_deref());
                    }
                    line.push(b'\n');
                    buffer.extend_from_slice(&line);
                    if buffer.len() >= COPY_CHUNK && tx.send(Ok(buffer.split().freeze())).await.is_err() {
                        return Ok(());
                    }
                }
                if !buffer.is_empty() {
                    let _ = tx.send(Ok(buffer.freeze())).await;
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}
