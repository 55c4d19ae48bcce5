//! Repair: what makes the target's differing ranges hold the source's rows — each
//! range's rows deleted on the target and the source's rows of it inserted, in one
//! transaction per table — written as a script, or run. Within one dialect: the source
//! server prints each value as a literal its own kind of server reads back.

use std::path::PathBuf;

use anyhow::Context as _;

use super::plan::{Range, Side, TablePlan, ValueClass};
use crate::sql::SqlDialect;

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

impl TableRepair {
    /// The statements inside a transaction, as a script.
    pub(super) fn script(&self, dialect: SqlDialect) -> String {
        format!("-- {}\n{};\n{};\nCOMMIT;\n", self.table, begin(dialect), self.statements.join(";\n"))
    }

    /// Runs the statements on the target in one transaction.
    pub(super) async fn apply(&self, target: &mut Side) -> anyhow::Result<()> {
        target.run(begin(target.dialect())).await?;
        for statement in &self.statements {
            if let Err(e) = target.run(statement).await {
                let _ = target.run("ROLLBACK").await;
                return Err(e).with_context(|| format!("repairing {} (rolled back)", self.table));
            }
        }
        target.run("COMMIT").await.with_context(|| format!("committing the repair of {}", self.table))?;
        Ok(())
    }
}

impl TablePlan {
    /// Each row of a range on `side` as a values tuple `(v1, v2, …)` of SQL literals,
    /// values as verify reads them (MySQL zero dates as NULL, floats exact).
    pub(super) fn literal_rows_sql(&self, side: &Side, range: &Range) -> String {
        let dialect = side.dialect();
        let values: Vec<String> = (0..self.columns.len()).map(|i| self.literal_of(dialect, i)).collect();
        let tuple = match dialect {
            // QUOTE(NULL) is the word NULL, so CONCAT_WS drops nothing.
            SqlDialect::Mysql => format!("CONCAT('(', CONCAT_WS(', ', {}), ')')", values.join(", ")),
            _ => format!("'(' || concat_ws(', ', {}) || ')'", values.join(", ")),
        };
        format!("SELECT {tuple} FROM {} WHERE {}", self.table(side), self.predicate(dialect, range))
    }

    /// A column's value as a SQL literal (or NULL), printed by the server.
    fn literal_of(&self, dialect: SqlDialect, i: usize) -> String {
        let value = self.stored(dialect, i);
        match (dialect, self.columns[i].1) {
            (SqlDialect::Mysql, ValueClass::Binary) => {
                format!("IF({value} IS NULL, 'NULL', CONCAT('0x', HEX({value})))")
            }
            (SqlDialect::Mysql, ValueClass::Bits) => {
                format!("IF({value} IS NULL, 'NULL', CONCAT('b''', BIN({value}), ''''))")
            }
            (SqlDialect::Mysql, _) => format!("QUOTE({value})"),
            _ => format!("quote_nullable({value})"),
        }
    }

    /// The statements that give the target a range's rows as the source has them
    /// (`rows` from [`TablePlan::literal_rows_sql`] on the source).
    pub(super) fn repair_statements(&self, target: &Side, range: &Range, rows: &[String]) -> Vec<String> {
        let dialect = target.dialect();
        let table = self.table(target);
        let mut statements = vec![format!("DELETE FROM {table} WHERE {}", self.predicate(dialect, range))];
        let columns: Vec<String> = self.columns.iter().map(|(name, _)| dialect.ident(name)).collect();
        // Identity columns generated ALWAYS take the source's values too.
        let (into, overriding) = match dialect {
            SqlDialect::Postgres => (table.trim_start_matches("ONLY "), " OVERRIDING SYSTEM VALUE"),
            _ => (table, ""),
        };
        for batch in rows.chunks(ROWS_PER_INSERT) {
            statements.push(format!(
                "INSERT INTO {into} ({}){overriding} VALUES {}",
                columns.join(", "),
                batch.join(", ")
            ));
        }
        statements
    }
}
