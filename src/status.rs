//! `cutover status`: where a pipeline stands. A running daemon answers on a
//! control socket in its state dir (mode 0600); when none runs, the checkpoint
//! store answers for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use anyhow::Context as _;

use crate::checkpoint::{CheckpointStore, SwitchoverRecord};
use crate::metrics::{METRICS, PHASES};

/// A pipeline's state, as `status` prints it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub running: bool,
    pub phase: String,
    /// The end of the last source transaction committed on the target.
    pub applied_position: Option<String>,
    pub lag_seconds: f64,
    /// PostgreSQL sources: WAL the source wrote past the applied position.
    pub lag_bytes: i64,
    pub transactions_applied: u64,
    /// Row changes (inserts, updates, deletes, truncates) those transactions carried.
    #[serde(default)]
    pub changes_applied: u64,
    /// Tables whose snapshot copy finished, with the rows copied.
    pub tables_copied: Vec<(String, u64)>,
    /// The snapshot copy in progress, if one runs.
    pub snapshot: Option<crate::progress::SnapshotStatus>,
    pub last_error: Option<String>,
}

/// What the pipeline reports beyond its metrics.
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Records the error the pipeline is retrying or stopped with.
pub fn set_last_error(error: Option<String>) {
    if let Ok(mut last) = LAST_ERROR.lock() {
        *last = error;
    }
}

/// The control socket's path in a state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

fn from_store(store: &CheckpointStore, running: bool) -> anyhow::Result<Status> {
    Ok(Status {
        running,
        applied_position: store.position()?.map(|p| p.to_string()),
        tables_copied: store.tables()?.into_iter().map(|(name, progress)| (name, progress.rows)).collect(),
        ..Status::default()
    })
}

/// The running pipeline's status.
fn live(store: &CheckpointStore) -> anyhow::Result<Status> {
    let mut status = from_store(store, true)?;
    status.phase =
        PHASES.iter().find(|p| METRICS.phase.with_label_values(&[p]).get() == 1).unwrap_or(&"starting").to_string();
    status.lag_seconds = METRICS.lag_seconds.get();
    status.lag_bytes = METRICS.lag_bytes.get();
    status.transactions_applied = METRICS.transactions_applied.get();
    status.changes_applied = METRICS.changes_applied_total();
    status.last_error = LAST_ERROR.lock().ok().and_then(|e| e.clone());
    status.snapshot = crate::progress::SNAPSHOT_PROGRESS.lock().ok().and_then(|p| p.as_ref().map(|p| p.status()));
    Ok(status)
}

/// What a client asks the daemon on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The switchover is done: record how it ended and stop (the fallback stream,
    /// when there is one, takes over in the same process).
    SwitchedOver(SwitchoverRecord),
    /// Copy these tables (`schema.table`) again: their copies are forgotten and the
    /// pipeline resumes from its checkpoint, which copies what it has not.
    Resync {
        tables: Vec<String>,
    },
}

/// Answers requests on the control socket until the task is aborted; `stop` ends
/// the pipeline after a switchover.
pub async fn serve(
    state_dir: &Path,
    store: Arc<CheckpointStore>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    resync: Arc<tokio::sync::watch::Sender<u64>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(state_dir);
    // A socket left by a killed predecessor; the RocksDB lock proves it is gone.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { continue };
            let mut request = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(1), socket.read_to_end(&mut request)).await;
            match (read, serde_json::from_slice::<Request>(&request)) {
                (Ok(Ok(_)), Ok(Request::SwitchedOver(record))) => {
                    if let Err(e) = store.save_switchover(&record) {
                        tracing::error!("recording the switchover: {e:#}");
                    }
                    METRICS.set_phase("switched-over");
                    tracing::info!(final_position = record.final_position, fallback = record.fallback, "switched over");
                    let _ = stop.send(true);
                }
                (Ok(Ok(_)), Ok(Request::Resync { tables })) => {
                    for table in &tables {
                        if let Err(e) = store.forget_table(table) {
                            tracing::error!("forgetting the copy of {table}: {e:#}");
                        }
                    }
                    tracing::info!(
                        tables = tables.join(", "),
                        "asked to copy again: resuming from the checkpoint to copy them"
                    );
                    resync.send_modify(|generation| *generation += 1);
                }
                _ => {}
            }
            let body = match live(&store).and_then(|s| Ok(serde_json::to_vec(&s)?)) {
                Ok(body) => body,
                Err(e) => format!("{{\"error\": {:?}}}", e.to_string()).into_bytes(),
            };
            let _ = socket.write_all(&body).await;
        }
    }))
}

/// The running daemon's status; an error saying how to start one when none answers.
pub async fn daemon_status(state_dir: &Path) -> anyhow::Result<Status> {
    ask(state_dir, &Request::Status).await?.with_context(|| {
        format!(
            "no cutover daemon answers on {}: start `cutover run --config …` for this pipeline first",
            socket_path(state_dir).display()
        )
    })
}

/// Sends `request` to the running daemon and returns its status; `None` when no daemon listens.
pub async fn ask(state_dir: &Path, request: &Request) -> anyhow::Result<Option<Status>> {
    let Ok(mut socket) = tokio::net::UnixStream::connect(socket_path(state_dir)).await else { return Ok(None) };
    socket.write_all(&serde_json::to_vec(request)?).await?;
    socket.shutdown().await?;
    let mut body = Vec::new();
    socket.read_to_end(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body).context("the daemon's answer on the control socket")?))
}

/// Where the fallback stream keeps its state, inside the forward pipeline's state dir.
pub fn fallback_state_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fallback")
}

/// The status of the daemon that runs for a state dir — the forward pipeline, or after a
/// switchover with fallback the fallback stream (the same process, its own socket in
/// [`fallback_state_dir`]); `None` when neither answers.
pub async fn running(state_dir: &Path) -> anyhow::Result<Option<Status>> {
    if let Some(status) = ask(state_dir, &Request::Status).await? {
        return Ok(Some(status));
    }
    Ok(ask(&fallback_state_dir(state_dir), &Request::Status)
        .await?
        .map(|status| Status { phase: "fallback".into(), ..status }))
}

/// Asks the running daemon, or reads the checkpoint store when none runs.
pub async fn query(state_dir: &Path) -> anyhow::Result<Status> {
    // A daemon that is starting holds the store before its socket listens: ask again.
    for _ in 0..50 {
        if let Some(status) = running(state_dir).await? {
            return Ok(status);
        }
        if let Ok(store) = CheckpointStore::open(state_dir) {
            let mut status = from_store(&store, false)?;
            status.phase = match store.switchover()? {
                Some(record) if record.fallback => "fallback".into(),
                Some(_) => "switched-over".into(),
                None => "stopped".into(),
            };
            return Ok(status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "no answer on {} and the checkpoint store in {} is locked: is a cutover process stuck?",
        socket_path(state_dir).display(),
        state_dir.display()
    )
}

/// The status for a terminal.
pub fn render(status: &Status) -> String {
    let mut out = format!(
        "phase:                {}{}\napplied position:     {}\nlag:                  {:.1} s, {} bytes\ntransactions applied: {} ({} row changes)\n",
        status.phase,
        if status.running { "" } else { " (no daemon running)" },
        status.applied_position.as_deref().unwrap_or("none yet"),
        status.lag_seconds,
        status.lag_bytes,
        status.transactions_applied,
        status.changes_applied
    );
    out.push_str(&format!("tables copied:        {}\n", status.tables_copied.len()));
    for (table, rows) in &status.tables_copied {
        out.push_str(&format!("  {table:<40} {rows:>12} rows\n"));
    }
    if let Some(snapshot) = &status.snapshot {
        out.push_str(&format!(
            "snapshot:             {}/{} tables, {} rows, {} MB at {:.1} MB/s, ETA {}\n",
            snapshot.tables_done,
            snapshot.tables_total,
            snapshot.rows,
            snapshot.megabytes,
            snapshot.megabytes_per_second,
            snapshot.eta_seconds.map(|s| format!("~{s} s")).unwrap_or_else(|| "unknown".into())
        ));
        for (table, rows, estimated) in &snapshot.tables {
            out.push_str(&format!("  {table:<40} {rows:>12} of ~{estimated} rows\n"));
        }
    }
    if let Some(error) = &status.last_error {
        out.push_str(&format!("last error:           {error}\n"));
    }
    out
}
