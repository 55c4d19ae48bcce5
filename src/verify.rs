//! `cutover verify`: source against target, table by table, in key-range chunks.
//!
//! Where both sides speak the same dialect, each server hashes its own rows: a
//! chunk is a row count and a sum of 64-bit row hashes, and a chunk that differs
//! is bisected by key until it is small enough to compare rows by their md5 one by one.
//! Across dialects the rows travel to cutover and each value is brought to one
//! canonical text (`compare::canonical`, by column type) before rows are compared.
//!
//! Chunks are ranges of the first key column. Only types every dialect orders
//! alike (integers, decimals, dates and times) are split by range; a table keyed
//! by text (whose order depends on collations) or without a key is split by key
//! hash into buckets where the servers hash (one pass per side gives every
//! bucket's digest), and compared whole across dialects.
//!
//! On a live pipeline a row the target has not caught up with yet looks changed:
//! rows found different are read again on the source, then on the target once it
//! has applied everything the source had written by then.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::compare::canonical;
use crate::config::{Config, TargetKind};
use crate::schema::sqlite::{encode, SqliteType, Stored};
use crate::schema::TableDefinition;
use crate::sql::{Rows, SqlClient, SqlDialect};
use crate::status::Request;

/// Rows per chunk when each server hashes its own rows.
const SERVER_CHUNK_ROWS: u64 = 100_000;
/// Rows per chunk when rows travel to cutover to be compared.
const CANONICAL_CHUNK_ROWS: u64 = 10_000;
/// A differing chunk this small is compared row by row instead of split again.
const LEAF_ROWS: u64 = 1_000;
/// Keys shown per kind of difference.
pub const SHOWN_KEYS: usize = 20;
/// How often differing rows of a live pipeline are read again.
const RECHECK_ROUNDS: usize = 3;
/// How long a re-check waits for the target to catch up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// Rows of one kind of difference: how many, and the first keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    pub count: u64,
    pub keys: Vec<String>,
}

impl Differences {
    fn add(&mut self, key: &str) {
        self.count += 1;
        if self.keys.len() < SHOWN_KEYS {
            self.keys.push(key.to_string());
        }
    }
}

/// One table's outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub chunks: usize,
    /// On the source, not on the target.
    pub missing: Differences,
    /// On the target, not on the source.
    pub extra: Differences,
    /// On both, with different values.
    pub changed: Differences,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows && self.missing.count + self.extra.count + self.changed.count == 0
    }
}

/// Everything verify found.
#[derive(Clone, Debug, Default)]
pub struct Verification {
    pub tables: Vec<TableReport>,
    /// On a live pipeline: the position the target had applied when the last differing rows were read.
    pub consistent_at: Option<String>,
    pub elapsed: Duration,
}

impl Verification {
    pub fn matches(&self) -> bool {
        self.tables.iter().all(TableReport::matches)
    }
}

/// How chunks are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hashing {
    /// Same dialect: the servers hash their rows.
    Server,
    /// Different dialects: rows come to cutover in canonical form.
    Canonical,
}

/// How a column's values are read and canonicalized across dialects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueClass {
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

    fn canonical(self, value: &str) -> String {
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
enum KeyOrder {
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
enum Bound {
    /// Written bare: MySQL compares a DECIMAL with a quoted string as a double.
    Number(String),
    Text(String),
}

impl Bound {
    fn new(value: String) -> Bound {
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
struct Range {
    lo: Option<Bound>,
    hi: Option<Bound>,
    buckets: Option<Buckets>,
}

/// Rows whose key's hash (the whole row's, without a key) modulo `of` is one of `these`:
/// slices of a table whose keys no range can split alike on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Buckets {
    of: u64,
    these: Vec<u64>,
}

/// One table as both sides see it.
struct TablePlan {
    display: String,
    /// The table, quoted for the source and for the target.
    source_table: String,
    target_table: String,
    columns: Vec<(String, ValueClass)>,
    /// Indexes of the key columns, in column order; empty for a table without a key.
    key: Vec<usize>,
    key_order: KeyOrder,
    /// The source's row estimate (0 when it has none): sizes the chunks.
    estimated_rows: u64,
    /// A SQLite source's columns: values are read by the copy's own rule (`schema::sqlite::encode`).
    sqlite_types: Option<Vec<SqliteType>>,
}

/// One side of the comparison.
struct Side {
    client: SqlClient,
    name: &'static str,
}

impl Side {
    async fn run(&mut self, sql: &str) -> anyhow::Result<Rows> {
        self.client.run(sql).await.with_context(|| format!("on the {}: {sql}", self.name))
    }

    fn dialect(&self) -> SqlDialect {
        self.client.dialect()
    }

    /// A table's rows for comparison; a SQLite source's values as the copy wrote them.
    async fn table_rows(&mut self, sql: &str, plan: &TablePlan) -> anyhow::Result<Rows> {
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
    fn new(
        config: &Config,
        table: &TableDefinition,
        source: SqlDialect,
        target: SqlDialect,
    ) -> anyhow::Result<TablePlan> {
        let name = &table.schema.name;
        let source_table = match source {
            // A SQLite file has one namespace; its tables land in `public`.
            SqlDialect::Sqlite => source.ident(&name.name),
            _ => format!("{}.{}", source.ident(&name.schema), source.ident(&name.name)),
        };
        let target_schema = match config.target.kind {
            TargetKind::Postgres => name.schema.clone(),
            TargetKind::Mysql => crate::connect::target_database(config, &name.schema)?,
        };
        let target_table = format!("{}.{}", target.ident(&target_schema), target.ident(&name.name));
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
            columns,
            key,
            key_order,
            estimated_rows: table.estimated_rows,
            sqlite_types,
        })
    }

    fn table(&self, side: &Side) -> &str {
        if side.name == "source" {
            &self.source_table
        } else {
            &self.target_table
        }
    }

    fn first_key(&self, dialect: SqlDialect) -> Option<String> {
        self.key.first().map(|&i| dialect.ident(&self.columns[i].0))
    }

    fn predicate(&self, dialect: SqlDialect, range: &Range) -> String {
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

    /// A row's bucket of `of`, by its key's text (its whole text without a key). Server
    /// hashing only: both sides compute it alike.
    fn bucket(&self, dialect: SqlDialect, of: u64) -> String {
        let key = match self.key.is_empty() {
            true => self.row_text(dialect),
            false => self.columns_text(dialect, &self.key),
        };
        match dialect {
            SqlDialect::Mysql => format!("CRC32({key}) % {of}"),
            _ => format!("(hashtextextended({key}, 1) & 9223372036854775807) % {of}"),
        }
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
    fn digest_sql(&self, side: &Side, range: &Range) -> String {
        let dialect = side.dialect();
        let sum = TablePlan::hash_sum(dialect, &self.row_text(dialect));
        format!("SELECT COUNT(*), {sum} FROM {} WHERE {}", self.table(side), self.predicate(dialect, range))
    }

    /// Per bucket of `of` in a range: its number, row count and sum of row hashes, in one pass.
    fn bucket_digests_sql(&self, side: &Side, range: &Range, of: u64) -> String {
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
    fn rows_sql(&self, side: &Side, range: &Range, hashing: Hashing) -> String {
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
    fn stored(&self, dialect: SqlDialect, i: usize) -> String {
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

    /// Rows of a range as `(key, compared value)`, sorted; without a key, `(the row's
    /// identity, its text as shown)`.
    fn keyed_rows(&self, rows: Rows, hashing: Hashing) -> Vec<(String, String)> {
        let mut keyed: Vec<(String, String)> = rows
            .into_iter()
            .map(|row| match hashing {
                // Without a key a row is its own identity (its md5), shown by its text.
                Hashing::Server if self.key.is_empty() => (
                    row.get(1).cloned().flatten().unwrap_or_default(),
                    shorten(row.first().cloned().flatten().unwrap_or_default()),
                ),
                Hashing::Server => {
                    let key: Vec<Option<String>> = row[..self.key.len().min(row.len())].to_vec();
                    (key_text(&key), row.last().cloned().flatten().unwrap_or_default())
                }
                Hashing::Canonical => {
                    let values: Vec<Option<String>> = row
                        .iter()
                        .zip(&self.columns)
                        .map(|(value, (_, class))| value.as_deref().map(|v| class.canonical(v)))
                        .collect();
                    let compared = values
                        .iter()
                        .map(|v| v.as_deref().map_or("\u{0}N".to_string(), |v| format!("{}:{v}", v.len())))
                        .collect::<Vec<_>>()
                        .join(",");
                    match self.key.is_empty() {
                        // Without a key a row is its own identity, shown by its values.
                        true => (compared, shorten(key_text(&values))),
                        false => {
                            let key = self.key.iter().map(|&i| values.get(i).cloned().flatten()).collect::<Vec<_>>();
                            (key_text(&key), compared)
                        }
                    }
                }
            })
            .collect();
        keyed.sort();
        keyed
    }
}

/// A key as the report shows it: the value, or `(a, b)` for a composite key.
fn key_text(values: &[Option<String>]) -> String {
    let shown: Vec<&str> = values.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
    match shown.as_slice() {
        [one] => one.to_string(),
        many => format!("({})", many.join(", ")),
    }
}

/// A table without a key is reported by its rows' values, cut to a readable length.
fn shorten(text: String) -> String {
    const SHOWN: usize = 120;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Walks two sorted row lists, recording what one has and the other lacks (rows
/// without a key are named by their text, and are never "changed"). Returns whether
/// anything differed.
fn diff_rows(
    source: &[(String, String)],
    target: &[(String, String)],
    keyless: bool,
    report: &mut TableReport,
) -> bool {
    let shown = |row: &(String, String)| if keyless { row.1.clone() } else { row.0.clone() };
    let (mut i, mut j, mut differed) = (0, 0, false);
    while i < source.len() || j < target.len() {
        let order = match (source.get(i), target.get(j)) {
            (Some(s), Some(t)) => s.0.cmp(&t.0),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                report.missing.add(&shown(&source[i]));
                i += 1;
                differed = true;
            }
            Ordering::Greater => {
                report.extra.add(&shown(&target[j]));
                j += 1;
                differed = true;
            }
            Ordering::Equal => {
                if !keyless && source[i].1 != target[j].1 {
                    report.changed.add(&source[i].0);
                    differed = true;
                }
                i += 1;
                j += 1;
            }
        }
    }
    differed
}

/// A count query's row: the row count and the hash sum.
fn digest(row: &[Option<String>]) -> anyhow::Result<(u64, String)> {
    let count = row.first().cloned().flatten().unwrap_or_default();
    let count = count.parse::<u64>().with_context(|| format!("row count `{count}` is not a number"))?;
    Ok((count, row.get(1).cloned().flatten().unwrap_or_default()))
}

fn parse_count(rows: &Rows) -> anyhow::Result<(u64, String)> {
    digest(rows.first().context("a count query returned no row")?)
}

/// Bucket digests by bucket number.
fn bucket_digests(rows: &Rows) -> anyhow::Result<BTreeMap<u64, (u64, String)>> {
    let mut digests = BTreeMap::new();
    for row in rows {
        let bucket = row.first().cloned().flatten().unwrap_or_default();
        let bucket = bucket.parse::<u64>().with_context(|| format!("bucket `{bucket}` is not a number"))?;
        digests.insert(bucket, digest(row.get(1..).unwrap_or_default())?);
    }
    Ok(digests)
}

/// Verifies one table: its report and the ranges that held differing rows.
struct TableCheck<'a> {
    plan: &'a TablePlan,
    hashing: Hashing,
    report: TableReport,
    /// Ranges that held differing rows, with the rows each side had in them.
    differing: Vec<(Range, u64, u64)>,
}

impl TableCheck<'_> {
    /// Chunk boundaries from the source.
    async fn ranges(&self, source: &mut Side) -> anyhow::Result<Vec<Range>> {
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

    /// Compares one chunk; bisects it when the servers' hashes differ.
    async fn chunk(&mut self, source: &mut Side, target: &mut Side, range: Range) -> anyhow::Result<()> {
        self.report.chunks += 1;
        if self.hashing == Hashing::Canonical {
            let (s, t) = self.rows(source, target, &range).await?;
            self.leaf(range, &s, &t);
            return Ok(());
        }
        let (s, t) = self.digests(source, target, &range).await?;
        let mut pending = vec![(range, s, t)];
        while let Some((range, s, t)) = pending.pop() {
            // Counts are taken where the comparison ends: a live target may catch up in between.
            if s == t {
                self.report.source_rows += s.0;
                self.report.target_rows += t.0;
                continue;
            }
            let larger = s.0.max(t.0);
            if larger > LEAF_ROWS && self.plan.key_order == KeyOrder::Whole {
                self.buckets(source, target, &range, larger / LEAF_ROWS).await?;
                continue;
            }
            if larger > LEAF_ROWS {
                let side = if s.0 >= t.0 { &mut *source } else { &mut *target };
                if let Some(middle) = self.middle(side, &range, larger / 2).await? {
                    let left = Range { lo: range.lo.clone(), hi: Some(middle.clone()), buckets: None };
                    let right = Range { lo: Some(middle), hi: range.hi.clone(), buckets: None };
                    let (ls, lt) = self.digests(source, target, &left).await?;
                    let (rs, rt) = self.digests(source, target, &right).await?;
                    pending.push((left, ls, lt));
                    pending.push((right, rs, rt));
                    continue;
                }
            }
            let (s, t) = self.rows(source, target, &range).await?;
            self.leaf(range, &s, &t);
        }
        Ok(())
    }

    /// Rows compared one by one: counted, and their range kept for a re-check if they differ.
    fn leaf(&mut self, range: Range, source: &[(String, String)], target: &[(String, String)]) {
        self.report.source_rows += source.len() as u64;
        self.report.target_rows += target.len() as u64;
        if diff_rows(source, target, self.plan.key.is_empty(), &mut self.report) {
            self.differing.push((range, source.len() as u64, target.len() as u64));
        }
    }

    /// A differing part of a table no range splits alike on both sides, in about `of` buckets
    /// by key hash: every bucket's digest in one pass per side, then the rows of those that differ.
    async fn buckets(&mut self, source: &mut Side, target: &mut Side, range: &Range, of: u64) -> anyhow::Result<()> {
        let of = of.clamp(2, 100_000);
        self.report.chunks += of as usize - 1;
        let (source_sql, target_sql) =
            (self.plan.bucket_digests_sql(source, range, of), self.plan.bucket_digests_sql(target, range, of));
        let (s, t) = tokio::join!(source.run(&source_sql), target.run(&target_sql));
        let (s, t) = (bucket_digests(&s?)?, bucket_digests(&t?)?);
        let buckets: BTreeSet<u64> = s.keys().chain(t.keys()).copied().collect();
        let mut differing = Vec::new();
        for bucket in buckets {
            match (s.get(&bucket), t.get(&bucket)) {
                (Some(s), Some(t)) if s == t => {
                    self.report.source_rows += s.0;
                    self.report.target_rows += t.0;
                }
                _ => differing.push(bucket),
            }
        }
        for these in differing.chunks(LEAF_ROWS as usize) {
            let slice = Range { buckets: Some(Buckets { of, these: these.to_vec() }), ..range.clone() };
            let (s, t) = self.rows(source, target, &slice).await?;
            self.leaf(slice, &s, &t);
        }
        Ok(())
    }

    async fn digests(
        &self,
        source: &mut Side,
        target: &mut Side,
        range: &Range,
    ) -> anyhow::Result<((u64, String), (u64, String))> {
        let (source_sql, target_sql) = (self.plan.digest_sql(source, range), self.plan.digest_sql(target, range));
        let (s, t) = tokio::join!(source.run(&source_sql), target.run(&target_sql));
        Ok((parse_count(&s?)?, parse_count(&t?)?))
    }

    /// Both sides' rows of a range, read at once.
    async fn rows(
        &self,
        source: &mut Side,
        target: &mut Side,
        range: &Range,
    ) -> anyhow::Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        let (s, t) = tokio::join!(self.side_rows(source, range), self.side_rows(target, range));
        Ok((s?, t?))
    }

    /// One side's rows of a range, keyed and sorted.
    async fn side_rows(&self, side: &mut Side, range: &Range) -> anyhow::Result<Vec<(String, String)>> {
        let sql = self.plan.rows_sql(side, range, self.hashing);
        Ok(self.plan.keyed_rows(side.table_rows(&sql, self.plan).await?, self.hashing))
    }

    /// The first key column's value `offset` rows into a range, when it splits the range.
    async fn middle(&self, side: &mut Side, range: &Range, offset: u64) -> anyhow::Result<Option<Bound>> {
        let dialect = side.dialect();
        let Some(key) = self.plan.first_key(dialect) else { return Ok(None) };
        let sql = format!(
            "SELECT {key} FROM {} WHERE {} ORDER BY {key} LIMIT 1 OFFSET {offset}",
            self.plan.table(side),
            self.plan.predicate(dialect, range)
        );
        let value = side.run(&sql).await?.into_iter().next().and_then(|row| row.into_iter().next().flatten());
        let middle = value.map(Bound::new);
        // Rows sharing the first key column's value cannot be split by it.
        Ok(middle.filter(|m| range.lo.as_ref() != Some(m)))
    }

    /// Reads the differing ranges again: the source first, then, once the target has applied
    /// everything the source had written by then, the target. Returns the position waited for.
    async fn recheck(
        &mut self,
        config: &Config,
        source: &mut Side,
        target: &mut Side,
    ) -> anyhow::Result<Option<String>> {
        let ranges = std::mem::take(&mut self.differing);
        let mut source_rows = Vec::with_capacity(ranges.len());
        for (range, _, _) in &ranges {
            source_rows.push(self.side_rows(source, range).await?);
        }
        let position = crate::pipeline::source_position(config).await?;
        // A daemon that stopped meanwhile: compare the rows as they are.
        let (reached, applied) =
            crate::pipeline::wait_until_applied(config, &position, CATCH_UP_WAIT).await.unwrap_or((false, None));
        if !reached {
            tracing::warn!(
                "the target did not reach the source's position {position} within {} s (applied: {}); \
                 differing rows are compared as they are",
                CATCH_UP_WAIT.as_secs(),
                applied.as_deref().unwrap_or("none")
            );
        }
        self.report.missing = Differences::default();
        self.report.extra = Differences::default();
        self.report.changed = Differences::default();
        for ((range, old_s, old_t), s) in ranges.into_iter().zip(source_rows) {
            let t = self.side_rows(target, &range).await?;
            let (new_s, new_t) = (s.len() as u64, t.len() as u64);
            self.report.source_rows = self.report.source_rows.saturating_sub(old_s) + new_s;
            self.report.target_rows = self.report.target_rows.saturating_sub(old_t) + new_t;
            if diff_rows(&s, &t, self.plan.key.is_empty(), &mut self.report) {
                self.differing.push((range, new_s, new_t));
            }
        }
        Ok(applied.filter(|_| reached))
    }
}

/// Compares every selected table.
pub async fn verify(config: &Config) -> anyhow::Result<Verification> {
    let started = Instant::now();
    let source_dialect = SqlDialect::of_source(config, "verify")?;
    let target_dialect = SqlDialect::of_target(config);
    let hashing = if source_dialect == target_dialect { Hashing::Server } else { Hashing::Canonical };
    let mut source = Side {
        client: SqlClient::open(source_dialect, config.source.endpoint()).await.context("[source]")?,
        name: "source",
    };
    let mut target = Side {
        client: SqlClient::open(target_dialect, config.target.endpoint()).await.context("[target]")?,
        name: "target",
    };
    let schema = crate::connect::source(config).await?.schema().await?;
    let live = crate::status::ask(&config.state.dir, &Request::Status).await.ok().flatten().is_some_and(|s| s.running);

    let mut checks = Vec::new();
    let plans: Vec<TablePlan> = schema
        .tables
        .iter()
        .map(|table| TablePlan::new(config, table, source_dialect, target_dialect))
        .collect::<anyhow::Result<_>>()?;
    for plan in &plans {
        let mut check = TableCheck {
            plan,
            hashing,
            report: TableReport { table: plan.display.clone(), ..TableReport::default() },
            differing: Vec::new(),
        };
        for range in check.ranges(&mut source).await.with_context(|| format!("splitting {}", plan.display))? {
            check
                .chunk(&mut source, &mut target, range)
                .await
                .with_context(|| format!("comparing {}", plan.display))?;
        }
        checks.push(check);
    }

    let mut consistent_at = None;
    if live {
        for _ in 0..RECHECK_ROUNDS {
            let mut rechecked = false;
            for check in checks.iter_mut().filter(|c| !c.differing.is_empty()) {
                consistent_at = check.recheck(config, &mut source, &mut target).await?;
                rechecked = true;
            }
            if !rechecked {
                break;
            }
        }
    }
    Ok(Verification {
        tables: checks.into_iter().map(|c| c.report).collect(),
        consistent_at,
        elapsed: started.elapsed(),
    })
}

/// The reports as a table for a terminal, then the keys of differing rows.
pub fn render(verification: &Verification) -> String {
    let mut out = format!("{:<40} {:>12} {:>12} {:>7}  result\n", "table", "source rows", "target rows", "chunks");
    for r in &verification.tables {
        let result = match r.matches() {
            true => "ok".to_string(),
            false => {
                format!("differ: {} missing, {} extra, {} changed", r.missing.count, r.extra.count, r.changed.count)
            }
        };
        out.push_str(&format!(
            "{:<40} {:>12} {:>12} {:>7}  {result}\n",
            r.table, r.source_rows, r.target_rows, r.chunks
        ));
    }
    for r in verification.tables.iter().filter(|r| !r.matches()) {
        out.push_str(&format!("\n{}:\n", r.table));
        for (what, differences) in
            [("missing on the target", &r.missing), ("extra on the target", &r.extra), ("changed", &r.changed)]
        {
            if differences.count == 0 {
                continue;
            }
            let more = differences.count - differences.keys.len() as u64;
            let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
            out.push_str(&format!("  {what}: {}{more}\n", differences.keys.join(", ")));
        }
    }
    if let Some(position) = &verification.consistent_at {
        out.push_str(&format!("\ndiffering rows re-read with the target at {position}\n"));
    }
    out.push_str(&format!(
        "\n{} tables, {} match ({:.1} s)\n",
        verification.tables.len(),
        verification.tables.iter().filter(|r| r.matches()).count(),
        verification.elapsed.as_secs_f64()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn row_lists_differ_by_missing_extra_and_changed_keys() {
        let mut report = TableReport::default();
        let source = rows(&[("1", "a"), ("2", "b"), ("3", "c"), ("5", "e")]);
        let target = rows(&[("1", "a"), ("3", "C"), ("4", "d"), ("5", "e")]);
        assert!(diff_rows(&source, &target, false, &mut report));
        assert_eq!(report.missing.keys, vec!["2"]);
        assert_eq!(report.extra.keys, vec!["4"]);
        assert_eq!(report.changed.keys, vec!["3"]);
        assert!(!diff_rows(&source, &source, false, &mut TableReport::default()));
        // Without a key: rows named by their text, never changed.
        let mut report = TableReport::default();
        assert!(diff_rows(&rows(&[("h1", "(1,a)")]), &rows(&[("h2", "(1,b)")]), true, &mut report));
        assert_eq!(
            (report.missing.keys.clone(), report.extra.keys.clone(), report.changed.count),
            (vec!["(1,a)".to_string()], vec!["(1,b)".to_string()], 0)
        );
    }

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

    #[test]
    fn long_keyless_rows_are_shortened_for_the_report() {
        let long = "x".repeat(500);
        assert_eq!(shorten(long).chars().count(), 121);
        assert_eq!(key_text(&[Some("1".into()), None]), "(1, NULL)");
    }
}
