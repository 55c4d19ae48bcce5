//! What sources and sinks share for the snapshot copy: the part of a table one copy
//! reads, the byte format both ends understand, the stream of those bytes, and the
//! dialect a source's values come in (sinks pick the copy format by it).

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

/// Which database and version the data comes from; sinks pick copy formats by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDialect {
    Postgres {
        major: u32,
    },
    /// MySQL or MariaDB: values in MySQL's text form, rewritten for the target.
    Mysql,
    /// SQLite: values checked against their declared types on the way.
    Sqlite,
    /// MongoDB: documents mapped to rows in PostgreSQL's text form.
    Mongodb,
}

/// The part of a table one copy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    Whole,
    /// PostgreSQL heap pages `[start, end)`, read by a TID range scan.
    Pages {
        start: u32,
        end: u32,
    },
    /// Rows whose integer primary key is in `[start, end)`; `None` is unbounded.
    KeyRange {
        start: Option<i64>,
        end: Option<i64>,
    },
    /// One partition of a partitioned table: the `n`th of its
    /// [`row_holders`](crate::schema::TableDefinition::row_holders).
    Partition(usize),
}

/// The byte format of a copy stream, understood by both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    PostgresBinary,
    PostgresText,
}

/// Table rows on their way from source to sink, never parsed on the way.
pub struct CopyStream {
    pub format: CopyFormat,
    pub data: Pin<Box<dyn Stream<Item = anyhow::Result<Bytes>> + Send>>,
}
