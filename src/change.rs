//! The common change model every source produces and every sink applies.
//!
//! A source emits a stream of [`Event`]s: `Begin`, the transaction's changes in
//! commit order, `Commit`. Transactions are never collected in memory; the
//! pipeline and the sink see them change by change and group whole transactions
//! into target transactions.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::position::Position;

/// A table's qualified name, as the source spells it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// How the source identifies the row an UPDATE or DELETE touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// By the columns marked `is_key` (primary key or a replica identity index).
    Key,
    /// By all columns (PostgreSQL `REPLICA IDENTITY FULL`): the old row is sent whole.
    Full,
    /// Not at all: only INSERT and TRUNCATE can be replicated.
    Nothing,
}

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type as the source's SQL spells it (`numeric(30,10)`, `public.mood[]`).
    pub type_name: String,
    /// The source's type OID (PostgreSQL) — decides the copy format.
    pub type_oid: u32,
    /// Part of the row identity.
    pub is_key: bool,
    /// The default expression (PostgreSQL SQL) as the source has it: a column added
    /// mid-stream gets it on the target, so rows that existed before match.
    pub default: Option<String>,
}

/// A table's columns and identity, as of some position in the source's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    pub name: TableName,
    pub columns: Vec<Column>,
    pub identity: Identity,
}

impl TableSchema {
    /// Indexes of the identity columns, in column order.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect()
    }
}

/// A column value. PostgreSQL sources carry values in PostgreSQL's text form,
/// which a PostgreSQL target casts back without loss.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// PostgreSQL's unchanged-TOAST marker: the column keeps the value the target has.
    Unchanged,
    /// The value in the source's canonical text form.
    Text(String),
}

/// One row, its values in the order of its table's columns.
pub type Row = Vec<Value>;

/// One change inside a transaction.
#[derive(Clone, Debug)]
pub enum Change {
    Insert {
        table: Arc<TableSchema>,
        row: Row,
    },
    /// `old` is the identity of the row before the update when the source sent one:
    /// key columns only (other columns `Null`) for [`Identity::Key`], the whole row for
    /// [`Identity::Full`]. `None` means the key did not change.
    Update {
        table: Arc<TableSchema>,
        old: Option<Row>,
        new: Row,
    },
    /// `old` holds the key columns ([`Identity::Key`]) or the whole row ([`Identity::Full`]).
    Delete {
        table: Arc<TableSchema>,
        old: Row,
    },
    Truncate {
        tables: Vec<Arc<TableSchema>>,
        cascade: bool,
        restart_identity: bool,
    },
    /// The table's columns as of this point (a column was added, or first sight of it).
    Relation(Arc<TableSchema>),
    /// The table's definition changed (DDL captured on the source, in order with the rows).
    Schema(SchemaChange),
}

/// DDL on one table, as the source ran it: what the target must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaChange {
    pub table: TableName,
    /// The source's statement, for messages (it may hold several statements, or none
    /// that names the table: it is never run on the target).
    pub statement: String,
    pub ops: Vec<SchemaOp>,
}

/// What the rows of a column added to a table with rows hold on the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExistingRows {
    /// NULL: the column has no default.
    Null,
    /// The default as evaluated once by the ADD (PostgreSQL's "missing value"), in text form.
    Value(String),
    /// Computed from each row by an expression the target evaluates the same way (a
    /// STORED generated column).
    Generated,
}

/// One step of a [`SchemaChange`]. Expressions and definitions are PostgreSQL SQL with
/// every name qualified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaOp {
    /// A table the selection matches appeared (created, or renamed into the selection):
    /// it joins the pipeline, copied under a snapshot of its own.
    CreateTable,
    DropTable,
    /// The change touched rows in a way the change log does not carry (a column's type
    /// rewritten, a partition attached, a volatile default filled in): the table is
    /// copied again. `why` says which.
    CopyAgain {
        why: String,
    },
    AddColumn {
        name: String,
        type_name: String,
        not_null: bool,
        /// Default or generation expression.
        expression: Option<String>,
        existing: ExistingRows,
    },
    DropColumn {
        name: String,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    /// A type change that keeps every value's text (`varchar(10)` → `varchar(20)`, `int` → `bigint`).
    SetType {
        column: String,
        type_name: String,
    },
    SetDefault {
        column: String,
        default: Option<String>,
    },
    SetNotNull {
        column: String,
        not_null: bool,
    },
    /// `definition`: `CREATE [UNIQUE] INDEX name ON schema.table USING …`.
    CreateIndex {
        name: String,
        definition: String,
    },
    DropIndex {
        name: String,
    },
    RenameIndex {
        from: String,
        to: String,
    },
    /// `definition`: as `pg_get_constraintdef` prints it (`FOREIGN KEY (a) REFERENCES s.t(id)`).
    AddConstraint {
        name: String,
        definition: String,
    },
    DropConstraint {
        name: String,
    },
    RenameConstraint {
        from: String,
        to: String,
    },
    /// A new partition of the table (or of one of its partitions), empty when created.
    CreatePartition {
        name: TableName,
        parent: TableName,
        bound: String,
        partition_key: Option<String>,
    },
    /// A partition left the table with its rows (`DETACH PARTITION`).
    DetachPartition {
        name: TableName,
        parent: TableName,
    },
    /// A partition was dropped with its rows.
    DropPartition {
        name: TableName,
    },
}

impl SchemaOp {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SchemaOp::CreateTable => "create table",
            SchemaOp::DropTable => "drop table",
            SchemaOp::CopyAgain { .. } => "copy again",
            SchemaOp::AddColumn { .. } => "add column",
            SchemaOp::DropColumn { .. } => "drop column",
            SchemaOp::RenameColumn { .. } => "rename column",
            SchemaOp::SetType { .. } => "alter column type",
            SchemaOp::SetDefault { .. } => "alter column default",
            SchemaOp::SetNotNull { .. } => "alter column not null",
            SchemaOp::CreateIndex { .. } => "create index",
            SchemaOp::DropIndex { .. } => "drop index",
            SchemaOp::RenameIndex { .. } => "rename index",
            SchemaOp::AddConstraint { .. } => "add constraint",
            SchemaOp::DropConstraint { .. } => "drop constraint",
            SchemaOp::RenameConstraint { .. } => "rename constraint",
            SchemaOp::CreatePartition { .. } => "create partition",
            SchemaOp::DetachPartition { .. } => "detach partition",
            SchemaOp::DropPartition { .. } => "drop partition",
        }
    }
}

/// Bytes a row's values hold, with a small allowance per value.
fn row_bytes(row: &[Value]) -> usize {
    row.iter().map(|v| 16 + if let Value::Text(text) = v { text.len() } else { 0 }).sum()
}

impl Change {
    /// About how many bytes of memory the change holds (its values' text).
    pub fn approx_bytes(&self) -> usize {
        64 + match self {
            Change::Insert { row, .. } => row_bytes(row),
            Change::Update { old, new, .. } => old.as_deref().map_or(0, row_bytes) + row_bytes(new),
            Change::Delete { old, .. } => row_bytes(old),
            Change::Truncate { .. } | Change::Relation(_) => 0,
            Change::Schema(change) => change.statement.len(),
        }
    }

    /// The table the change is about (the first one for a truncate).
    pub fn table(&self) -> Option<&TableName> {
        match self {
            Change::Insert { table, .. }
            | Change::Update { table, .. }
            | Change::Delete { table, .. }
            | Change::Relation(table) => Some(&table.name),
            Change::Truncate { tables, .. } => tables.first().map(|t| &t.name),
            Change::Schema(change) => Some(&change.table),
        }
    }
}

/// What a source's change stream yields.
#[derive(Clone, Debug)]
pub enum Event {
    /// A transaction starts. `position` orders it against snapshot positions
    /// (PostgreSQL: its commit LSN).
    Begin {
        position: Position,
        commit_time: SystemTime,
    },
    Change(Change),
    /// The transaction committed. `position` is where a restart resumes after it.
    Commit {
        position: Position,
        commit_time: SystemTime,
    },
    /// Between transactions: the source has sent every transaction its log holds before
    /// `position` (a PostgreSQL keepalive's `wal_end`, a MySQL heartbeat's position). A
    /// replay to a time ends on it once it passes the log's end read after that time.
    Heartbeat {
        position: Position,
    },
}

impl Event {
    /// About how many bytes of memory the event holds: what bounds the decode → apply
    /// channel and a batch by size, not only by count.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Event::Change(change) => change.approx_bytes(),
            Event::Begin { .. } | Event::Commit { .. } | Event::Heartbeat { .. } => 64,
        }
    }
}
