//! Reads the source's `information_schema`: tables, columns mapped to
//! PostgreSQL types, keys and indexes, enum types and `AUTO_INCREMENT` values.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use mysql_async::prelude::Queryable;

use super::MysqlTable;
use crate::change::{Column, Identity, SchemaOp, TableName, TableSchema};
use crate::schema::mysql::{map_column, MysqlColumn};
use crate::schema::{quote_ident, quote_table, ColumnDefinition, EnumType, Sequence, SourceSchema, TableDefinition};

/// `information_schema.COLUMNS`: table, column, data type, column type, numeric precision
/// and scale, datetime precision, character length, nullable, extra, character set, default.
type ColumnRow = (
    String,
    String,
    String,
    String,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// A MySQL column default as PostgreSQL SQL, where it is a plain literal; expressions
/// (`current_timestamp()`, …) are left to the application.
fn literal_default(default: Option<&str>) -> Option<String> {
    let default = default?;
    let is_number = !default.is_empty() && default.parse::<f64>().is_ok();
    let is_string = default.len() >= 2 && default.starts_with('\'') && default.ends_with('\'');
    (is_number || is_string).then(|| default.to_string())
}

/// `information_schema.TABLES`: name, estimated rows, data length, next AUTO_INCREMENT value.
type TableRow = (String, Option<u64>, Option<u64>, Option<u64>);

/// The catalog rows [`read_tables`] builds on, read in four queries.
struct CatalogRows {
    tables: Vec<TableRow>,
    columns: Vec<ColumnRow>,
    checks: Vec<(String, String)>,
    indexes: Vec<(String, String, u64, String)>,
}

impl CatalogRows {
    async fn read(conn: &mut mysql_async::Conn, db: &str) -> anyhow::Result<CatalogRows> {
        let tables: Vec<TableRow> = conn
            .exec(
                "SELECT TABLE_NAME, TABLE_ROWS, DATA_LENGTH, AUTO_INCREMENT FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
                (db,),
            )
            .await
            .context("reading the source's tables")?;
        let columns: Vec<ColumnRow> = conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE, \
                        DATETIME_PRECISION, CHARACTER_MAXIMUM_LENGTH, IS_NULLABLE, EXTRA, CHARACTER_SET_NAME, COLUMN_DEFAULT \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION",
                (db,),
            )
            .await
            .context("reading the source's columns")?;
        // MariaDB's JSON is longtext with a json_valid() check; MySQL has no such table before 8.0.16.
        let checks: Vec<(String, String)> = conn
            .exec(
                "SELECT TABLE_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?",
                (db,),
            )
            .await
            .unwrap_or_default();
        let indexes: Vec<(String, String, u64, String)> = conn
            .exec(
                "SELECT TABLE_NAME, INDEX_NAME, NON_UNIQUE, COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
                (db,),
            )
            .await
            .context("reading the source's indexes")?;
        Ok(CatalogRows { tables, columns, checks, indexes })
    }

    /// The same tables, columns, checks and indexes (row counts and AUTO_INCREMENT values
    /// move with every write).
    fn same_shape(&self, other: &CatalogRows) -> bool {
        let names = |rows: &CatalogRows| rows.tables.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
        names(self) == names(other)
            && self.columns == other.columns
            && self.checks == other.checks
            && self.indexes == other.indexes
    }
}

/// An index or a unique constraint of a table, as the target creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableKey {
    /// Its name on the target: `<table>_<index>` (MySQL's index names are per table).
    pub name: String,
    /// `CREATE INDEX …` for an index, `UNIQUE (…)` for a unique constraint.
    pub definition: String,
    pub constraint: bool,
}

impl TableKey {
    pub fn create(&self) -> SchemaOp {
        let (name, definition) = (self.name.clone(), self.definition.clone());
        match self.constraint {
            true => SchemaOp::AddConstraint { name, definition },
            false => SchemaOp::CreateIndex { name, definition },
        }
    }

    pub fn drop(&self) -> SchemaOp {
        let name = self.name.clone();
        match self.constraint {
            true => SchemaOp::DropConstraint { name },
            false => SchemaOp::DropIndex { name },
        }
    }

    /// What the target does to go from `before` to `after`: keys gone or changed
    /// dropped, then keys new or changed created.
    pub fn changes(before: &[TableKey], after: &[TableKey]) -> Vec<SchemaOp> {
        let dropped = before.iter().filter(|k| !after.contains(k)).map(TableKey::drop);
        dropped.chain(after.iter().filter(|k| !before.contains(k)).map(TableKey::create)).collect()
    }
}

/// How many times the catalog is read, at most, for two reads in a row that agree.
const CATALOG_READS: usize = 20;

/// The selected tables of database `db` with the value encoding of each column.
/// How [`read_tables`] reads `information_schema`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CatalogRead {
    /// DDL may run: read until two reads in a row agree.
    Settled,
    /// Under `FLUSH TABLES WITH READ LOCK`, where no DDL runs: once.
    Locked,
}

pub async fn read_tables(
    conn: &mut mysql_async::Conn,
    db: &str,
    read: CatalogRead,
    include: impl Fn(&TableName) -> bool,
) -> anyhow::Result<(SourceSchema, HashMap<TableName, MysqlTable>)> {
    let db = db.to_string();
    let mut followed = HashMap::new();
    // Every column cutover cannot map, reported together.
    let mut unsupported = Vec::new();
    // information_schema is no snapshot: a DDL statement between two of its queries (a
    // table renamed after the tables were listed, before its columns were) gives a view
    // of no one moment. Read until two reads in a row agree.
    let mut rows = CatalogRows::read(conn, &db).await?;
    for attempt in (read == CatalogRead::Settled).then_some(1..).into_iter().flatten() {
        let again = CatalogRows::read(conn, &db).await?;
        if again.same_shape(&rows) {
            break;
        }
        if attempt >= CATALOG_READS {
            return Err(crate::retry::ResumeFromCheckpoint(format!(
                "the source's tables in {db} changed during each of {CATALOG_READS} reads of its catalog (DDL running)"
            ))
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        rows = again;
    }
    let CatalogRows { tables, columns, checks, indexes } = rows;

    let mut schema = SourceSchema::default();
    for (table, rows, bytes, auto_increment) in tables {
        let name = TableName::new(db.clone(), table.clone());
        if !include(&name) {
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
        for (
            _,
            column,
            data_type,
            column_type,
            precision,
            scale,
            datetime_precision,
            length,
            nullable,
            extra,
            charset,
            default,
        ) in columns.iter().filter(|c| c.0 == table)
        {
            let is_json = checks
                .iter()
                .any(|(t, clause)| t == &table && clause.replace('`', "").trim() == format!("json_valid({column})"));
            let mysql = MysqlColumn {
                name: column.clone(),
                data_type: data_type.to_lowercase(),
                column_type: column_type.to_lowercase(),
                numeric_precision: *precision,
                numeric_scale: *scale,
                datetime_precision: *datetime_precision,
                character_maximum_length: *length,
                is_json,
                charset: charset.clone(),
            };
            let mapping = match map_column(&mysql) {
                Ok(mapping) => mapping,
                Err(e) => {
                    unsupported.push(format!("table {name}: {e}"));
                    continue;
                }
            };
            let type_name = match mapping.enum_labels {
                Some(labels) => {
                    let enum_name = TableName::new(db.clone(), format!("{table}_{column}"));
                    let qualified = quote_table(&enum_name);
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
                default: literal_default(default.as_deref()),
            });
            // VIRTUAL / STORED (PERSISTENT) columns: the binlog carries their values like any
            // other column's, and MySQL's expressions are not PostgreSQL's.
            let generated = extra.to_ascii_uppercase().contains("GENERATED");
            definitions.push(ColumnDefinition {
                not_null: nullable == "NO",
                identity: auto.then_some('d'),
                source_type: Some(column_type.clone()),
                loss: match generated {
                    true => {
                        Some("generated on the source: a plain column on the target, filled with the source's values")
                    }
                    false => mapping.loss,
                },
            });
            encodings.push(mapping.encoding);
        }
        let list = |columns: &[String]| columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let qualified = quote_table(&name);
        let mut constraints = Vec::new();
        let mut index_sql = Vec::new();
        let mut keys = Vec::new();
        for (index, unique, columns) in &index_groups {
            // MySQL index names are per table; PostgreSQL's are per schema.
            let pg_name = format!("{table}_{index}");
            let key = match *unique {
                true => TableKey { name: pg_name, definition: format!("UNIQUE ({})", list(columns)), constraint: true },
                false => {
                    let definition =
                        format!("CREATE INDEX {} ON {qualified} ({})", quote_ident(&pg_name), list(columns));
                    TableKey { name: pg_name, definition, constraint: false }
                }
            };
            match key.constraint {
                true => constraints.push((key.name.clone(), key.definition.clone())),
                false => index_sql.push(key.definition.clone()),
            }
            keys.push(key);
        }
        let identity = if key_columns.is_empty() { Identity::Full } else { Identity::Key };
        let table_schema = TableSchema { name: name.clone(), columns: table_columns, identity };
        followed.insert(
            name.clone(),
            MysqlTable { schema: Arc::new(table_schema.clone()), encodings: Arc::new(encodings), keys },
        );
        schema.tables.push(TableDefinition {
            schema: table_schema,
            columns: definitions,
            primary_key: (!key_columns.is_empty())
                .then(|| (format!("{table}_pkey"), format!("PRIMARY KEY ({})", list(&key_columns)))),
            constraints,
            foreign_keys: Vec::new(),
            indexes: index_sql,
            estimated_rows: rows.unwrap_or(0),
            pages: bytes.unwrap_or(0) / 8192,
            has_user_types: false,
            partitioning: None,
            inherits: Vec::new(),
            key_span: None,
            generated: Vec::new(),
        });
    }
    if !unsupported.is_empty() {
        anyhow::bail!(
            "{}\nleave such tables out with [source] exclude, or change the columns to a type cutover maps",
            unsupported.join("\n")
        );
    }
    Ok((schema, followed))
}

#[cfg(test)]
mod tests {
    use super::literal_default;

    #[test]
    fn keeps_only_literal_defaults() {
        assert_eq!(literal_default(Some("7")), Some("7".into()));
        assert_eq!(literal_default(Some("'it''s'")), Some("'it''s'".into()));
        assert_eq!(literal_default(Some("current_timestamp()")), None);
        assert_eq!(literal_default(Some("NULL")), None);
        assert_eq!(literal_default(None), None);
    }
}
