//! SQLite → PostgreSQL: column types from declared types, and each stored value
//! checked against its column's type on the way.
//!
//! SQLite lets any column hold any value; its declared type only sets an
//! affinity. The target type follows the declared type (SQLite's affinity rules,
//! refined where PostgreSQL has a closer type), and a stored value that does not
//! fit it is a [`Mismatch`], never a silently changed or dropped value.

use std::fmt::Write as _;

/// What a SQLite column becomes in PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteType {
    BigInt,
    Double,
    Boolean,
    /// `varchar(n)`: at most n characters.
    Varchar(u32),
    Text,
    Bytea,
    /// `numeric(p,s)`, or unconstrained `numeric`.
    Numeric(Option<(u32, u32)>),
    Date,
    Timestamp,
    Jsonb,
}

impl SqliteType {
    /// The PostgreSQL type name.
    pub fn target_type(self) -> String {
        match self {
            SqliteType::BigInt => "bigint".into(),
            SqliteType::Double => "double precision".into(),
            SqliteType::Boolean => "boolean".into(),
            SqliteType::Varchar(n) => format!("varchar({n})"),
            SqliteType::Text => "text".into(),
            SqliteType::Bytea => "bytea".into(),
            SqliteType::Numeric(Some((p, s))) => format!("numeric({p},{s})"),
            SqliteType::Numeric(None) => "numeric".into(),
            SqliteType::Date => "date".into(),
            SqliteType::Timestamp => "timestamp".into(),
            SqliteType::Jsonb => "jsonb".into(),
        }
    }
}

impl SqliteType {
    /// Back from [`SqliteType::target_type`]: what a column of the source schema holds.
    pub fn from_target_type(name: &str) -> Option<SqliteType> {
        Some(match name {
            "bigint" => SqliteType::BigInt,
            "double precision" => SqliteType::Double,
            "boolean" => SqliteType::Boolean,
            "text" => SqliteType::Text,
            "bytea" => SqliteType::Bytea,
            "numeric" => SqliteType::Numeric(None),
            "date" => SqliteType::Date,
            "timestamp" => SqliteType::Timestamp,
            "jsonb" => SqliteType::Jsonb,
            other => {
                let args = other.strip_suffix(')')?;
                if let Some(n) = args.strip_prefix("varchar(") {
                    SqliteType::Varchar(n.parse().ok()?)
                } else {
                    let (p, s) = args.strip_prefix("numeric(")?.split_once(',')?;
                    SqliteType::Numeric(Some((p.parse().ok()?, s.parse().ok()?)))
                }
            }
        })
    }
}

/// The target type for a declared type (`INTEGER`, `VARCHAR(40)`, `DECIMAL(10,2)`, ``).
pub fn map_declared(declared: &str) -> SqliteType {
    let upper = declared.trim().to_ascii_uppercase();
    let (base, args) = match upper.split_once('(') {
        Some((base, rest)) => (base.trim(), rest.trim_end_matches(')').split(',').map(str::trim).collect()),
        None => (upper.as_str(), Vec::new()),
    };
    let number = |i: usize| args.get(i).and_then(|a: &&str| a.parse::<u32>().ok());
    match base {
        // Affinity rule 1 first, as SQLite applies it: any declared type containing INT.
        b if b.contains("INT") => SqliteType::BigInt,
        "BOOLEAN" | "BOOL" => SqliteType::Boolean,
        "DATE" => SqliteType::Date,
        "DATETIME" | "TIMESTAMP" => SqliteType::Timestamp,
        "JSON" | "JSONB" => SqliteType::Jsonb,
        "NUMERIC" | "DECIMAL" => match (number(0), number(1)) {
            (Some(p), s) if (1..=1000).contains(&p) => SqliteType::Numeric(Some((p, s.unwrap_or(0).min(p)))),
            _ => SqliteType::Numeric(None),
        },
        b if b.contains("CHAR") || b.contains("CLOB") || b.contains("TEXT") => match number(0) {
            Some(n) if n > 0 && !b.contains("TEXT") && !b.contains("CLOB") => SqliteType::Varchar(n),
            _ => SqliteType::Text,
        },
        b if b.contains("BLOB") => SqliteType::Bytea,
        // REAL is an 8-byte float in SQLite: double precision, never `real`.
        b if b.contains("REAL") || b.contains("FLOA") || b.contains("DOUB") => SqliteType::Double,
        // No declared type, or one SQLite gives NUMERIC affinity to (MONEY, UUID, …): text keeps every value.
        _ => SqliteType::Text,
    }
}

/// A stored value as SQLite hands it over.
#[derive(Clone, Copy, Debug)]
pub enum Stored<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

impl<'a> From<rusqlite::types::ValueRef<'a>> for Stored<'a> {
    fn from(value: rusqlite::types::ValueRef<'a>) -> Stored<'a> {
        use rusqlite::types::ValueRef;
        match value {
            ValueRef::Null => Stored::Null,
            ValueRef::Integer(i) => Stored::Integer(i),
            ValueRef::Real(r) => Stored::Real(r),
            ValueRef::Text(t) => Stored::Text(t),
            ValueRef::Blob(b) => Stored::Blob(b),
        }
    }
}

/// A stored value its column's type cannot hold.
#[derive(Debug, thiserror::Error)]
#[error("{value} does not fit {target}: {why}")]
pub struct Mismatch {
    /// The value, shortened, with its storage class.
    pub value: String,
    pub target: String,
    pub why: &'static str,
}

fn mismatch(value: Stored<'_>, target: SqliteType, why: &'static str) -> Mismatch {
    let shown = match value {
        Stored::Null => "NULL".to_string(),
        Stored::Integer(i) => format!("integer {i}"),
        Stored::Real(r) => format!("real {r}"),
        Stored::Text(t) => {
            let text = String::from_utf8_lossy(t);
            let short: String = text.chars().take(60).collect();
            format!("text '{short}'{}", if short.len() < text.len() { "…" } else { "" })
        }
        Stored::Blob(b) => format!("blob of {} bytes", b.len()),
    };
    Mismatch { value: shown, target: target.target_type(), why }
}

/// `value` in PostgreSQL's text form for a `target` column; `None` for NULL.
pub fn encode(target: SqliteType, value: Stored<'_>) -> Result<Option<String>, Mismatch> {
    let text = |bytes: &[u8]| -> Result<String, Mismatch> {
        let text = std::str::from_utf8(bytes).map_err(|_| mismatch(value, target, "not valid UTF-8"))?;
        if text.contains('\0') {
            return Err(mismatch(value, target, "PostgreSQL text cannot hold a NUL character"));
        }
        Ok(text.to_string())
    };
    Ok(Some(match (target, value) {
        (_, Stored::Null) => return Ok(None),
        (SqliteType::BigInt, Stored::Integer(i)) => i.to_string(),
        (SqliteType::BigInt, Stored::Real(r)) if r.fract() == 0.0 && r.abs() < 9.2e18 => (r as i64).to_string(),
        (SqliteType::BigInt, Stored::Text(t)) => match text(t)?.trim().parse::<i64>() {
            Ok(i) => i.to_string(),
            Err(_) => return Err(mismatch(value, target, "not an integer")),
        },
        (SqliteType::BigInt, _) => return Err(mismatch(value, target, "not an integer")),
        (SqliteType::Double, Stored::Integer(i)) => i.to_string(),
        (SqliteType::Double, Stored::Real(r)) => float(r),
        (SqliteType::Double, Stored::Text(t)) => match text(t)?.trim().parse::<f64>() {
            Ok(r) => float(r),
            Err(_) => return Err(mismatch(value, target, "not a number")),
        },
        (SqliteType::Double, _) => return Err(mismatch(value, target, "not a number")),
        (SqliteType::Boolean, Stored::Integer(0)) => "f".into(),
        (SqliteType::Boolean, Stored::Integer(1)) => "t".into(),
        (SqliteType::Boolean, Stored::Text(t)) => match text(t)?.trim().to_ascii_lowercase().as_str() {
            "0" | "f" | "false" | "no" | "off" => "f".into(),
            "1" | "t" | "true" | "yes" | "on" => "t".into(),
            _ => return Err(mismatch(value, target, "not a truth value")),
        },
        (SqliteType::Boolean, _) => return Err(mismatch(value, target, "only 0 and 1 are truth values")),
        (SqliteType::Varchar(n), Stored::Text(t)) => {
            let t = text(t)?;
            if t.chars().count() > n as usize {
                return Err(mismatch(value, target, "longer than the declared length"));
            }
            t
        }
        (SqliteType::Varchar(_) | SqliteType::Text, Stored::Integer(i)) => i.to_string(),
        (SqliteType::Varchar(_) | SqliteType::Text, Stored::Real(r)) => float(r),
        (SqliteType::Text, Stored::Text(t)) => text(t)?,
        (SqliteType::Varchar(_) | SqliteType::Text, Stored::Blob(_)) => {
            return Err(mismatch(value, target, "a blob in a text column"))
        }
        (SqliteType::Bytea, Stored::Blob(b) | Stored::Text(b)) => {
            let mut hex = String::with_capacity(2 + 2 * b.len());
            hex.push_str("\\x");
            for byte in b {
                let _ = write!(hex, "{byte:02x}");
            }
            hex
        }
        (SqliteType::Bytea, _) => return Err(mismatch(value, target, "a number in a blob column")),
        (SqliteType::Numeric(limits), Stored::Integer(i)) => decimal(&i.to_string(), limits, value, target)?,
        (SqliteType::Numeric(limits), Stored::Real(r)) if r.is_finite() => decimal(&float(r), limits, value, target)?,
        (SqliteType::Numeric(limits), Stored::Text(t)) => decimal(text(t)?.trim(), limits, value, target)?,
        (SqliteType::Numeric(_), _) => return Err(mismatch(value, target, "not a decimal number")),
        (SqliteType::Date, _) => {
            let (days, _) = date_time(value).ok_or_else(|| mismatch(value, target, "not a date"))?;
            let (y, m, d) = crate::position::civil_from_days(days);
            format!("{y:04}-{m:02}-{d:02}")
        }
        (SqliteType::Timestamp, _) => {
            let (days, micros) = date_time(value).ok_or_else(|| mismatch(value, target, "not a date and time"))?;
            let (y, m, d) = crate::position::civil_from_days(days);
            let (s, us) = (micros / 1_000_000, micros % 1_000_000);
            format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{us:06}", s / 3600, s / 60 % 60, s % 60)
        }
        (SqliteType::Jsonb, Stored::Text(t)) => {
            let t = text(t)?;
            serde_json::from_str::<serde_json::Value>(&t).map_err(|_| mismatch(value, target, "not JSON"))?;
            t
        }
        (SqliteType::Jsonb, Stored::Integer(i)) => i.to_string(),
        (SqliteType::Jsonb, Stored::Real(r)) if r.is_finite() => float(r),
        (SqliteType::Jsonb, _) => return Err(mismatch(value, target, "not JSON")),
    }))
}

/// A float as PostgreSQL reads it back exactly (shortest round-trip form).
fn float(r: f64) -> String {
    match r {
        r if r.is_nan() => "NaN".into(),
        r if r == f64::INFINITY => "Infinity".into(),
        r if r == f64::NEG_INFINITY => "-Infinity".into(),
        r => format!("{r:?}"),
    }
}

/// Checks a decimal literal against `numeric(p,s)`: digits left of the point ≤ p − s.
fn decimal(
    literal: &str,
    limits: Option<(u32, u32)>,
    value: Stored<'_>,
    target: SqliteType,
) -> Result<String, Mismatch> {
    let unsigned = literal.strip_prefix(['-', '+']).unwrap_or(literal);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| mismatch(value, target, "not a decimal number"))?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits_ok(whole) || !digits_ok(fraction) {
        return Err(mismatch(value, target, "not a decimal number"));
    }
    if let Some((p, s)) = limits {
        let significant = whole.trim_start_matches('0').len() as i64 + i64::from(exponent);
        if significant > i64::from(p) - i64::from(s) {
            return Err(mismatch(value, target, "too many digits before the decimal point"));
        }
    }
    Ok(literal.to_string())
}

/// A date or date-time as (days since 1970-01-01, microseconds into the day), UTC:
/// ISO 8601 text (`2026-11-25`, `2026-11-25 14:03:00.123`, `…T…Z`, `…+01:00`) or
/// unix time in seconds (integer or real), as SQLite's date functions read them.
fn date_time(value: Stored<'_>) -> Option<(i64, i64)> {
    let micros = match value {
        Stored::Integer(seconds) => i128::from(seconds) * 1_000_000,
        Stored::Real(seconds) if seconds.is_finite() && seconds.abs() < 1e13 => (seconds * 1e6).round() as i128,
        Stored::Text(text) => {
            let text = std::str::from_utf8(text).ok()?.trim();
            let (date, time) = match text.find(['T', ' ']) {
                Some(i) => (&text[..i], Some(text[i + 1..].trim())),
                None => (text, None),
            };
            let mut parts = date.splitn(3, '-');
            let (y, m, d): (i64, u32, u32) =
                (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
            if date.len() != 10 || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
                return None;
            }
            let days = crate::position::days_from_civil(y, m, d);
            let day_micros = match time {
                None => 0,
                Some(time) => {
                    let (clock, offset_seconds) = split_offset(time)?;
                    let mut fields = clock.split(':');
                    let h: i64 = fields.next()?.parse().ok()?;
                    let mi: i64 = fields.next()?.parse().ok()?;
                    let (s, us) = match fields.next() {
                        None => (0, 0),
                        Some(seconds) => {
                            let (s, f) = seconds.split_once('.').unwrap_or((seconds, ""));
                            let f: String = f.chars().chain(std::iter::repeat('0')).take(6).collect();
                            (s.parse::<i64>().ok()?, f.parse::<i64>().ok()?)
                        }
                    };
                    if fields.next().is_some() || h > 23 || mi > 59 || s > 59 {
                        return None;
                    }
                    ((h * 60 + mi) * 60 + s - offset_seconds) * 1_000_000 + us
                }
            };
            i128::from(days) * 86_400_000_000 + i128::from(day_micros)
        }
        _ => return None,
    };
    let days = i64::try_from(micros.div_euclid(86_400_000_000)).ok()?;
    Some((days, i64::try_from(micros.rem_euclid(86_400_000_000)).ok()?))
}

/// `14:03:00+01:00` → (`14:03:00`, 3600); `…Z` → offset 0.
fn split_offset(time: &str) -> Option<(&str, i64)> {
    if let Some(clock) = time.strip_suffix('Z') {
        return Some((clock, 0));
    }
    match time.rfind(['+', '-']) {
        Some(i) => {
            let sign = if time.as_bytes()[i] == b'-' { -1 } else { 1 };
            let (h, m) = time[i + 1..].split_once(':').unwrap_or((&time[i + 1..], "0"));
            Some((&time[..i], sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)))
        }
        None => Some((time, 0)),
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn target_types_map_back() {
        use super::SqliteType;
        for t in [
            SqliteType::BigInt,
            SqliteType::Varchar(40),
            SqliteType::Numeric(Some((12, 2))),
            SqliteType::Numeric(None),
            SqliteType::Timestamp,
            SqliteType::Bytea,
        ] {
            assert_eq!(SqliteType::from_target_type(&t.target_type()), Some(t));
        }
    }

    use super::*;

    #[test]
    fn declared_types_map_by_affinity() {
        for (declared, target) in [
            ("INTEGER", "bigint"),
            ("tinyint", "bigint"),
            ("REAL", "double precision"),
            ("FLOAT", "double precision"),
            ("DOUBLE PRECISION", "double precision"),
            ("BOOLEAN", "boolean"),
            ("VARCHAR(40)", "varchar(40)"),
            ("NVARCHAR(10)", "varchar(10)"),
            ("TEXT", "text"),
            ("", "text"),
            ("BLOB", "bytea"),
            ("DECIMAL(10,2)", "numeric(10,2)"),
            ("NUMERIC", "numeric"),
            ("DATE", "date"),
            ("DATETIME", "timestamp"),
            ("TIMESTAMP", "timestamp"),
            ("JSON", "jsonb"),
        ] {
            assert_eq!(map_declared(declared).target_type(), target, "{declared}");
        }
    }

    #[test]
    fn values_encode_or_name_the_mismatch() {
        let ok = |t: &str, v: Stored<'_>| encode(map_declared(t), v).expect("fits").unwrap_or_default();
        assert_eq!(ok("INTEGER", Stored::Integer(-7)), "-7");
        assert_eq!(ok("REAL", Stored::Real(0.1)), "0.1");
        assert_eq!(ok("REAL", Stored::Real(1e300)), "1e300");
        assert_eq!(ok("BOOLEAN", Stored::Integer(1)), "t");
        assert_eq!(ok("BLOB", Stored::Blob(&[0xde, 0xad])), "\\xdead");
        assert_eq!(ok("DECIMAL(6,2)", Stored::Text(b"1234.5")), "1234.5");
        assert_eq!(ok("DATE", Stored::Text(b"2026-11-25")), "2026-11-25");
        assert_eq!(ok("DATETIME", Stored::Text(b"2026-11-25 14:03")), "2026-11-25 14:03:00.000000");
        assert_eq!(ok("DATETIME", Stored::Text(b"2026-11-25T14:03:00.5+01:00")), "2026-11-25 13:03:00.500000");
        assert_eq!(ok("TIMESTAMP", Stored::Integer(1_795_615_380)), "2026-11-25 14:03:00.000000");
        assert_eq!(ok("DATE", Stored::Real(-86_400.0)), "1969-12-31");
        assert_eq!(ok("JSON", Stored::Text(br#"{"a": [1]}"#)), r#"{"a": [1]}"#);
        assert_eq!(encode(SqliteType::Text, Stored::Null).ok(), Some(None));
        let bad = |t: &str, v: Stored<'_>| encode(map_declared(t), v).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(bad("INTEGER", Stored::Text(b"abc")).contains("text 'abc' does not fit bigint"));
        assert!(bad("INTEGER", Stored::Real(1.5)).contains("not an integer"));
        assert!(bad("VARCHAR(3)", Stored::Text(b"abcd")).contains("longer"));
        assert!(bad("DECIMAL(4,2)", Stored::Integer(123)).contains("too many digits"));
        assert!(bad("DATE", Stored::Text(b"2026-02-30")).contains("not a date"));
        assert!(bad("BOOLEAN", Stored::Integer(5)).contains("truth"));
        assert!(bad("TEXT", Stored::Text(b"a\0b")).contains("NUL"));
        assert!(bad("TEXT", Stored::Text(&[0xff, 0xfe])).contains("UTF-8"));
        assert!(bad("JSON", Stored::Text(b"{oops")).contains("not JSON"));
    }
}
