//! The pipeline's TOML configuration: one file per pipeline.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file,
//! the key and the reason. Passwords may sit in the URL or come from
//! `password_file` / `password_env`; they never appear in `Debug` output.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration of one pipeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub target: TargetConfig,
    pub state: StateConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub stream: StreamConfig,
    #[serde(default)]
    pub switchover: SwitchoverConfig,
    /// The pipeline's name: names the slot, publication and replication origin.
    /// Taken from the config file's name (`shop.toml` → `shop`).
    #[serde(skip)]
    pub name: String,
}

/// Which kind of database an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
    Mysql,
    Sqlite,
    Mongodb,
}

/// `[source] mapping` (MongoDB): how documents become rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MongoMapping {
    /// Nested fields become columns joined by `_`; arrays stay jsonb.
    #[default]
    Flatten,
    /// `_id` text primary key and the whole document in a `doc jsonb` column.
    Jsonb,
}

/// `[source] on_type_mismatch` (SQLite): what a stored value that does not fit its
/// column's declared type does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTypeMismatch {
    /// Stop the copy, naming the table, rowid, column and value.
    #[default]
    Error,
    /// Copy every such column as text (the plan says which).
    Text,
}

/// `[target] partitions`: what a PostgreSQL partitioned table becomes on the target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Partitions {
    /// The same partitioned table with the same partitions (PostgreSQL targets).
    #[default]
    Keep,
    /// One plain table holding every partition's rows (what a MySQL target always gets).
    Flatten,
}

/// Which kind of database the target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Postgres,
    Mysql,
}

/// `[source]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub url: ConnUrl,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Glob patterns over `schema.table`; empty means every table.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// SQLite only.
    pub on_type_mismatch: Option<OnTypeMismatch>,
    /// MongoDB only.
    pub mapping: Option<MongoMapping>,
    /// PostgreSQL only: capture schema changes with an event trigger (default: true,
    /// installed when the role is a superuser).
    pub capture_ddl: Option<bool>,
}

/// `[target]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub kind: TargetKind,
    pub url: ConnUrl,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// PostgreSQL targets; a MySQL target always flattens.
    pub partitions: Option<Partitions>,
    /// PostgreSQL targets: tables (`schema.table` patterns) whose user triggers cutover
    /// may disable while it applies, when its role may not set `session_replication_role`.
    #[serde(default)]
    pub disable_triggers: Vec<String>,
}

impl TargetConfig {
    /// `disable_triggers`, compiled (each pattern was checked when the config loaded).
    pub fn disable_triggers(&self) -> Vec<glob::Pattern> {
        self.disable_triggers.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect()
    }

    /// What partitioned tables become on this target.
    pub fn partitions(&self) -> Partitions {
        match self.kind {
            TargetKind::Postgres => self.partitions.unwrap_or_default(),
            TargetKind::Mysql => Partitions::Flatten,
        }
    }
}

impl SourceConfig {
    pub fn endpoint(&self) -> Endpoint<'_> {
        Endpoint {
            url: &self.url,
            password_file: self.password_file.as_deref(),
            password_env: self.password_env.as_deref(),
        }
    }
}

impl TargetConfig {
    pub fn endpoint(&self) -> Endpoint<'_> {
        Endpoint {
            url: &self.url,
            password_file: self.password_file.as_deref(),
            password_env: self.password_env.as_deref(),
        }
    }
}

/// A connection URL. It may hold a password, so `Debug` and `Display` redact it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ConnUrl(String);

impl ConnUrl {
    pub fn new(url: impl Into<String>) -> Self {
        ConnUrl(url.into())
    }

    /// The URL as written, password included: for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as a driver should read it, password included (for connecting only): the user
    /// and password percent-encoded, so that a `/`, `?`, `#` or `@` in them cannot move where
    /// tokio-postgres (first `@`), mysql_async and the MongoDB driver (`/`, `?` end the
    /// authority) look for the host.
    pub fn for_driver(&self) -> String {
        match UrlParts::split(&self.0) {
            Some(parts) => parts.with_userinfo(&match &parts.password {
                Some(password) => format!("{}:{}", percent_encode(&parts.user), percent_encode(password)),
                None => percent_encode(&parts.user),
            }),
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for ConnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for ConnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Where a server is and how to log in: one endpoint's part of the config.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub url: &'a ConnUrl,
    pub password_file: Option<&'a Path>,
    pub password_env: Option<&'a str>,
}

impl Endpoint<'_> {
    /// The password from `password_file` or `password_env`, if either is set.
    pub fn external_password(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read password_file {}: {e}", path.display()))?;
            return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = self.password_env {
            let value = std::env::var(var)
                .map_err(|_| anyhow::anyhow!("password_env names ${var}, which is not set in the environment"))?;
            return Ok(Some(value));
        }
        Ok(None)
    }
}

/// Replaces the password in `scheme://user:password@host/...` (and a `password=` query
/// parameter) with `***`.
pub fn redact_url(url: &str) -> String {
    let redacted = match UrlParts::split(url) {
        Some(parts @ UrlParts { password: Some(_), .. }) => parts.with_userinfo(&format!("{}:***", parts.raw_user)),
        Some(_) => url.to_string(),
        // No host where one could be: hide everything before the last `@` that may be a password.
        None => {
            let authority = url.find("://").map_or(0, |i| i + 3);
            let after_scheme = &url[authority..];
            match after_scheme.rfind('@').and_then(|at| Some((after_scheme[..at].find(':')?, at))) {
                Some((colon, at)) => format!("{}:***{}", &url[..authority + colon], &after_scheme[at..]),
                None => url.to_string(),
            }
        }
    };
    redact_password_parameter(&redacted)
}

/// `…?password=secret&…` → `…?password=***&…` (libpq and tokio-postgres take a password there).
fn redact_password_parameter(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// A URL cut around its credentials: `scheme://` `user:password@` `host…`.
///
/// The credentials end at the last `@` that a host list follows (up to the next `/`, `?` or
/// the end: letters, digits, `.-_:[],%`, or nothing before a `/`), as the URL standard reads
/// `@` in the authority; unlike it, a `/`, `?` or `#` in a password does not end the
/// authority. So a password may be written as it is or percent-encoded; an `@` in a query
/// value right before a host-like word would have to be written `%40`.
struct UrlParts<'a> {
    /// `scheme://`
    prefix: &'a str,
    /// The user as written, percent-encoding included.
    raw_user: &'a str,
    /// The user and password, percent-decoded as the drivers do.
    user: String,
    password: Option<String>,
    /// The host and everything after it.
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    /// `None` for a URL without `scheme://` or without credentials.
    fn split(url: &'a str) -> Option<UrlParts<'a>> {
        let authority = url.find("://")? + 3;
        let after_scheme = &url[authority..];
        let is_host_char = |c: char| c.is_ascii_alphanumeric() || ".-_:[],%".contains(c);
        let at = after_scheme.rmatch_indices('@').map(|(i, _)| i).find(|&at| {
            let tail = &after_scheme[at + 1..];
            let host_end = tail.find(['/', '?']).unwrap_or(tail.len());
            tail[..host_end].chars().all(is_host_char) && (host_end > 0 || tail.starts_with('/'))
        })?;
        let userinfo = &after_scheme[..at];
        let (raw_user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(percent_decode(password))),
            None => (userinfo, None),
        };
        Some(UrlParts {
            prefix: &url[..authority],
            raw_user,
            user: percent_decode(raw_user),
            password,
            rest: &after_scheme[at + 1..],
        })
    }

    /// The URL with `userinfo` in place of the credentials.
    fn with_userinfo(&self, userinfo: &str) -> String {
        format!("{}{userinfo}@{}", self.prefix, self.rest)
    }
}

/// Every byte but the URL standard's unreserved characters as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(char::from(byte)),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// `%2F` → `/`; a `%` not followed by two hex digits stays as written (as the drivers read it).
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `[switchover]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverConfig {
    /// After a switchover, stream the new primary's writes back to the old source,
    /// so a rollback loses nothing.
    #[serde(default)]
    pub fallback: bool,
}

/// `[state]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Holds the RocksDB checkpoint store.
    pub dir: PathBuf,
}

/// `[snapshot] mode`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy, then stream.
    #[default]
    Initial,
    /// Stream only: the target already holds the data.
    Never,
    /// Copy, then exit 0 (one-shot migration, major-version upgrade).
    Only,
}

/// `[snapshot]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Parallel copy connections; default: the number of cores.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig { mode: SnapshotMode::default(), workers: default_workers() }
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// `[stream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// With `[snapshot] mode = "never"`: where streaming begins (a binlog file:offset is
    /// the next event to read; a GTID or LSN is the last transaction the target has).
    /// A checkpoint, once there, wins.
    pub start: Option<String>,
    /// Stop after every transaction before this time or up to this position, then exit 0.
    pub stop_at: Option<String>,
    /// Transactions to leave out: `gtid:0-1-1207` (MariaDB), `gtid:<uuid>:77` (MySQL), or the
    /// position of their first event.
    #[serde(default)]
    pub skip: Vec<String>,
}

impl StreamConfig {
    /// `stop_at`, parsed (validated when the config loads).
    pub fn stop_at(&self) -> Option<crate::position::StopAt> {
        self.stop_at.as_deref().and_then(|s| s.parse().ok())
    }

    /// `start`, parsed (validated when the config loads).
    pub fn start(&self) -> Option<crate::position::Position> {
        self.start.as_deref().and_then(|s| s.parse().ok())
    }

    /// `skip`, parsed (validated when the config loads), with each entry's text.
    pub fn skip(&self) -> Vec<(String, crate::position::Position)> {
        self.skip.iter().filter_map(|s| Some((s.clone(), s.parse().ok()?))).collect()
    }
}

/// `[metrics]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` listen; `"off"` for nowhere. The default port
    /// clashes with neither postgres_exporter (9187) nor mysqld_exporter (9104).
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: default_metrics_listen() }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9465".into()
}

impl MetricsConfig {
    /// The address to listen on, `None` when turned off.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        if self.listen == "off" {
            return None;
        }
        self.listen.parse().ok()
    }
}

/// `[pipeline]`: batching limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Most changes buffered before they are written to the open target transaction.
    #[serde(default = "default_max_batch_changes")]
    pub max_batch_changes: usize,
    /// Most bytes of change values buffered before they are written to the open target
    /// transaction: a batch of large values is flushed early, so memory stays bounded.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Longest a target transaction stays open while more source transactions arrive.
    #[serde(default = "default_max_batch_ms")]
    pub max_batch_ms: u64,
    /// Target connections applying streamed changes side by side (1 to
    /// [`MAX_APPLY_CONNECTIONS`]); unset, this machine's cores, at most 4.
    #[serde(default)]
    pub apply_connections: Option<usize>,
    /// How long lost connections are retried before the daemon exits with the last
    /// error: seconds, or a number with `s`, `m` or `h` (`"10m"`).
    #[serde(default = "default_max_retry_time")]
    pub max_retry_time: Duration,
}

/// Most `[pipeline] apply_connections`; each has its own progress record on the target.
pub const MAX_APPLY_CONNECTIONS: usize = 16;

impl PipelineConfig {
    /// `apply_connections`, or the default picked from this machine's cores.
    pub fn apply_connections(&self) -> usize {
        self.apply_connections.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
    }

    pub fn max_retry_time(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.max_retry_time.0)
    }
}

/// A span of time in seconds, written as a number of seconds or `"90s"`, `"10m"`, `"1h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duration(pub u64);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Seconds(s) => return Ok(Duration(s)),
            Raw::Text(t) => t,
        };
        let (number, unit) =
            text.trim().split_at(text.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(text.trim().len()));
        let number: u64 = number.parse().map_err(|_| {
            serde::de::Error::custom(format!("`{text}` is not a duration like \"90s\", \"10m\" or \"1h\""))
        })?;
        let factor = match unit.trim() {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(serde::de::Error::custom(format!("`{text}`: the unit must be s, m or h"))),
        };
        Ok(Duration(number * factor))
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch_changes: default_max_batch_changes(),
            max_batch_bytes: default_max_batch_bytes(),
            max_batch_ms: default_max_batch_ms(),
            apply_connections: None,
            max_retry_time: default_max_retry_time(),
        }
    }
}

fn default_max_batch_changes() -> usize {
    5_000
}

fn default_max_batch_bytes() -> usize {
    16 << 20
}

fn default_max_batch_ms() -> u64 {
    200
}

fn default_max_retry_time() -> Duration {
    Duration(600)
}

/// A configuration that could not be loaded; says which file and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors and gives the pipeline name.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        let mut config: Config = toml::from_str(text).map_err(|e| invalid(with_suggestion(&e.to_string())))?;
        config.name = pipeline_name(path);
        if config.name.is_empty() {
            return Err(invalid("the file name must contain letters or digits: it names the pipeline".into()));
        }
        if config.metrics.listen != "off" && config.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(format!(
                "[metrics] listen: `{}` is not an address like \"127.0.0.1:9465\" (or \"off\")",
                config.metrics.listen
            )));
        }
        if let Some(start) = &config.stream.start {
            if config.snapshot.mode != SnapshotMode::Never {
                return Err(invalid(
                    "[stream] start: only with [snapshot] mode = \"never\" (the target already holds the data up to it)".into(),
                ));
            }
            start.parse::<crate::position::Position>().map_err(|e| invalid(format!("[stream] start: {e}")))?;
        }
        for entry in &config.stream.skip {
            entry.parse::<crate::position::Position>().map_err(|e| invalid(format!("[stream] skip: {e}")))?;
        }
        if let Some(stop_at) = &config.stream.stop_at {
            stop_at.parse::<crate::position::StopAt>().map_err(|e| invalid(format!("[stream] stop_at: {e}")))?;
        }
        if config.source.on_type_mismatch.is_some() && config.source.kind != SourceKind::Sqlite {
            return Err(invalid("[source] on_type_mismatch: only for kind = \"sqlite\"".into()));
        }
        if config.target.partitions == Some(Partitions::Keep) && config.target.kind == TargetKind::Mysql {
            return Err(invalid(
                "[target] partitions = \"keep\": a MySQL target takes a partitioned table as one plain table \
                 (\"flatten\", its default)"
                    .into(),
            ));
        }
        if !config.target.disable_triggers.is_empty() && config.target.kind == TargetKind::Mysql {
            return Err(invalid(
                "[target] disable_triggers: MySQL cannot disable a trigger (only drop it); only for kind = \"postgres\""
                    .into(),
            ));
        }
        for pattern in &config.target.disable_triggers {
            glob::Pattern::new(pattern)
                .map_err(|e| invalid(format!("[target] disable_triggers: {pattern:?} is no valid pattern: {e}")))?;
        }
        if config.source.capture_ddl.is_some() && config.source.kind != SourceKind::Postgres {
            return Err(invalid("[source] capture_ddl: only for kind = \"postgres\"".into()));
        }
        if config.source.mapping.is_some() && config.source.kind != SourceKind::Mongodb {
            return Err(invalid("[source] mapping: only for kind = \"mongodb\"".into()));
        }
        if config.source.kind == SourceKind::Sqlite {
            // A file has no change log: it is copied once.
            match config.snapshot.mode {
                SnapshotMode::Never => {
                    return Err(invalid(
                        "[snapshot] mode = \"never\": a SQLite source is only ever copied (snapshot only)".into(),
                    ))
                }
                _ => config.snapshot.mode = SnapshotMode::Only,
            }
            if config.stream.start.is_some() || config.stream.stop_at.is_some() || !config.stream.skip.is_empty() {
                return Err(invalid("[stream]: a SQLite source has no change log to stream".into()));
            }
        }
        if config.switchover.fallback && !matches!(config.source.kind, SourceKind::Postgres | SourceKind::Mysql) {
            return Err(invalid(
                "[switchover] fallback: the fallback stream writes into the old source; only a PostgreSQL or MySQL \
                 source can take writes"
                    .into(),
            ));
        }
        // A MySQL database's tables land in a PostgreSQL schema of the database's name, not
        // back in the schemas they came from.
        if config.switchover.fallback
            && config.source.kind == SourceKind::Postgres
            && config.target.kind == TargetKind::Mysql
        {
            return Err(invalid(
                "[switchover] fallback: a stream from a MySQL target back into a PostgreSQL source is not built \
                 (its tables would land in a schema named after the MySQL database); set fallback = false and keep \
                 a backup of the new primary for rollback"
                    .into(),
            ));
        }
        if config.snapshot.workers == 0 {
            return Err(invalid("[snapshot] workers: must be at least 1".into()));
        }
        if config.pipeline.apply_connections.is_some_and(|n| n == 0 || n > MAX_APPLY_CONNECTIONS) {
            return Err(invalid(format!(
                "[pipeline] apply_connections: must be between 1 and {MAX_APPLY_CONNECTIONS}"
            )));
        }
        if config.pipeline.max_batch_changes == 0 {
            return Err(invalid("[pipeline] max_batch_changes: must be at least 1".into()));
        }
        if config.pipeline.max_batch_bytes == 0 {
            return Err(invalid("[pipeline] max_batch_bytes: must be at least 1".into()));
        }
        for (key, patterns) in
            [("[source] tables", &config.source.tables), ("[source] exclude", &config.source.exclude)]
        {
            for pattern in patterns {
                glob::Pattern::new(pattern)
                    .map_err(|e| invalid(format!("{key}: `{pattern}` is not a valid glob pattern: {e}")))?;
            }
        }
        for (key, endpoint) in [("[source]", config.source.endpoint()), ("[target]", config.target.endpoint())] {
            if endpoint.password_file.is_some() && endpoint.password_env.is_some() {
                return Err(invalid(format!("{key}: set password_file or password_env, not both")));
            }
        }
        Ok(config)
    }

    /// Which tables `[source] tables` and `exclude` select.
    pub fn table_filter(&self) -> TableFilter {
        let compile = |patterns: &[String]| patterns.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect();
        TableFilter { tables: compile(&self.source.tables), exclude: compile(&self.source.exclude) }
    }
}

/// `[source] tables` / `exclude`, compiled. The default selects every table.
#[derive(Clone, Debug, Default)]
pub struct TableFilter {
    tables: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl TableFilter {
    /// Whether `schema.table` is selected by `tables` and not by `exclude`.
    pub fn includes(&self, qualified: &str) -> bool {
        (self.tables.is_empty() || self.tables.iter().any(|p| p.matches(qualified)))
            && !self.exclude.iter().any(|p| p.matches(qualified))
    }
}

/// Adds "did you mean" to serde's "unknown field `x`, expected one of `a`, `b`" message.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else { return message.to_string() };
    let Some((unknown, expected)) = rest.split_once('`') else { return message.to_string() };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let nearest = candidates.iter().min_by_key(|c| edit_distance(unknown, c));
    match nearest {
        Some(nearest) if edit_distance(unknown, nearest) <= 3 => {
            format!("{}\ndid you mean `{nearest}`?", message.trim_end())
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// `/etc/cutover/shop-eu.toml` → `shop_eu`: safe as a slot, publication and origin name.
fn pipeline_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
    stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        kind = "postgres"
        url = "postgresql://app:secret@old:5432/shop"
        tables = ["public.*"]
        exclude = ["public.audit_*"]
        [target]
        kind = "postgres"
        url = "postgresql://app@new:5432/shop"
        [state]
        dir = "/tmp/x"
    "#;

    #[test]
    fn parses_and_filters_tables() {
        let config = Config::parse(MINIMAL, Path::new("/etc/cutover/Shop-EU.toml")).expect("valid");
        assert_eq!(config.name, "shop_eu");
        assert_eq!(config.snapshot.mode, SnapshotMode::Initial);
        let filter = config.table_filter();
        assert!(filter.includes("public.orders"));
        assert!(!filter.includes("public.audit_log"));
        assert!(!filter.includes("other.orders"));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let text = MINIMAL.replace("[state]", "[state]\ndirr = 1");
        let err = Config::parse(&text, Path::new("p.toml")).expect_err("unknown key").to_string();
        assert!(err.contains("p.toml") && err.contains("dirr"), "{err}");
        let text = MINIMAL.replace("[target]", "[target]\npasword_file = \"/x\"");
        let err = Config::parse(&text, Path::new("p.toml")).expect_err("typo").to_string();
        assert!(err.contains("line") && err.contains("did you mean `password_file`?"), "{err}");
        let text = MINIMAL.replacen("\"postgres\"", "\"oracle\"", 1);
        let err = Config::parse(&text, Path::new("p.toml")).expect_err("bad kind").to_string();
        assert!(err.contains("oracle") && err.contains("postgres"), "{err}");
    }

    #[test]
    fn fallback_is_refused_where_it_cannot_land() {
        let to_mysql = format!(
            "{}\n[switchover]\nfallback = true\n",
            MINIMAL.replace(
                "kind = \"postgres\"\n        url = \"postgresql://app@new",
                "kind = \"mysql\"\n        url = \"mysql://app@new"
            )
        );
        let err = Config::parse(&to_mysql, Path::new("p.toml")).expect_err("refused").to_string();
        assert!(err.contains("[switchover] fallback") && err.contains("fallback = false"), "{err}");
        let to_postgres = format!("{MINIMAL}\n[switchover]\nfallback = true\n");
        assert!(Config::parse(&to_postgres, Path::new("p.toml")).is_ok());
    }

    #[test]
    fn retry_time_takes_seconds_or_units() {
        for (value, seconds) in [("90", 90), ("\"90s\"", 90), ("\"10m\"", 600), ("\"1h\"", 3600)] {
            let text = format!("{MINIMAL}\n[pipeline]\nmax_retry_time = {value}\n");
            let config = Config::parse(&text, Path::new("p.toml")).expect("valid");
            assert_eq!(config.pipeline.max_retry_time().as_secs(), seconds);
        }
        let text = format!("{MINIMAL}\n[pipeline]\nmax_retry_time = \"10 parsecs\"\n");
        let err = Config::parse(&text, Path::new("p.toml")).expect_err("bad unit").to_string();
        assert!(err.contains("max_retry_time") || err.contains("unit"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgresql://app:secret@old:5432/shop"), "postgresql://app:***@old:5432/shop");
        assert_eq!(redact_url("postgresql://app@old/shop"), "postgresql://app@old/shop");
        assert_eq!(redact_url("postgresql://a:b:c@h/d?x=@"), "postgresql://a:***@h/d?x=@");
        let config = Config::parse(MINIMAL, Path::new("p.toml")).expect("valid");
        assert!(!format!("{config:?}").contains("secret"));
    }

    /// A password with the characters that end a URL's parts, as written and percent-encoded.
    const ODD: &str = "s3/cr?et@pw#x:y%z&w=v";
    const ODD_ENCODED: &str = "s3%2Fcr%3Fet%40pw%23x%3Ay%25z%26w%3Dv";

    #[test]
    fn odd_passwords_are_redacted_in_every_url_kind() {
        for scheme in ["postgresql", "postgres", "mysql", "mongodb", "mongodb+srv"] {
            for password in [ODD, ODD_ENCODED] {
                for rest in ["db.example.com:5432/shop?sslmode=require&x=@", "h1:1,h2:2/shop", "[::1]/shop", "h"] {
                    let url = format!("{scheme}://app:{password}@{rest}");
                    let redacted = redact_url(&url);
                    assert_eq!(redacted, format!("{scheme}://app:***@{rest}"), "{url}");
                    assert!(!ConnUrl::new(&url).to_string().contains("s3"), "{url}");
                }
            }
        }
        // A user name with an `@` (Azure's `user@server`), a password in the query.
        assert_eq!(redact_url("postgresql://me@srv:pw/x@h/db"), "postgresql://me@srv:***@h/db");
        assert_eq!(redact_url("postgresql://h/db?user=a&password=p/w@x"), "postgresql://h/db?user=a&password=***");
        // Nothing after the last `@` looks like a host: still nothing of the password shows.
        assert_eq!(redact_url("mysql://app:pw/x@"), "mysql://app:***@");
        assert_eq!(redact_url("sqlite:///var/db/a@b.db"), "sqlite:///var/db/a@b.db");
    }

    #[test]
    fn drivers_get_the_credentials_percent_encoded() {
        for password in [ODD, ODD_ENCODED] {
            let url = ConnUrl::new(format!("mysql://app:{password}@127.0.0.1:3306/shop?ssl-mode=DISABLED"));
            assert_eq!(url.for_driver(), format!("mysql://app:{ODD_ENCODED}@127.0.0.1:3306/shop?ssl-mode=DISABLED"));
            let postgres = ConnUrl::new(format!("postgres://app:{password}@127.0.0.1/shop"));
            let config: tokio_postgres::Config = postgres.for_driver().parse().expect("tokio-postgres reads it");
            assert_eq!(config.get_password(), Some(ODD.as_bytes()));
            assert_eq!(config.get_user(), Some("app"));
            assert_eq!(config.get_hosts(), &[tokio_postgres::config::Host::Tcp("127.0.0.1".into())]);
        }
        let opts = mysql_async::Opts::from_url(&ConnUrl::new(format!("mysql://app:{ODD}@h:3307/shop")).for_driver())
            .expect("mysql_async reads it");
        assert_eq!((opts.pass(), opts.ip_or_hostname(), opts.tcp_port()), (Some(ODD), "h", 3307));
        let mongo = ConnUrl::new(format!("mongodb://app:{ODD}@h1:27017,h2/shop?replicaSet=rs0&authSource=admin"));
        let parsed =
            mongodb::options::ConnectionString::parse(mongo.for_driver()).expect("the MongoDB driver reads it");
        let credential = parsed.credential.expect("a credential");
        assert_eq!((credential.username.as_deref(), credential.password.as_deref()), (Some("app"), Some(ODD)));
        assert_eq!(credential.source.as_deref(), Some("admin"));
        let no_credentials = ConnUrl::new("sqlite:///tmp/x.db");
        assert_eq!(no_credentials.for_driver(), "sqlite:///tmp/x.db");
        assert_eq!(percent_decode("%2f%zz%+1%"), "/%zz%+1%");
    }
}
