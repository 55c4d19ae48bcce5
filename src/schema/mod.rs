//! What a table looks like beyond its columns — constraints, indexes,
//! sequences, enum types — so a sink can create it, plus identifier quoting.
//!
//! Definitions carry SQL fragments in PostgreSQL's dialect (as the source's
//! catalog prints them); the PostgreSQL sink turns them into DDL.

pub mod mysql;
pub mod mysql_target;
pub mod postgres;
pub mod sqlite;

use crate::change::{Column, TableName, TableSchema};

/// `"ident"`, with embedded quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'text'`, with embedded quotes doubled (standard_conforming_strings on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `"schema"."name"`.
pub fn quote_table(name: &TableName) -> String {
    format!("{}.{}", quote_ident(&name.schema), quote_ident(&name.name))
}

/// Appends one value to a PostgreSQL text-`COPY` row (escaped; NULL as `\N`).
pub fn push_copy_field(row: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        row.extend_from_slice(b"\\N");
        return;
    };
    for &byte in value.as_bytes() {
        match byte {
            b'\\' => row.extend_from_slice(b"\\\\"),
            b'\t' => row.extend_from_slice(b"\\t"),
            b'\n' => row.extend_from_slice(b"\\n"),
            b'\r' => row.extend_from_slice(b"\\r"),
            other => row.push(other),
        }
    }
}

/// Everything the source knows about the objects it replicates.
#[derive(Clone, Debug, Default)]
pub struct SourceSchema {
    pub enums: Vec<EnumType>,
    /// Domains, composite and range types the tables' columns use, each after the types
    /// it is made of.
    pub types: Vec<UserType>,
    /// Extensions whose types the tables' columns use, or that the source database has.
    pub extensions: Vec<Extension>,
    pub sequences: Vec<Sequence>,
    pub tables: Vec<TableDefinition>,
}

/// A user-defined type other than an enum.
#[derive(Clone, Debug)]
pub struct UserType {
    pub name: TableName,
    pub kind: UserTypeKind,
}

/// What a [`UserType`] is made of; type names as `format_type` prints them.
#[derive(Clone, Debug)]
pub enum UserTypeKind {
    Domain {
        base: String,
        not_null: bool,
        default: Option<String>,
        /// `(name, CHECK (…))` as `pg_get_constraintdef` prints them.
        checks: Vec<(String, String)>,
    },
    Composite {
        attributes: Vec<(String, String)>,
    },
    Range {
        subtype: String,
    },
}

/// An extension of the source database.
#[derive(Clone, Debug)]
pub struct Extension {
    pub name: String,
    /// The schema its objects live in.
    pub schema: String,
    /// Columns (`schema.table.column`) whose type it provides: it must exist on the target.
    pub needed_by: Vec<String>,
}

/// A table with everything needed to recreate it.
#[derive(Clone, Debug)]
pub struct TableDefinition {
    pub schema: TableSchema,
    pub columns: Vec<ColumnDefinition>,
    /// `(name, definition)` as `pg_get_constraintdef` prints it.
    pub primary_key: Option<(String, String)>,
    /// Unique, check and exclusion constraints.
    pub constraints: Vec<(String, String)>,
    pub foreign_keys: Vec<(String, String)>,
    /// `CREATE INDEX` statements for indexes that back no constraint.
    pub indexes: Vec<String>,
    /// The planner's row estimate and the table's size in 8 kB pages.
    pub estimated_rows: u64,
    pub pages: u64,
    /// Some column's type (or its element type) is user-defined: its binary form
    /// carries OIDs that differ on the target, so the copy goes as text.
    pub has_user_types: bool,
    /// Set for a PostgreSQL partitioned table: its rows live in its partitions.
    pub partitioning: Option<Partitioning>,
    /// Columns the source computes: not in `schema.columns`, never copied or streamed.
    pub generated: Vec<GeneratedColumn>,
    /// The tables it inherits from (PostgreSQL `INHERITS`, not partitioning): it is copied
    /// and streamed as a table of its own, and the link is not made on the target.
    pub inherits: Vec<TableName>,
    /// The least and greatest value of its key, read where the key is a single integer
    /// column and the table big enough to split: the copy then goes in key ranges, and a
    /// copy cut short resumes from the ranges it finished (the applier places each
    /// streamed row in its range by key).
    pub key_span: Option<(i64, i64)>,
}

/// A column the database computes from the row's other columns (PostgreSQL
/// `GENERATED ALWAYS AS (…) STORED`): the target computes it too.
#[derive(Clone, Debug)]
pub struct GeneratedColumn {
    pub name: String,
    pub type_name: String,
    /// As `pg_get_expr` prints it.
    pub expression: String,
    /// Its place among all the table's columns, data and generated.
    pub position: usize,
}

/// How a partitioned table splits its rows, and its partitions.
#[derive(Clone, Debug)]
pub struct Partitioning {
    /// As `pg_get_partkeydef` prints it: `RANGE (created_at)`, `LIST (region)`, `HASH (id)`.
    pub key: String,
    /// Every partition below the table, each parent before its own partitions.
    pub partitions: Vec<Partition>,
}

/// One partition of a partitioned table.
#[derive(Clone, Debug)]
pub struct Partition {
    pub name: TableName,
    pub parent: TableName,
    /// As `pg_get_expr(relpartbound)` prints it: `FOR VALUES FROM (…) TO (…)`, `DEFAULT`.
    pub bound: String,
    /// Its own partition key when it is partitioned in turn; `None` for a partition that holds rows.
    pub key: Option<String>,
}

/// A table's columns' names, types and key, data and generated ([`TableDefinition::signature`]).
pub fn signature(columns: &[Column], generated: &[GeneratedColumn]) -> Vec<String> {
    let data = columns.iter().map(|c| format!("{} {} {}", c.name, c.type_name, c.is_key));
    data.chain(generated.iter().map(|g| format!("{} {} ({})", g.name, g.type_name, g.expression))).collect()
}

impl TableDefinition {
    /// Its columns' names, types and key, data and generated: what a copy of it reads and
    /// a chunk plan records.
    pub fn signature(&self) -> Vec<String> {
        signature(&self.schema.columns, &self.generated)
    }

    /// The names of every column, data and generated.
    pub fn column_names(&self) -> Vec<&str> {
        let data = self.schema.columns.iter().map(|c| c.name.as_str());
        data.chain(self.generated.iter().map(|g| g.name.as_str())).collect()
    }

    /// The tables that hold this table's rows: its partitions that hold rows (for a
    /// partitioned table), else the table itself.
    pub fn row_holders(&self) -> Vec<&TableName> {
        match &self.partitioning {
            Some(partitioning) => partitioning.partitions.iter().filter(|p| p.key.is_none()).map(|p| &p.name).collect(),
            None => vec![&self.schema.name],
        }
    }
}

/// A column's DDL beyond name and type.
#[derive(Clone, Debug)]
pub struct ColumnDefinition {
    pub not_null: bool,
    /// `a` (always) or `d` (by default) for identity columns.
    pub identity: Option<char>,
    /// The type as the source declares it, when it differs from the target's (the plan shows both).
    pub source_type: Option<String>,
    /// What the type mapping can lose, for the plan.
    pub loss: Option<&'static str>,
}

/// An enum type with its labels in order.
#[derive(Clone, Debug)]
pub struct EnumType {
    pub name: TableName,
    pub labels: Vec<String>,
}

/// A sequence, with its value as of the snapshot.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub name: TableName,
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
    /// `None` when `nextval` was never called.
    pub last_value: Option<i64>,
    /// The column that owns it (`serial`); `identity` when it belongs to an identity column.
    pub owned_by: Option<(TableName, String)>,
    pub identity: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_fields_escape_and_mark_null() {
        let mut row = Vec::new();
        super::push_copy_field(&mut row, Some("a\tb\\c\n"));
        super::push_copy_field(&mut row, None);
        assert_eq!(row, b"a\\tb\\\\c\\n\\N");
    }
}
