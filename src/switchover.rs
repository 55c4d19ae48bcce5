//! `cutover switchover`: end a migration with the target as the new primary.
//!
//! Runs beside `cutover run` (same config) and talks to it over its control socket:
//! 1. waits until the target has what the source's log holds within a second of its
//!    being read (positions, not the lag gauge);
//! 2. fences the source — PostgreSQL: `default_transaction_read_only` on the
//!    database and every other client session of it ended; MySQL: `read_only`
//!    (and `super_read_only` where it exists) and the client sessions killed —
//!    and waits until the ended sessions are gone (one inside its commit still
//!    commits). It refuses while prepared transactions exist (they commit whenever
//!    their coordinator says so, after any final position), and names who can still
//!    write: background workers (PostgreSQL subscriptions, pg_cron), and on MariaDB,
//!    which has no `super_read_only`, the accounts `read_only` does not hold back;
//! 3. reads the source's final position after that (PostgreSQL:
//!    `pg_current_wal_insert_lsn()`, which includes what is not written out yet) and
//!    waits until the target has it (PostgreSQL: the slot's confirmed position; MySQL:
//!    the applied binlog position);
//! 4. sets the target's sequences to the source's values;
//! 5. with `[switchover] fallback = true`, creates the fallback stream on the target
//!    (publication and slot, `REPLICA IDENTITY FULL` for tables without a key)
//!    before anything can write to it;
//! 6. tells the daemon it is over: it stops, and with fallback streams target →
//!    old source in the same process;
//! 7. drops the forward stream's slot and publications on the old source: a slot
//!    left there would keep every WAL byte written after it (the fallback's included)
//!    forever.
//!
//! The write-blocked window (step 2 to 6) is what the application sees as downtime.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::checkpoint::{CheckpointStore, SwitchoverRecord};
use crate::config::{Config, SourceKind, TargetKind};
use crate::finding::{Finding, Severity};
use crate::pgconn::ConnectParams;
use crate::status::{ask, Request};

/// What a switchover did.
#[derive(Debug)]
pub struct Summary {
    pub final_position: String,
    /// From fencing the source to the end: the application's downtime.
    pub write_blocked: Duration,
    pub transactions_applied: u64,
    pub changes_applied: u64,
    pub sessions_ended: u64,
    /// Who can still write to the old source after the fence, and how to stop them.
    pub still_writing: Vec<String>,
    pub sequences_synced: usize,
    pub fallback: bool,
    /// What was dropped of the forward stream on the old source, or why it is still there.
    pub forward_stream_dropped: Result<Vec<String>, String>,
    /// The target's user triggers cutover had disabled and enabled again, or why not.
    pub triggers_enabled: Result<Vec<String>, String>,
}

/// How long each wait may take before the switchover gives up (the source stays fenced).
const WAIT: Duration = Duration::from_secs(120);

/// How soon the target must have what the source's log held when read, for the pipeline
/// to count as caught up: about what the write-blocked window waits for it.
const CAUGHT_UP: Duration = Duration::from_secs(1);

/// How long the daemon may take to let go of the forward stream's slot once told it is over.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Runs the switchover.
pub async fn switchover(config: &Config) -> anyhow::Result<Summary> {
    if !matches!(config.source.kind, SourceKind::Postgres | SourceKind::Mysql) {
        anyhow::bail!(
            "switchover fences a PostgreSQL or MySQL source; a {:?} source has no writers to fence",
            config.source.kind
        );
    }
    // 1. Caught up: what the source's log holds when read, the target has within CAUGHT_UP.
    // Decided by positions, not by the lag gauge: a steady writer keeps the daemon from
    // ever idling, and a wedged daemon's last lag reading stays small.
    let started = Instant::now();
    loop {
        let status = crate::status::daemon_status(&config.state.dir).await?;
        let mut applied = status.applied_position.clone();
        if matches!(status.phase.as_str(), "catch-up" | "streaming") {
            let end = crate::pipeline::source_position(config).await?;
            let (reached, seen) = crate::pipeline::wait_until_applied(config, &end, CAUGHT_UP).await?;
            if reached {
                break;
            }
            applied = seen;
        }
        anyhow::ensure!(
            started.elapsed() < WAIT,
            "the target never had what the source's log held within {} s of reading it, in {} s of trying (phase {}, \
             lag {:.1} s, applied {}); nothing was fenced — see `cutover status`",
            CAUGHT_UP.as_secs(),
            WAIT.as_secs(),
            status.phase,
            status.lag_seconds,
            applied.as_deref().unwrap_or("none")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let fallback = match config.switchover.fallback {
        true => Some(check_fallback(config).await?),
        false => None,
    };

    // 2. Fence the source; 3. its final position, and the target has it.
    let fenced = Instant::now();
    let fence = crate::connect::source(config).await?.fence().await?;
    let final_position = fence.final_position;
    let (reached, applied) = crate::pipeline::wait_until_applied(config, &final_position, WAIT).await?;
    if !reached {
        let undo = match config.source.kind {
            SourceKind::Postgres => "ALTER DATABASE … RESET default_transaction_read_only",
            _ => "SET GLOBAL read_only = OFF",
        };
        anyhow::bail!(
            "the target did not reach the source's final position {final_position} within {} s (applied: {}); the \
             source stays read-only — see `cutover status`, then run switchover again (or {undo} to undo)",
            WAIT.as_secs(),
            applied.unwrap_or_else(|| "none".into())
        );
    }
    let final_position = final_position.to_string();

    // 4. Sequences (and anything else the end of a snapshot sets) to the source's values.
    let (mut source, mut sink) = crate::connect::source_and_sink(config).await?;
    let schema = source.schema().await?;
    sink.finish_snapshot(&schema).await.context("syncing sequences on the target")?;
    let sequences_synced = schema.sequences.len();

    // 5. The fallback stream, created before anything writes to the new primary.
    if let Some(fallback) = fallback {
        create_fallback(config, fallback, &schema).await?;
    }

    // 6. Over: the daemon records it and stops (or turns into the fallback stream).
    let record = SwitchoverRecord { final_position: final_position.clone(), fallback: config.switchover.fallback };
    let status = ask(&config.state.dir, &Request::SwitchedOver(record))
        .await?
        .context("the daemon went away before it was told the switchover is done; the source stays fenced")?;
    let write_blocked = fenced.elapsed();
    // Only now that the daemon applies nothing more: the user triggers it disabled fire
    // again for the application. The switchover is done either way.
    let triggers_enabled = sink.hand_over().await.map_err(|e| {
        format!(
            "{e:#}; run `cutover cleanup`, or ALTER TABLE … ENABLE TRIGGER each one cutover.disabled_triggers lists"
        )
    });

    // 7. Nothing reads the forward stream any more (a MySQL binlog needs no slot). The
    // switchover is done either way.
    let forward_stream_dropped = match config.source.kind {
        SourceKind::Postgres => drop_forward_stream(config).await.map_err(|e| {
            let slot = crate::source::postgres::slot_name(&config.name);
            format!(
                "{e:#}; until it is dropped, the slot keeps the old source's WAL: on the old source, SELECT \
                 pg_drop_replication_slot('{slot}'); DROP PUBLICATION IF EXISTS {slot}, {slot}_inserts;"
            )
        }),
        _ => Ok(Vec::new()),
    };
    Ok(Summary {
        final_position,
        write_blocked,
        transactions_applied: status.transactions_applied,
        changes_applied: status.changes_applied,
        sessions_ended: fence.sessions_ended,
        still_writing: fence.still_writing,
        sequences_synced,
        fallback: config.switchover.fallback,
        forward_stream_dropped,
        triggers_enabled,
    })
}

/// Drops the forward stream's objects on the old source (PostgreSQL: its slot and
/// publications) once the daemon's stream has let go of them; returns what was dropped.
async fn drop_forward_stream(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut source = crate::connect::source(config).await.context("connecting to the old source")?;
    let started = Instant::now();
    loop {
        match source.cleanup().await {
            Ok(dropped) => return Ok(dropped),
            // The daemon's walsender holds the slot until the forward pipeline has wound down.
            Err(_) if started.elapsed() < SLOT_RELEASE_WAIT => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e),
        }
    }
}

/// The fallback pipeline's config text: the same pipeline reversed (the new primary
/// as source, the old source as target), streaming only (`mode = "never"`), the
/// replicated tables named one by one, its state in [`crate::status::fallback_state_dir`].
fn fallback_config(config: &Config, tables: &[String]) -> anyhow::Result<String> {
    let source_kind = match config.target.kind {
        TargetKind::Postgres => "postgres",
        TargetKind::Mysql => "mysql",
    };
    let target_kind = match config.source.kind {
        SourceKind::Postgres => "postgres",
        SourceKind::Mysql => "mysql",
        other => anyhow::bail!("a fallback stream writes into the old source; a {other:?} source cannot take writes"),
    };
    let mut source = toml::map::Map::new();
    source.insert("kind".into(), source_kind.into());
    source.insert("url".into(), config.target.url.expose().into());
    source.insert(
        "tables".into(),
        tables.iter().map(|t| toml::Value::from(glob::Pattern::escape(t))).collect::<Vec<_>>().into(),
    );
    let mut target = toml::map::Map::new();
    target.insert("kind".into(), target_kind.into());
    target.insert("url".into(), config.source.url.expose().into());
    for (section, endpoint) in [(&mut source, config.target.endpoint()), (&mut target, config.source.endpoint())] {
        if let Some(file) = endpoint.password_file {
            section.insert("password_file".into(), file.display().to_string().into());
        }
        if let Some(variable) = endpoint.password_env {
            section.insert("password_env".into(), variable.into());
        }
    }
    let mut document = toml::map::Map::new();
    document.insert("source".into(), source.into());
    document.insert("target".into(), target.into());
    document.insert(
        "state".into(),
        toml::Value::from(toml::map::Map::from_iter([(
            "dir".to_string(),
            toml::Value::from(crate::status::fallback_state_dir(&config.state.dir).display().to_string()),
        )])),
    );
    document.insert(
        "snapshot".into(),
        toml::Value::from(toml::map::Map::from_iter([("mode".to_string(), toml::Value::from("never"))])),
    );
    document.insert(
        "metrics".into(),
        toml::Value::from(toml::map::Map::from_iter([(
            "listen".to_string(),
            toml::Value::from(config.metrics.listen.clone()),
        )])),
    );
    toml::to_string(&toml::Value::from(document)).context("writing the fallback config")
}

/// Where a switchover writes the fallback pipeline's config (readable, and usable
/// with `status` and `cleanup`).
fn fallback_path(config: &Config) -> std::path::PathBuf {
    config.state.dir.join(format!("{}_fallback.toml", config.name))
}

/// The fallback pipeline to run once `run` returns, if the pipeline ended in a
/// switchover with fallback (`switchover` created its stream and wrote its config).
pub async fn fallback_after_switchover(config: &Config) -> anyhow::Result<Option<Config>> {
    // The pipeline's own tasks let go of the store as they wind down: wait them out.
    let mut attempts = 0;
    let store = loop {
        match CheckpointStore::open(&config.state.dir) {
            Ok(store) => break store,
            Err(_) if attempts < 50 => attempts += 1,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !store.switchover()?.is_some_and(|r| r.fallback) {
        return Ok(None);
    }
    Ok(Some(Config::load(&fallback_path(config))?))
}

/// Sets up the fallback stream on the new primary: tables without a key get
/// `REPLICA IDENTITY FULL` (PostgreSQL; cutover created them), then the stream's
/// publication and slot (or binlog position) are created and recorded.
/// Writes the fallback pipeline's config next to the state dir and loads it.
fn write_fallback_config(config: &Config, schema: &crate::schema::SourceSchema) -> anyhow::Result<Config> {
    // The tables as the new primary names them (a MySQL target: in the database they landed in).
    let tables: Vec<String> = schema
        .tables
        .iter()
        .map(|t| match config.target.kind {
            TargetKind::Postgres => Ok(t.schema.name.to_string()),
            TargetKind::Mysql => Ok(format!(
                "{}.{}",
                crate::connect::target_database(config, &t.schema.name.schema)?,
                t.schema.name.name
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    let path = fallback_path(config);
    // It holds both URLs, passwords included: readable by cutover's user only.
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        use std::os::unix::fs::PermissionsExt as _;
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(fallback_config(config, &tables).map_err(std::io::Error::other)?.as_bytes())
    };
    write().with_context(|| format!("writing the fallback config {}", path.display()))?;
    Ok(Config::load(&path)?)
}

/// The new primary must be able to serve the fallback stream (PostgreSQL `wal_level =
/// logical` and a free slot, MySQL binlog in ROW format, privileges): checked before
/// anything is fenced, so a switchover never stops half-way for it. Returns the fallback
/// stream's source, ready to be created once the old source is fenced.
async fn check_fallback(config: &Config) -> anyhow::Result<Fallback> {
    let schema = crate::connect::source(config).await?.schema().await?;
    let fallback = write_fallback_config(config, &schema)?;
    let mut new_primary =
        crate::connect::source(&fallback).await.context("connecting to the target as the fallback stream's source")?;
    let fallback_schema = new_primary.schema().await?;
    let problems: Vec<Finding> =
        new_primary.preflight(&fallback_schema).await?.into_iter().filter(|f| f.severity == Severity::Error).collect();
    if !problems.is_empty() {
        anyhow::bail!(
            "the target cannot serve the fallback stream (the findings' \"source\" is the target); nothing was fenced:\n{}",
            crate::preflight::render_findings(&problems)
        );
    }
    Ok(Fallback { config: fallback, source: new_primary })
}

/// The fallback pipeline, checked: its config, and the new primary as its source.
struct Fallback {
    config: Config,
    source: Box<dyn crate::source::Source>,
}

async fn create_fallback(
    config: &Config,
    fallback: Fallback,
    schema: &crate::schema::SourceSchema,
) -> anyhow::Result<()> {
    let Fallback { config: fallback, mut source } = fallback;
    std::fs::create_dir_all(&fallback.state.dir)
        .with_context(|| format!("creating the fallback state dir {}", fallback.state.dir.display()))?;
    let store = CheckpointStore::open(&fallback.state.dir)?;
    if store.identity()?.is_some() {
        return Ok(());
    }
    if config.target.kind == TargetKind::Postgres {
        let client = ConnectParams::from_endpoint(config.target.endpoint())?.connect().await?;
        for table in schema.tables.iter().filter(|t| t.schema.key_indexes().is_empty()) {
            let sql = format!("ALTER TABLE {} REPLICA IDENTITY FULL", crate::schema::quote_table(&table.schema.name));
            client.batch_execute(&sql).await.with_context(|| format!("on the target: {sql}"))?;
        }
    }
    // Only the new primary's side: the old source is written to once the daemon runs the stream.
    // Read after the replica identities changed: they decide which publication a table joins.
    let fallback_schema = source.schema().await?;
    let (identity, _snapshot) = source.create_stream(&fallback_schema.tables).await?;
    source.release_snapshot().await;
    store.save_identity(&identity)?;
    tracing::info!(from = %identity.consistent_point, "fallback stream created on the new primary");
    Ok(())
}

/// The summary for a terminal.
pub fn render(summary: &Summary) -> String {
    let mut out = format!(
        "switchover done: the target is the new primary\n\
         final source position:   {}\n\
         write-blocked window:    {} ms\n\
         transactions applied:    {} ({} row changes)\n\
         client sessions ended:   {}\n\
         sequences synced:        {}\n\
         fallback:                {}\n\
         forward stream:          {}\n\
         user triggers:           {}\n",
        summary.final_position,
        summary.write_blocked.as_millis(),
        summary.transactions_applied,
        summary.changes_applied,
        summary.sessions_ended,
        summary.sequences_synced,
        if summary.fallback {
            "streaming the new primary's writes back to the old source (cutover status shows phase fallback)"
        } else {
            "off ([switchover] fallback = true to keep the old source in step)"
        },
        match &summary.forward_stream_dropped {
            Ok(dropped) if dropped.is_empty() => "nothing to drop on the old source".to_string(),
            Ok(dropped) => format!("dropped {}", dropped.join(", ")),
            Err(why) => format!("NOT dropped: {why}"),
        },
        match &summary.triggers_enabled {
            Ok(enabled) if enabled.is_empty() => "none disabled by cutover".to_string(),
            Ok(enabled) => format!("enabled again: {}", enabled.join(", ")),
            Err(why) => format!("NOT enabled again: {why}"),
        }
    );
    if !summary.still_writing.is_empty() {
        out.push_str("can still write to the old source:\n");
        for writer in &summary.still_writing {
            out.push_str(&format!("  - {writer}\n"));
        }
    }
    out
}
