//! `cutover check`: what each server must allow before the pipeline runs, and
//! the plan — every table, its key and, where types change, each column's mapping.

use std::fmt::Write as _;

use crate::change::Identity;
use crate::config::{Partitions, TargetConfig, TargetKind};
use crate::finding::{Finding, Severity};
use crate::schema::mysql_target::mysql_expression;
use crate::schema::{SourceSchema, UserTypeKind};

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
pub fn render_plan(schema: &SourceSchema, target: &TargetConfig) -> String {
    let partitions = target.partitions();
    let mut out = String::new();
    for extension in &schema.extensions {
        let used = match extension.needed_by.is_empty() {
            true => String::new(),
            false => format!(" (types of {})", extension.needed_by.join(", ")),
        };
        let _ = writeln!(out, "extension {} in schema {}{used}", extension.name, extension.schema);
    }
    for user_type in &schema.types {
        let kind = match user_type.kind {
            UserTypeKind::Domain { .. } => "domain",
            UserTypeKind::Composite { .. } => "composite type",
            UserTypeKind::Range { .. } => "range type",
        };
        let _ = writeln!(out, "{kind} {}", user_type.name);
    }
    if !schema.extensions.is_empty() || !schema.types.is_empty() {
        out.push('\n');
    }
    for table in &schema.tables {
        let key: Vec<&str> = table.schema.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
        let key = match (table.schema.identity, key.is_empty()) {
            (Identity::Key, false) => format!("key ({})", key.join(", ")),
            (Identity::Full, _) => "no key: rows matched on all columns".to_string(),
            _ => "no key and no replica identity: INSERT and TRUNCATE only".to_string(),
        };
        let _ = writeln!(out, "{}  ~{} rows  {key}", table.schema.name, table.estimated_rows);
        if let Some(partitioning) = &table.partitioning {
            let names: Vec<String> = partitioning.partitions.iter().map(|p| p.name.to_string()).collect();
            let becomes = match partitions {
                Partitions::Keep => "the same partitioned table with the same partitions",
                Partitions::Flatten => "one plain table",
            };
            let _ = writeln!(
                out,
                "    partitioned by {} into {} partition(s) ({}): becomes {becomes}; each partition that holds rows \
                 is copied as a chunk of its own",
                partitioning.key,
                names.len(),
                names.join(", ")
            );
        }
        if !table.inherits.is_empty() {
            let parents: Vec<String> = table.inherits.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "    inherits from {}: copied and streamed as a table of its own; on the target the link is not \
                 made, so a query on the parent there does not see these rows (recreate it with ALTER TABLE … \
                 INHERIT after the switchover if the application needs it)",
                parents.join(", ")
            );
        }
        for generated in &table.generated {
            let becomes = match (target.kind, mysql_expression(&generated.expression, &table.column_names())) {
                (TargetKind::Postgres, _) => "computed on the target too".to_string(),
                (TargetKind::Mysql, Some(expression)) => format!("computed on the target as {expression}"),
                (TargetKind::Mysql, None) => {
                    "NOT created on the target: MySQL has no form of this expression (create it there by hand)".into()
                }
            };
            let _ = writeln!(out, "    {:<24} generated as {}: {becomes}", generated.name, generated.expression);
        }
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
    let (mut source, mut sink) = crate::connect::source_and_sink(config).await?;
    let schema = source.schema().await?;
    let mut findings = source.preflight(&schema).await?;
    findings.extend(source.check_skip(&config.stream.skip()).await?);
    let copy_bytes = match config.snapshot.mode {
        crate::config::SnapshotMode::Never => 0,
        _ => schema.tables.iter().map(|t| t.pages.saturating_mul(8192)).sum(),
    };
    findings.extend(sink.preflight(&schema, copy_bytes, config.pipeline.apply_connections()).await?);
    println!("plan for pipeline {}: {} table(s)\n", config.name, schema.tables.len());
    print!("{}", render_plan(&schema, &config.target));
    println!();
    if findings.is_empty() {
        println!("preflight: source and target are ready");
    } else {
        print!("{}", render_findings(&findings));
    }
    Ok(!findings.iter().any(|f| f.severity == Severity::Error))
}
