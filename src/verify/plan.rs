//! One table as both sides see it: how its columns are read, how its key splits it
//! into chunks, and the SQL each side runs.

use anyhow::Context as _;

use crate::compare::canonical;
use crate::config::{Config, TargetKind};
use crate::schema::sqlite::{encode, SqliteType, Stored};
use crate::schema::TableDefinition;
use crate::sql::{Rows, SqlClient, SqlDialect};

use super::{Hashing, TableCheck, CANONICAL_CHUNK_ROWS, SERVER_CHUNK_ROWS};

/// How a column's values are read and canonicalized across dialects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValueClass {
    /// Compared as stored.
    Text,
    /// Blank-padded `character(n)`: trailing blanks say nothing.
    PaddedText,
    /// Read as lowercase hex.
    Binary,
    /// PostgreSQL arrays, MySQL SET lists or JSON arrays: compared as JSON arrays.
    Array,
    /// Bit strings: read as `0`/`1` digits (MySQL `BIN`), leading zeros aside.
    Bits,
    /// Dates and timestamps: MySQL's zero dates read as NULL, as the copy writes them.
    Date,
    /// MySQL `time` (PostgreSQL `interval`): read as `TIME(6)` on MySQL, whatever its fraction.
    Interval,
    /// 4-byte floats: compared as the same `f32` (MySQL prints FLOAT to 6 digits; read as DOUBLE).
    Real,
    /// 8-byte floats: compared as the same `f64`, exponent or not.
    Double,
    /// Numbers, booleans, times, JSON: `compare::canonical`.
    Other,
}

impl ValueClass {
    /// From the type as the source's schema spells it (PostgreSQL's names).
    fn of(type_name: &str) -> ValueClass {
        let t = type_name.to_ascii_lowercase();
        if t.ends_with("[]") {
            ValueClass::Array
        } else if t.starts_with("bit") {
            ValueClass::Bits
        } else if t.starts_with("date") || t.starts_with("timestamp") {
            ValueClass::Date
        } else if t.starts_with("interval") {
            ValueClass::Interval
        } else if t == "real" || t == "float4" {
            ValueClass::Real
        } else if t == "double precision" || t == "float8" {
            ValueClass::Double
        } else if t == "bytea" {
            ValueClass::Binary
        } else if t.starts_with("character(") || t == "character" || t == "bpchar" {
            ValueClass::PaddedText
        } else if t.starts_with("text")
            || t.starts_with("character varying")
            || t.starts_with("varchar")
            || t == "citext"
        {
            ValueClass::Text
        } else {
            ValueClass::Other
        }
    }

    pub(super) fn canonical(self, value: &str) -> String {
        match self {
            ValueClass::Text => value.to_string(),
            // PostgreSQL's `\x` form (a SQLite source's blobs) or bare hex.
            ValueClass::Binary => value.strip_prefix("\\x").unwrap_or(value).to_string(),
            ValueClass::PaddedText => value.trim_end_matches(' ').to_string(),
            ValueClass::Array => match serde_json::from_str::<serde_json::Value>(value) {
                Ok(json @ serde_json::Value::Array(_)) => crate::compare::sorted_json(&json),
                // A MySQL SET: `a,b`.
                _ => {
                    let labels: Vec<serde_json::Value> = match value {
                        "" => Vec::new(),
                        list => list.split(',').map(|l| serde_json::Value::String(l.to_string())).collect(),
                    };
                    crate::compare::sorted_json(&serde_json::Value::Array(labels))
                }
            },
            ValueClass::Bits => match value.trim_start_matches('0') {
                "" => "0".to_string(),
                bits => bits.to_string(),
            },
            ValueClass::Real => value.trim().parse::<f32>().map_or_else(|_| value.to_string(), |f| format!("{f:?}")),
            ValueClass::Double => value.trim().parse::<f64>().map_or_else(|_| value.to_string(), |f| format!("{f:?}")),
            ValueClass::Date | ValueClass::Interval | ValueClass::Other => canonical(value),
        }
    }
}

/// How the first key column's values split into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyOrder {
    /// Integers: ranges of equal width between the lowest and highest key.
    Integer,
    /// Ordered alike by every dialect: boundaries read from the source.
    Universal,
    /// Ordered by collation (text, uuid, …), or no key: the table is one chunk.
    Whole,
}

impl KeyOrder {
    fn of(type_name: &str) -> KeyOrder {
        let t = type_name.to_ascii_lowercase();
        if matches!(t.as_str(), "smallint" | "integer" | "bigint" | "int" | "int2" | "int4" | "int8") {
            KeyOrder::Integer
        } else if t.starts_with("numeric") || t.starts_with("decimal") || t == "date" || t.starts_with("timestamp") {
            KeyOrder::Universal
        } else {
            KeyOrder::Whole
        }
    }
}

/// A chunk boundary: a value of the first key column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Bound {
    /// Written bare: MySQL compares a DECIMAL with a quoted string as a double.
    Number(String),
    Text(String),
}

impl Bound {
    pub(super) fn new(value: String) -> Bound {
        let digits = value.strip_prefix('-').unwrap_or(&value);
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
        let number = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if number(whole) && number(fraction) {
            Bound::Number(value)
        } else {
            Bound::Text(value)
        }
    }

    fn sql(&self, dialect: SqlDialect) -> String {
        match self {
            Bound::Number(number) => number.clone(),
            Bound::Text(text) => dialect.literal(text),
        }
    }
}

/// The rows one comparison covers: the first key column in `[lo, hi)` (`None` is
/// unbounded) and, where set, key hashes in some buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Range {
    pub(super) lo: Option<Bound>,
    pub(super) hi: Option<Bound>,
    pub(super) buckets: Option<Buckets>,
}

/// Rows whose key's hash (the whole row's, without a key) modulo `of` is one of `these`:
/// slices of a table whose keys no range can split alike on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Buckets {
    pub(super) of: u64,
    pub(super) these: Vec<u64>,
}

/// One table as both sides see it.
pub(super) struct TablePlan {
    pub(super) display: String,
    /// The table, quoted for the source and for the target.
    source_table: String,
    target_table: String,
    /// The source's dialect.
    source: SqlDialect,
    /// The target's schema (MySQL: database) and table, unquoted.
    target_name: (String, String),
    pub(super) columns: Vec<(String, ValueClass)>,
    /// Indexes of the key columns, in column order; empty for a table without a key.
    pub(super) key: Vec<usize>,
    pub(super) key_order: KeyOrder,
    /// Across dialects, the column whose text both sides print alike (text, uuid, an
    /// integer, bytes as hex, a boolean as 1 or 0) that buckets go by: the first key
    /// column, or without a key the first such column; `None` when there is none.
    bucket_column: Option<usize>,
    /// The bucket column is a boolean (PostgreSQL prints it `t`/`f`, MySQL `1`/`0`).
    bucket_boolean: bool,
    /// The source's row estimate (0 when it has none): sizes the chunks.
    estimated_rows: u64,
    /// Source and target speak different dialects: buckets go by a hash both compute alike.
    across: bool,
    /// A SQLite source's columns: values are read by the copy's own rule (`schema::sqlite::encode`).
    sqlite_types: Option<Vec<SqliteType>>,
}

/// One side of the comparison.
pub(super) struct Side {
    pub(super) client: SqlClient,
    pub(super) name: &'static str,
}

impl Side {
    pub(super) async fn run(&mut self, sql: &str) -> anyhow::Result<Rows> {
        self.client.run(sql).await.with_context(|| format!("on the {}: {sql}", self.name))
    }

    pub(super) fn dialect(&self) -> SqlDialect {
        self.client.dialect()
    }

    /// A table's rows for comparison; a SQLite source's values as the copy wrote them.
    pub(super) async fn table_rows(&mut self, sql: &str, plan: &TablePlan) -> anyhow::Result<Rows> {
        match (&self.client, &plan.sqlite_types) {
            (SqlClient::Sqlite(conn), Some(types)) => {
                sqlite_rows(conn, sql, types).with_context(|| format!("on the {}: {sql}", self.name))
            }
            _ => self.run(sql).await,
        }
    }
}

/// Rows of a SQLite query, each value in PostgreSQL's text form by the copy's rule; a value
/// the copy would have refused is read as text (as `on_type_mismatch = "text"` copies it).
fn sqlite_rows(conn: &rusqlite::Connection, sql: &str, types: &[SqliteType]) -> anyhow::Result<Rows> {
    let mut statement = conn.prepare(sql)?;
    let mut rows = statement.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(types.len());
        for (i, kind) in types.iter().enumerate() {
            let stored = Stored::from(row.get_ref(i)?);
            values.push(match encode(*kind, stored) {
                Ok(value) => value,
                Err(_) => encode(SqliteType::Text, stored).ok().flatten(),
            });
        }
        out.push(values);
    }
    Ok(out)
}

impl TablePlan {
    pub(super) fn new(
        config: &Config,
        table: &TableDefinition,
        source: SqlDialect,
        target: SqlDialect,
    ) -> anyhow::Result<TablePlan> {
        let name = &table.schema.name;
        // A PostgreSQL table's rows without those of tables that inherit from it (each of
        // those is a table of its own here); a partitioned table's rows are its partitions'.
        let only = |dialect: SqlDialect| match dialect == SqlDialect::Postgres && table.partitioning.is_none() {
            true => "ONLY ",
            false => "",
        };
        let source_table = match source {
            // A SQLite file has one namespace; its tables land in `public`.
            SqlDialect::Sqlite => source.ident(&name.name),
            _ => format!("{}{}.{}", only(source), source.ident(&name.schema), source.ident(&name.name)),
        };
        let target_schema = match config.target.kind {
            TargetKind::Postgres => name.schema.clone(),
            TargetKind::Mysql => crate::connect::target_database(config, &name.schema)?,
        };
        let target_table = format!("{}{}.{}", only(target), target.ident(&target_schema), target.ident(&name.name));
        let target_name = (target_schema, name.name.clone());
        let columns: Vec<(String, ValueClass)> =
            table.schema.columns.iter().map(|c| (c.name.clone(), ValueClass::of(&c.type_name))).collect();
        let key = table.schema.key_indexes();
        // A key in the source schema that is not the primary key (MySQL: a unique key) still orders rows.
        let key_order = match key.first() {
            // SQLite orders its raw stored values (unix times, text, numbers mixed), not the copy's.
            Some(&first) => match KeyOrder::of(&table.schema.columns[first].type_name) {
                KeyOrder::Universal if source == SqlDialect::Sqlite => KeyOrder::Whole,
                order => order,
            },
            None => KeyOrder::Whole,
        };
        let type_name = |i: usize| table.schema.columns[i].type_name.to_ascii_lowercase();
        let same_text = |i: usize| {
            matches!(columns[i].1, ValueClass::Text | ValueClass::PaddedText | ValueClass::Binary)
                || ["uuid", "boolean"].contains(&type_name(i).as_str())
                || KeyOrder::of(&type_name(i)) == KeyOrder::Integer
        };
        // Without a key, a boolean (at most three buckets) only when nothing else is there.
        let bucket_column = match key.first() {
            Some(&first) => same_text(first).then_some(first),
            None => (0..columns.len())
                .find(|&i| same_text(i) && type_name(i) != "boolean")
                .or_else(|| (0..columns.len()).find(|&i| same_text(i))),
        };
        let sqlite_types = match source {
            SqlDialect::Sqlite => Some(
                table
                    .schema
                    .columns
                    .iter()
                    .map(|c| {
                        SqliteType::from_target_type(&c.type_name)
                            .with_context(|| format!("{name}.{}: type {} is no SQLite mapping", c.name, c.type_name))
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            _ => None,
        };
        Ok(TablePlan {
            display: name.to_string(),
            source_table,
            target_table,
            source,
            target_name,
            columns,
            key,
            key_order,
            bucket_boolean: bucket_column.is_some_and(|i| type_name(i) == "boolean"),
            bucket_column,
            estimated_rows: table.estimated_rows,
            across: source != target,
            sqlite_types,
        })
    }

    pub(super) fn table(&self, side: &Side) -> &str {
        if side.name == "source" {
            &self.source_table
        } else {
            &self.target_table
        }
    }

    /// The target's schema (MySQL: database) and table, unquoted.
    pub(super) fn target_name(&self) -> (&str, &str) {
        (&self.target_name.0, &self.target_name.1)
    }

    /// The rows of a range, in the source's SQL.
    pub(super) fn source_predicate(&self, range: &Range) -> String {
        self.predicate(self.source, range)
    }

    pub(super) fn first_key(&self, dialect: SqlDialect) -> Option<String> {
        self.key.first().map(|&i| dialect.ident(&self.columns[i].0))
    }

    pub(super) fn predicate(&self, dialect: SqlDialect, range: &Range) -> String {
        let mut parts = Vec::new();
        if let Some(key) = self.first_key(dialect) {
            if let Some(lo) = &range.lo {
                parts.push(format!("{key} >= {}", lo.sql(dialect)));
            }
            if let Some(hi) = &range.hi {
                parts.push(format!("{key} < {}", hi.sql(dialect)));
            }
        }
        if let Some(buckets) = &range.buckets {
            let these: Vec<String> = buckets.these.iter().map(u64::to_string).collect();
            parts.push(format!("{} IN ({})", self.bucket(dialect, buckets.of), these.join(", ")));
        }
        if parts.is_empty() {
            "1 = 1".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// A row's bucket of `of`, by its key's text (its whole text without a key) within one
    /// dialect; across dialects by the md5 of the UTF-8 text of its bucket column, which
    /// both sides print alike (NULL as the empty text).
    fn bucket(&self, dialect: SqlDialect, of: u64) -> String {
        if self.across {
            let column = self.bucket_column.map(|i| self.bucket_text(dialect, i)).unwrap_or_default();
            return match dialect {
                SqlDialect::Mysql => format!(
                    "CAST(CONV(LEFT(MD5(COALESCE(CONVERT({column} USING utf8mb4), '')), 8), 16, 10) AS UNSIGNED) % {of}"
                ),
                _ => format!("('x' || left(md5(coalesce({column}::text, '')), 8))::bit(32)::bigint % {of}"),
            };
        }
        let key = match self.key.is_empty() {
            true => self.row_text(dialect),
            false => self.columns_text(dialect, &self.key),
        };
        match dialect {
            SqlDialect::Mysql => format!("CRC32({key}) % {of}"),
            _ => format!("(hashtextextended({key}, 1) & 9223372036854775807) % {of}"),
        }
    }

    /// Across dialects, whether the table's rows go in buckets: no range splits them alike
    /// on both sides (a key by collation, or none), a column holds values whose UTF-8 text
    /// both sides hash alike (trailing blanks of a padded column dropped by both), and
    /// neither side is SQLite (no md5).
    fn buckets_across(&self, source: SqlDialect) -> bool {
        self.across && source != SqlDialect::Sqlite && self.key_order == KeyOrder::Whole && self.bucket_column.is_some()
    }

    /// Every row with its bucket of `of` first, ordered by bucket, the values as
    /// [`Hashing::Canonical`] reads them: one pass over the table, sorted by the server.
    pub(super) fn bucketed_rows_sql(&self, side: &Side, of: u64) -> String {
        let dialect = side.dialect();
        let values: Vec<String> = (0..self.columns.len()).map(|i| self.text_of(dialect, i)).collect();
        format!("SELECT {} AS b, {} FROM {} ORDER BY 1", self.bucket(dialect, of), values.join(", "), self.table(side))
    }

    /// The sum of the 64-bit hashes of the row texts `row`, as text.
    fn hash_sum(dialect: SqlDialect, row: &str) -> String {
        match dialect {
            SqlDialect::Mysql => {
                format!("CAST(COALESCE(SUM(CAST(CONV(LEFT(MD5({row}), 16), 16, 10) AS UNSIGNED)), 0) AS CHAR)")
            }
            // hash_bytes_extended, unchanged since PostgreSQL 11: 3× cheaper than md5. A chunk that
            // differs only by it would be bisected and its rows compared by md5 (found equal).
            _ => format!("COALESCE(SUM(hashtextextended({row}, 0)), 0)::text"),
        }
    }

    /// A row's text, unambiguous and the same for equal rows on the same dialect.
    fn row_text(&self, dialect: SqlDialect) -> String {
        self.columns_text(dialect, &(0..self.columns.len()).collect::<Vec<_>>())
    }

    /// Some columns' values as one text, unambiguous and the same for equal values on the same dialect.
    fn columns_text(&self, dialect: SqlDialect, columns: &[usize]) -> String {
        match dialect {
            SqlDialect::Mysql => {
                let values = columns.iter().map(|&i| format!("QUOTE({})", self.stored(dialect, i)));
                format!("CONCAT_WS(',', {})", values.collect::<Vec<_>>().join(", "))
            }
            // Server hashing never runs on SQLite (it is never a target); the text is PostgreSQL's.
            SqlDialect::Postgres | SqlDialect::Sqlite => {
                let columns = columns.iter().map(|&i| dialect.ident(&self.columns[i].0));
                format!("ROW({})::text", columns.collect::<Vec<_>>().join(", "))
            }
        }
    }

    /// Row count and the sum of the rows' 64-bit hashes in a range, as text.
    pub(super) fn digest_sql(&self, side: &Side, range: &Range) -> String {
        let dialect = side.dialect();
        let sum = TablePlan::hash_sum(dialect, &self.row_text(dialect));
        format!("SELECT COUNT(*), {sum} FROM {} WHERE {}", self.table(side), self.predicate(dialect, range))
    }

    /// Per bucket of `of` in a range: its number, row count and sum of row hashes, in one pass.
    pub(super) fn bucket_digests_sql(&self, side: &Side, range: &Range, of: u64) -> String {
        let dialect = side.dialect();
        format!(
            "SELECT b, COUNT(*), {} FROM (SELECT {} AS b, {} AS r FROM {} WHERE {}) s GROUP BY b",
            TablePlan::hash_sum(dialect, "r"),
            self.bucket(dialect, of),
            self.row_text(dialect),
            self.table(side),
            self.predicate(dialect, range)
        )
    }

    /// Each row's key and what its values compare by: the server's row hash, or
    /// (canonical) the values themselves.
    pub(super) fn rows_sql(&self, side: &Side, range: &Range, hashing: Hashing) -> String {
        let dialect = side.dialect();
        let select = match hashing {
            Hashing::Server => {
                let row = self.row_text(dialect);
                let mut select: Vec<String> = self.key.iter().map(|&i| self.text_of(dialect, i)).collect();
                select.push(format!("MD5({row})"));
                if self.key.is_empty() {
                    select.insert(0, row);
                }
                select
            }
            Hashing::Canonical => (0..self.columns.len()).map(|i| self.text_of(dialect, i)).collect(),
        };
        format!("SELECT {} FROM {} WHERE {}", select.join(", "), self.table(side), self.predicate(dialect, range))
    }

    /// A column's value as the copy carries it (on MySQL, zero dates are NULL), in a form
    /// both sides print alike.
    pub(super) fn stored(&self, dialect: SqlDialect, i: usize) -> String {
        let (name, class) = &self.columns[i];
        let column = dialect.ident(name);
        match (dialect, class) {
            (SqlDialect::Mysql, ValueClass::Date) => {
                format!("IF(MONTH({column}) = 0 OR DAYOFMONTH({column}) = 0, NULL, {column})")
            }
            (SqlDialect::Mysql, ValueClass::Interval) => format!("CAST({column} AS TIME(6))"),
            (SqlDialect::Mysql, ValueClass::Real) => format!("({column} * 1e0)"),
            _ => column,
        }
    }

    /// The bucket column as text both dialects print alike: bytes as lowercase hex, booleans
    /// as 1 or 0 (as MySQL stores them; the copy refuses any other value there).
    fn bucket_text(&self, dialect: SqlDialect, i: usize) -> String {
        match (dialect, self.bucket_boolean) {
            (SqlDialect::Postgres, true) => format!("{}::int", dialect.ident(&self.columns[i].0)),
            _ => self.text_of(dialect, i),
        }
    }

    /// A column read as text in its class's form.
    fn text_of(&self, dialect: SqlDialect, i: usize) -> String {
        let column = self.stored(dialect, i);
        match (dialect, self.columns[i].1) {
            (SqlDialect::Postgres, ValueClass::Binary) => format!("encode({column}, 'hex')"),
            (SqlDialect::Postgres, ValueClass::Array) => format!("array_to_json({column})::text"),
            (SqlDialect::Mysql, ValueClass::Binary) => format!("LOWER(HEX({column}))"),
            (SqlDialect::Mysql, ValueClass::Bits) => format!("BIN({column})"),
            _ => column,
        }
    }
}

impl TableCheck<'_> {
    /// Across dialects, for a table keyed by text: how many buckets its rows go in (about
    /// half a chunk's rows each), when more than one and both sides hash the key's UTF-8
    /// text (a PostgreSQL side's server encoding is UTF8).
    pub(super) async fn buckets_across(&self, source: &mut Side, target: &mut Side) -> anyhow::Result<Option<u64>> {
        if !self.plan.buckets_across(source.dialect()) {
            return Ok(None);
        }
        for side in [&mut *source, &mut *target] {
            if side.dialect() == SqlDialect::Postgres {
                let encoding = side.run("SELECT current_setting('server_encoding')").await?;
                if encoding.first().and_then(|r| r.first().cloned().flatten()).as_deref() != Some("UTF8") {
                    return Ok(None);
                }
            }
        }
        let count = match self.plan.estimated_rows {
            0 => {
                let rows = source.run(&format!("SELECT COUNT(*) FROM {}", self.plan.table(source))).await?;
                rows.first().and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            estimate => estimate,
        };
        let of = count / CANONICAL_CHUNK_ROWS * 2;
        Ok((of > 1).then_some(of))
    }

    /// Chunk boundaries from the source.
    pub(super) async fn ranges(&self, source: &mut Side) -> anyhow::Result<Vec<Range>> {
        let dialect = source.dialect();
        let table = self.plan.table(source).to_string();
        let Some(key) = self.plan.first_key(dialect) else { return Ok(vec![Range::default()]) };
        let chunk_rows = match self.hashing {
            Hashing::Server => SERVER_CHUNK_ROWS,
            Hashing::Canonical => CANONICAL_CHUNK_ROWS,
        };
        let bounds = match self.plan.key_order {
            KeyOrder::Whole => Vec::new(),
            KeyOrder::Integer if self.hashing == Hashing::Server => {
                // MIN and MAX come from the index; the row count from the estimate, when there is one.
                let count = match self.plan.estimated_rows {
                    0 => "COUNT(*)".to_string(),
                    estimate => estimate.to_string(),
                };
                let rows = source.run(&format!("SELECT MIN({key}), MAX({key}), {count} FROM {table}")).await?;
                let row = rows.first().context("MIN/MAX returned no row")?;
                let number = |i: usize| row.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
                match (number(0), number(1), number(2)) {
                    (Some(min), Some(max), Some(count)) if count as u64 > chunk_rows => {
                        let chunks = (count as u64).div_ceil(chunk_rows) as i128;
                        let width = ((i128::from(max) - i128::from(min) + 1) / chunks).max(1);
                        (1..chunks)
                            .filter_map(|c| i64::try_from(i128::from(min) + c * width).ok())
                            .filter(|&b| b <= max)
                            .map(|b| Bound::Number(b.to_string()))
                            .collect()
                    }
                    _ => Vec::new(),
                }
            }
            // Rows that travel are bounded by count: equal key widths could put most rows in one chunk.
            KeyOrder::Integer | KeyOrder::Universal => {
                let sql = format!(
                    "SELECT k FROM (SELECT {key} AS k, ROW_NUMBER() OVER (ORDER BY {key}) AS n FROM {table}) s \
                     WHERE n % {chunk_rows} = 0 ORDER BY k"
                );
                let mut bounds: Vec<Bound> = Vec::new();
                for row in source.run(&sql).await? {
                    if let Some(Some(value)) = row.into_iter().next() {
                        // The target parses the boundary: in a form both dialects read.
                        let value = match self.hashing {
                            Hashing::Server => value,
                            Hashing::Canonical => canonical(&value),
                        };
                        let bound = Bound::new(value);
                        if bounds.last() != Some(&bound) {
                            bounds.push(bound);
                        }
                    }
                }
                bounds
            }
        };
        let mut ranges = Vec::with_capacity(bounds.len() + 1);
        let mut lo = None;
        for bound in bounds {
            ranges.push(Range { lo: lo.take(), hi: Some(bound.clone()), buckets: None });
            lo = Some(bound);
        }
        ranges.push(Range { lo, hi: None, buckets: None });
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_compare_alike_across_dialects_by_column_class() {
        assert_eq!(ValueClass::of("text[]").canonical("[\"a\",\"b\"]"), ValueClass::Array.canonical("a,b"));
        assert_eq!(ValueClass::Array.canonical("[]"), ValueClass::Array.canonical(""));
        assert_eq!(ValueClass::of("character(5)").canonical("ab   "), "ab");
        // Text is compared as stored: `t` is not `1` in a text column.
        assert_ne!(ValueClass::of("text").canonical("t"), ValueClass::of("text").canonical("1"));
        assert_eq!(ValueClass::of("boolean").canonical("t"), ValueClass::of("boolean").canonical("1"));
        assert_eq!(ValueClass::of("bit varying(12)").canonical("000101"), ValueClass::Bits.canonical("101"));
        assert_eq!(
            ValueClass::of("timestamp with time zone").canonical("2024-01-01 10:00:00.5+00"),
            ValueClass::Other.canonical("2024-01-01 10:00:00.500000")
        );
    }

    #[test]
    fn floats_compare_as_the_same_number() {
        assert_eq!(
            ValueClass::of("double precision").canonical("1.7e+15"),
            ValueClass::Double.canonical("1700000000000000.0")
        );
        // MySQL's FLOAT read as DOUBLE against PostgreSQL's real.
        assert_eq!(ValueClass::of("real").canonical("3.1415927"), ValueClass::Real.canonical("3.141592741012573"));
        assert_eq!(ValueClass::Double.canonical("NaN"), ValueClass::Double.canonical("NaN"));
    }

    #[test]
    fn numeric_bounds_are_written_bare() {
        assert_eq!(Bound::new("-12.50".into()).sql(SqlDialect::Mysql), "-12.50");
        assert_eq!(Bound::new("1e5".into()).sql(SqlDialect::Mysql), "'1e5'");
        assert_eq!(Bound::new("2024-01-01".into()).sql(SqlDialect::Postgres), "'2024-01-01'");
        assert_eq!(Bound::new("1.".into()).sql(SqlDialect::Postgres), "'1.'");
    }

    #[test]
    fn keys_split_only_where_every_dialect_orders_alike() {
        assert_eq!(KeyOrder::of("bigint"), KeyOrder::Integer);
        assert_eq!(KeyOrder::of("numeric(10,2)"), KeyOrder::Universal);
        assert_eq!(KeyOrder::of("timestamp with time zone"), KeyOrder::Universal);
        assert_eq!(KeyOrder::of("text"), KeyOrder::Whole);
        assert_eq!(KeyOrder::of("uuid"), KeyOrder::Whole);
    }
}
