//! What a check found on a server: one problem, where, what it must be, and the fix.
//! Sources, sinks, `check` and `switchover` all speak it.

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
