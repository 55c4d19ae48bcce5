//! SQLite as a one-shot source: a file is copied, then `run` exits 0.
//!
//! Why the copy is consistent: the file is opened read-only and everything —
//! the schema and every table's rows — is read inside one read transaction,
//! begun before the first read. SQLite keeps that view for as long as the
//! transaction lasts, whatever other processes write meanwhile. The copy
//! workers share that one connection, so tables are read one after another;
//! the target's loading of one overlaps the reading of the next.
//!
//! Types follow the declared types ([`crate::schema::sqlite`]); a stored value
//! that does not fit its column stops the copy with the table, rowid, column and
//! value, unless `[source] on_type_mismatch = "text"` widened that column to text
//! after a scan (the plan says which).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

use super::{ChangeStream, SnapshotPoint, Source, TableReader};
use crate::change::{Column, Identity, TableName, TableSchema};
use crate::checkpoint::PipelineIdentity;
use crate::config::{OnTypeMismatch, TableFilter};
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::finding::Finding;
use crate::position::Position;
use crate::schema::sqlite::{encode, map_declared, SqliteType, Stored};
use crate::schema::{push_copy_field, quote_ident, quote_table, ColumnDefinition, SourceSchema, TableDefinition};

/// Where SQLite tables land in a PostgreSQL target.
const TARGET_SCHEMA: &str = "public";

/// A SQLite file as a source.
pub struct SqliteSource {
    path: PathBuf,
    filter: TableFilter,
    on_mismatch: OnTypeMismatch,
    /// The one read-only connection, inside its one read transaction.
    conn: Arc<Mutex<rusqlite::Connection>>,
    tables: Arc<HashMap<TableName, SqliteTable>>,
    /// Indexes that cannot be recreated (expressions, partial), for the plan.
    skipped: Vec<String>,
}

/// How a table is read.
#[derive(Clone, Debug)]
struct SqliteTable {
    /// The name in the file.
    name: String,
    columns: Vec<String>,
    types: Vec<SqliteType>,
    /// `WITHOUT ROWID` tables are named by their key in errors.
    has_rowid: bool,
    key: Vec<usize>,
}

/// `sqlite:///srv/app/data.db` (or `sqlite:relative.db`) → the file's path.
pub fn path_from_url(url: &str) -> anyhow::Result<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .with_context(|| format!("url {url} is not a SQLite URL: write sqlite:///path/to/file.db"))?;
    anyhow::ensure!(!path.is_empty(), "url {url} names no file: write sqlite:///path/to/file.db");
    Ok(PathBuf::from(path))
}

impl SqliteSource {
    /// Opens the file read-only and begins the read transaction everything is read in.
    pub fn open(path: PathBuf, filter: TableFilter, on_mismatch: OnTypeMismatch) -> anyhow::Result<SqliteSource> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open the SQLite file {} read-only", path.display()))?;
        // The first read inside the transaction pins what every later read sees.
        conn.execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;")
            .with_context(|| format!("{} is not a SQLite database, or cannot be read", path.display()))?;
        Ok(SqliteSource {
            path,
            filter,
            on_mismatch,
            conn: Arc::new(Mutex::new(conn)),
            tables: Default::default(),
            skipped: Vec::new(),
        })
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, rusqlite::Connection>> {
        self.conn.lock().map_err(|_| anyhow::anyhow!("the SQLite connection was poisoned by a failed read"))
    }

    /// Reads every selected table's definition.
    fn read_schema(&mut self) -> anyhow::Result<SourceSchema> {
        let conn = self.lock()?;
        let context = |what: &str| format!("reading {what} from {}", self.path.display());
        let names: Vec<(String, String)> = conn
            .prepare("SELECT name, coalesce(sql, '') FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .with_context(|| context("the table list"))?;
        let selected: Vec<(String, String)> =
            names.into_iter().filter(|(name, _)| self.filter.includes(&format!("{TARGET_SCHEMA}.{name}"))).collect();
        let sizes: HashMap<String, u64> = conn
            .prepare("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?)))?.collect())
            .map(|sizes: Vec<(String, i64)>| {
                sizes.into_iter().map(|(n, s)| (n, u64::try_from(s).unwrap_or(0))).collect()
            })
            .unwrap_or_default();
        let mut schema = SourceSchema::default();
        let mut tables = HashMap::new();
        let mut skipped = Vec::new();
        for (name, sql) in &selected {
            let target = TableName::new(TARGET_SCHEMA, name.clone());
            let columns: Vec<(String, String, bool, i64)> = conn
                .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid")
                .and_then(|mut s| s.query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect())
                .with_context(|| context(&format!("the columns of {name}")))?;
            let mut key: Vec<(i64, usize)> =
                columns.iter().enumerate().filter(|(_, c)| c.3 > 0).map(|(i, c)| (c.3, i)).collect();
            key.sort_unstable();
            let key: Vec<usize> = key.into_iter().map(|(_, i)| i).collect();
            let rows: i64 = conn
                .query_row(&format!("SELECT count(*) FROM {}", quote_ident(name)), [], |r| r.get(0))
                .with_context(|| context(&format!("the rows of {name}")))?;
            let list = |cols: &[String]| cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
            let key_names: Vec<String> = key.iter().map(|&i| columns[i].0.clone()).collect();
            let (mut constraints, mut indexes) = (Vec::new(), Vec::new());
            let index_list: Vec<(String, bool, String, bool)> = conn
                .prepare("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?1) ORDER BY name")
                .and_then(|mut s| s.query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect())
                .with_context(|| context(&format!("the indexes of {name}")))?;
            for (index, unique, origin, partial) in index_list.iter().filter(|i| i.2 != "pk") {
                let cols: Vec<Option<String>> = conn
                    .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                    .and_then(|mut s| s.query_map([index], |r| r.get(0))?.collect())
                    .with_context(|| context(&format!("index {index}")))?;
                let Some(cols) = cols.into_iter().collect::<Option<Vec<String>>>().filter(|_| !partial) else {
                    skipped.push(format!("index {index} on {name} (an expression or partial index)"));
                    continue;
                };
                match (unique, origin.as_str()) {
                    (true, "u") => constraints
                        .push((format!("{name}_{}_key", cols.join("_")), format!("UNIQUE ({})", list(&cols)))),
                    (unique, _) => indexes.push(format!(
                        "CREATE {}INDEX {} ON {} ({})",
                        if *unique { "UNIQUE " } else { "" },
                        quote_ident(index),
                        quote_table(&target),
                        list(&cols)
                    )),
                }
            }
            let mut table = SqliteTable {
                name: name.clone(),
                columns: columns.iter().map(|c| c.0.clone()).collect(),
                types: columns.iter().map(|c| map_declared(&c.1)).collect(),
                has_rowid: !sql.to_ascii_uppercase().contains("WITHOUT ROWID"),
                key: key.clone(),
            };
            let mut widened = vec![false; columns.len()];
            if self.on_mismatch == OnTypeMismatch::Text {
                for column in
                    misfit_columns(&conn, &table).with_context(|| context(&format!("the values of {name}")))?
                {
                    table.types[column] = SqliteType::Text;
                    widened[column] = true;
                }
            }
            let types = table.types.clone();
            tables.insert(target.clone(), table);
            schema.tables.push(TableDefinition {
                schema: TableSchema {
                    name: target.clone(),
                    columns: columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| Column {
                            name: c.0.clone(),
                            type_name: types[i].target_type(),
                            type_oid: 0,
                            is_key: key.contains(&i),
                            default: None,
                        })
                        .collect(),
                    identity: if key.is_empty() { Identity::Full } else { Identity::Key },
                },
                columns: columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ColumnDefinition {
                        // An INTEGER PRIMARY KEY is the rowid: never NULL, whatever it declares.
                        not_null: c.2 || key == [i],
                        identity: None,
                        source_type: Some(if c.1.is_empty() { "(no type)".into() } else { c.1.clone() }),
                        loss: widened[i].then_some("values that do not fit the declared type: copied as text"),
                    })
                    .collect(),
                primary_key: (!key.is_empty())
                    .then(|| (format!("{name}_pkey"), format!("PRIMARY KEY ({})", list(&key_names)))),
                constraints,
                foreign_keys: Vec::new(),
                indexes,
                estimated_rows: u64::try_from(rows).unwrap_or(0),
                pages: sizes.get(name).copied().unwrap_or(0) / 8192,
                has_user_types: false,
                partitioning: None,
                inherits: Vec::new(),
                key_span: None,
                generated: Vec::new(),
            });
        }
        // Foreign keys to tables that are copied too; the parent's key when the column is implicit.
        let keys: HashMap<String, Vec<String>> = schema
            .tables
            .iter()
            .map(|t| {
                (
                    t.schema.name.name.clone(),
                    t.schema.columns.iter().filter(|c| c.is_key).map(|c| c.name.clone()).collect(),
                )
            })
            .collect();
        for table in &mut schema.tables {
            let fks: Vec<(i64, String, String, Option<String>, String, String)> = conn
                .prepare("SELECT id, \"table\", \"from\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1) ORDER BY id, seq")
                .and_then(|mut s| {
                    s.query_map([&table.schema.name.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
                        .collect()
                })
                .with_context(|| context(&format!("the foreign keys of {}", table.schema.name.name)))?;
            let mut grouped: Vec<ForeignKey> = Vec::new();
            for (id, parent, from, to, on_update, on_delete) in fks {
                match grouped.last_mut() {
                    Some(last) if last.id == id => {
                        last.from.push(from);
                        last.to.push(to);
                    }
                    _ => grouped.push(ForeignKey { id, parent, from: vec![from], to: vec![to], on_update, on_delete }),
                }
            }
            for ForeignKey { id, parent, from, to, on_update, on_delete } in grouped {
                let Some(parent_key) = keys.get(&parent) else {
                    skipped.push(format!("foreign key of {} to {parent}, which is not copied", table.schema.name.name));
                    continue;
                };
                let to: Vec<String> = match to.iter().all(Option::is_some) {
                    true => to.into_iter().flatten().collect(),
                    false => parent_key.clone(),
                };
                let action = |event: &str, action: &str| match action {
                    "NO ACTION" | "" => String::new(),
                    action => format!(" ON {event} {action}"),
                };
                let list = |cols: &[String]| cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
                table.foreign_keys.push((
                    format!("{}_fk{id}", table.schema.name.name),
                    format!(
                        "FOREIGN KEY ({}) REFERENCES {} ({}){}{}",
                        list(&from),
                        quote_table(&TableName::new(TARGET_SCHEMA, parent)),
                        list(&to),
                        action("UPDATE", &on_update),
                        action("DELETE", &on_delete)
                    ),
                ));
            }
        }
        drop(conn);
        self.tables = Arc::new(tables);
        self.skipped = skipped;
        Ok(schema)
    }
}

/// One foreign key as `pragma_foreign_key_list` lists it, its columns gathered.
struct ForeignKey {
    id: i64,
    parent: String,
    from: Vec<String>,
    /// `None`: the parent's primary key column in that place.
    to: Vec<Option<String>>,
    on_update: String,
    on_delete: String,
}

/// The columns holding a value that does not fit their type (for `on_type_mismatch = "text"`).
fn misfit_columns(conn: &rusqlite::Connection, table: &SqliteTable) -> rusqlite::Result<Vec<usize>> {
    let checked: Vec<usize> = (0..table.types.len()).filter(|&i| table.types[i] != SqliteType::Text).collect();
    if checked.is_empty() {
        return Ok(Vec::new());
    }
    let select: Vec<String> = checked.iter().map(|&i| quote_ident(&table.columns[i])).collect();
    let mut statement = conn.prepare(&format!("SELECT {} FROM {}", select.join(", "), quote_ident(&table.name)))?;
    let mut rows = statement.query([])?;
    let mut misfits = vec![false; checked.len()];
    while let Some(row) = rows.next()? {
        for (slot, &column) in checked.iter().enumerate() {
            if !misfits[slot] && encode(table.types[column], Stored::from(row.get_ref(slot)?)).is_err() {
                misfits[slot] = true;
            }
        }
    }
    Ok(checked.iter().zip(misfits).filter(|(_, misfit)| *misfit).map(|(&c, _)| c).collect())
}

const SNAPSHOT_ONLY: &str = "a SQLite source is copied once (snapshot only): it has no change log to stream";

#[async_trait]
impl Source for SqliteSource {
    fn dialect(&self) -> SourceDialect {
        SourceDialect::Sqlite
    }

    async fn schema(&mut self) -> anyhow::Result<SourceSchema> {
        // Brief, except for the value scan `on_type_mismatch = "text"` asks for, which a
        // one-shot copy can afford before it starts.
        self.read_schema()
    }

    async fn preflight(&mut self, schema: &SourceSchema) -> anyhow::Result<Vec<Finding>> {
        let mut findings: Vec<Finding> = self
            .skipped
            .iter()
            .map(|what| {
                Finding::warning(
                    "source",
                    what.clone(),
                    "an index or key PostgreSQL can take as is",
                    "recreate it on the target by hand after the copy".into(),
                )
            })
            .collect();
        for table in schema.tables.iter().filter(|t| t.primary_key.is_none()) {
            findings.push(Finding::warning(
                "source",
                format!("table {} has no primary key", table.schema.name),
                "a primary key",
                "copied as is, without a key on the target; add one there if the application needs it".into(),
            ));
        }
        Ok(findings)
    }

    async fn create_stream(
        &mut self,
        _tables: &[TableDefinition],
    ) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)> {
        anyhow::bail!(SNAPSHOT_ONLY)
    }

    async fn resume_stream(&mut self, _identity: &PipelineIdentity, _tables: &[TableDefinition]) -> anyhow::Result<()> {
        anyhow::bail!(SNAPSHOT_ONLY)
    }

    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint> {
        // The read transaction opened with the file is the snapshot.
        Ok(SnapshotPoint {
            position: Position::Snapshot,
            id: String::new(),
            untracked: HashMap::new(),
            shapes: HashMap::new(),
        })
    }

    async fn snapshot_reader(&self, _snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>> {
        Ok(Box::new(SqliteReader { conn: self.conn.clone(), tables: self.tables.clone() }))
    }

    async fn start_stream(
        &mut self,
        _from: &Position,
        _confirmed: watch::Receiver<Position>,
        _copies: &HashMap<String, crate::checkpoint::TableProgress>,
    ) -> anyhow::Result<Box<dyn ChangeStream>> {
        anyhow::bail!(SNAPSHOT_ONLY)
    }
}

/// Bytes per chunk handed to the sink.
const COPY_CHUNK: usize = 256 * 1024;

/// A copy worker's reader: the shared connection, one table at a time.
struct SqliteReader {
    conn: Arc<Mutex<rusqlite::Connection>>,
    tables: Arc<HashMap<TableName, SqliteTable>>,
}

#[async_trait]
impl TableReader for SqliteReader {
    async fn read_rows(
        &mut self,
        table: &TableDefinition,
        condition: &str,
    ) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let name = &table.schema.name;
        let source = self.tables.get(name).with_context(|| format!("no column mapping for {name}"))?;
        let conn =
            self.conn.lock().map_err(|_| anyhow::anyhow!("the SQLite connection was poisoned by a failed read"))?;
        let mut statement =
            conn.prepare(&source.select(Some(condition))).with_context(|| format!("reading rows of {name}"))?;
        let mut rows = statement.query([]).with_context(|| format!("reading rows of {name}"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().with_context(|| format!("reading rows of {name}"))? {
            out.push(pg_text_row(row, name, source)?);
        }
        Ok(out)
    }

    async fn read(&mut self, table: &TableDefinition, _chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        anyhow::ensure!(
            format == CopyFormat::PostgresText,
            "a SQLite source copies into PostgreSQL's text format only"
        );
        let name = table.schema.name.clone();
        let source = self.tables.get(&name).cloned().with_context(|| format!("no column mapping for {name}"))?;
        let conn = self.conn.clone();
        let (tx, mut rx) = mpsc::channel::<anyhow::Result<Bytes>>(8);
        tokio::task::spawn_blocking(move || {
            let result = read_table(&conn, &name, &source, &tx);
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}

impl SqliteTable {
    /// `SELECT` of its columns as the copy reads them, the rowid first when there is one
    /// (to name a bad row), where `condition` holds.
    fn select(&self, condition: Option<&str>) -> String {
        let columns: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        let lead = if self.has_rowid { "rowid, " } else { "" };
        let mut sql = format!("SELECT {lead}{} FROM {}", columns.join(", "), quote_ident(&self.name));
        if let Some(condition) = condition {
            sql.push_str(&format!(" WHERE {condition}"));
        }
        sql
    }
}

/// A row read by [`SqliteTable::select`], each value in PostgreSQL's text form by the
/// copy's rule; a value that does not fit its column's type is named by its row.
fn pg_text_row(row: &rusqlite::Row<'_>, name: &TableName, table: &SqliteTable) -> anyhow::Result<Vec<Option<String>>> {
    let offset = usize::from(table.has_rowid);
    let mut values = Vec::with_capacity(table.types.len());
    for (i, target) in table.types.iter().enumerate() {
        let value = row.get_ref(i + offset).with_context(|| format!("reading {name}"))?;
        let text = encode(*target, Stored::from(value)).map_err(|e| {
            let which = match table.has_rowid {
                true => format!("rowid {}", row.get::<_, i64>(0).unwrap_or_default()),
                false => {
                    let key: Vec<String> = table
                        .key
                        .iter()
                        .map(|&k| format!("{}={:?}", table.columns[k], row.get_ref(k).ok().map(Stored::from)))
                        .collect();
                    format!("key ({})", key.join(", "))
                }
            };
            anyhow::anyhow!(
                "table {name}, {which}, column {}: {e}; fix the value in the SQLite file, or set \
                 [source] on_type_mismatch = \"text\" to copy such columns as text",
                table.columns[i]
            )
        })?;
        values.push(text);
    }
    Ok(values)
}

/// Streams one table as PostgreSQL text `COPY` rows into `tx`.
fn read_table(
    conn: &Mutex<rusqlite::Connection>,
    name: &TableName,
    table: &SqliteTable,
    tx: &mpsc::Sender<anyhow::Result<Bytes>>,
) -> anyhow::Result<()> {
    let conn = conn.lock().map_err(|_| anyhow::anyhow!("the SQLite connection was poisoned by a failed read"))?;
    let mut statement =
        conn.prepare(&table.select(None)).with_context(|| format!("reading {name} from the SQLite file"))?;
    let mut rows = statement.query([]).with_context(|| format!("reading {name} from the SQLite file"))?;
    let mut buffer = BytesMut::with_capacity(COPY_CHUNK);
    let mut line = Vec::new();
    while let Some(row) = rows.next().with_context(|| format!("reading {name} from the SQLite file"))? {
        line.clear();
        for (i, text) in pg_text_row(row, name, table)?.iter().enumerate() {
            if i > 0 {
                line.push(b'\t');
            }
            push_copy_field(&mut line, text.as_deref());
        }
        line.push(b'\n');
        buffer.extend_from_slice(&line);
        if buffer.len() >= COPY_CHUNK && tx.blocking_send(Ok(buffer.split().freeze())).is_err() {
            return Ok(());
        }
    }
    if !buffer.is_empty() {
        let _ = tx.blocking_send(Ok(buffer.freeze()));
    }
    Ok(())
}
