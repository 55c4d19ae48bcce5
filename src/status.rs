//! `cutover status`: where a pipeline stands. A running daemon answers on a
//! control socket in its state dir (mode 0600); when none runs, the checkpoint
//! store answers for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use anyhow::Context as _;

use crate::checkpoint::{CheckpointStore, SwitchoverRecord};
use crate::hold::{Hold, HoldPoint};
use crate::metrics::{METRICS, PHASES};
use crate::position::Position;

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
    /// Hold the applier: before its next transaction, or (`before`, a position) after every
    /// transaction ordered before that and before the rest. Kept while the connection is.
    Hold {
        before: Option<String>,
    },
}

/// What the control socket can ask of the running pipeline.
pub struct Controls {
    /// Ends the pipeline after a switchover.
    pub stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped to copy forgotten tables again.
    pub resync: Arc<tokio::sync::watch::Sender<u64>>,
    /// Holds the applier for `verify --repair`.
    pub hold: Arc<Hold>,
}

/// How long a hold waits for the applier to reach its point.
const HOLD_WAIT: Duration = Duration::from_secs(60);

/// Answers requests on the control socket until the task is aborted. A request is one
/// line of JSON (or all a client sends before it shuts its side); a hold keeps its
/// connection, and lasts as long as it.
pub async fn serve(
    state_dir: &Path,
    store: Arc<CheckpointStore>,
    controls: Controls,
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
            let Ok((socket, _)) = listener.accept().await else { continue };
            let (read, mut write) = socket.into_split();
            let mut lines = BufReader::new(read).lines();
            let line = tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await;
            let request = match line {
                Ok(Ok(Some(line))) => serde_json::from_str::<Request>(&line).ok(),
                _ => None,
            };
            match request {
                Some(Request::SwitchedOver(record)) => {
                    if let Err(e) = store.save_switchover(&record) {
                        tracing::error!("recording the switchover: {e:#}");
                    }
                    METRICS.set_phase("switched-over");
                    tracing::info!(final_position = record.final_position, fallback = record.fallback, "switched over");
                    let _ = controls.stop.send(true);
                }
                Some(Request::Resync { tables }) => {
                    for table in &tables {
                        if let Err(e) = store.forget_table(table) {
                            tracing::error!("forgetting the copy of {table}: {e:#}");
                        }
                    }
                    tracing::info!(
                        tables = tables.join(", "),
                        "asked to copy again: resuming from the checkpoint to copy them"
                    );
                    controls.resync.send_modify(|generation| *generation += 1);
                }
                Some(Request::Hold { before }) => {
                    if controls.hold.is_asked() {
                        let busy = HoldAnswer::refused("another verify --repair holds this pipeline: wait for it");
                        let _ = write.write_all(&busy.line()).await;
                    } else {
                        // Asked here, before the next connection is accepted: one hold at a time.
                        controls.hold.ask(Some(HoldPoint::Next));
                        tokio::spawn(serve_hold(lines, write, before, controls.hold.clone()));
                    }
                    continue;
                }
                Some(Request::Status) | None => {}
            }
            let body = match live(&store).and_then(|s| Ok(serde_json::to_vec(&s)?)) {
                Ok(body) => body,
                Err(e) => format!("{{\"error\": {:?}}}", e.to_string()).into_bytes(),
            };
            let _ = write.write_all(&body).await;
        }
    }))
}

/// Serves one hold: holds where asked, says where, and waits for the next point, until
/// the client lets go (shuts its side or closes the connection) or a hold fails.
async fn serve_hold(
    mut lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    mut write: OwnedWriteHalf,
    mut before: Option<String>,
    hold: Arc<Hold>,
) {
    loop {
        let point = match before.as_deref().map(str::parse::<Position>) {
            None => HoldPoint::Next,
            Some(Ok(position)) => HoldPoint::Before(position),
            Some(Err(e)) => {
                let _ = write.write_all(&HoldAnswer::refused(format!("not a position: {e:#}")).line()).await;
                break;
            }
        };
        hold.ask(Some(point.clone()));
        let answer = tokio::select! {
            held = hold.held(&point) => match held {
                Ok(position) => HoldAnswer { held_at: Some(position.to_string()), error: None },
                Err(e) => HoldAnswer::refused(format!("cannot hold before {point}: {e:#}")),
            },
            _ = tokio::time::sleep(HOLD_WAIT) => HoldAnswer::refused(format!(
                "the pipeline did not reach {point} within {} s (is it still copying, or far behind?)",
                HOLD_WAIT.as_secs()
            )),
            // The client sends nothing while it waits: anything is it going away.
            _ = lines.next_line() => break,
        };
        let refused = answer.error.is_some();
        if write.write_all(&answer.line()).await.is_err() || refused {
            break;
        }
        match lines.next_line().await {
            Ok(Some(line)) => match serde_json::from_str::<Request>(&line) {
                Ok(Request::Hold { before: next }) => before = next,
                _ => break,
            },
            _ => break,
        }
    }
    hold.ask(None);
}

/// The daemon's answer to a hold.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HoldAnswer {
    /// The position the target has applied, held there.
    held_at: Option<String>,
    error: Option<String>,
}

impl HoldAnswer {
    fn refused(why: impl Into<String>) -> HoldAnswer {
        HoldAnswer { held_at: None, error: Some(why.into()) }
    }

    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// A hold on a running daemon's applier ([`crate::hold::Hold`]): it applies nothing
/// past the point last asked for until this is dropped, or this process ends.
pub struct HeldPipeline {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    /// The position last held before.
    before: Option<String>,
}

impl HeldPipeline {
    /// Holds the daemon's applier before its next transaction, once it is there. `None`
    /// when no daemon runs.
    pub async fn next(state_dir: &Path) -> anyhow::Result<Option<HeldPipeline>> {
        let Ok(socket) = tokio::net::UnixStream::connect(socket_path(state_dir)).await else { return Ok(None) };
        let (read, write) = socket.into_split();
        let mut held = HeldPipeline { lines: BufReader::new(read).lines(), write, before: None };
        held.ask(None).await?;
        Ok(Some(held))
    }

    /// Has the applier apply every transaction ordered before `position` (a snapshot's)
    /// and hold before the rest: the position the target has applied then.
    pub async fn before(&mut self, position: &Position) -> anyhow::Result<Position> {
        self.before = Some(position.to_string());
        self.ask(self.before.clone()).await
    }

    /// Whether the hold still stands where it was last asked to (the daemon did not stop
    /// streaming since, nor resume from its checkpoint): an error if not.
    pub async fn confirm(&mut self) -> anyhow::Result<()> {
        self.ask(self.before.clone()).await.map(|_| ())
    }

    async fn ask(&mut self, before: Option<String>) -> anyhow::Result<Position> {
        let mut request = serde_json::to_vec(&Request::Hold { before })?;
        request.push(b'\n');
        self.write.write_all(&request).await.context("asking the daemon to hold")?;
        let line = self.lines.next_line().await.context("waiting for the daemon to hold")?;
        let answer: HoldAnswer = serde_json::from_str(&line.context("the daemon closed the control connection")?)
            .context("the daemon's answer to a hold")?;
        match (answer.held_at, answer.error) {
            (_, Some(error)) => anyhow::bail!("the daemon cannot hold: {error}"),
            (Some(at), None) => at.parse().context("the daemon's held position"),
            (None, None) => anyhow::bail!("the daemon's answer to a hold says nothing"),
        }
    }
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
