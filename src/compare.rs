//! `cutover compare-queries`: the application's queries, timed on the source and
//! on the target, their result sets compared.
//!
//! Each query runs `runs` times on each side; the median time is reported. The
//! last run's rows are compared as sets of canonical texts, so the same data
//! printed by two dialects compares equal (`t` and `1`, `1.50` and `1.5`, a UTC
//! timestamp with or without `+00`, JSON with different spacing or key order).

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sql::{Rows, SqlClient, SqlDialect};
use anyhow::Context as _;

/// One query's outcome.
#[derive(Debug)]
pub struct QueryReport {
    pub query: String,
    pub source_ms: f64,
    pub target_ms: f64,
    pub rows: (usize, usize),
    pub same: bool,
}

/// `;`-separated statements, outside quotes; empty ones dropped.
pub fn split_queries(text: &str) -> Vec<String> {
    let mut queries = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (None, ';') => queries.push(std::mem::take(&mut current)),
            (None, '\'' | '"' | '`') => {
                quote = Some(c);
                current.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            _ => current.push(c),
        }
    }
    queries.push(current);
    queries.into_iter().map(|q| q.trim().to_string()).filter(|q| !q.is_empty()).collect()
}

/// One value as both dialects would agree on it.
pub fn canonical(value: &str) -> String {
    let v = value.trim();
    match v {
        "t" | "true" => return "1".into(),
        "f" | "false" => return "0".into(),
        _ => {}
    }
    if v.starts_with(['{', '[']) {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(v) {
            return sorted_json(&json);
        }
    }
    let v = v.strip_suffix("+00").unwrap_or(v);
    // Floats in exponent form (`1e+300`, `1.7e+15`): their shortest form, which is either
    // an exponent again or a decimal, trimmed as any decimal below.
    let shortest;
    let v = match v.contains(['e', 'E']) && !v.starts_with(['e', 'E']) {
        true => match v.parse::<f64>() {
            Ok(float) => {
                shortest = format!("{float:?}");
                if shortest.contains('e') {
                    return shortest;
                }
                shortest.as_str()
            }
            Err(_) => v,
        },
        false => v,
    };
    // Decimals: trailing zeros after the point say nothing about the value.
    let numeric = v.strip_prefix('-').unwrap_or(v);
    if numeric.contains('.') && numeric.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let trimmed = v.trim_end_matches('0').trim_end_matches('.');
        return if trimmed == "-0" { "0".into() } else { trimmed.to_string() };
    }
    // Times: trailing zeros of a fraction of a second likewise (`12:00:00.500000` is `12:00:00.5`).
    if let Some((whole, fraction)) = v.rsplit_once('.') {
        let is_time = whole.len() >= 8 && whole.as_bytes()[whole.len() - 3] == b':';
        if is_time && !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) {
            let fraction = fraction.trim_end_matches('0');
            return if fraction.is_empty() { whole.to_string() } else { format!("{whole}.{fraction}") };
        }
    }
    v.to_string()
}

/// JSON with object keys sorted at every level: the same document however a
/// server orders or spaces it.
pub fn sorted_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let fields: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", serde_json::Value::String(k.clone()), sorted_json(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => format!("[{}]", items.iter().map(sorted_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

fn canonical_rows(rows: Rows) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> =
        rows.into_iter().map(|row| row.into_iter().map(|v| v.map(|v| canonical(&v))).collect()).collect();
    rows.sort();
    rows
}

/// Runs every query `runs` times on both sides.
pub async fn compare(config: &Config, queries: &[String], runs: usize) -> anyhow::Result<Vec<QueryReport>> {
    let source_dialect = SqlDialect::of_source(config, "compare-queries")?;
    let mut source = SqlClient::open(source_dialect, config.source.endpoint()).await.context("[source]")?;
    let mut target =
        SqlClient::open(SqlDialect::of_target(config), config.target.endpoint()).await.context("[target]")?;
    let mut reports = Vec::new();
    for query in queries {
        let (mut source_times, mut target_times) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        let (mut source_rows, mut target_rows) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            source_rows = source.run(query).await.with_context(|| format!("running on the source: {query}"))?;
            source_times.push(started.elapsed());
            let started = Instant::now();
            target_rows = target.run(query).await.with_context(|| format!("running on the target: {query}"))?;
            target_times.push(started.elapsed());
        }
        let rows = (source_rows.len(), target_rows.len());
        reports.push(QueryReport {
            query: query.clone(),
            source_ms: median_ms(&mut source_times),
            target_ms: median_ms(&mut target_times),
            rows,
            same: canonical_rows(source_rows) == canonical_rows(target_rows),
        });
    }
    Ok(reports)
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    times.get(times.len() / 2).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// The reports as a table for a terminal.
pub fn render(reports: &[QueryReport]) -> String {
    let mut out =
        format!("{:<60} {:>10} {:>10} {:>7} {:>13}  result\n", "query", "source ms", "target ms", "ratio", "rows s/t");
    for r in reports {
        let one_line: String = r.query.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut shown: String = one_line.chars().take(57).collect();
        if shown.len() < one_line.len() {
            shown.push_str("...");
        }
        out.push_str(&format!(
            "{shown:<60} {:>10.2} {:>10.2} {:>7.2} {:>13}  {}\n",
            r.source_ms,
            r.target_ms,
            r.target_ms / r.source_ms.max(0.001),
            format!("{}/{}", r.rows.0, r.rows.1),
            if r.same { "same" } else { "differ" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_outside_quotes() {
        assert_eq!(
            split_queries("SELECT 1; SELECT ';' AS semi;\n\n SELECT \"a;b\" FROM t ;"),
            vec!["SELECT 1", "SELECT ';' AS semi", "SELECT \"a;b\" FROM t"]
        );
    }

    #[test]
    fn dialects_agree_on_canonical_values() {
        for (a, b) in [
            ("t", "1"),
            ("1.50", "1.5"),
            ("2.00", "2"),
            ("2024-01-01 10:00:00+00", "2024-01-01 10:00:00"),
            ("10:00:00.000000", "10:00:00"),
            ("2024-01-01 10:00:00.5+00", "2024-01-01 10:00:00.500000"),
            ("1e+300", "1e300"),
            ("1.7e+15", "1700000000000000.0"),
            (r#"{"b": 1, "a": [1, 2]}"#, r#"{"a":[1,2],"b":1}"#),
        ] {
            assert_eq!(canonical(a), canonical(b), "{a} vs {b}");
        }
        assert_ne!(canonical("10"), canonical("1"));
    }
}
