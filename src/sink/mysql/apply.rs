//! Batches of changes → statements inside the open target transaction: multi-row
//! `INSERT … ON DUPLICATE KEY UPDATE`, updates and deletes by key, or by the whole old
//! row for a table without a key; schema changes from the stream.

use std::sync::Arc;

use anyhow::Context as _;
use mysql_async::prelude::Queryable;

use super::{column_types, MysqlSink, DROPS};
use crate::change::{Change, Identity, SchemaChange, SchemaOp, TableSchema, Value};
use crate::schema::mysql_target::{quote_ident, shorten, Conversion};

/// Where a source table lives on the target and how its values convert.
pub(super) struct TargetTable {
    /// `` `db`.`table` ``.
    qualified: String,
    /// The source's column count this was built for (a Relation may add columns).
    columns: usize,
    conversions: Vec<Conversion>,
    /// Per column: text, whose collation would match `'dup'` to `'Dup'` and `'dup '`, so
    /// a row found by its values compares it byte for byte (not `char`: stored without the
    /// trailing blanks a PostgreSQL `char(n)` sends).
    text: Vec<bool>,
}

impl MysqlSink {
    /// The target table for a source table's schema, reading its column types once.
    async fn target(&mut self, table: &TableSchema) -> anyhow::Result<Arc<TargetTable>> {
        if let Some(known) = self.tables.get(&table.name).filter(|t| t.columns == table.columns.len()) {
            return Ok(known.clone());
        }
        let database = self.database(&table.name.schema);
        let types = column_types(&mut self.conn, &database, &table.name.name).await?;
        let conversions = table
            .columns
            .iter()
            .map(|c| {
                let target = types.get(&c.name).map(String::as_str).unwrap_or("longtext");
                Conversion::between(&c.type_name, target)
            })
            .collect();
        let text = table
            .columns
            .iter()
            .map(|c| {
                let target = types.get(&c.name).map(String::as_str).unwrap_or("longtext");
                matches!(target, "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set")
            })
            .collect();
        let target = Arc::new(TargetTable {
            qualified: self.qualified(&table.name),
            columns: table.columns.len(),
            conversions,
            text,
        });
        self.tables.insert(table.name.clone(), target.clone());
        Ok(target)
    }

    /// Adds the columns a `Relation` shows that the target table lacks.
    async fn add_columns(&mut self, table: &TableSchema) -> anyhow::Result<()> {
        let columns: Vec<(&str, &str)> =
            table.columns.iter().map(|c| (c.name.as_str(), c.type_name.as_str())).collect();
        self.add_missing_columns(&table.name, &columns, Some(table)).await
    }

    /// A captured schema change: what [`Sink::in_place`](crate::sink::Sink::in_place) accepted.
    async fn apply_schema(&mut self, change: &SchemaChange) -> anyhow::Result<()> {
        for op in &change.ops {
            match op {
                // Not as DDL here, which would commit: rolled back instead, the transaction's
                // earlier rows would meet a dropped table in the replay. Nothing after the drop
                // writes the table (the applier leaves its changes out).
                SchemaOp::DropTable => {
                    self.tables.remove(&change.table);
                    let sql = format!("INSERT IGNORE INTO {DROPS} (pipeline, db, name) VALUES (?, ?, ?)");
                    let db = self.database(&change.table.schema);
                    self.conn
                        .exec_drop(sql, (&self.pipeline, db, &change.table.name))
                        .await
                        .with_context(|| format!("recording that {} is to be dropped on the target", change.table))?;
                    // Part of the transaction: DDL later in it must roll it back first.
                    self.written = true;
                }
                SchemaOp::AddColumn { name, type_name, .. } => {
                    self.add_missing_columns(&change.table, &[(name.as_str(), type_name.as_str())], None).await?
                }
                SchemaOp::CreatePartition { .. } => {}
                other => tracing::warn!(
                    table = %change.table,
                    change = other.kind(),
                    statement = %change.statement,
                    "a schema change not mirrored on the MySQL target (the rows stay exact; make it by hand if wanted)"
                ),
            }
        }
        Ok(())
    }

    pub(super) async fn apply_one(&mut self, change: &Change) -> anyhow::Result<()> {
        match change {
            Change::Relation(table) => self.add_columns(table).await,
            Change::Schema(change) => self.apply_schema(change).await,
            Change::Truncate { tables, .. } => {
                // DELETE, not TRUNCATE: TRUNCATE would commit the open transaction.
                for table in tables {
                    let sql = format!("DELETE FROM {}", self.qualified(&table.name));
                    self.conn.query_drop(&sql).await.with_context(|| format!("applying {sql} on the target"))?;
                }
                Ok(())
            }
            Change::Insert { table, row } => self.upsert(table, &[row.as_slice()]).await,
            Change::Update { table, old, new } => {
                let key = table.key_indexes();
                if table.identity != Identity::Key {
                    let old = old.as_deref().with_context(|| {
                        format!("an update of {} without its old row (a table without a key)", table.name)
                    })?;
                    return self.by_full_row(table, old, Some(new)).await;
                }
                let moved_from = old.as_deref().filter(|old| key.iter().any(|&k| old.get(k) != new.get(k)));
                if new.contains(&Value::Unchanged) {
                    // Columns the source left out keep the target's values: the row is updated
                    // in place, found by the key it had (a key change moves it with the rest).
                    self.update_known(table, moved_from.unwrap_or(new), new).await
                } else {
                    if let Some(old) = moved_from {
                        self.delete_by_key(table, old).await?;
                    }
                    self.upsert(table, &[new.as_slice()]).await
                }
            }
            Change::Delete { table, old } => match table.identity {
                Identity::Key => self.delete_by_key(table, old).await,
                _ => self.by_full_row(table, old, None).await,
            },
        }
    }

    /// `INSERT … ON DUPLICATE KEY UPDATE` (plain `INSERT` for a table without a key).
    pub(super) async fn upsert(&mut self, table: &TableSchema, rows: &[&[Value]]) -> anyhow::Result<()> {
        let target = self.target(table).await?;
        let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let one = format!("({})", vec!["?"; columns.len()].join(", "));
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES {}",
            target.qualified,
            columns.join(", "),
            vec![one; rows.len()].join(", ")
        );
        if table.identity == Identity::Key {
            let updates: Vec<String> = columns.iter().map(|c| format!("{c} = VALUES({c})")).collect();
            sql.push_str(&format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", ")));
        }
        let mut params = Vec::with_capacity(rows.len() * columns.len());
        for row in rows {
            for (i, value) in row.iter().enumerate() {
                params.push(param(table, &target, i, value)?);
            }
        }
        self.conn
            .exec_drop(&sql, params)
            .await
            .with_context(|| format!("applying an insert into {} on the target", table.name))
    }

    /// An update that leaves some columns as the target has them, of the row whose
    /// key is the one in `matched_by`.
    async fn update_known(&mut self, table: &TableSchema, matched_by: &[Value], new: &[Value]) -> anyhow::Result<()> {
        let target = self.target(table).await?;
        let (mut sets, mut params) = (Vec::new(), Vec::new());
        for (i, (column, value)) in table.columns.iter().zip(new).enumerate() {
            if value != &Value::Unchanged {
                sets.push(format!("{} = ?", quote_ident(&column.name)));
                params.push(param(table, &target, i, value)?);
            }
        }
        let (predicate, key_params) = key_predicate(table, &target, matched_by)?;
        params.extend(key_params);
        let sql = format!("UPDATE {} SET {} WHERE {predicate}", target.qualified, sets.join(", "));
        self.conn
            .exec_drop(&sql, params)
            .await
            .with_context(|| format!("applying an update of {} on the target", table.name))
    }

    async fn delete_by_key(&mut self, table: &TableSchema, old: &[Value]) -> anyhow::Result<()> {
        let target = self.target(table).await?;
        let (predicate, params) = key_predicate(table, &target, old)?;
        let sql = format!("DELETE FROM {} WHERE {predicate}", target.qualified);
        self.conn
            .exec_drop(&sql, params)
            .await
            .with_context(|| format!("applying a delete from {} on the target", table.name))
    }

    /// An update or delete of a table without a key: one row matching every old value.
    async fn by_full_row(&mut self, table: &TableSchema, old: &[Value], new: Option<&[Value]>) -> anyhow::Result<()> {
        let target = self.target(table).await?;
        let mut params = Vec::new();
        let mut sets = Vec::new();
        if let Some(new) = new {
            for (i, (column, value)) in table.columns.iter().zip(new).enumerate() {
                if value != &Value::Unchanged {
                    sets.push(format!("{} = ?", quote_ident(&column.name)));
                    params.push(param(table, &target, i, value)?);
                }
            }
        }
        let mut predicates = Vec::new();
        for (i, (column, value)) in table.columns.iter().zip(old).enumerate() {
            if value != &Value::Unchanged {
                let binary = if target.text.get(i).copied().unwrap_or(false) { "BINARY " } else { "" };
                predicates.push(format!("{binary}{} <=> ?", quote_ident(&column.name)));
                params.push(param(table, &target, i, value)?);
            }
        }
        let sql = match new {
            Some(_) => format!(
                "UPDATE {} SET {} WHERE {} LIMIT 1",
                target.qualified,
                sets.join(", "),
                predicates.join(" AND ")
            ),
            None => format!("DELETE FROM {} WHERE {} LIMIT 1", target.qualified, predicates.join(" AND ")),
        };
        self.conn
            .exec_drop(&sql, params)
            .await
            .with_context(|| format!("applying a change to {} on the target", table.name))?;
        if self.conn.affected_rows() == 0 {
            anyhow::bail!(
                "{} on the target has no row equal to the source's old row: the target has drifted from the source; \
                 cutover stopped at its last checkpoint. Compare the table (cutover verify) and copy it again",
                table.name
            );
        }
        Ok(())
    }
}

/// A change's value as a statement parameter, converted for the target column.
fn param(table: &TableSchema, target: &TargetTable, i: usize, value: &Value) -> anyhow::Result<mysql_async::Value> {
    match value {
        Value::Null | Value::Unchanged => Ok(mysql_async::Value::NULL),
        Value::Text(text) => {
            let conversion = target.conversions.get(i).copied().unwrap_or(Conversion::Same);
            conversion.apply(text).map(mysql_async::Value::Bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}, column {}: {e} (value `{}`); cutover stopped at its last checkpoint",
                    table.name,
                    table.columns.get(i).map(|c| c.name.as_str()).unwrap_or("?"),
                    shorten(text)
                )
            })
        }
    }
}

/// `` `k1` = ? AND `k2` = ? `` and its parameters, from a row's key columns.
fn key_predicate(
    table: &TableSchema,
    target: &TargetTable,
    row: &[Value],
) -> anyhow::Result<(String, Vec<mysql_async::Value>)> {
    let key = table.key_indexes();
    let mut predicates = Vec::with_capacity(key.len());
    let mut params = Vec::with_capacity(key.len());
    for k in key {
        predicates.push(format!("{} = ?", quote_ident(&table.columns[k].name)));
        params.push(param(table, target, k, row.get(k).unwrap_or(&Value::Null))?);
    }
    Ok((predicates.join(" AND "), params))
}
