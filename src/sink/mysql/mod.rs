//! MySQL / MariaDB as a target.
//!
//! Tables are created from the (PostgreSQL-dialect) definitions with
//! [`crate::schema::mysql_target`]'s mapping; a PostgreSQL schema `public` (and a
//! MySQL source's own database) lands in the target URL's database, any other
//! schema in a database of its name. Copies arrive as PostgreSQL text `COPY` and
//! are rewritten on the fly into `LOAD DATA LOCAL INFILE` rows; streamed changes
//! are applied with `INSERT … ON DUPLICATE KEY UPDATE` and deletes by key, in
//! transactions that record the source position in `cutover.progress` before
//! they commit: exactly once, as on PostgreSQL.
//!
//! `LOAD DATA LOCAL` turns data errors into warnings (the server cannot stop the
//! client mid-file), so every load checks its warnings and fails on any: a value
//! is never silently changed. DDL commits implicitly in MySQL, so an `ADD COLUMN`
//! from the stream is applied between target transactions, idempotently.
//!
//! Its parts: this module connects, checks what the user may do, creates and drops
//! tables, runs DDL and commits; [`apply`] turns batches into statements; [`copy`]
//! bulk-loads the snapshot and adds keys, indexes and foreign keys after the data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use mysql_async::prelude::Queryable;

mod apply;
mod copy;

use self::apply::TargetTable;
use self::copy::{column_list, foreign_key_clause, MysqlTableWriter};
use super::{InPlace, Sink, TableWriter, TargetColumn};
use crate::change::{Change, ExistingRows, SchemaOp, TableName, TableSchema, Value};
use crate::copy::{CopyFormat, SourceDialect};
use crate::finding::Finding;
use crate::myconn::MysqlParams;
use crate::position::Position;
use crate::schema::mysql_target::{map_type, mysql_expression, quote_ident};
use crate::schema::{SourceSchema, TableDefinition};

/// Session settings for every target connection: UTC, strict (a value that does
/// not fit is an error), explicit zeros kept in auto-increment columns.
const SESSION: &str = "SET time_zone = '+00:00', NAMES utf8mb4, \
     sql_mode = 'STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'";

/// Where each pipeline's applied position is recorded, in the same transactions as its rows.
const PROGRESS: &str = "`cutover`.`progress`";
/// Tables a committed transaction dropped (DDL cannot be part of it): written with the
/// transaction, dropped and deleted after its commit, and at the next connect after a
/// crash in between.
const DROPS: &str = "`cutover`.`pending_drops`";

/// Rows per multi-row `INSERT` while streaming.
const INSERT_BATCH: usize = 500;

/// A MySQL or MariaDB database as the target.
pub struct MysqlSink {
    params: MysqlParams,
    conn: mysql_async::Conn,
    pipeline: String,
    /// The source schema that lands in the URL's database besides `public`.
    home_schema: String,
    /// Target columns of the tables changes were applied to, by source table.
    tables: HashMap<TableName, Arc<TargetTable>>,
    open: bool,
    /// The open transaction holds writes (DDL would commit them without the progress row).
    written: bool,
    /// Which apply connection this is.
    lane: usize,
}

impl MysqlSink {
    /// Connects to the target; `home_schema` is the source schema that maps to the
    /// URL's database (PostgreSQL `public` always does).
    pub async fn connect(params: MysqlParams, pipeline: &str, home_schema: &str) -> anyhow::Result<MysqlSink> {
        // Every statement names its database: connect to the server, and create the
        // URL's database when it is missing.
        // Matched rows are counted: a row of a table without a key, updated to the values it
        // has, is still found (else it would read as drift).
        let params = params.server_only().counting_matched_rows();
        let mut conn = params.connect().await.context("[target]")?;
        conn.query_drop(SESSION).await.context("setting up the target session")?;
        conn.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4",
            quote_ident(&params.database)
        ))
        .await
        .with_context(|| format!("creating database {} on the target", params.database))?;
        // Created here, outside any transaction: MySQL DDL would commit an open one.
        for sql in [
            "CREATE DATABASE IF NOT EXISTS `cutover` CHARACTER SET utf8mb4".to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS {PROGRESS} (pipeline varchar(200) PRIMARY KEY, position text NOT NULL, \
                 commit_time datetime(6))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {DROPS} (pipeline varchar(200), db varchar(64), name varchar(64), \
                 PRIMARY KEY (pipeline, db, name))"
            ),
        ] {
            conn.query_drop(sql).await.context("creating cutover.progress on the target")?;
        }
        let mut sink = MysqlSink {
            params,
            conn,
            pipeline: format!("cutover_{pipeline}"),
            home_schema: home_schema.to_string(),
            tables: HashMap::new(),
            open: false,
            written: false,
            lane: 0,
        };
        sink.finish_drops().await?;
        Ok(sink)
    }

    /// As apply connection `lane`.
    pub fn on_lane(self, lane: usize) -> MysqlSink {
        MysqlSink { lane, ..self }
    }

    /// Drops the tables committed transactions dropped, and forgets them.
    async fn finish_drops(&mut self) -> anyhow::Result<()> {
        let pending: Vec<(String, String)> = self
            .conn
            .exec(format!("SELECT db, name FROM {DROPS} WHERE pipeline = ?"), (&self.pipeline,))
            .await
            .context("reading the tables to drop on the target")?;
        for (db, name) in pending {
            let qualified = format!("{}.{}", quote_ident(&db), quote_ident(&name));
            drop_table_unchecked(&mut self.conn, &qualified)
                .await
                .with_context(|| format!("dropping {qualified} on the target (the source dropped it)"))?;
            self.conn
                .exec_drop(
                    format!("DELETE FROM {DROPS} WHERE pipeline = ? AND db = ? AND name = ?"),
                    (&self.pipeline, &db, &name),
                )
                .await
                .context("forgetting a table dropped on the target")?;
        }
        Ok(())
    }

    fn database(&self, schema: &str) -> String {
        database_for(&self.params.database, &self.home_schema, schema)
    }

    fn qualified(&self, table: &TableName) -> String {
        format!("{}.{}", quote_ident(&self.database(&table.schema)), quote_ident(&table.name))
    }

    /// Adds those of `columns` (name, PostgreSQL type) the target table lacks; with the
    /// source's description of the table, first stops if it lacks a column the target has.
    async fn add_missing_columns(
        &mut self,
        table: &TableName,
        columns: &[(&str, &str)],
        described: Option<&TableSchema>,
    ) -> anyhow::Result<()> {
        let database = self.database(&table.schema);
        let existing = target_columns(&mut self.conn, &database, &table.name).await?;
        if let Some(described) = described {
            super::check_no_column_gone(described, &existing)?;
        }
        let missing: Vec<String> = columns
            .iter()
            .filter(|(name, _)| !existing.iter().any(|e| e.name == *name))
            .map(|(name, type_name)| format!("ADD COLUMN {} {}", quote_ident(name), map_type(type_name, None).0))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.tables.remove(table);
        self.run_ddl(&format!("ALTER TABLE {} {}", self.qualified(table), missing.join(", "))).await
    }

    /// Runs DDL, which commits in MySQL. An open transaction that holds writes would be
    /// committed without its progress row — possibly in the middle of a source transaction —
    /// and a crash then would apply those writes again (doubling rows of a table without a
    /// key). So it is rolled back first, the DDL runs on its own (what calls this makes it
    /// safe to repeat), and the pipeline resumes from its checkpoint: the replay finds the DDL
    /// done and applies the transactions around it in one target transaction.
    async fn run_ddl(&mut self, sql: &str) -> anyhow::Result<()> {
        let rolled_back = self.open && self.written;
        if rolled_back {
            self.conn.query_drop("ROLLBACK").await.context("rolling back the target transaction before DDL")?;
            self.open = false;
            self.written = false;
        }
        self.conn.query_drop(sql).await.with_context(|| format!("applying `{sql}` on the target"))?;
        crate::failpoint::hit("mysql-sink-after-ddl");
        if rolled_back {
            return Err(crate::retry::ResumeFromCheckpoint(format!(
                "applied `{sql}` on the target between transactions; the source transactions around it are applied \
                 again from the last checkpoint"
            ))
            .into());
        }
        if self.open {
            self.conn.query_drop("START TRANSACTION").await.context("reopening the target transaction")?;
        }
        Ok(())
    }
}

/// Source schema → target database.
pub fn database_for(url_database: &str, home_schema: &str, schema: &str) -> String {
    match schema == "public" || schema == home_schema {
        true => url_database.to_string(),
        false => schema.to_string(),
    }
}

/// Drops a table that foreign keys may reference, with the session's checks off for the
/// drop only: on again after it, also when it fails.
async fn drop_table_unchecked(conn: &mut mysql_async::Conn, qualified: &str) -> Result<(), mysql_async::Error> {
    let sql = format!("SET foreign_key_checks = 0; DROP TABLE IF EXISTS {qualified}; SET foreign_key_checks = 1");
    let result = conn.query_drop(sql).await;
    if result.is_err() {
        // Best effort: on a connection that is gone there is no session to restore.
        let _ = conn.query_drop("SET foreign_key_checks = 1").await;
    }
    result
}

/// A target table's columns, in their order (`DATA_TYPE` as the type).
async fn target_columns(
    conn: &mut mysql_async::Conn,
    database: &str,
    table: &str,
) -> anyhow::Result<Vec<TargetColumn>> {
    let rows: Vec<(String, String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, EXTRA FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .with_context(|| format!("reading the columns of {database}.{table} on the target"))?;
    Ok(rows
        .into_iter()
        .map(|(name, type_name, extra)| TargetColumn {
            name,
            type_name,
            generated: extra.to_ascii_uppercase().contains("GENERATED"),
            identity_always: false,
        })
        .collect())
}

/// `COLUMN_NAME` → `DATA_TYPE` of a target table.
async fn column_types(
    conn: &mut mysql_async::Conn,
    database: &str,
    table: &str,
) -> anyhow::Result<HashMap<String, String>> {
    Ok(target_columns(conn, database, table).await?.into_iter().map(|c| (c.name, c.type_name)).collect())
}

/// The enum labels a column's type names, if it is one of the schema's enum types.
fn enum_labels<'a>(schema: &'a SourceSchema, type_name: &str) -> Option<&'a [String]> {
    let bare = |s: &str| s.replace('"', "");
    schema
        .enums
        .iter()
        .find(|e| {
            let t = bare(type_name);
            t == format!("{}.{}", e.name.schema, e.name.name) || t == e.name.name
        })
        .map(|e| e.labels.as_slice())
}

/// `CREATE TABLE` for MySQL: mapped types, NOT NULL, the primary key. Columns in
/// a key or index get a type an index can hold (`varchar(255)` for text).
fn create_table(schema: &SourceSchema, table: &TableDefinition, qualified: &str) -> String {
    let mut indexed: Vec<String> = table.schema.columns.iter().filter(|c| c.is_key).map(|c| c.name.clone()).collect();
    for definition in table.constraints.iter().map(|(_, d)| d).chain(&table.indexes) {
        indexed.extend(column_list(definition).unwrap_or_default());
    }
    let key: Vec<String> = table.schema.columns.iter().filter(|c| c.is_key).map(|c| quote_ident(&c.name)).collect();
    let mut lines: Vec<String> = table
        .schema
        .columns
        .iter()
        .zip(&table.columns)
        .map(|(column, definition)| {
            let (mut mapped, _) = map_type(&column.type_name, enum_labels(schema, &column.type_name));
            // A MySQL source's SET stays a SET (its values load as comma lists), not JSON.
            if let Some(set) = definition.source_type.as_ref().filter(|t| t.starts_with("set(")) {
                mapped = set.clone();
            }
            if indexed.contains(&column.name) {
                mapped = match mapped.as_str() {
                    "longtext" => "varchar(255)".into(),
                    "longblob" => "varbinary(255)".into(),
                    _ => mapped,
                };
            }
            // An identity column, or a `serial` one (its sequence is owned by the column).
            let serial = schema.sequences.iter().any(|s| {
                s.owned_by.as_ref().is_some_and(|(owner, name)| owner == &table.schema.name && name == &column.name)
            });
            let auto = (definition.identity.is_some() || serial) && key.len() == 1 && column.is_key;
            format!(
                "{} {mapped}{}{}",
                quote_ident(&column.name),
                if definition.not_null || column.is_key { " NOT NULL" } else { "" },
                if auto { " AUTO_INCREMENT" } else { "" }
            )
        })
        .collect();
    // Generated columns whose expression MySQL reads the same, in their place; the plan
    // names the others, which are left out.
    for generated in &table.generated {
        if let Some(expression) = mysql_expression(&generated.expression, &table.column_names()) {
            let (mapped, _) = map_type(&generated.type_name, enum_labels(schema, &generated.type_name));
            let sql = format!("{} {mapped} GENERATED ALWAYS AS ({expression}) STORED", quote_ident(&generated.name));
            lines.insert(generated.position.min(lines.len()), sql);
        }
    }
    if !key.is_empty() {
        lines.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    format!("CREATE TABLE IF NOT EXISTS {qualified} (\n  {}\n) DEFAULT CHARSET = utf8mb4", lines.join(",\n  "))
}

#[async_trait]
impl Sink for MysqlSink {
    fn copy_format(&self, _table: &TableDefinition, _source: SourceDialect) -> CopyFormat {
        CopyFormat::PostgresText
    }

    async fn preflight(
        &mut self,
        schema: &SourceSchema,
        copy_bytes: u64,
        _apply_connections: usize,
    ) -> anyhow::Result<Vec<Finding>> {
        let mut findings = Vec::new();
        // What MySQL's types cannot hold, column by column (the plan shows PostgreSQL's types).
        for table in &schema.tables {
            for column in &table.schema.columns {
                let (mapped, loss) = map_type(&column.type_name, enum_labels(schema, &column.type_name));
                if let Some(loss) = loss {
                    findings.push(Finding::warning(
                        "target",
                        format!("{}.{} {} → MySQL {mapped}", table.schema.name, column.name, column.type_name),
                        "a MySQL type that holds every value",
                        format!("{loss}; check the values, or change the column's type on the source"),
                    ));
                }
            }
        }
        let local_infile: Option<String> =
            self.conn.query_first("SELECT CAST(@@local_infile AS CHAR)").await.context("reading local_infile")?;
        if !matches!(local_infile.as_deref(), Some("1" | "ON")) {
            findings.push(Finding::error(
                "target",
                format!("local_infile = {}", local_infile.unwrap_or_default()),
                "ON (cutover bulk-loads with LOAD DATA LOCAL INFILE)",
                "SET GLOBAL local_infile = ON; and local_infile = ON under [mysqld] in my.cnf".into(),
            ));
        }
        let grants: Vec<String> = self.conn.query("SHOW GRANTS").await.context("SHOW GRANTS on the target")?;
        let grants = grants.join("\n").to_uppercase();
        if !grants.contains("ALL PRIVILEGES") {
            for privilege in ["CREATE", "INSERT", "UPDATE", "DELETE", "ALTER", "INDEX", "REFERENCES"] {
                if !grants.contains(privilege) {
                    let user: Option<String> = self.conn.query_first("SELECT CURRENT_USER()").await?;
                    findings.push(Finding::error(
                        "target",
                        format!("user {} lacks {privilege}", user.unwrap_or_default()),
                        privilege,
                        format!("GRANT {privilege} ON *.* TO the target user;"),
                    ));
                }
            }
        }
        if copy_bytes > 0 {
            findings.push(Finding::warning(
                "target",
                "free disk space cannot be read through MySQL".into(),
                &format!(
                    "about {} free for the snapshot (tables, indexes, redo and binlog)",
                    crate::finding::human_bytes(copy_bytes.saturating_mul(2))
                ),
                "check the free space on the target's datadir volume by hand".into(),
            ));
        }
        Ok(findings)
    }

    async fn applied_position(&mut self) -> anyhow::Result<Option<Position>> {
        // Every apply connection's record: the highest is where the target stands (they commit in source order).
        let records = crate::sink::lane_records(&self.pipeline);
        let sql =
            format!("SELECT position FROM {PROGRESS} WHERE pipeline IN ({})", vec!["?"; records.len()].join(", "));
        match self.conn.exec::<String, _, _>(&sql, records).await {
            Ok(positions) => {
                let mut highest = None;
                for text in positions {
                    let position: Position =
                        text.parse().context("cutover.progress on the target holds a position cutover cannot read")?;
                    highest = highest.max(Some(position));
                }
                Ok(highest)
            }
            // 1146: no such table — nothing was applied yet.
            Err(mysql_async::Error::Server(e)) if e.code == 1146 => Ok(None),
            Err(e) => Err(e).context("reading cutover.progress on the target"),
        }
    }

    async fn create_tables(
        &mut self,
        schema: &SourceSchema,
        tables: &[&TableDefinition],
        fresh: bool,
    ) -> anyhow::Result<()> {
        for table in tables {
            let database = self.database(&table.schema.name.schema);
            self.conn
                .query_drop(format!("CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4", quote_ident(&database)))
                .await
                .with_context(|| format!("creating database {database} on the target"))?;
            let qualified = self.qualified(&table.schema.name);
            if fresh {
                let has_rows: Option<u8> =
                    match self.conn.query_first(format!("SELECT 1 FROM {qualified} LIMIT 1")).await {
                        Ok(row) => row,
                        Err(mysql_async::Error::Server(e)) if e.code == 1146 => None,
                        Err(e) => return Err(e).with_context(|| format!("looking into {qualified} on the target")),
                    };
                if has_rows.is_some() {
                    anyhow::bail!(
                        "table {qualified} already holds rows on the target, and cutover never overwrites data it did not \
                         write: empty or drop it, or set [snapshot] mode = \"never\" if the target already has the data"
                    );
                }
            }
            // Copied again (a restart in the middle of the snapshot, `cutover resync`) with other
            // columns than the source has now (one dropped or renamed there): created again.
            if !fresh {
                let mut columns: Vec<String> = target_columns(&mut self.conn, &database, &table.schema.name.name)
                    .await?
                    .into_iter()
                    .filter(|c| !c.generated)
                    .map(|c| c.name)
                    .collect();
                columns.sort();
                let mut wanted: Vec<String> = table.schema.columns.iter().map(|c| c.name.clone()).collect();
                wanted.sort();
                if !columns.is_empty() && columns != wanted {
                    tracing::warn!(table = %table.schema.name, "the target's table has other columns than the source's: dropped and created again");
                    // A foreign key that references it is not checked again when it is back.
                    drop_table_unchecked(&mut self.conn, &qualified)
                        .await
                        .with_context(|| format!("dropping {qualified} on the target to create it again"))?;
                }
            }
            let sql = create_table(schema, table, &qualified);
            self.conn.query_drop(&sql).await.with_context(|| format!("creating {qualified} on the target: {sql}"))?;
        }
        Ok(())
    }

    async fn table_writer(&self) -> anyhow::Result<Box<dyn TableWriter>> {
        let mut conn = self.params.connect().await.context("[target]")?;
        // Checks the load would repeat row by row; the keys are built after the data.
        conn.query_drop(format!("{SESSION}, foreign_key_checks = 0, unique_checks = 0"))
            .await
            .context("setting up a target copy session")?;
        Ok(Box::new(MysqlTableWriter {
            conn,
            url_database: self.params.database.clone(),
            home_schema: self.home_schema.clone(),
        }))
    }

    async fn finish_snapshot(&mut self, schema: &SourceSchema) -> anyhow::Result<()> {
        for table in &schema.tables {
            let qualified = self.qualified(&table.schema.name);
            let (url, home) = (self.params.database.clone(), self.home_schema.clone());
            for (name, definition) in &table.foreign_keys {
                let Some(clause) = foreign_key_clause(name, definition, |s| database_for(&url, &home, s)) else {
                    tracing::warn!(table = %table.schema.name, definition, "foreign key not recreated on MySQL");
                    continue;
                };
                let exists: Option<u8> = self
                    .conn
                    .exec_first(
                        "SELECT 1 FROM information_schema.TABLE_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ? \
                         AND CONSTRAINT_NAME = ?",
                        (self.database(&table.schema.name.schema), &table.schema.name.name, name),
                    )
                    .await
                    .context("reading foreign keys on the target")?;
                if exists.is_none() {
                    let sql = format!("ALTER TABLE {qualified} {clause}");
                    self.conn
                        .query_drop(&sql)
                        .await
                        .with_context(|| format!("adding a foreign key on the target: {sql}"))?;
                }
            }
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
        self.finish_drops().await?;
        let records = crate::sink::lane_records(&self.pipeline);
        let sql = format!("DELETE FROM {PROGRESS} WHERE pipeline IN ({})", vec!["?"; records.len()].join(", "));
        match self.conn.exec_drop(&sql, records).await {
            Ok(()) => Ok(vec![format!("target: cutover.progress rows of {}", self.pipeline)]),
            Err(mysql_async::Error::Server(e)) if e.code == 1146 => Ok(Vec::new()),
            Err(e) => Err(e).context("cleaning cutover.progress on the target"),
        }
    }

    async fn drop_tables(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
        for table in tables {
            let qualified = self.qualified(table);
            drop_table_unchecked(&mut self.conn, &qualified)
                .await
                .with_context(|| format!("dropping {qualified} on the target"))?;
        }
        Ok(())
    }

    async fn missing_tables(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        let mut missing = Vec::new();
        for table in tables {
            let found: Option<u8> = self
                .conn
                .exec_first(
                    "SELECT 1 FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                    (self.database(&table.schema), &table.name),
                )
                .await
                .with_context(|| format!("looking for {table} on the target"))?;
            if found.is_none() {
                missing.push(table.clone());
            }
        }
        Ok(missing)
    }

    fn in_place(&self) -> InPlace {
        Box::new(|op| match op {
            SchemaOp::DropTable | SchemaOp::CreatePartition { .. } => true,
            SchemaOp::AddColumn { existing, .. } => *existing == ExistingRows::Null,
            // Left out: the target is only less strict than the source (a plain index it
            // keeps where the source dropped one refuses no row), or names differ.
            SchemaOp::SetDefault { .. }
            | SchemaOp::SetNotNull { not_null: true, .. }
            | SchemaOp::CreateIndex { .. }
            | SchemaOp::DropIndex { .. }
            | SchemaOp::RenameIndex { .. }
            | SchemaOp::AddConstraint { .. }
            | SchemaOp::RenameConstraint { .. } => true,
            // A key or a NOT NULL the target kept where the source dropped it would merge or
            // refuse rows; a column changed changes rows: copied again.
            _ => false,
        })
    }

    fn forget_tables(&mut self, tables: &[TableName]) {
        for table in tables {
            self.tables.remove(table);
        }
    }

    async fn bound_lock_waits(&mut self, bounded: bool) -> anyhow::Result<()> {
        let sql = match bounded {
            true => format!("SET SESSION innodb_lock_wait_timeout = {}", super::LOCK_WAIT_BOUND_SECONDS),
            false => "SET SESSION innodb_lock_wait_timeout = DEFAULT".to_string(),
        };
        self.conn.query_drop(&sql).await.with_context(|| format!("{sql} on the target"))
    }

    async fn begin(&mut self) -> anyhow::Result<()> {
        self.conn.query_drop("START TRANSACTION").await.context("opening a target transaction")?;
        self.open = true;
        self.written = false;
        Ok(())
    }

    async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
        let mut i = 0;
        while i < changes.len() {
            // Runs of inserts into one table go as multi-row statements.
            if let Change::Insert { table, .. } = &changes[i] {
                let run: Vec<&[Value]> = changes[i..]
                    .iter()
                    .take(INSERT_BATCH)
                    .map_while(|c| match c {
                        Change::Insert { table: t, row } if Arc::ptr_eq(t, table) || **t == **table => {
                            Some(row.as_slice())
                        }
                        _ => None,
                    })
                    .collect();
                let table = table.clone();
                self.written = true;
                self.upsert(&table, &run).await?;
                i += run.len();
                continue;
            }
            if !matches!(changes[i], Change::Relation(_) | Change::Schema(_)) {
                self.written = true;
            }
            self.apply_one(&changes[i]).await?;
            i += 1;
        }
        Ok(())
    }

    async fn commit(&mut self, position: &Position, commit_time: SystemTime) -> anyhow::Result<()> {
        let seconds = commit_time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.conn
            .exec_drop(
                format!(
                    "INSERT INTO {PROGRESS} (pipeline, position, commit_time) \
                     VALUES (?, ?, FROM_UNIXTIME(?)) ON DUPLICATE KEY UPDATE position = VALUES(position), \
                     commit_time = VALUES(commit_time)"
                ),
                (crate::sink::lane_record(&self.pipeline, self.lane), position.to_string(), seconds),
            )
            .await
            .context("recording the applied position on the target")?;
        self.conn.query_drop("COMMIT").await.context("committing on the target")?;
        self.open = false;
        self.written = false;
        crate::failpoint::hit("mysql-sink-before-drops");
        self.finish_drops().await
    }
}
