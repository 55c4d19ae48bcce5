//! Repair: what makes the target's differing ranges hold the source's rows — in one
//! transaction per table, the rows of each range the source lacks deleted and the
//! source's rows upserted by key — written as a script, or run. Upserts leave a row that
//! matches in place, so a foreign key's `ON DELETE CASCADE` does not take rows of other
//! tables with it. Where an upsert could go wrong, the range's rows are deleted and the
//! source's inserted instead ([`TablePlan::upserts_safely`]): a table without a key, on
//! MySQL one with another unique index, on PostgreSQL one with a deferrable constraint or
//! an identity column generated ALWAYS besides the key. The source's rows are read as
//! the copy reads them, in PostgreSQL's text form ([`Source::read_rows`]), and written as
//! literals of the target's dialect converted as the copy converts them, so any pair the
//! copy serves is repaired alike.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;

use super::plan::{Range, Side, TablePlan};
use crate::schema::mysql_target::Conversion;
use crate::schema::TableDefinition;
use crate::source::TableReader;
use crate::sql::SqlDialect;
use crate::status::HeldPipeline;

/// Rows per INSERT statement.
const ROWS_PER_INSERT: usize = 500;

/// What `verify` does about the rows it finds different.
#[derive(Clone, Debug, Default)]
pub struct Repair {
    /// Write the SQL that makes the target equal to the source here.
    pub script: Option<PathBuf>,
    /// Run it on the target (a transaction per table).
    pub apply: bool,
}

/// One table's repair: its statements, without the transaction around them.
pub(super) struct TableRepair {
    pub(super) table: String,
    pub(super) statements: Vec<String>,
}

/// The statement that opens a transaction.
fn begin(dialect: SqlDialect) -> &'static str {
    match dialect {
        SqlDialect::Mysql => "START TRANSACTION",
        _ => "BEGIN",
    }
}

/// What a script sets first: the session verify's own connections have, which the
/// literals are written for (UTC, backslashes as escapes on MySQL, as text on PostgreSQL).
pub(super) fn script_session(dialect: SqlDialect) -> &'static str {
    match dialect {
        SqlDialect::Mysql => {
            "SET time_zone = '+00:00', NAMES utf8mb4;\n\
             SET SESSION sql_mode = REPLACE(@@sql_mode, 'NO_BACKSLASH_ESCAPES', '');\n"
        }
        _ => "SET TimeZone = 'UTC';\nSET standard_conforming_strings = on;\n",
    }
}

impl TableRepair {
    /// The range's source rows read, and the statements that give the target those rows.
    pub(super) async fn of(
        plan: &TablePlan,
        table: &TableDefinition,
        ranges: impl Iterator<Item = &Range>,
        source: &mut dyn TableReader,
        target: &mut Side,
    ) -> anyhow::Result<TableRepair> {
        let literals = Literals::of(plan, table, target).await?;
        let upsert = plan.upserts_safely(target).await?;
        let mut statements = Vec::new();
        for range in ranges {
            let rows = source.read_rows(table, &plan.source_predicate(range)).await?;
            let rows = rows.iter().map(|row| literals.row(row)).collect::<anyhow::Result<Vec<_>>>()?;
            statements.extend(plan.repair_statements(target, range, &rows, upsert));
        }
        Ok(TableRepair { table: plan.display.clone(), statements })
    }

    /// The statements inside a transaction, as a script.
    pub(super) fn script(&self, dialect: SqlDialect) -> String {
        format!("-- {}\n{};\n{};\nCOMMIT;\n", self.table, begin(dialect), self.statements.join(";\n"))
    }

    /// Runs the statements on the target in one transaction.
    /// Runs the repair in one transaction; with a `hold` on a live pipeline, commits only
    /// if the hold still stands once the rows are written (locked by the transaction: a
    /// daemon that resumes after that waits for the commit to touch them).
    pub(super) async fn apply(&self, target: &mut Side, hold: Option<&mut HeldPipeline>) -> anyhow::Result<()> {
        target.run(begin(target.dialect())).await?;
        for statement in &self.statements {
            if let Err(e) = target.run(statement).await {
                let _ = target.run("ROLLBACK").await;
                return Err(e).with_context(|| format!("repairing {} (rolled back)", self.table));
            }
        }
        if let Some(hold) = hold {
            if let Err(e) = hold.confirm().await {
                let _ = target.run("ROLLBACK").await;
                return Err(e).with_context(|| format!("repairing {} (rolled back)", self.table));
            }
        }
        target.run("COMMIT").await.with_context(|| format!("committing the repair of {}", self.table))?;
        Ok(())
    }
}

/// How one table's values, in PostgreSQL's text form, become literals of the target.
struct Literals {
    dialect: SqlDialect,
    /// A MySQL target's conversion per column, as its copy applies them (by the
    /// column's `DATA_TYPE` there); empty for PostgreSQL, which reads the text form.
    conversions: Vec<Conversion>,
}

impl Literals {
    async fn of(plan: &TablePlan, table: &TableDefinition, target: &mut Side) -> anyhow::Result<Literals> {
        let dialect = target.dialect();
        let mut conversions = Vec::new();
        if dialect == SqlDialect::Mysql {
            let (schema, name) = plan.target_name();
            let types = target
                .run(&format!(
                    "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {} \
                     AND TABLE_NAME = {}",
                    dialect.literal(schema),
                    dialect.literal(name)
                ))
                .await?;
            for column in &table.schema.columns {
                let data_type = types
                    .iter()
                    .find(|row| row.first().cloned().flatten().as_deref() == Some(column.name.as_str()))
                    .and_then(|row| row.get(1).cloned().flatten())
                    .with_context(|| format!("{}: the target has no column {}", plan.display, column.name))?;
                conversions.push(Conversion::between(&column.type_name, &data_type));
            }
        }
        Ok(Literals { dialect, conversions })
    }

    /// A row's values as the target's literals.
    fn row(&self, values: &[Option<String>]) -> anyhow::Result<Vec<String>> {
        let mut literals = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            literals.push(match (value, self.conversions.get(i)) {
                (None, _) => "NULL".to_string(),
                (Some(text), None) => self.dialect.literal(text),
                (Some(text), Some(conversion)) => {
                    let stored = conversion.apply(text).map_err(|e| anyhow::anyhow!("a value of column {i}: {e}"))?;
                    match conversion {
                        Conversion::Bytes => {
                            let mut hex = String::from("X'");
                            for byte in &stored {
                                let _ = write!(hex, "{byte:02x}");
                            }
                            hex + "'"
                        }
                        // A BIT column reads a number; a quoted one would be its characters' bytes.
                        Conversion::Bits => String::from_utf8_lossy(&stored).into_owned(),
                        _ => self
                            .dialect
                            .literal(&String::from_utf8(stored).context("a converted value that is not UTF-8")?),
                    }
                }
            });
        }
        Ok(literals)
    }
}

impl TablePlan {
    /// Whether the target's table takes the source's rows as upserts by the key: it has a
    /// key; on MySQL no other unique index (`ON DUPLICATE KEY UPDATE` would update the
    /// row holding the other value); on PostgreSQL no deferrable constraint (no `ON
    /// CONFLICT` arbiter) and no identity generated ALWAYS besides the key (which `UPDATE`
    /// may not set). Another unique value met on PostgreSQL fails the table's repair,
    /// rolled back.
    async fn upserts_safely(&self, target: &mut Side) -> anyhow::Result<bool> {
        if self.key.is_empty() {
            return Ok(false);
        }
        let dialect = target.dialect();
        let (schema, name) = self.target_name();
        let sql = match dialect {
            SqlDialect::Mysql => format!(
                "SELECT COUNT(DISTINCT INDEX_NAME) = 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = {} \
                 AND TABLE_NAME = {} AND NON_UNIQUE = 0",
                dialect.literal(schema),
                dialect.literal(name)
            ),
            _ => {
                let table = format!(
                    "{}::regclass",
                    dialect.literal(&format!("{}.{}", dialect.ident(schema), dialect.ident(name)))
                );
                let keys: Vec<String> = self.key.iter().map(|&k| dialect.literal(&self.columns[k].0)).collect();
                format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = {table} AND condeferrable) \
                     AND NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {table} AND attidentity = 'a' \
                                     AND attnum > 0 AND NOT attisdropped AND attname::text <> ALL (ARRAY[{}]::text[]))",
                    keys.join(", ")
                )
            }
        };
        let rows = target.run(&sql).await?;
        let answer = rows.first().and_then(|row| row.first().cloned().flatten());
        Ok(matches!(answer.as_deref(), Some("1" | "t")))
    }

    /// The statements that give the target a range's rows as the source has them
    /// (`rows`: each row's values as the target's literals), as upserts by key or, where
    /// that is not safe, the range's rows deleted and the source's inserted.
    pub(super) fn repair_statements(
        &self,
        target: &Side,
        range: &Range,
        rows: &[Vec<String>],
        upsert: bool,
    ) -> Vec<String> {
        let dialect = target.dialect();
        let table = self.table(target);
        let predicate = self.predicate(dialect, range);
        let tuple = |values: &[String]| format!("({})", values.join(", "));
        let names =
            |columns: &[usize]| -> Vec<String> { columns.iter().map(|&i| dialect.ident(&self.columns[i].0)).collect() };
        let keys: Vec<String> =
            rows.iter().map(|row| tuple(&self.key.iter().map(|&k| row[k].clone()).collect::<Vec<_>>())).collect();
        let mut statements = vec![match (upsert, keys.is_empty()) {
            (true, false) => {
                format!(
                    "DELETE FROM {table} WHERE {predicate} AND {} NOT IN ({})",
                    tuple(&names(&self.key)),
                    keys.join(", ")
                )
            }
            _ => format!("DELETE FROM {table} WHERE {predicate}"),
        }];
        let all: Vec<usize> = (0..self.columns.len()).collect();
        let others: Vec<usize> = all.iter().copied().filter(|i| !self.key.contains(i)).collect();
        // Identity columns generated ALWAYS take the source's values too.
        let (into, overriding) = match dialect {
            SqlDialect::Postgres => (table.trim_start_matches("ONLY "), " OVERRIDING SYSTEM VALUE"),
            _ => (table, ""),
        };
        let on_conflict = match (upsert, dialect) {
            (false, _) => String::new(),
            (true, SqlDialect::Mysql) => {
                // Nothing to set but the key: a no-op update keeps the row.
                let set = match others.is_empty() {
                    true => names(&self.key).iter().map(|k| format!("{k} = {k}")).collect::<Vec<_>>(),
                    false => names(&others).iter().map(|c| format!("{c} = VALUES({c})")).collect(),
                };
                format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
            }
            (true, _) => match others.is_empty() {
                true => format!(" ON CONFLICT ({}) DO NOTHING", names(&self.key).join(", ")),
                false => format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    names(&self.key).join(", "),
                    names(&others).iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect::<Vec<_>>().join(", ")
                ),
            },
        };
        for batch in rows.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = batch.iter().map(|row| tuple(row)).collect();
            statements.push(format!(
                "INSERT INTO {into} ({}){overriding} VALUES {}{on_conflict}",
                names(&all).join(", "),
                values.join(", ")
            ));
        }
        statements
    }
}
