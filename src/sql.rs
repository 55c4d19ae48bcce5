//! Text queries against any SQL endpoint — PostgreSQL, MySQL / MariaDB, SQLite —
//! with rows back as text. `compare-queries` and `verify` read both sides through it.

use anyhow::Context as _;
use mysql_async::prelude::Queryable;

use crate::config::{Config, Endpoint, SourceKind, TargetKind};

/// Which SQL a side speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlDialect {
    Postgres,
    Mysql,
    Sqlite,
}

impl SqlDialect {
    /// The source's dialect; a MongoDB source speaks no SQL.
    pub fn of_source(config: &Config, command: &str) -> anyhow::Result<SqlDialect> {
        Ok(match config.source.kind {
            SourceKind::Postgres => SqlDialect::Postgres,
            SourceKind::Mysql => SqlDialect::Mysql,
            SourceKind::Sqlite => SqlDialect::Sqlite,
            SourceKind::Mongodb => anyhow::bail!("{command} reads the source with SQL; a MongoDB source has none"),
        })
    }

    pub fn of_target(config: &Config) -> SqlDialect {
        match config.target.kind {
            TargetKind::Postgres => SqlDialect::Postgres,
            TargetKind::Mysql => SqlDialect::Mysql,
        }
    }

    /// An identifier, quoted.
    pub fn ident(self, name: &str) -> String {
        match self {
            SqlDialect::Mysql => format!("`{}`", name.replace('`', "``")),
            SqlDialect::Postgres | SqlDialect::Sqlite => crate::schema::quote_ident(name),
        }
    }

    /// A string literal. MySQL sessions opened here have `NO_BACKSLASH_ESCAPES` off.
    pub fn literal(self, text: &str) -> String {
        match self {
            SqlDialect::Mysql => format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''")),
            SqlDialect::Postgres | SqlDialect::Sqlite => crate::schema::quote_literal(text),
        }
    }
}

/// Rows as text: `None` for NULL.
pub type Rows = Vec<Vec<Option<String>>>;

/// One statement's rows as text, as the server sends them.
pub type RowStream<'a> =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = anyhow::Result<Vec<Option<String>>>> + Send + 'a>>;

/// A MySQL row as text (binary values as sent; other non-text values as MySQL prints them).
fn mysql_row_text(row: mysql_async::Row) -> Vec<Option<String>> {
    (0..row.len())
        .map(|i| match row.as_ref(i) {
            None | Some(mysql_async::Value::NULL) => None,
            Some(mysql_async::Value::Bytes(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
        })
        .collect()
}

/// A connection that runs SQL and returns rows as text.
pub enum SqlClient {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
    Sqlite(rusqlite::Connection),
}

impl SqlClient {
    /// Connects with cutover's session settings (UTC, ISO dates, exact floats, hex bytes).
    pub async fn open(dialect: SqlDialect, endpoint: Endpoint<'_>) -> anyhow::Result<SqlClient> {
        Ok(match dialect {
            SqlDialect::Postgres => {
                SqlClient::Postgres(crate::pgconn::ConnectParams::from_endpoint(endpoint)?.connect().await?)
            }
            SqlDialect::Mysql => {
                let mut conn = crate::myconn::MysqlParams::from_endpoint(endpoint)?.connect().await?;
                conn.query_drop("SET SESSION sql_mode = REPLACE(@@sql_mode, 'NO_BACKSLASH_ESCAPES', '')")
                    .await
                    .context("setting up a MySQL session")?;
                SqlClient::Mysql(conn)
            }
            SqlDialect::Sqlite => {
                let path = crate::source::sqlite::path_from_url(endpoint.url.expose())?;
                SqlClient::Sqlite(
                    rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .with_context(|| format!("opening {} read-only", path.display()))?,
                )
            }
        })
    }

    pub fn dialect(&self) -> SqlDialect {
        match self {
            SqlClient::Postgres(_) => SqlDialect::Postgres,
            SqlClient::Mysql(_) => SqlDialect::Mysql,
            SqlClient::Sqlite(_) => SqlDialect::Sqlite,
        }
    }

    /// Reads inside `snapshot`, which the source pinned ([`crate::source::Source::new_snapshot`])
    /// and has not let go of yet, until the transaction this opens ends: PostgreSQL imports
    /// it by name; on MySQL a consistent-snapshot transaction is it while the source holds
    /// its read lock. A SQLite file has no other writer to read apart from.
    pub async fn join_snapshot(&mut self, snapshot: &crate::source::SnapshotPoint) -> anyhow::Result<()> {
        match self {
            SqlClient::Postgres(client) => client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    crate::schema::quote_literal(&snapshot.id)
                ))
                .await
                .context("importing the source's pinned snapshot"),
            SqlClient::Mysql(conn) => conn
                .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                .await
                .context("opening a consistent-snapshot transaction on the source"),
            SqlClient::Sqlite(conn) => conn.execute_batch("BEGIN").context("opening a read transaction"),
        }
    }

    /// Runs one statement; its rows as they arrive, without holding them all (a SQLite
    /// file's are read at once).
    pub async fn stream<'a>(&'a mut self, sql: &str) -> anyhow::Result<RowStream<'a>> {
        use futures_util::{StreamExt, TryStreamExt};
        Ok(match self {
            SqlClient::Postgres(client) => {
                let messages = client.simple_query_raw(sql).await?;
                Box::pin(messages.map_err(anyhow::Error::new).try_filter_map(|message| async move {
                    Ok(match message {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                }))
            }
            SqlClient::Mysql(conn) => {
                // A statement without rows (START TRANSACTION) has no result set to stream.
                match conn.query_iter(sql.to_string()).await?.stream_and_drop::<mysql_async::Row>().await? {
                    Some(rows) => Box::pin(rows.map(|row| row.map(mysql_row_text).map_err(anyhow::Error::new))),
                    None => Box::pin(futures_util::stream::empty()),
                }
            }
            SqlClient::Sqlite(conn) => Box::pin(futures_util::stream::iter(sqlite_run(conn, sql)?.into_iter().map(Ok))),
        })
    }

    /// Runs one statement; its rows as text (binary values as lowercase hex).
    pub async fn run(&mut self, sql: &str) -> anyhow::Result<Rows> {
        use futures_util::TryStreamExt;
        match self {
            SqlClient::Postgres(_) | SqlClient::Mysql(_) => self.stream(sql).await?.try_collect().await,
            SqlClient::Sqlite(conn) => sqlite_run(conn, sql),
        }
    }
}

/// Runs one statement on a SQLite file; its rows as text.
fn sqlite_run(conn: &rusqlite::Connection, sql: &str) -> anyhow::Result<Rows> {
    let mut statement = conn.prepare(sql)?;
    let columns = statement.column_count();
    let rows = statement.query_map([], |row| {
        (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => None,
                    rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                    // Shortest round-trip form, exponent where PostgreSQL has one.
                    rusqlite::types::ValueRef::Real(v) => Some(format!("{v:?}")),
                    rusqlite::types::ValueRef::Text(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    rusqlite::types::ValueRef::Blob(v) => Some(v.iter().map(|b| format!("{b:02x}")).collect()),
                })
            })
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    Ok(rows.collect::<rusqlite::Result<Rows>>()?)
}
