//! MySQL / MariaDB connections, for the source and the sink alike: URL → parameters
//! (TLS included), sessions in UTC with utf8mb4, and where the binlog stands.

use std::sync::Arc;

use anyhow::Context as _;
use mysql_async::prelude::Queryable;

use crate::config::Endpoint;
use crate::position::{BinlogPosition, GtidSet};

/// How to reach the server, from a `mysql://` URL.
#[derive(Clone)]
pub struct MysqlParams {
    opts: mysql_async::Opts,
    /// The replicated database: the URL's path.
    pub database: String,
    /// `host:port`, for messages.
    pub endpoint: String,
    /// `ssl-mode = PREFERRED` (the default) against a server without TLS: connect
    /// in the clear, and stop asking once the server has said no.
    tls_optional: bool,
    tls_refused: Arc<std::sync::atomic::AtomicBool>,
}

impl MysqlParams {
    pub fn from_endpoint(endpoint: Endpoint<'_>) -> anyhow::Result<MysqlParams> {
        let (url, tls) = crate::tls::TlsSettings::from_url(&endpoint.url.for_driver(), crate::tls::Driver::Mysql)
            .with_context(|| format!("url {}", endpoint.url))?;
        let opts = mysql_async::Opts::from_url(&url)
            .map_err(|e| anyhow::anyhow!("url {} is not a MySQL URL: {e}", endpoint.url))?;
        let database = opts.db_name().map(str::to_string).with_context(|| {
            format!("url {} names no database: add it as the path (mysql://user@host/shop)", endpoint.url)
        })?;
        let mut builder = mysql_async::OptsBuilder::from_opts(opts).ssl_opts(crate::tls::mysql_ssl_opts(&tls));
        if let Some(password) = endpoint.external_password()? {
            builder = builder.pass(Some(password));
        }
        let opts = mysql_async::Opts::from(builder);
        let endpoint = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        Ok(MysqlParams {
            opts,
            database,
            endpoint,
            tls_optional: tls.mode == crate::tls::TlsMode::Prefer,
            tls_refused: Default::default(),
        })
    }

    /// Parameters of a server nobody connects to, for tests that feed events by hand.
    #[cfg(test)]
    pub fn unconnected(database: &str) -> MysqlParams {
        MysqlParams {
            opts: mysql_async::Opts::default(),
            database: database.into(),
            endpoint: "test".into(),
            tls_optional: true,
            tls_refused: Default::default(),
        }
    }

    /// The same server, with no database selected (a target's database may not exist yet).
    pub fn server_only(&self) -> MysqlParams {
        let opts = mysql_async::OptsBuilder::from_opts(self.opts.clone()).db_name(None::<String>);
        MysqlParams { opts: opts.into(), ..self.clone() }
    }

    /// The same server, reporting the rows a statement matched rather than those it changed
    /// (`CLIENT_FOUND_ROWS`): an update that sets the values a row already has still found it.
    pub fn counting_matched_rows(&self) -> MysqlParams {
        let opts = mysql_async::OptsBuilder::from_opts(self.opts.clone()).client_found_rows(true);
        MysqlParams { opts: opts.into(), ..self.clone() }
    }

    /// A connection in UTC with utf8mb4, as every cutover session uses.
    pub async fn connect(&self) -> anyhow::Result<mysql_async::Conn> {
        use std::sync::atomic::Ordering;
        let context = || format!("cannot connect to MySQL at {} (database {})", self.endpoint, self.database);
        let plain = || mysql_async::Opts::from(mysql_async::OptsBuilder::from_opts(self.opts.clone()).ssl_opts(None));
        let opts = if self.tls_refused.load(Ordering::Relaxed) { plain() } else { self.opts.clone() };
        let mut conn = match mysql_async::Conn::new(opts).await {
            Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
                if self.tls_optional =>
            {
                self.tls_refused.store(true, Ordering::Relaxed);
                mysql_async::Conn::new(plain()).await.with_context(context)?
            }
            Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)) => anyhow::bail!(
                "{}: the server does not offer TLS, but ssl-mode asks for it (configure ssl_cert/ssl_key on \
                 the server, or lower ssl-mode)",
                context()
            ),
            other => other.with_context(context)?,
        };
        conn.query_drop("SET time_zone = '+00:00', NAMES utf8mb4").await.context("setting up a MySQL session")?;
        Ok(conn)
    }
}

/// The server's binlog coordinate now, with the GTID state it stands for when GTIDs are on.
pub async fn binlog_position(conn: &mut mysql_async::Conn) -> anyhow::Result<BinlogPosition> {
    // MySQL 8.4 renamed SHOW MASTER STATUS; older servers and MariaDB know only the old name.
    let status: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(status) => status,
        Err(_) => conn
            .query_first("SHOW BINARY LOG STATUS")
            .await
            .context("SHOW BINARY LOG STATUS (needs REPLICATION CLIENT / BINLOG MONITOR)")?,
    };
    let status = status.context("the source has no binary log: set log_bin = ON (log-bin in my.cnf) and restart it")?;
    let file: String = status.get_opt(0).and_then(Result::ok).context("SHOW MASTER STATUS returned no file name")?;
    let pos: u64 = status.get_opt(1).and_then(Result::ok).context("SHOW MASTER STATUS returned no position")?;
    // The GTID state at the same point (under the caller's lock, if it holds one): MySQL's Executed_Gtid_Set column, MariaDB's
    // gtid_binlog_pos (MySQL has no such variable). Empty when GTIDs are off.
    let executed: Option<String> = status.get_opt(4).and_then(Result::ok);
    let gtid = match executed.filter(|g| !g.trim().is_empty()) {
        Some(set) => Some(set),
        None => conn.query_first("SELECT @@gtid_binlog_pos").await.ok().flatten(),
    };
    let gtid = match gtid.filter(|g| !g.trim().is_empty()) {
        Some(text) => Some(GtidSet::parse(&text).with_context(|| format!("the source's executed GTID set {text}"))?),
        None => None,
    };
    Ok(BinlogPosition { file, pos, gtid })
}

/// Whether one error of an error chain is a MySQL connection that broke: I/O, a closed
/// connection, or the server's shutdown in progress (1053), connection killed (1927),
/// server gone (2006) or lost (2013).
pub fn is_transient(cause: &(dyn std::error::Error + 'static)) -> bool {
    match cause.downcast_ref::<mysql_async::Error>() {
        Some(mysql_async::Error::Io(_) | mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed)) => {
            true
        }
        Some(mysql_async::Error::Server(server)) => matches!(server.code, 1053 | 1927 | 2006 | 2013),
        _ => false,
    }
}
