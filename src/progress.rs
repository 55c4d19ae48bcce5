//! Snapshot progress as a person at a terminal sees it: a bar per table being
//! copied and one for the whole snapshot (indicatif). Anywhere else — a file,
//! the journal, JSON logs — the copy reports with a log line every 10 s instead.
//!
//! Log lines and bars share stderr: while bars are drawn, every log line goes
//! through [`LogWriter`], which lifts the bars, writes the line and redraws them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// The bars' canvas, when stderr is a terminal showing text logs.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Draws progress bars from now on (call once, before logging starts).
pub fn enable_bars() {
    let _ = BARS.set(MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)));
}

/// A `tracing` writer for stderr that keeps progress bars intact.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        *self
    }
}

/// One table of a snapshot copy.
pub struct TableCopy {
    pub name: String,
    /// The planner's row estimate and the on-disk size: the yardsticks for ETAs.
    pub estimated_rows: u64,
    pub estimated_bytes: u64,
    /// Bytes streamed so far (live).
    pub bytes: AtomicU64,
    /// Rows in finished chunks.
    pub rows: AtomicU64,
    /// Set when its last chunk is in: its exact row count.
    pub finished: AtomicU64,
}

impl TableCopy {
    pub fn new(name: String, estimated_rows: u64, estimated_bytes: u64) -> TableCopy {
        TableCopy {
            name,
            estimated_rows,
            estimated_bytes,
            bytes: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            finished: AtomicU64::new(u64::MAX),
        }
    }

    /// Rows copied: exact once finished, else estimated from the bytes moved.
    fn rows_so_far(&self) -> (u64, bool) {
        match self.finished.load(Relaxed) {
            u64::MAX => {
                let share = self.bytes.load(Relaxed) as f64 / self.estimated_bytes.max(1) as f64;
                let estimate = (share.min(1.0) * self.estimated_rows as f64) as u64;
                (estimate.max(self.rows.load(Relaxed)), false)
            }
            rows => (rows, true),
        }
    }
}

/// How the snapshot reports: bars on a terminal, else periodic log lines.
pub enum Reporter {
    Bars { total: ProgressBar, tables: HashMap<String, (ProgressBar, Instant)> },
    Log { last: Instant },
}

/// How often the log reporter writes a line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Reporter {
    pub fn new(total_bytes: u64) -> Reporter {
        match BARS.get() {
            Some(bars) => {
                let total = bars.add(ProgressBar::new(total_bytes.max(1)));
                total.set_style(style("{prefix:.bold} [{bar:30}] {percent:>3}%  {msg}  ETA {eta}"));
                total.set_prefix("snapshot");
                Reporter::Bars { total, tables: HashMap::new() }
            }
            None => Reporter::Log { last: Instant::now() },
        }
    }

    /// Brings the display up to date (call often; the log reporter writes every 10 s).
    pub fn tick(&mut self, progress: &crate::progress::CopyProgress) {
        match self {
            Reporter::Log { last } => {
                if last.elapsed() >= LOG_INTERVAL {
                    progress.report();
                    *last = Instant::now();
                }
            }
            Reporter::Bars { total, tables } => {
                let Some(bars) = BARS.get() else { return };
                let status = progress.status();
                total.set_position(progress.bytes());
                total.set_message(format!(
                    "{}/{} tables, {} rows, {:.1} MB/s",
                    status.tables_done, status.tables_total, status.rows, status.megabytes_per_second
                ));
                for table in progress.tables() {
                    let bytes = table.bytes.load(Relaxed);
                    let (rows, finished) = table.rows_so_far();
                    if bytes == 0 && !finished {
                        continue;
                    }
                    let (bar, started) = tables.entry(table.name.clone()).or_insert_with(|| {
                        let bar = bars.insert_before(total, ProgressBar::new(table.estimated_bytes.max(1)));
                        bar.set_style(style("{prefix:<32} [{bar:30}] {percent:>3}%  {msg}  ETA {eta}"));
                        bar.set_prefix(table.name.clone());
                        (bar, Instant::now())
                    });
                    if bar.is_finished() {
                        continue;
                    }
                    // A rate over less than a second says little.
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = match elapsed >= 1.0 {
                        true => format!(", {:.0} rows/s", rows as f64 / elapsed),
                        false => String::new(),
                    };
                    if finished {
                        bar.finish_and_clear();
                        let _ = bars.println(format!(
                            "{}: {rows} rows copied in {:.1} s",
                            table.name,
                            started.elapsed().as_secs_f64()
                        ));
                    } else {
                        bar.set_position(bytes.min(table.estimated_bytes));
                        bar.set_message(format!("~{rows}/{} rows{rate}", table.estimated_rows));
                    }
                }
            }
        }
    }

    /// Takes the bars off the screen.
    pub fn finish(self) {
        if let Reporter::Bars { total, tables } = self {
            for (bar, _) in tables.values() {
                bar.finish_and_clear();
            }
            total.finish_and_clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::TableCopy;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn rows_are_estimated_from_bytes_until_the_table_is_done() {
        let table = TableCopy::new("public.t".into(), 1000, 8192 * 10);
        table.bytes.store(8192 * 5, Relaxed);
        assert_eq!(table.rows_so_far(), (500, false));
        table.bytes.store(8192 * 50, Relaxed); // more bytes than the estimate: never past it
        assert_eq!(table.rows_so_far(), (1000, false));
        table.finished.store(1234, Relaxed);
        assert_eq!(table.rows_so_far(), (1234, true));
    }
}

/// What the copy workers have moved so far.
pub struct CopyProgress {
    started: Instant,
    /// Every table being copied.
    tables: Vec<TableCopy>,
    /// The tables' size on disk: the yardstick for the ETA.
    estimated_bytes: u64,
    /// Bytes streamed from source to target.
    bytes: AtomicU64,
    /// Rows in finished chunks.
    rows: AtomicU64,
    /// Tables whose every chunk is copied.
    done: AtomicUsize,
}

/// The snapshot in progress, for `status`; `None` when no copy runs.
pub static SNAPSHOT_PROGRESS: std::sync::Mutex<Option<Arc<CopyProgress>>> = std::sync::Mutex::new(None);

impl CopyProgress {
    /// A copy of `tables` starting now.
    pub fn new(tables: Vec<TableCopy>) -> CopyProgress {
        CopyProgress {
            started: Instant::now(),
            estimated_bytes: tables.iter().map(|t| t.estimated_bytes).sum(),
            tables,
            bytes: Default::default(),
            rows: Default::default(),
            done: Default::default(),
        }
    }

    /// The tables' size on disk.
    pub fn estimated_bytes(&self) -> u64 {
        self.estimated_bytes
    }

    /// `bytes` more of table `index` moved from source to target.
    pub fn moved(&self, index: usize, bytes: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
        if let Some(table) = self.tables.get(index) {
            table.bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// A chunk of table `index` landed with `rows` rows.
    pub fn chunk_copied(&self, index: usize, rows: u64) {
        self.rows.fetch_add(rows, Relaxed);
        if let Some(table) = self.tables.get(index) {
            table.rows.fetch_add(rows, Relaxed);
        }
    }

    /// Table `index`'s last chunk landed: it holds `rows` rows.
    pub fn table_copied(&self, index: usize, rows: u64) {
        self.done.fetch_add(1, Relaxed);
        if let Some(table) = self.tables.get(index) {
            table.finished.store(rows, Relaxed);
        }
    }

    /// Where the copy stands.
    pub fn status(&self) -> SnapshotStatus {
        let bytes = self.bytes.load(Relaxed);
        let rate = bytes as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let remaining = self.estimated_bytes.saturating_sub(bytes) as f64;
        SnapshotStatus {
            tables_done: self.done.load(Relaxed),
            tables_total: self.tables.len(),
            rows: self.rows.load(Relaxed),
            megabytes: bytes / 1_000_000,
            megabytes_per_second: rate / 1e6,
            eta_seconds: (rate > 0.0).then(|| (remaining / rate).round() as u64),
            tables: self.tables.iter().map(|t| (t.name.clone(), t.rows.load(Relaxed), t.estimated_rows)).collect(),
        }
    }

    /// Bytes streamed from source to target so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// The tables being copied, with their live counters.
    pub fn tables(&self) -> &[TableCopy] {
        &self.tables
    }

    /// One log line: tables, rows, bytes, rate and a rough ETA from the tables' on-disk size.
    pub fn report(&self) {
        let status = self.status();
        tracing::info!(
            tables_copied = format!("{}/{}", status.tables_done, status.tables_total),
            rows = status.rows,
            megabytes = status.megabytes,
            megabytes_per_second = format!("{:.1}", status.megabytes_per_second),
            eta_seconds = status.eta_seconds.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()),
            "snapshot in progress"
        );
    }
}

/// A snapshot copy in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotStatus {
    pub tables_done: usize,
    pub tables_total: usize,
    pub rows: u64,
    pub megabytes: u64,
    pub megabytes_per_second: f64,
    /// Rough: from the tables' size on disk and the rate so far.
    pub eta_seconds: Option<u64>,
    /// `(table, rows copied, estimated rows)`.
    pub tables: Vec<(String, u64, u64)>,
}
