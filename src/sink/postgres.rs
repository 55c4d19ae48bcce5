//! PostgreSQL sink.
//!
//! Why replay is safe and nothing doubles: every target transaction ends on a
//! source transaction boundary and records the source position it reaches with
//! `pg_replication_origin_xact_setup`, as PostgreSQL's own subscriber does. The
//! origin's progress commits atomically with the rows, so after a crash the
//! target itself says which transactions it has, and the pipeline resumes after
//! them — even for tables without a key, where an upsert could not absorb a replay.
//!
//! Changes are applied as multi-row statements over `unnest` of text arrays
//! (one prepared statement per table and shape, any batch size); values travel
//! in PostgreSQL's text form and are cast to the column type on the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::{Sink, TableWriter};
use crate::change::{Change, Identity, TableName, TableSchema, Value};
use crate::config::Partitions;
use crate::copy::{CopyFormat, CopyStream, SourceDialect};
use crate::finding::Finding;
use crate::pgconn::ConnectParams;
use crate::position::{Lsn, Position};
use crate::schema::postgres::{self as ddl, PostDataObject};
use crate::schema::{quote_ident, quote_literal, quote_table, SourceSchema, TableDefinition};

/// A PostgreSQL database as the target.
pub struct PostgresSink {
    params: ConnectParams,
    client: Client,
    origin: String,
    major: u32,
    statements: HashMap<String, Statement>,
    /// Target columns per table, to notice columns added on the source.
    /// Each table's columns on the target: (name, type as `format_type` prints it).
    columns: HashMap<TableName, Vec<(String, String)>>,
    /// The apply session is bound to the origin.
    session_ready: bool,
    /// What partitioned tables become here.
    partitions: Partitions,
    /// What the target role may do beyond writing its tables.
    powers: Powers,
}

/// What the target role may do beyond writing its own tables; a managed service's
/// role (RDS, Cloud SQL, Azure, Supabase, Neon) is no superuser.
#[derive(Clone, Copy, Debug)]
struct Powers {
    /// Superuser, or EXECUTE on the `pg_replication_origin_*` functions: the position is
    /// recorded in the replication origin; else in `cutover.progress`, in the same
    /// transaction as the rows either way.
    origins: bool,
    /// Superuser, or (PostgreSQL 15+) `GRANT SET ON PARAMETER session_replication_role`:
    /// triggers and foreign keys rest while changes are applied; else foreign keys are
    /// created DEFERRABLE and deferred to the end of each target transaction, which ends
    /// on a source transaction boundary, where the source had them satisfied.
    replica_role: bool,
}

/// The replication origin functions the sink calls, as `has_function_privilege` names them.
const ORIGIN_FUNCTIONS: [&str; 5] = [
    "pg_replication_origin_create(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_progress(text, boolean)",
    "pg_replication_origin_drop(text)",
];

impl Powers {
    async fn read(client: &Client, major: u32) -> anyhow::Result<Powers> {
        let origins = ORIGIN_FUNCTIONS.map(|f| format!("has_function_privilege('{f}', 'EXECUTE')")).join(" AND ");
        let replica_role = match major >= 15 {
            true => "has_parameter_privilege('session_replication_role', 'SET')",
            false => "false",
        };
        let row = client
            .query_one(
                &format!("SELECT {origins}, rolsuper OR {replica_role} FROM pg_roles WHERE rolname = current_user"),
                &[],
            )
            .await
            .context("reading what the target role may do")?;
        Ok(Powers { origins: row.get(0), replica_role: row.get(1) })
    }
}

impl PostgresSink {
    /// Free space on the volume of the target's data directory against what the
    /// snapshot will write: the tables' size, and about as much again for indexes and WAL.
    async fn free_space_finding(&mut self, copy_bytes: u64) -> Option<Finding> {
        use crate::finding::human_bytes;
        let need = human_bytes(copy_bytes);
        match self.free_bytes().await {
            Ok(free) if free < copy_bytes => Some(Finding::error(
                "target",
                format!("{} free on the volume of the target's data directory", human_bytes(free)),
                &format!("at least {need} for the source tables, about twice that with indexes and WAL"),
                "free or grow that volume, or copy fewer tables ([source] tables / exclude)".into(),
            )),
            Ok(free) if free < copy_bytes.saturating_mul(2) => Some(Finding::warning(
                "target",
                format!("{} free on the volume of the target's data directory", human_bytes(free)),
                &format!(
                    "about {} (the source tables take {need}; indexes and WAL need room too)",
                    human_bytes(copy_bytes.saturating_mul(2))
                ),
                "watch the target's disk during the snapshot, or grow the volume first".into(),
            )),
            Ok(_) => None,
            Err(e) => Some(Finding::warning(
                "target",
                format!("free disk space unknown ({e:#})"),
                &format!("about {} free for the snapshot", human_bytes(copy_bytes.saturating_mul(2))),
                "check the free space on the target's data directory volume by hand".into(),
            )),
        }
    }

    /// Bytes free on the data directory's volume, read with `df` through
    /// `COPY FROM PROGRAM` (superuser; a managed service may not allow it).
    async fn free_bytes(&mut self) -> anyhow::Result<u64> {
        let dir: String = self
            .client
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .context("reading data_directory")?
            .get(0);
        let program = format!("df -Pk -- '{}'", dir.replace('\'', "'\\''"));
        let transaction = self.client.transaction().await.context("opening a transaction")?;
        transaction
            .batch_execute(&format!(
                "CREATE TEMP TABLE cutover_df (line text) ON COMMIT DROP; COPY cutover_df FROM PROGRAM {}",
                quote_literal(&program)
            ))
            .await
            .context("running df on the target server")?;
        let lines = transaction.query("SELECT line FROM cutover_df", &[]).await.context("reading df's output")?;
        let available = lines
            .get(1)
            .and_then(|row| row.get::<_, Option<String>>(0))
            .and_then(|line| line.split_whitespace().nth(3).and_then(|kb| kb.parse::<u64>().ok()))
            .context("df printed no free space")?;
        transaction.rollback().await.context("closing the transaction")?;
        Ok(available.saturating_mul(1024))
    }

    pub async fn connect(
        params: ConnectParams,
        pipeline: &str,
        partitions: Partitions,
    ) -> anyhow::Result<PostgresSink> {
        let client = params.connect().await?;
        // After a switchover the old source is read-only by default for every session;
        // the fallback stream applying into it lifts that for itself only.
        client
            .batch_execute("SET default_transaction_read_only = off")
            .await
            .context("setting up the target session")?;
        let major = crate::pgconn::server_major(&client, "target").await?;
        let origin = format!("cutover_{pipeline}");
        let powers = Powers::read(&client, major).await?;
        let sink = PostgresSink {
            major,
            params,
            client,
            origin,
            statements: HashMap::new(),
            columns: HashMap::new(),
            session_ready: false,
            partitions,
            powers,
        };
        Ok(sink)
    }

    /// Before the first apply: binds this session to the replication origin (created if
    /// needed) and, as PostgreSQL's own subscriber does, turns off triggers and
    /// foreign-key checks (the source checked them), which also lets a batch group its
    /// changes by table — each as far as the role may ([`Powers`]).
    async fn prepare_session(&mut self) -> anyhow::Result<()> {
        if self.session_ready {
            return Ok(());
        }
        if self.powers.origins {
            self.setup_origin().await?;
        }
        if self.powers.replica_role {
            self.client
                .batch_execute("SET session_replication_role = replica")
                .await
                .context("setting session_replication_role = replica on the target")?;
        }
        self.session_ready = true;
        Ok(())
    }

    /// Creates the replication origin if needed and binds this session to it.
    async fn setup_origin(&self) -> anyhow::Result<()> {
        let needs_grant = "(needs superuser, or GRANT EXECUTE on the pg_replication_origin_* functions)";
        self.client
            .execute(
                "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
                &[&self.origin],
            )
            .await
            .with_context(|| format!("creating replication origin {} on the target {needs_grant}", self.origin))?;
        // A killed predecessor's session may hold the origin until its backend notices.
        let mut attempts = 0;
        loop {
            match self.client.execute("SELECT pg_replication_origin_session_setup($1)", &[&self.origin]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempts < 50 && e.code().map(|c| c.code()) == Some("55006") => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "binding to replication origin {} on the target {needs_grant}; \
                         is another cutover running this pipeline?",
                        self.origin
                    )))
                }
            }
        }
    }

    async fn statement(&mut self, sql: &str, params: usize) -> anyhow::Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT_ARRAY; params];
        let statement =
            self.client.prepare_typed(sql, &types).await.with_context(|| format!("preparing on the target: {sql}"))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Stops at a description of the table that lacks a column the target holds data in
    /// ([`super::check_no_column_gone`]).
    async fn check_relation(&mut self, table: &TableSchema) -> anyhow::Result<()> {
        let target: Vec<String> = self
            .client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 \
                 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&quote_table(&table.name)],
            )
            .await
            .with_context(|| format!("reading the columns of {} on the target", table.name))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        super::check_no_column_gone(table, &target)
    }

    async fn ensure_columns(&mut self, table: &TableSchema) -> anyhow::Result<()> {
        if !self.columns.contains_key(&table.name) {
            let existing: Vec<(String, String)> = self
                .client
                .query(
                    "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                     WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                    &[&quote_table(&table.name)],
                )
                .await
                .with_context(|| format!("reading the columns of {} on the target", table.name))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            self.columns.insert(table.name.clone(), existing);
        }
        let known = self.columns.get(&table.name).cloned().unwrap_or_default();
        // A source without a fixed schema (MongoDB) widens a column whose values disagree in type to jsonb.
        for (name, _) in known.iter().filter(|(name, known_type)| {
            known_type != "jsonb" && table.columns.iter().any(|c| &c.name == name && c.type_name == "jsonb")
        }) {
            let sql = format!(
                "ALTER TABLE {} ALTER COLUMN {column} TYPE jsonb USING to_jsonb({column})",
                quote_table(&table.name),
                column = quote_ident(name)
            );
            self.client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("changing column {name} of {} to jsonb on the target", table.name))?;
            tracing::info!(table = %table.name, column = %name, "changed a column to jsonb: the source's values differ in type");
            if let Some(entry) = self.columns.get_mut(&table.name).and_then(|c| c.iter_mut().find(|(n, _)| n == name)) {
                entry.1 = "jsonb".into();
            }
        }
        for column in table.columns.iter().filter(|c| !known.iter().any(|(name, _)| name == &c.name)) {
            let default = column.default.as_ref().map(|d| format!(" DEFAULT {d}")).unwrap_or_default();
            let sql = format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}{default}",
                quote_table(&table.name),
                quote_ident(&column.name),
                column.type_name
            );
            self.client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("adding column {} to {} on the target", column.name, table.name))?;
            tracing::info!(table = %table.name, column = %column.name, "added a column the source added");
            self.columns.entry(table.name.clone()).or_default().push((column.name.clone(), column.type_name.clone()));
        }
        Ok(())
    }

    async fn execute_arrays(
        &mut self,
        sql: &str,
        params: &[Vec<Option<String>>],
        table: &TableName,
    ) -> anyhow::Result<()> {
        let statement = self.statement(sql, params.len()).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = params.first().map_or(0, Vec::len);
        self.client.execute(&statement, &refs).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("applying {rows} row(s) to {table} on the target (statement: {sql})"))
        })?;
        Ok(())
    }

    async fn flush(&mut self, run: Option<Run>) -> anyhow::Result<()> {
        let Some(run) = run else { return Ok(()) };
        if run.deletes.first().is_some_and(|d| !d.is_empty()) {
            self.execute_arrays(&run.delete_sql, &run.deletes, &run.table).await?;
        }
        if !run.live.iter().any(|&live| live) {
            return Ok(());
        }
        let params: Vec<Vec<Option<String>>> = if run.live.iter().all(|&live| live) {
            run.params
        } else {
            run.params
                .into_iter()
                .map(|column| column.into_iter().zip(&run.live).filter(|(_, &live)| live).map(|(v, _)| v).collect())
                .collect()
        };
        self.execute_arrays(&run.sql, &params, &run.table).await
    }

    /// Applies changes in the given order; `compact` lets a table's upserts and
    /// deletes merge into one run (see [`Run`]).
    async fn apply_in_order(&mut self, changes: &[&Change], compact: bool) -> anyhow::Result<()> {
        let mut run: Option<Run> = None;
        for &change in changes {
            let (kind, table, columns, key, new_key, values): Planned<'_> = match change {
                Change::Relation(table) => {
                    self.flush(run.take()).await?;
                    self.check_relation(table).await?;
                    self.ensure_columns(table).await?;
                    continue;
                }
                Change::Truncate { tables, cascade, restart_identity } => {
                    self.flush(run.take()).await?;
                    let names: Vec<String> = tables.iter().map(|t| quote_table(&t.name)).collect();
                    let sql = format!(
                        "TRUNCATE {}{}{}",
                        names.join(", "),
                        if *restart_identity { " RESTART IDENTITY" } else { "" },
                        if *cascade { " CASCADE" } else { "" }
                    );
                    self.client.batch_execute(&sql).await.with_context(|| format!("applying {sql} on the target"))?;
                    continue;
                }
                Change::Insert { table, row } => {
                    let all: Vec<usize> = (0..row.len()).collect();
                    let kind = if table.identity == Identity::Key { RunKind::Upsert } else { RunKind::Insert };
                    let key = table.key_indexes().iter().map(|&i| text_of(&row[i])).collect();
                    (kind, table, all, key, None, row.iter().map(text_of).collect())
                }
                Change::Update { table, old, new } => {
                    if table.identity != Identity::Key {
                        self.flush(run.take()).await?;
                        let old = old.as_deref().with_context(|| {
                            format!(
                                "an UPDATE of {} came without its old row; the table needs REPLICA IDENTITY FULL",
                                table.name
                            )
                        })?;
                        self.apply_by_full_row(table, old, Some(new)).await?;
                        continue;
                    }
                    let key_indexes = table.key_indexes();
                    let new_key: Vec<Option<String>> = key_indexes.iter().map(|&i| text_of(&new[i])).collect();
                    let old_key: Vec<Option<String>> = match old {
                        Some(old) => key_indexes.iter().map(|&i| text_of(&old[i])).collect(),
                        None => new_key.clone(),
                    };
                    let partial = new.contains(&Value::Unchanged);
                    if !partial && old_key == new_key {
                        let values = new.iter().map(text_of).collect();
                        (RunKind::Upsert, table, (0..new.len()).collect(), new_key, None, values)
                    } else {
                        let present: Vec<usize> = (0..new.len()).filter(|&i| new[i] != Value::Unchanged).collect();
                        let mut values: Vec<Option<String>> = present.iter().map(|&i| text_of(&new[i])).collect();
                        values.extend(old_key.iter().cloned());
                        let moved_to = (old_key != new_key).then_some(new_key);
                        (RunKind::Update, table, present, old_key, moved_to, values)
                    }
                }
                Change::Delete { table, old } => {
                    if table.identity != Identity::Key {
                        self.flush(run.take()).await?;
                        self.apply_by_full_row(table, old, None).await?;
                        continue;
                    }
                    let key: Vec<Option<String>> = table.key_indexes().iter().map(|&i| text_of(&old[i])).collect();
                    if compact {
                        let all: Vec<usize> = (0..table.columns.len()).collect();
                        if !run.as_ref().is_some_and(|r| r.fits(RunKind::Upsert, table, &all, &key, None)) {
                            self.flush(run.take()).await?;
                        }
                        run.get_or_insert_with(|| Run::new(RunKind::Upsert, table, all, true)).delete(key);
                        continue;
                    }
                    (RunKind::Delete, table, Vec::new(), key.clone(), None, key)
                }
            };
            if !run.as_ref().is_some_and(|r| r.fits(kind, table, &columns, &key, new_key.as_ref())) {
                self.flush(run.take()).await?;
                run = Some(Run::new(kind, table, columns, compact));
            }
            if let Some(run) = run.as_mut() {
                run.push(values.into_iter(), key, new_key);
            }
        }
        self.flush(run).await
    }

    /// Updates or deletes one row matched on all its old values (no key).
    async fn apply_by_full_row(
        &mut self,
        table: &TableSchema,
        old: &[Value],
        new: Option<&[Value]>,
    ) -> anyhow::Result<()> {
        let mut params: Vec<Option<String>> = Vec::new();
        let mut predicates = Vec::new();
        for (column, value) in table.columns.iter().zip(old) {
            let name = quote_ident(&column.name);
            match value {
                Value::Unchanged => continue,
                Value::Null => predicates.push(format!("{name} IS NULL")),
                Value::Text(text) => {
                    params.push(Some(text.clone()));
                    // Compared as values of the column's type (so `…00:00.000000` finds
                    // `…00:00`); types without equality are compared as text.
                    predicates.push(if has_no_equality(&column.type_name) {
                        format!("{name}::text = ${}", params.len())
                    } else {
                        format!("{name} = ${}::{}", params.len(), column.type_name)
                    });
                }
            }
        }
        let qualified = quote_table(&table.name);
        // A row of a partitioned table is named by its partition and its ctid (a ctid is
        // only unique within one partition); still a TID scan.
        let locate = format!(
            "(tableoid, ctid) = (SELECT tableoid, ctid FROM {qualified} WHERE {} LIMIT 1)",
            predicates.join(" AND ")
        );
        let sql = match new {
            None => format!("DELETE FROM {qualified} WHERE {locate}"),
            Some(new) => {
                let mut sets = Vec::new();
                for (column, value) in table.columns.iter().zip(new) {
                    if *value == Value::Unchanged {
                        continue;
                    }
                    params.push(text_of(value));
                    sets.push(format!("{} = ${}::{}", quote_ident(&column.name), params.len(), column.type_name));
                }
                format!("UPDATE {qualified} SET {} WHERE {locate}", sets.join(", "))
            }
        };
        let types = vec![Type::TEXT; params.len()];
        let statement = self.client.prepare_typed(&sql, &types).await.with_context(|| format!("preparing {sql}"))?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let touched = self
            .client
            .execute(&statement, &refs)
            .await
            .with_context(|| format!("applying a change to {} on the target", table.name))?;
        if touched == 0 {
            // Replays cannot cause this (the target records what it applied), so the
            // target has drifted from the source: stop rather than drift further.
            anyhow::bail!(
                "a row of {} to {} by its old values is not on the target, so the target differs from the source; \
                 cutover stopped at its last checkpoint. Compare the table (cutover verify) and copy it again",
                table.name,
                if new.is_some() { "update" } else { "delete" }
            );
        }
        Ok(())
    }
}

/// Types PostgreSQL has no `=` for.
fn has_no_equality(type_name: &str) -> bool {
    let base = type_name.split('(').next().unwrap_or(type_name).trim_end_matches("[]");
    matches!(base, "json" | "xml" | "point" | "line" | "lseg" | "box" | "path" | "polygon" | "circle")
        || type_name.ends_with("json[]")
}

/// A key's column values as text.
type Key = Vec<Option<String>>;

/// One change as a run sees it: kind, table, columns written, the key of the row it
/// matches, the key an update moves that row to, parameter values.
type Planned<'a> = (RunKind, &'a Arc<TableSchema>, Vec<usize>, Key, Option<Key>, Vec<Option<String>>);

/// Whether an apply error is PostgreSQL's unique_violation.
fn is_unique_violation(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .any(|e| e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Text(text) => Some(text.clone()),
        Value::Null | Value::Unchanged => None,
    }
}

/// What a run of changes does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RunKind {
    /// Insert, or update of the whole row: `INSERT … ON CONFLICT (key) DO UPDATE`.
    Upsert,
    /// Plain insert (table without key).
    Insert,
    /// Update of some columns (unchanged TOAST left out) or of the key, by the old key.
    Update,
    Delete,
}

/// Consecutive changes of one shape, gathered into one statement's arrays.
///
/// Compacting (the default), an `Upsert` run of a table with a key also takes
/// that table's deletes: a later whole-row image of a key replaces the earlier
/// one, a delete drops the key's pending row, and at flush the deletes run
/// before the upserts. Each key ends as its last change left it.
struct Run {
    kind: RunKind,
    table: TableName,
    /// The columns written (for `Update`: the ones present), by index.
    columns: Vec<usize>,
    sql: String,
    params: Vec<Vec<Option<String>>>,
    /// Row index of each key in the arrays; for `Update`, also the keys rows move to.
    keys: HashMap<Key, usize>,
    /// Rows still to write (an `Upsert` row dropped by a later delete is not).
    live: Vec<bool>,
    /// Key columns of the rows an `Upsert` run deletes first, one array per key column.
    deletes: Vec<Vec<Option<String>>>,
    delete_sql: String,
    /// Whether a repeated key collapses into one row (else it starts a new run).
    compact: bool,
}

impl Run {
    fn new(kind: RunKind, table: &TableSchema, columns: Vec<usize>, compact: bool) -> Run {
        let key = table.key_indexes();
        let sql = run_sql(kind, table, &columns, &key);
        let params = match kind {
            RunKind::Upsert | RunKind::Insert => columns.len(),
            RunKind::Update => columns.len() + key.len(),
            RunKind::Delete => key.len(),
        };
        Run {
            kind,
            table: table.name.clone(),
            columns,
            sql,
            params: vec![Vec::new(); params],
            keys: HashMap::new(),
            live: Vec::new(),
            deletes: vec![Vec::new(); key.len()],
            delete_sql: run_sql(RunKind::Delete, table, &[], &key),
            compact,
        }
    }

    fn fits(&self, kind: RunKind, table: &TableSchema, columns: &[usize], key: &Key, moved_to: Option<&Key>) -> bool {
        self.kind == kind
            && self.table == table.name
            && self.columns == columns
            // One statement sees the table as it was before the statement: an UPDATE … FROM
            // row matching a key that an earlier row of the run moved there (1 → 2, 2 → 3),
            // or moving a row onto a key the run has yet to move away, would not see the
            // earlier row's effect. So every key, old or new, appears once per `Update` run.
            // INSERT … ON CONFLICT may touch a row once per statement unless the run
            // collapses repeated keys; deletes may repeat.
            && match kind {
                // UPDATE … FROM visits its rows in whatever order the join gives, and each row's
                // unique checks see the rows updated before it: in source order (not compacting),
                // an update is a statement of its own, so a secondary unique value moved from row
                // to row (through NULL) is never taken before it is free.
                RunKind::Update => {
                    (self.compact || self.live.is_empty())
                        && !self.keys.contains_key(key)
                        && moved_to.is_none_or(|to| !self.keys.contains_key(to))
                }
                RunKind::Upsert => self.compact || !self.keys.contains_key(key),
                RunKind::Insert | RunKind::Delete => true,
            }
    }

    fn push(&mut self, values: impl Iterator<Item = Option<String>>, key: Key, moved_to: Option<Key>) {
        if self.kind == RunKind::Upsert {
            if let Some(&row) = self.keys.get(&key) {
                // The later whole-row image of the same key wins.
                for (param, value) in self.params.iter_mut().zip(values) {
                    param[row] = value;
                }
                return;
            }
        }
        for (param, value) in self.params.iter_mut().zip(values) {
            param.push(value);
        }
        if self.kind == RunKind::Upsert || self.kind == RunKind::Update {
            if let Some(to) = moved_to {
                self.keys.insert(to, self.live.len());
            }
            self.keys.insert(key, self.live.len());
        }
        self.live.push(true);
    }

    /// A delete taken into a compacting `Upsert` run.
    fn delete(&mut self, key: Key) {
        if let Some(row) = self.keys.remove(&key) {
            self.live[row] = false;
        }
        for (column, value) in self.deletes.iter_mut().zip(key) {
            column.push(value);
        }
    }
}

/// The statement for a run: arrays of text, one per parameter, unnested into rows.
fn run_sql(kind: RunKind, table: &TableSchema, columns: &[usize], key: &[usize]) -> String {
    let qualified = quote_table(&table.name);
    let cast = |alias: &str, i: usize| format!("{alias}::{}", table.columns[i].type_name);
    let name = |i: usize| quote_ident(&table.columns[i].name);
    let aliases: Vec<String> = (1..=columns.len()).map(|n| format!("a{n}")).collect();
    let key_aliases: Vec<String> = (1..=key.len()).map(|n| format!("k{n}")).collect();
    let unnest = |names: &[String]| {
        let arrays: Vec<String> = (1..=names.len()).map(|n| format!("${n}::text[]")).collect();
        format!("unnest({}) AS v({})", arrays.join(", "), names.join(", "))
    };
    let key_match = key
        .iter()
        .zip(&key_aliases)
        .map(|(&i, alias)| format!("t.{} = {}", name(i), cast(&format!("v.{alias}"), i)))
        .collect::<Vec<_>>()
        .join(" AND ");
    match kind {
        RunKind::Upsert | RunKind::Insert => {
            let names: Vec<String> = columns.iter().map(|&i| name(i)).collect();
            let values: Vec<String> = columns.iter().zip(&aliases).map(|(&i, a)| cast(&format!("v.{a}"), i)).collect();
            let mut sql = format!(
                "INSERT INTO {qualified} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}",
                names.join(", "),
                values.join(", "),
                unnest(&aliases)
            );
            if kind == RunKind::Upsert {
                let key_names: Vec<String> = key.iter().map(|&i| name(i)).collect();
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|i| !key.contains(i))
                    .map(|&i| format!("{} = EXCLUDED.{}", name(i), name(i)))
                    .collect();
                if updates.is_empty() {
                    sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", key_names.join(", ")));
                } else {
                    sql.push_str(&format!(
                        " ON CONFLICT ({}) DO UPDATE SET {}",
                        key_names.join(", "),
                        updates.join(", ")
                    ));
                }
            }
            sql
        }
        RunKind::Update => {
            let sets: Vec<String> = columns
                .iter()
                .zip(&aliases)
                .map(|(&i, a)| format!("{} = {}", name(i), cast(&format!("v.{a}"), i)))
                .collect();
            let mut all = aliases.clone();
            all.extend(key_aliases.iter().cloned());
            format!("UPDATE {qualified} AS t SET {} FROM {} WHERE {}", sets.join(", "), unnest(&all), key_match)
        }
        RunKind::Delete => format!("DELETE FROM {qualified} AS t USING {} WHERE {}", unnest(&key_aliases), key_match),
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn copy_format(&self, table: &TableDefinition, source: SourceDialect) -> CopyFormat {
        // Binary is the fastest path, but carries type OIDs (user types differ between
        // databases) and is documented as less portable across major versions.
        match source {
            SourceDialect::Postgres { major } if major == self.major && !table.has_user_types => {
                CopyFormat::PostgresBinary
            }
            SourceDialect::Postgres { .. } | SourceDialect::Mysql | SourceDialect::Sqlite | SourceDialect::Mongodb => {
                CopyFormat::PostgresText
            }
        }
    }

    async fn applied_position(&mut self) -> anyhow::Result<Option<Position>> {
        // A function the role may not execute fails the query even where CASE skips it.
        let origin = match self.powers.origins {
            true => {
                "CASE WHEN EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1) \
                     THEN pg_replication_origin_progress($1, true)::text END"
            }
            false => "CASE WHEN $1::text IS NULL THEN NULL END::text",
        };
        let row = self
            .client
            .query_one(&format!("SELECT {origin}, to_regclass('cutover.progress') IS NOT NULL"), &[&self.origin])
            .await
            .context("reading the replication origin's progress on the target")?;
        let lsn: Option<String> = row.get(0);
        if let Some(text) = lsn.as_deref().filter(|t| *t != "0/0") {
            return Ok(Some(Position::Lsn(text.parse::<Lsn>()?)));
        }
        if !row.get::<_, bool>(1) {
            return Ok(None);
        }
        let recorded = self
            .client
            .query_opt("SELECT position FROM cutover.progress WHERE pipeline = $1", &[&self.origin])
            .await
            .context("reading cutover.progress on the target")?;
        recorded
            .map(|r| r.get::<_, String>(0).parse().context("cutover.progress holds a position cutover cannot read"))
            .transpose()
    }

    async fn preflight(&mut self, schema: &SourceSchema, copy_bytes: u64) -> anyhow::Result<Vec<Finding>> {
        let row = self
            .client
            .query_one("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await
            .context("reading the target role")?;
        let (user, superuser): (String, bool) = (row.get(0), row.get(1));
        let role = quote_ident(&user);
        let mut findings = Vec::new();
        let database: String = self
            .client
            .query_one("SELECT current_database()::text", &[])
            .await
            .context("reading the target database")?
            .get(0);
        let may_create: bool = self
            .client
            .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
            .await
            .context("reading the target role's privileges")?
            .get(0);
        if !may_create {
            findings.push(Finding::error(
                "target",
                format!("role {user} may not create schemas in database {database}"),
                "CREATE on the database (cutover creates the source's schemas and its own `cutover` schema)",
                format!("GRANT CREATE ON DATABASE {} TO {role};", quote_ident(&database)),
            ));
        }
        if !superuser && !self.powers.origins {
            let functions = ORIGIN_FUNCTIONS.join(", ");
            findings.push(Finding::warning(
                "target",
                format!("role {user} may not use replication origins"),
                "EXECUTE on the replication origin functions, to record positions as PostgreSQL's own subscriber \
                 does (without it they go into cutover.progress, in the same transaction as the rows)",
                format!("GRANT EXECUTE ON FUNCTION {functions} TO {role};"),
            ));
        }
        if !self.powers.replica_role {
            let grant = match self.major >= 15 {
                true => format!("GRANT SET ON PARAMETER session_replication_role TO {role};"),
                false => format!("ALTER ROLE {role} SUPERUSER; (before PostgreSQL 15 only a superuser may)"),
            };
            findings.push(Finding::warning(
                "target",
                format!("role {user} may not set session_replication_role"),
                "it to apply with triggers and foreign keys at rest (without it, foreign keys are created \
                 DEFERRABLE and checked at the end of each target transaction, and the target's own triggers fire)",
                grant,
            ));
        }
        if copy_bytes > 0 {
            findings.extend(self.free_space_finding(copy_bytes).await);
        }
        let available: Vec<String> = self
            .client
            .query("SELECT name::text FROM pg_available_extensions", &[])
            .await
            .context("reading the target's available extensions")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for extension in schema.extensions.iter().filter(|e| !available.contains(&e.name)) {
            let what = format!("extension {} is not available on the target", extension.name);
            let fix = "install the package that provides it on the target's server (for contrib extensions: \
                       postgresql-contrib), or leave out the tables that use it ([source] exclude)"
                .to_string();
            findings.push(match extension.needed_by.is_empty() {
                false => Finding::error(
                    "target",
                    what,
                    &format!("{} for columns {}", extension.name, extension.needed_by.join(", ")),
                    fix,
                ),
                true => Finding::warning(
                    "target",
                    what,
                    "it for what the source uses it for (an index's operator class, a function)",
                    fix,
                ),
            });
        }
        Ok(findings)
    }

    async fn create_tables(
        &mut self,
        schema: &SourceSchema,
        tables: &[&TableDefinition],
        fresh: bool,
    ) -> anyhow::Result<()> {
        let mut sql = ddl::prerequisites(schema);
        for table in tables {
            let exists = self
                .client
                .query_opt(
                    "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
                    &[&table.schema.name.schema, &table.schema.name.name],
                )
                .await
                .context("looking for existing tables on the target")?
                .is_some();
            // Copied again (a restart in the middle of the snapshot, `cutover resync`) with other
            // columns than the source has now (one dropped or renamed there): created again.
            if exists && !fresh {
                let columns: Vec<String> = self
                    .client
                    .query(
                        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 \
                         AND NOT attisdropped ORDER BY attname",
                        &[&quote_table(&table.schema.name)],
                    )
                    .await
                    .with_context(|| format!("reading the columns of {} on the target", table.schema.name))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut wanted: Vec<String> = table.column_names().iter().map(|c| c.to_string()).collect();
                wanted.sort();
                if columns != wanted {
                    tracing::warn!(
                        table = %table.schema.name,
                        "the target's table has other columns than the source's: dropped (with what depends on it: \
                         views, foreign keys, which come back with the keys after the copy) and created again"
                    );
                    sql.push(format!("DROP TABLE {} CASCADE", quote_table(&table.schema.name)));
                }
            }
            if exists && fresh {
                let has_rows = self
                    .client
                    .query_opt(&format!("SELECT 1 FROM {} LIMIT 1", quote_table(&table.schema.name)), &[])
                    .await
                    .with_context(|| format!("looking into {} on the target", table.schema.name))?
                    .is_some();
                if has_rows {
                    anyhow::bail!(
                        "table {} already holds rows on the target, and cutover never overwrites data it did not write: \
                         empty or drop it, or set [snapshot] mode = \"never\" if the target already has the data",
                        table.schema.name
                    );
                }
            }
            sql.extend(ddl::create_table(table, self.partitions));
        }
        let script = format!("BEGIN; {}; COMMIT", sql.join(";\n"));
        self.client
            .batch_execute(&script)
            .await
            .map_err(|e| anyhow::Error::new(e).context("creating the schema on the target"))?;
        Ok(())
    }

    async fn table_writer(&self) -> anyhow::Result<Box<dyn TableWriter>> {
        let client = self.params.connect().await?;
        // Index builds after the data go faster with room to sort in.
        client
            .batch_execute("SET maintenance_work_mem = '1GB'; SET synchronous_commit = off")
            .await
            .context("setting up a copy connection on the target")?;
        Ok(Box::new(PostgresTableWriter { client }))
    }

    async fn finish_snapshot(&mut self, schema: &SourceSchema) -> anyhow::Result<()> {
        for table in &schema.tables {
            create_missing(&self.client, table, ddl::foreign_keys(table, !self.powers.replica_role)).await?;
        }
        for sql in ddl::sequence_values(schema) {
            self.client.batch_execute(&sql).await.with_context(|| format!("setting sequences on the target: {sql}"))?;
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
        let mut dropped = Vec::new();
        let exists = self
            .client
            .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&self.origin])
            .await
            .context("reading the target's replication origins")?
            .is_some();
        if exists {
            self.client.execute("SELECT pg_replication_origin_drop($1)", &[&self.origin]).await.with_context(|| {
                format!("dropping replication origin {} (is `cutover run` still running?)", self.origin)
            })?;
            dropped.push(format!("target: replication origin {}", self.origin));
        }
        let progress = self.client.execute("DELETE FROM cutover.progress WHERE pipeline = $1", &[&self.origin]).await;
        if progress.is_ok_and(|rows| rows > 0) {
            dropped.push(format!("target: row {} of cutover.progress", self.origin));
            // The table and schema go with the last pipeline that used them.
            self.client
                .batch_execute(
                    "DO $cutover$ BEGIN IF NOT EXISTS (SELECT 1 FROM cutover.progress) THEN \
                     DROP TABLE cutover.progress; DROP SCHEMA IF EXISTS cutover; END IF; END $cutover$",
                )
                .await
                .context("dropping cutover.progress")?;
        }
        Ok(dropped)
    }

    async fn referencing_tables(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        let names: Vec<String> = tables.iter().map(quote_table).collect();
        let rows = self
            .client
            .query(
                "SELECT DISTINCT n.nspname::text, c.relname::text FROM pg_constraint f \
                 JOIN pg_class c ON c.oid = f.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE f.contype = 'f' AND f.confrelid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t) \
                   AND f.conrelid <> ALL (SELECT coalesce(to_regclass(t), 0) FROM unnest($1::text[]) t) \
                 ORDER BY 1, 2",
                &[&names],
            )
            .await
            .context("reading the target's foreign keys")?;
        Ok(rows.iter().map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect())
    }

    async fn begin(&mut self) -> anyhow::Result<()> {
        self.prepare_session().await?;
        // Without session_replication_role, foreign keys (created DEFERRABLE) are checked
        // at commit, on a source transaction boundary.
        let begin = if self.powers.replica_role { "BEGIN" } else { "BEGIN; SET CONSTRAINTS ALL DEFERRED" };
        self.client.batch_execute(begin).await.context("opening a target transaction")
    }

    async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
        // Grouped by table and compacted, a batch is a few statements. That reorders
        // rows of a table, which a secondary unique constraint may object to in
        // passing: then the batch runs again exactly in source order.
        self.client.batch_execute("SAVEPOINT cutover_batch").await.context("opening a savepoint on the target")?;
        match self.apply_in_order(&group_by_table(changes), true).await {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {
                tracing::debug!("a reordered batch hit a unique constraint; applying it in source order");
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT cutover_batch")
                    .await
                    .context("rolling back a batch")?;
                // The rollback also undid any column the batch added: read them again.
                self.columns.clear();
                let in_order: Vec<&Change> = changes.iter().collect();
                self.apply_in_order(&in_order, false).await?;
            }
            Err(e) => return Err(e),
        }
        self.client
            .batch_execute("RELEASE SAVEPOINT cutover_batch")
            .await
            .context("releasing a savepoint on the target")
    }

    async fn commit(&mut self, position: &Position, commit_time: SystemTime) -> anyhow::Result<()> {
        let micros = commit_time.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        let seconds = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
        // An LSN goes into the replication origin, as PostgreSQL's own subscriber keeps it;
        // other sources' positions into cutover.progress, in the same transaction.
        let record = match position.lsn().filter(|_| self.powers.origins) {
            Some(lsn) => format!("SELECT pg_replication_origin_xact_setup('{lsn}', to_timestamp({seconds}))"),
            None => format!(
                "CREATE SCHEMA IF NOT EXISTS cutover; \
                 CREATE TABLE IF NOT EXISTS cutover.progress (pipeline text PRIMARY KEY, position text NOT NULL, \
                     commit_time timestamptz, updated_at timestamptz NOT NULL DEFAULT now()); \
                 INSERT INTO cutover.progress (pipeline, position, commit_time) VALUES ({}, {}, to_timestamp({seconds})) \
                 ON CONFLICT (pipeline) DO UPDATE SET position = EXCLUDED.position, commit_time = EXCLUDED.commit_time, \
                     updated_at = now()",
                quote_literal(&self.origin),
                quote_literal(&position.to_string())
            ),
        };
        self.client
            .batch_execute(&format!("{record}; COMMIT"))
            .await
            .with_context(|| format!("committing the target transaction that reaches {position}"))
    }
}

/// The changes with those between barriers grouped by table, each table's in
/// their original order, so runs grow long. Safe because the final state of a row
/// depends only on the order of its own table's changes, and foreign keys are not
/// checked while applying (session_replication_role) or only at commit (deferred).
/// Truncates, column additions and row-matched changes of tables without key stay
/// where they are.
fn group_by_table(changes: &[Change]) -> Vec<&Change> {
    let is_barrier = |change: &Change| match change {
        Change::Relation(_) | Change::Truncate { .. } => true,
        Change::Update { table, .. } | Change::Delete { table, .. } => table.identity != Identity::Key,
        Change::Insert { .. } => false,
    };
    let mut ordered: Vec<&Change> = Vec::with_capacity(changes.len());
    let mut segment_start = 0;
    for change in changes {
        if is_barrier(change) {
            ordered[segment_start..].sort_by(|a, b| a.table().cmp(&b.table()));
            ordered.push(change);
            segment_start = ordered.len();
        } else {
            ordered.push(change);
        }
    }
    ordered[segment_start..].sort_by(|a, b| a.table().cmp(&b.table()));
    ordered
}

/// A copy connection on the target.
struct PostgresTableWriter {
    client: Client,
}

#[async_trait]
impl TableWriter for PostgresTableWriter {
    async fn truncate(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
        let list: Vec<String> = tables.iter().map(quote_table).collect();
        self.client.batch_execute(&format!("TRUNCATE {}", list.join(", "))).await.with_context(|| {
            format!(
                "emptying {} on the target before copying again (a table that foreign keys reference is emptied \
                 only with the tables that reference it: copy those again too)",
                list.join(", ")
            )
        })
    }

    async fn write(&mut self, table: &TableDefinition, mut rows: CopyStream) -> anyhow::Result<u64> {
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let format = match rows.format {
            CopyFormat::PostgresBinary => "binary",
            CopyFormat::PostgresText => "text",
        };
        let name = &table.schema.name;
        let sql = format!("COPY {} ({}) FROM STDIN (FORMAT {format})", quote_table(name), columns.join(", "));
        let sink = self
            .client
            .copy_in::<_, bytes::Bytes>(&sql)
            .await
            .with_context(|| format!("starting to copy {name} into the target"))?;
        futures_util::pin_mut!(sink);
        while let Some(chunk) = rows.data.next().await {
            sink.feed(chunk?).await.with_context(|| format!("copying {name} into the target"))?;
        }
        sink.as_mut().finish().await.with_context(|| format!("finishing the copy of {name} into the target"))
    }

    async fn build_indexes(&mut self, table: &TableDefinition) -> anyhow::Result<()> {
        create_missing(&self.client, table, ddl::post_data(table)).await
    }
}

/// Runs the statements for objects the table does not have yet (a restart may
/// have built some already).
async fn create_missing(client: &Client, table: &TableDefinition, objects: Vec<PostDataObject>) -> anyhow::Result<()> {
    let name = &table.schema.name;
    let existing: Vec<String> = client
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::text::regclass \
             UNION SELECT relname::text FROM pg_class WHERE relnamespace = $2::text::regnamespace",
            &[&quote_table(name), &quote_ident(&name.schema)],
        )
        .await
        .with_context(|| format!("reading the constraints of {name} on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for object in objects.into_iter().filter(|o| !existing.contains(&o.name)) {
        client
            .batch_execute(&object.sql)
            .await
            .with_context(|| format!("creating {} on {name} on the target: {}", object.name, object.sql))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Column;

    fn table() -> TableSchema {
        let column = |name: &str, type_name: &str, is_key| Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid: 0,
            is_key,
            default: None,
        };
        TableSchema {
            name: TableName::new("public", "Order Lines"),
            columns: vec![column("id", "integer", true), column("note", "text", false)],
            identity: Identity::Key,
        }
    }

    #[test]
    fn statements_unnest_text_arrays_and_cast() {
        let t = table();
        assert_eq!(
            run_sql(RunKind::Upsert, &t, &[0, 1], &[0]),
            "INSERT INTO \"public\".\"Order Lines\" (\"id\", \"note\") OVERRIDING SYSTEM VALUE \
             SELECT v.a1::integer, v.a2::text FROM unnest($1::text[], $2::text[]) AS v(a1, a2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"note\" = EXCLUDED.\"note\""
        );
        assert_eq!(
            run_sql(RunKind::Delete, &t, &[], &[0]),
            "DELETE FROM \"public\".\"Order Lines\" AS t USING unnest($1::text[]) AS v(k1) WHERE t.\"id\" = v.k1::integer"
        );
        assert_eq!(
            run_sql(RunKind::Update, &t, &[1], &[0]),
            "UPDATE \"public\".\"Order Lines\" AS t SET \"note\" = v.a1::text FROM unnest($1::text[], $2::text[]) AS v(a1, k1) \
             WHERE t.\"id\" = v.k1::integer"
        );
    }
}
