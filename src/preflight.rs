//! `cutover check`: what each server must allow before the pipeline runs, and
//! the plan — every table, its key and, where types change, each column's mapping.

use std::fmt::Write as _;

use crate::change::Identity;
use crate::schema::SourceSchema;

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The pipeline cannot run until this is fixed.
    Error,
    /// It runs, with a limitation the user should know.
    Warning,
}

/// One thing a server check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Where: `source`, `target`, a table.
    pub side: String,
    /// The setting or object, with its value.
    pub what: String,
    /// What it must be.
    pub required: String,
    /// The statement or step that fixes it.
    pub fix: String,
}

impl Finding {
    pub fn error(side: &str, what: String, required: &str, fix: String) -> Finding {
        Finding { severity: Severity::Error, side: side.into(), what, required: required.into(), fix }
    }

    pub fn warning(side: &str, what: String, required: &str, fix: String) -> Finding {
        Finding { severity: Severity::Warning, side: side.into(), what, required: required.into(), fix }
    }
}

/// Bytes as a person reads them: `512 MiB`, `3.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

/// The findings, worst first, for a terminal.
pub fn render_findings(findings: &[Finding]) -> String {
    let mut out = String::new();
    for severity in [Severity::Error, Severity::Warning] {
        for f in findings.iter().filter(|f| f.severity == severity) {
            let label = if severity == Severity::Error { "ERROR" } else { "warning" };
            let _ = writeln!(out, "{label} [{}] {}: needs {}\n    fix: {}", f.side, f.what, f.required, f.fix);
        }
    }
    out
}

/// The plan: each table with its estimated rows and key, and each column whose type
/// changes on the way with what the change can lose.
pub fn render_plan(schema: &SourceSchema) -> String {
    let mut out = String::new();
    for table in &schema.tables {
        let key: Vec<&str> = table.schema.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
        let key = match (table.schema.identity, key.is_empty()) {
            (Identity::Key, false) => format!("key ({})", key.join(", ")),
            (Identity::Full, _) => "no key: rows matched on all columns".to_string(),
            _ => "no key and no replica identity: INSERT and TRUNCATE only".to_string(),
        };
        let _ = writeln!(out, "{}  ~{} rows  {key}", table.schema.name, table.estimated_rows);
        for (column, definition) in table.schema.columns.iter().zip(&table.columns) {
            if let Some(source_type) = &definition.source_type {
                let loss = definition.loss.map(|l| format!("  (can lose: {l})")).unwrap_or_default();
                let _ = writeln!(out, "    {:<24} {:<28} -> {}{loss}", column.name, source_type, column.type_name);
            }
        }
    }
    out
}

/// Runs `cutover check`: prints the plan and the findings; `Ok(false)` when any is an error.
pub async fn check(config: &crate::config::Config) -> anyhow::Result<bool> {
    let (mut source, mut sink) = crate::pipeline::connect(config).await?;
    let schema = source.schema().await?;
    let mut findings = source.preflight(&schema).await?;
    findings.extend(source.check_skip(&config.stream.skip()).await?);
    let copy_bytes = match config.snapshot.mode {
        crate::config::SnapshotMode::Never => 0,
        _ => schema.tables.iter().map(|t| t.pages.saturating_mul(8192)).sum(),
    };
    findings.extend(sink.preflight(&schema, copy_bytes).await?);
    println!("plan for pipeline {}: {} table(s)\n", config.name, schema.tables.len());
    print!("{}", render_plan(&schema));
    println!();
    if findings.is_empty() {
        println!("preflight: source and target are ready");
    } else {
        print!("{}", render_findings(&findings));
    }
    Ok(!findings.iter().any(|f| f.severity == Severity::Error))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_like_df_h() {
        use super::human_bytes;
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(300 * 1024 * 1024), "300 MiB");
        assert_eq!(human_bytes(u64::MAX), "16777216 TiB");
    }
}
