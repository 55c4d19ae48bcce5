//! Connecting to PostgreSQL, shared by the source and the sink: URL and
//! password handling, session settings, and the error type that tells a
//! transient failure (retry) from a definite one (stop and tell the user).

use anyhow::Context as _;
use tokio_postgres::config::Host;

use crate::config::Endpoint;
use crate::tls::{Driver, PostgresTls, TlsSettings};

/// Session settings every cutover connection uses, so that values print and
/// parse the same way on both sides.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3 \
     -c bytea_output=hex -c standard_conforming_strings=on";

/// Where a PostgreSQL server is and how to log in.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// `sslmode` / `sslrootcert` from the URL.
    pub tls: PostgresTls,
    config: tokio_postgres::Config,
}

impl ConnectParams {
    /// Reads a `postgresql://` URL, with the password from the endpoint's file or
    /// environment variable when one is set.
    pub fn from_endpoint(endpoint: Endpoint<'_>) -> anyhow::Result<ConnectParams> {
        let (url, tls) = TlsSettings::from_url(&endpoint.url.for_driver(), Driver::Postgres)
            .with_context(|| format!("url {}", endpoint.url))?;
        let tls = PostgresTls::new(&tls).with_context(|| format!("url {}", endpoint.url))?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| anyhow::anyhow!("url {} is not a PostgreSQL URL: {e}", endpoint.url))?;
        config.ssl_mode(tls.driver_mode());
        if let Some(password) = endpoint.external_password()? {
            config.password(password);
        }
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(_) => anyhow::bail!("url {}: only TCP hosts are supported, not Unix sockets", endpoint.url),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user =
            config.get_user().map(str::to_string).with_context(|| format!("url {} names no user", endpoint.url))?;
        let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let options = match config.get_options() {
            Some(own) => format!("{own} {SESSION_OPTIONS}"),
            None => SESSION_OPTIONS.to_string(),
        };
        config.options(&options).application_name("cutover");
        Ok(ConnectParams { host, port, user, password, database, tls, config })
    }

    /// `host:port`, for messages.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Opens a SQL connection; its I/O runs on a spawned task.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = self.config.connect(self.tls.clone()).await.with_context(|| {
            format!("cannot connect to PostgreSQL at {} (database {})", self.endpoint(), self.database)
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("PostgreSQL connection ended: {e}");
            }
        });
        Ok(client)
    }
}

/// The server's major version (15 for 15.4).
pub async fn server_major(client: &tokio_postgres::Client, side: &str) -> anyhow::Result<u32> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .with_context(|| format!("reading the {side}'s server version"))?
        .get(0);
    Ok(u32::try_from(version / 10_000).unwrap_or(0))
}

/// A failure on a PostgreSQL connection.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Could not connect or log in.
    #[error("{0}")]
    Connect(String),
    /// The connection broke: retrying may help.
    #[error("{0}")]
    Io(String),
    /// The server sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server said no.
    #[error("PostgreSQL error {code}: {message}")]
    Server { code: String, message: String },
}

/// Whether one error of an error chain is a PostgreSQL connection that broke or was
/// refused: class 08 (connection exceptions), 57P01–57P03 (shutdown, crash, not yet
/// accepting), a closed connection or an I/O error.
pub fn is_transient(cause: &(dyn std::error::Error + 'static)) -> bool {
    let transient_sqlstate = |code: &str| code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
        let code = e.code().map(|c| c.code());
        return e.is_closed()
            || code.is_some_and(transient_sqlstate)
            || (code.is_none() && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()));
    }
    match cause.downcast_ref::<PgError>() {
        Some(PgError::Server { code, .. }) => transient_sqlstate(code),
        Some(PgError::Io(_)) => true,
        _ => false,
    }
}
