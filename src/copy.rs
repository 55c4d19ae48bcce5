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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

impl Chunk {
    /// `2 × workers` ranges of a single integer key whose values span `[min, max]`, so a
    /// slow range does not hold up the rest; the outer ranges are open, so rows outside
    /// the span (written after it was read) are not missed.
    pub fn key_ranges((min, max): (i64, i64), workers: usize) -> Vec<Chunk> {
        let count = (workers.max(1) * 2) as i128;
        let width = ((i128::from(max) - i128::from(min)) / count + 1).max(1);
        // Bounds past the largest key go no further than it; the empty ranges that makes go.
        let bound = |i: i128| i64::try_from(i128::from(min) + width * i).unwrap_or(i64::MAX);
        (0..count)
            .map(|i| Chunk::KeyRange { start: (i > 0).then(|| bound(i)), end: (i < count - 1).then(|| bound(i + 1)) })
            .filter(|chunk| !matches!(chunk, Chunk::KeyRange { start: Some(s), end: Some(e) } if s >= e))
            .collect()
    }

    /// The SQL condition on `column` (quoted) that selects a key range's rows; `None`
    /// for a chunk that is no key range, or one without bounds.
    pub fn key_condition(&self, column: &str) -> Option<String> {
        let Chunk::KeyRange { start, end } = *self else { return None };
        let bounds: Vec<String> = [start.map(|s| format!("{column} >= {s}")), end.map(|e| format!("{column} < {e}"))]
            .into_iter()
            .flatten()
            .collect();
        (!bounds.is_empty()).then(|| bounds.join(" AND "))
    }

    /// Whether the row with integer key `key` lies in this key range (any key lies in a
    /// chunk that is not a key range).
    pub fn holds_key(&self, key: i64) -> bool {
        match *self {
            Chunk::KeyRange { start, end } => start.is_none_or(|s| key >= s) && end.is_none_or(|e| key < e),
            _ => true,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::Chunk;

    #[test]
    fn key_ranges_cover_every_key_once_even_at_the_extremes() {
        for span in [(1, 10), (0, 0), (i64::MIN, i64::MAX), (-5, 3), (i64::MAX - 1, i64::MAX)] {
            let ranges = Chunk::key_ranges(span, 3);
            for key in [i64::MIN, span.0.saturating_sub(1), span.0, 0, span.1, span.1.saturating_add(1), i64::MAX] {
                let holders = ranges.iter().filter(|r| r.holds_key(key)).count();
                assert_eq!(holders, 1, "key {key} in {span:?}: {ranges:?}");
            }
        }
    }
}
