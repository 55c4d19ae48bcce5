//! Batches of changes → multi-row statements over `unnest` of text arrays, grouped by
//! table and compacted per key, never two updates touching one key in one statement.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use super::PostgresSink;
use crate::change::{Change, ExistingRows, Identity, SchemaChange, SchemaOp, TableName, TableSchema, Value};
use crate::config::Partitions;
use crate::schema::postgres::{add_constraint, create_index};
use crate::schema::{quote_ident, quote_literal, quote_table};
use crate::sink::TargetColumn;

impl PostgresSink {
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

    /// The table's columns on the target, read once and kept until a schema change.
    async fn known_columns(&mut self, table: &TableName) -> anyhow::Result<&[TargetColumn]> {
        if !self.columns.contains_key(table) {
            let read = super::target_columns(&self.client, table).await?;
            self.columns.insert(table.clone(), read);
        }
        Ok(self.columns.get(table).map(Vec::as_slice).unwrap_or_default())
    }

    /// The source's columns the target holds as `GENERATED ALWAYS AS IDENTITY`, by index.
    async fn identity_always(&mut self, table: &TableSchema) -> anyhow::Result<Vec<usize>> {
        let known = self.known_columns(&table.name).await?;
        Ok((0..table.columns.len())
            .filter(|&i| known.iter().any(|k| k.identity_always && k.name == table.columns[i].name))
            .collect())
    }

    /// Follows the source's description of a table: stops when it lacks a column the target
    /// holds data in ([`crate::sink::check_no_column_gone`]), widens a column to jsonb, adds
    /// the columns the source added.
    async fn ensure_columns(&mut self, table: &TableSchema) -> anyhow::Result<()> {
        let known = self.known_columns(&table.name).await?.to_vec();
        crate::sink::check_no_column_gone(table, &known)?;
        // A source without a fixed schema (MongoDB) widens a column whose values disagree in type to jsonb.
        for name in known
            .iter()
            .filter(|k| {
                k.type_name != "jsonb" && table.columns.iter().any(|c| c.name == k.name && c.type_name == "jsonb")
            })
            .map(|k| &k.name)
        {
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
            if let Some(entry) = self.columns.get_mut(&table.name).and_then(|c| c.iter_mut().find(|k| &k.name == name))
            {
                entry.type_name = "jsonb".into();
            }
        }
        for column in table.columns.iter().filter(|c| !known.iter().any(|k| k.name == c.name)) {
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
            let added = TargetColumn {
                name: column.name.clone(),
                type_name: column.type_name.clone(),
                generated: false,
                identity_always: false,
            };
            self.columns.entry(table.name.clone()).or_default().push(added);
        }
        Ok(())
    }

    async fn execute_arrays(
        &mut self,
        sql: &str,
        params: &[Vec<Option<String>>],
        table: &TableName,
    ) -> anyhow::Result<u64> {
        let statement = self.statement(sql, params.len()).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = params.first().map_or(0, Vec::len);
        self.client.execute(&statement, &refs).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("applying {rows} row(s) to {table} on the target (statement: {sql})"))
        })
    }

    /// One captured schema change, inside the open transaction (so it commits with the
    /// position it was captured at, or not at all). The table's cached columns are
    /// forgotten: the next description of it reads them again.
    async fn apply_schema(&mut self, change: &SchemaChange) -> anyhow::Result<()> {
        let table = quote_table(&change.table);
        let in_schema = |name: &str| quote_table(&TableName::new(&change.table.schema, name));
        let mut statements = Vec::new();
        for op in &change.ops {
            match op {
                SchemaOp::CreateTable | SchemaOp::CopyAgain { .. } => anyhow::bail!(
                    "{}: a schema change that copies the table again reached the sink (the pipeline drops and copies such tables)",
                    change.table
                ),
                SchemaOp::DropTable => statements.push(format!("DROP TABLE IF EXISTS {table} CASCADE")),
                SchemaOp::AddColumn { name, type_name, not_null, expression, existing } => {
                    let column = quote_ident(name);
                    let filled = match (existing, expression) {
                        (ExistingRows::Generated, expression) => {
                            format!(" GENERATED ALWAYS AS ({}) STORED", expression.as_deref().unwrap_or("NULL"))
                        }
                        (ExistingRows::Value(value), _) => format!(" DEFAULT {}::{type_name}", quote_literal(value)),
                        (ExistingRows::Null, _) => String::new(),
                    };
                    let not_null = if *not_null { " NOT NULL" } else { "" };
                    statements.push(format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type_name}{filled}{not_null}"));
                    // Rows that predate the column hold what the source filled in; new rows come with their values.
                    match (existing, expression) {
                        (ExistingRows::Generated, _) => {}
                        (_, Some(default)) => {
                            statements.push(format!("ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default}"))
                        }
                        (ExistingRows::Value(_), None) => {
                            statements.push(format!("ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT"))
                        }
                        (ExistingRows::Null, None) => {}
                    }
                }
                SchemaOp::DropColumn { name } => {
                    statements.push(format!("ALTER TABLE {table} DROP COLUMN IF EXISTS {}", quote_ident(name)))
                }
                SchemaOp::RenameColumn { from, to } => statements.push(format!(
                    "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                    quote_ident(from),
                    quote_ident(to)
                )),
                SchemaOp::SetType { column, type_name } => {
                    statements.push(format!("ALTER TABLE {table} ALTER COLUMN {} TYPE {type_name}", quote_ident(column)))
                }
                SchemaOp::SetDefault { column, default } => statements.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {} {}",
                    quote_ident(column),
                    default.as_ref().map_or("DROP DEFAULT".to_string(), |d| format!("SET DEFAULT {d}"))
                )),
                SchemaOp::SetNotNull { column, not_null } => statements.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {} {} NOT NULL",
                    quote_ident(column),
                    if *not_null { "SET" } else { "DROP" }
                )),
                SchemaOp::CreateIndex { definition, .. } => statements.push(create_index(definition)),
                SchemaOp::DropIndex { name } => statements.push(format!("DROP INDEX IF EXISTS {}", in_schema(name))),
                SchemaOp::RenameIndex { from, to } => {
                    statements.push(format!("ALTER INDEX IF EXISTS {} RENAME TO {}", in_schema(from), quote_ident(to)))
                }
                SchemaOp::AddConstraint { name, definition } => {
                    statements.push(add_constraint(&change.table, name, definition, !self.powers.replica_role))
                }
                SchemaOp::DropConstraint { name } => {
                    statements.push(format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}", quote_ident(name)))
                }
                SchemaOp::RenameConstraint { from, to } => statements.push(format!(
                    "ALTER TABLE {table} RENAME CONSTRAINT {} TO {}",
                    quote_ident(from),
                    quote_ident(to)
                )),
                SchemaOp::CreatePartition { name, parent, bound, partition_key } => {
                    if self.partitions == Partitions::Keep {
                        let sub = partition_key.as_ref().map(|key| format!(" PARTITION BY {key}")).unwrap_or_default();
                        statements.push(format!(
                            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} {bound}{sub}",
                            quote_table(name),
                            quote_table(parent)
                        ));
                    }
                }
                SchemaOp::DetachPartition { name, parent } => {
                    // The detached table's rows are copied again as a table of its own; one that is
                    // no longer attached here already is that copy (a restart copied it before the
                    // stream replayed the detach), so it stays.
                    let (name, parent) = (quote_table(name), quote_table(parent));
                    let detach = quote_literal(&format!("ALTER TABLE {parent} DETACH PARTITION {name}"));
                    let drop = quote_literal(&format!("DROP TABLE {name}"));
                    let body = format!(
                        "BEGIN IF EXISTS (SELECT 1 FROM pg_inherits \
                         WHERE inhrelid = to_regclass({}) AND inhparent = to_regclass({})) \
                         THEN EXECUTE {detach}; EXECUTE {drop}; END IF; END",
                        quote_literal(&name),
                        quote_literal(&parent)
                    );
                    // A quoted literal, not dollar quotes: a table name cannot end it.
                    statements.push(format!("DO {}", quote_literal(&body)))
                }
                SchemaOp::DropPartition { name } => statements.push(format!("DROP TABLE IF EXISTS {}", quote_table(name))),
            }
        }
        for sql in &statements {
            self.client.batch_execute(sql).await.map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "applying the source's schema change on {} to the target: {sql} (the source ran: {})",
                    change.table, change.statement
                ))
            })?;
        }
        self.columns.remove(&change.table);
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
        if let Some((check, columns)) = &run.identity_check {
            if self.execute_arrays(check, &params, &run.table).await? > 0 {
                return Err(identity_changed(&run.table, columns));
            }
        }
        self.execute_arrays(&run.sql, &params, &run.table).await?;
        Ok(())
    }

    /// Applies changes in the given order; `compact` lets a table's upserts and
    /// deletes merge into one run (see [`Run`]).
    pub(super) async fn apply_in_order(&mut self, changes: &[&Change], compact: bool) -> anyhow::Result<()> {
        let mut run: Option<Run> = None;
        for &change in changes {
            let (kind, table, columns, key, new_key, values): Planned<'_> = match change {
                Change::Relation(table) => {
                    self.flush(run.take()).await?;
                    self.ensure_columns(table).await?;
                    continue;
                }
                Change::Schema(change) => {
                    self.flush(run.take()).await?;
                    self.apply_schema(change).await?;
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
                        if run.is_none() {
                            let always = self.identity_always(table).await?;
                            run = Some(Run::new(RunKind::Upsert, table, all, &always, true));
                        }
                        if let Some(run) = run.as_mut() {
                            run.delete(key);
                        }
                        continue;
                    }
                    (RunKind::Delete, table, Vec::new(), key.clone(), None, key)
                }
            };
            if !run.as_ref().is_some_and(|r| r.fits(kind, table, &columns, &key, new_key.as_ref())) {
                self.flush(run.take()).await?;
                let always = self.identity_always(table).await?;
                run = Some(Run::new(kind, table, columns, &always, compact));
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
                let always = self.identity_always(table).await?;
                let changed: Vec<String> = always
                    .iter()
                    .filter(|&&i| old.get(i).is_some_and(|o| *o != Value::Unchanged && new.get(i) != Some(o)))
                    .map(|&i| table.columns[i].name.clone())
                    .collect();
                if !changed.is_empty() {
                    return Err(identity_changed(&table.name, &changed));
                }
                let mut sets = Vec::new();
                for (i, (column, value)) in table.columns.iter().zip(new).enumerate() {
                    if *value == Value::Unchanged || always.contains(&i) {
                        continue;
                    }
                    params.push(text_of(value));
                    sets.push(format!("{} = ${}::{}", quote_ident(&column.name), params.len(), column.type_name));
                }
                if sets.is_empty() {
                    // Nothing the target can write changed: the row only has to be there.
                    format!("SELECT FROM {qualified} WHERE {locate}")
                } else {
                    format!("UPDATE {qualified} SET {} WHERE {locate}", sets.join(", "))
                }
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
pub(super) fn is_unique_violation(error: &anyhow::Error) -> bool {
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
    /// A query that finds rows whose `GENERATED ALWAYS AS IDENTITY` columns the run
    /// would change (the write leaves them out: an update cannot set them), and those columns.
    identity_check: Option<(String, Vec<String>)>,
    /// Whether a repeated key collapses into one row (else it starts a new run).
    compact: bool,
}

impl Run {
    fn new(kind: RunKind, table: &TableSchema, columns: Vec<usize>, always: &[usize], compact: bool) -> Run {
        let key = table.key_indexes();
        let sql = run_sql(kind, table, &columns, &key, always);
        let identity_check = identity_check_sql(kind, table, &columns, &key, always);
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
            delete_sql: run_sql(RunKind::Delete, table, &[], &key, &[]),
            identity_check,
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

/// How a run's statements name its parameters: `v.a1…` for the columns written,
/// `v.k1…` for the key an `Update` matches, all arrays of text unnested into rows.
struct RunParams<'a> {
    table: &'a TableSchema,
    columns: &'a [usize],
    key: &'a [usize],
    aliases: Vec<String>,
    key_aliases: Vec<String>,
}

impl<'a> RunParams<'a> {
    fn new(table: &'a TableSchema, columns: &'a [usize], key: &'a [usize]) -> RunParams<'a> {
        RunParams {
            table,
            columns,
            key,
            aliases: (1..=columns.len()).map(|n| format!("a{n}")).collect(),
            key_aliases: (1..=key.len()).map(|n| format!("k{n}")).collect(),
        }
    }

    fn name(&self, i: usize) -> String {
        quote_ident(&self.table.columns[i].name)
    }

    /// The parameter holding column `i`'s written value, cast to its type.
    fn value(&self, i: usize) -> Option<String> {
        let at = self.columns.iter().position(|&c| c == i)?;
        Some(self.cast(&self.aliases[at], i))
    }

    fn cast(&self, alias: &str, i: usize) -> String {
        format!("v.{alias}::{}", self.table.columns[i].type_name)
    }

    fn unnest(names: &[String]) -> String {
        let arrays: Vec<String> = (1..=names.len()).map(|n| format!("${n}::text[]")).collect();
        format!("unnest({}) AS v({})", arrays.join(", "), names.join(", "))
    }

    /// Every parameter, written columns then key, as the rows of `v`.
    fn unnest_all(&self) -> String {
        let mut all = self.aliases.clone();
        all.extend(self.key_aliases.iter().cloned());
        Self::unnest(&all)
    }

    /// `t`'s row for a row of `v`: by the key parameters, or (`Upsert`) by the key's written values.
    fn key_match(&self, by_written_values: bool) -> String {
        self.key
            .iter()
            .zip(&self.key_aliases)
            .map(|(&i, alias)| {
                let value = if by_written_values { self.value(i) } else { None };
                format!("t.{} = {}", self.name(i), value.unwrap_or_else(|| self.cast(alias, i)))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// The statement for a run: arrays of text, one per parameter, unnested into rows.
/// `always` (columns held as `GENERATED ALWAYS AS IDENTITY`) are inserted but never
/// updated: PostgreSQL refuses, and [`identity_check_sql`] makes sure they keep their value.
fn run_sql(kind: RunKind, table: &TableSchema, columns: &[usize], key: &[usize], always: &[usize]) -> String {
    let qualified = quote_table(&table.name);
    let p = RunParams::new(table, columns, key);
    let name = |i: usize| p.name(i);
    let key_match = p.key_match(false);
    match kind {
        RunKind::Upsert | RunKind::Insert => {
            let names: Vec<String> = columns.iter().map(|&i| name(i)).collect();
            let values: Vec<String> = columns.iter().zip(&p.aliases).map(|(&i, a)| p.cast(a, i)).collect();
            let mut sql = format!(
                "INSERT INTO {qualified} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}",
                names.join(", "),
                values.join(", "),
                RunParams::unnest(&p.aliases)
            );
            if kind == RunKind::Upsert {
                let key_names: Vec<String> = key.iter().map(|&i| name(i)).collect();
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|i| !key.contains(i) && !always.contains(i))
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
                .zip(&p.aliases)
                .filter(|(i, _)| !always.contains(i))
                .map(|(&i, a)| format!("{} = {}", name(i), p.cast(a, i)))
                .collect();
            if sets.is_empty() {
                // Only identity columns are written, which the check covers: nothing to update.
                return format!("SELECT FROM {} WHERE false", p.unnest_all());
            }
            format!("UPDATE {qualified} AS t SET {} FROM {} WHERE {}", sets.join(", "), p.unnest_all(), key_match)
        }
        RunKind::Delete => {
            format!("DELETE FROM {qualified} AS t USING {} WHERE {key_match}", RunParams::unnest(&p.key_aliases))
        }
    }
}

/// For a run that writes `GENERATED ALWAYS AS IDENTITY` columns over existing rows: a
/// query (same parameters as the run) returning a row for each target row whose value
/// there differs from the one written, which the run's update would not change. Only
/// `UPDATE … SET col = DEFAULT` on the source gives a row a new identity value.
fn identity_check_sql(
    kind: RunKind,
    table: &TableSchema,
    columns: &[usize],
    key: &[usize],
    always: &[usize],
) -> Option<(String, Vec<String>)> {
    let checked: Vec<usize> = columns.iter().copied().filter(|i| always.contains(i)).collect();
    let by_written_values = match kind {
        RunKind::Upsert => true,
        RunKind::Update => false,
        RunKind::Insert | RunKind::Delete => return None,
    };
    if checked.is_empty() {
        return None;
    }
    let p = RunParams::new(table, columns, key);
    let differs: Vec<String> =
        checked.iter().filter_map(|&i| Some(format!("t.{} IS DISTINCT FROM {}", p.name(i), p.value(i)?))).collect();
    let from = if by_written_values { RunParams::unnest(&p.aliases) } else { p.unnest_all() };
    let sql = format!(
        "SELECT 1 FROM {} AS t, {from} WHERE {} AND ({}) LIMIT 1",
        quote_table(&table.name),
        p.key_match(by_written_values),
        differs.join(" OR ")
    );
    Some((sql, checked.iter().map(|&i| table.columns[i].name.clone()).collect()))
}

/// The error for a source row whose identity column got a new value: the target's
/// column is `GENERATED ALWAYS`, which no update can write.
fn identity_changed(table: &TableName, columns: &[String]) -> anyhow::Error {
    let alter: Vec<String> =
        columns.iter().map(|c| format!("ALTER COLUMN {} SET GENERATED BY DEFAULT", quote_ident(c))).collect();
    anyhow::anyhow!(
        "the source gave a row of {table} a new value in {} (UPDATE … SET … = DEFAULT), which the target holds as \
         GENERATED ALWAYS AS IDENTITY and no update can write; cutover stopped at its last checkpoint. \
         Run on the target: ALTER TABLE {} {}; then start cutover again",
        columns.join(", "),
        quote_table(table),
        alter.join(", ")
    )
}

/// The changes with those between barriers grouped by table, each table's in
/// their original order, so runs grow long. Safe because the final state of a row
/// depends only on the order of its own table's changes, and foreign keys are not
/// checked while applying (session_replication_role) or only at commit (deferred).
/// Truncates, column additions and row-matched changes of tables without key stay
/// where they are.
pub(super) fn group_by_table(changes: &[Change]) -> Vec<&Change> {
    let is_barrier = |change: &Change| match change {
        Change::Relation(_) | Change::Truncate { .. } | Change::Schema(_) => true,
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
            run_sql(RunKind::Upsert, &t, &[0, 1], &[0], &[]),
            "INSERT INTO \"public\".\"Order Lines\" (\"id\", \"note\") OVERRIDING SYSTEM VALUE \
             SELECT v.a1::integer, v.a2::text FROM unnest($1::text[], $2::text[]) AS v(a1, a2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"note\" = EXCLUDED.\"note\""
        );
        assert_eq!(
            run_sql(RunKind::Delete, &t, &[], &[0], &[]),
            "DELETE FROM \"public\".\"Order Lines\" AS t USING unnest($1::text[]) AS v(k1) WHERE t.\"id\" = v.k1::integer"
        );
        assert_eq!(
            run_sql(RunKind::Update, &t, &[1], &[0], &[]),
            "UPDATE \"public\".\"Order Lines\" AS t SET \"note\" = v.a1::text FROM unnest($1::text[], $2::text[]) AS v(a1, k1) \
             WHERE t.\"id\" = v.k1::integer"
        );
    }
}
