//! What verify found, and how it is shown.

use std::time::Duration;

use super::SHOWN_KEYS;

/// Rows of one kind of difference: how many, and the first keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    pub count: u64,
    pub keys: Vec<String>,
}

impl Differences {
    pub(super) fn add(&mut self, key: &str) {
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
    /// Tables whose differing rows a repair covered (`verify --repair` / `--repair-script`).
    pub repaired: Vec<String>,
}

impl Verification {
    pub fn matches(&self) -> bool {
        self.tables.iter().all(TableReport::matches)
    }
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
