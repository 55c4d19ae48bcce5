//! MySQL / MariaDB → PostgreSQL: the type mapping and the value encoding, one
//! rule for the snapshot and the stream.
//!
//! Values arrive in MySQL's text form (the text protocol) and leave in
//! PostgreSQL's text form, ready for text `COPY` or a cast on the server.

use std::fmt::Write as _;
use std::sync::Arc;

use mysql_async::binlog::value::BinlogValue;
use mysql_async::Value as MysqlValue;

/// A MySQL column as `information_schema.columns` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MysqlColumn {
    pub name: String,
    /// `DATA_TYPE`: `int`, `varchar`, `enum`, …
    pub data_type: String,
    /// `COLUMN_TYPE`: `int(10) unsigned`, `tinyint(1)`, `enum('a','b')`, …
    pub column_type: String,
    pub numeric_precision: Option<u64>,
    pub numeric_scale: Option<u64>,
    pub datetime_precision: Option<u64>,
    pub character_maximum_length: Option<u64>,
    /// MariaDB's JSON is `longtext` with a `json_valid` check.
    pub is_json: bool,
    /// `CHARACTER_SET_NAME` of a text column.
    pub charset: Option<String>,
}

/// How one MySQL column lands in PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMapping {
    /// The PostgreSQL type (for enums: the enum type's qualified name, filled in by the caller).
    pub target_type: String,
    /// How values are rewritten on the way.
    pub encoding: Encoding,
    /// What the cast can lose, for the plan; `None` when nothing.
    pub loss: Option<&'static str>,
    /// The labels of an `enum(…)`: the caller creates a PostgreSQL enum type.
    pub enum_labels: Option<Vec<String>>,
}

/// The value rewrite a column needs between MySQL's forms (text protocol,
/// binlog) and PostgreSQL's text form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The text is the same in both.
    Same,
    /// `tinyint(1)` → boolean: only 0 and 1 fit.
    Boolean,
    /// Text stored as latin1: the text protocol converts it, the binlog carries the stored bytes.
    Latin1,
    /// An unsigned integer of this many bits: the binlog may carry it as signed.
    Unsigned { bits: u32 },
    /// `TIME`: the binlog carries its parts.
    Time,
    /// `enum(…)`: the binlog carries the 1-based index.
    Enum { labels: Arc<[String]> },
    /// Bytes → `\x…` hex.
    Bytes,
    /// `bit(n)`: big-endian bytes → a string of 0s and 1s.
    Bits { width: u32 },
    /// `0000-00-00` and other zero dates → NULL.
    Date,
    /// Zero datetimes → NULL.
    DateTime,
    /// UTC (the session runs at `+00:00`), zero → NULL, suffixed `+00`.
    Timestamp,
    /// `set('a','b')`: `a,b` (text protocol) or a bit mask (binlog) → `{"a","b"}`.
    Set { labels: Arc<[String]> },
}

/// A MySQL type cutover does not map.
#[derive(Debug, thiserror::Error)]
#[error("column {column} has type {column_type}, which cutover cannot map to PostgreSQL")]
pub struct UnsupportedType {
    pub column: String,
    pub column_type: String,
}

fn labels(column_type: &str) -> Vec<String> {
    // `enum('a','it''s')`: quoted, comma-separated, quotes doubled.
    let inner = column_type.split_once('(').and_then(|(_, rest)| rest.strip_suffix(')')).unwrap_or_default();
    let mut labels = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    label.push('\'');
                } else {
                    break;
                }
            } else if c == '\\' {
                if let Some(escaped) = chars.next() {
                    label.push(escaped);
                }
            } else {
                label.push(c);
            }
        }
        labels.push(label);
    }
    labels
}

/// The default type mapping.
pub fn map_column(column: &MysqlColumn) -> Result<ColumnMapping, UnsupportedType> {
    let unsigned = column.column_type.contains("unsigned");
    let text = || if column.charset.as_deref() == Some("latin1") { Encoding::Latin1 } else { Encoding::Same };
    let unsigned_as = |target: &str, bits: u32| ColumnMapping {
        target_type: target.to_string(),
        encoding: Encoding::Unsigned { bits },
        loss: None,
        enum_labels: None,
    };
    let same = |target: &str| ColumnMapping {
        target_type: target.to_string(),
        encoding: Encoding::Same,
        loss: None,
        enum_labels: None,
    };
    let with = |target: String, encoding: Encoding, loss: Option<&'static str>| ColumnMapping {
        target_type: target,
        encoding,
        loss,
        enum_labels: None,
    };
    let fraction = column.datetime_precision.unwrap_or(0).min(6);
    Ok(match column.data_type.as_str() {
        "tinyint" if column.column_type.starts_with("tinyint(1)") => {
            with("boolean".into(), Encoding::Boolean, Some("values other than 0 and 1 do not fit boolean"))
        }
        "tinyint" if unsigned => unsigned_as("smallint", 8),
        "tinyint" => same("smallint"),
        "smallint" if unsigned => unsigned_as("integer", 16),
        "smallint" => same("smallint"),
        "mediumint" if unsigned => unsigned_as("integer", 24),
        "mediumint" => same("integer"),
        "int" | "integer" if unsigned => unsigned_as("bigint", 32),
        "int" | "integer" => same("integer"),
        "bigint" if unsigned => unsigned_as("numeric(20,0)", 64),
        "bigint" => same("bigint"),
        "decimal" | "numeric" => {
            same(&format!("numeric({},{})", column.numeric_precision.unwrap_or(10), column.numeric_scale.unwrap_or(0)))
        }
        "float" => same("real"),
        "double" | "real" => same("double precision"),
        "char" | "varchar" => with(format!("varchar({})", column.character_maximum_length.unwrap_or(1)), text(), None),
        "longtext" if column.is_json => same("jsonb"),
        "json" => same("jsonb"),
        "tinytext" | "text" | "mediumtext" | "longtext" => with("text".into(), text(), None),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            with("bytea".into(), Encoding::Bytes, None)
        }
        "date" => with("date".into(), Encoding::Date, Some("zero dates become NULL")),
        "datetime" => with(format!("timestamp({fraction})"), Encoding::DateTime, Some("zero dates become NULL")),
        "timestamp" => with(format!("timestamptz({fraction})"), Encoding::Timestamp, Some("zero dates become NULL")),
        "time" => with("interval".into(), Encoding::Time, None),
        "year" => same("smallint"),
        "enum" => {
            let labels = labels(&column.column_type);
            ColumnMapping {
                target_type: String::new(),
                encoding: Encoding::Enum { labels: labels.clone().into() },
                loss: None,
                enum_labels: Some(labels),
            }
        }
        "set" => with("text[]".into(), Encoding::Set { labels: labels(&column.column_type).into() }, None),
        "bit" => {
            let width = column.numeric_precision.unwrap_or(1);
            with(format!("bit varying({width})"), Encoding::Bits { width: u32::try_from(width).unwrap_or(64) }, None)
        }
        "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon"
        | "geometrycollection" => with("bytea".into(), Encoding::Bytes, Some("geometry is copied as SRID + WKB bytes")),
        _ => return Err(UnsupportedType { column: column.name.clone(), column_type: column.column_type.clone() }),
    })
}

/// A source value that cannot become a value of its target column.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

fn is_zero_date(t: &str) -> bool {
    t.starts_with("0000-00-00") || t.get(5..10).is_some_and(|md| md.contains("-00") || md.starts_with("00"))
}

/// A value in MySQL's text form (text protocol) → PostgreSQL's text form; `None` is NULL.
pub fn encode(encoding: &Encoding, value: &[u8]) -> Result<Option<String>, ValueError> {
    let text = || std::str::from_utf8(value).map_err(|_| ValueError("a text value is not valid UTF-8".into()));
    let zero_date = is_zero_date;
    Ok(match encoding {
        Encoding::Same | Encoding::Latin1 | Encoding::Unsigned { .. } | Encoding::Time | Encoding::Enum { .. } => {
            Some(text()?.to_string())
        }
        Encoding::Boolean => Some(boolean(text()?)?),
        Encoding::Bytes => {
            let mut hex = String::with_capacity(2 + value.len() * 2);
            hex.push_str("\\x");
            for byte in value {
                let _ = write!(hex, "{byte:02x}");
            }
            Some(hex)
        }
        Encoding::Bits { width } => {
            let bits: String = value.iter().map(|b| format!("{b:08b}")).collect();
            let width = *width as usize;
            Some(if bits.len() > width { bits[bits.len() - width..].to_string() } else { format!("{bits:0>width$}") })
        }
        Encoding::Date | Encoding::DateTime => {
            let t = text()?;
            (!zero_date(t)).then(|| t.to_string())
        }
        Encoding::Timestamp => {
            let t = text()?;
            (!zero_date(t)).then(|| format!("{t}+00"))
        }
        Encoding::Set { .. } => {
            let t = text()?;
            let elements: Vec<&str> = if t.is_empty() { Vec::new() } else { t.split(',').collect() };
            Some(array_literal(&elements))
        }
    })
}

/// `tinyint(1)` as boolean: 0 and 1 only.
fn boolean(text: &str) -> Result<String, ValueError> {
    match text {
        "0" | "1" => Ok(text.to_string()),
        other => Err(ValueError(format!(
            "value {other} of a tinyint(1) column does not fit boolean (only 0 and 1 do): fix the value on the source, \
             or make the column tinyint(4) so that it maps to smallint"
        ))),
    }
}

/// `{"a","b"}`: a PostgreSQL text-array literal.
fn array_literal(elements: &[&str]) -> String {
    let quoted: Vec<String> =
        elements.iter().map(|e| format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

/// A value as the binlog carries it (decoded by `mysql_common`) → PostgreSQL's text form.
pub fn encode_binlog(encoding: &Encoding, value: BinlogValue<'_>) -> Result<Option<String>, ValueError> {
    let value = match value {
        BinlogValue::Value(value) => value,
        BinlogValue::Jsonb(jsonb) => {
            let json = serde_json::Value::try_from(jsonb)
                .map_err(|e| ValueError(format!("a JSON value cannot be read: {e}")))?;
            return Ok(Some(json.to_string()));
        }
        BinlogValue::JsonDiff(_) => {
            return Err(ValueError(
                "a partial JSON update cannot be applied: set binlog_row_value_options = '' on the source".into(),
            ))
        }
    };
    let utf8 = |bytes: &[u8]| encode(encoding, bytes);
    Ok(match (encoding, value) {
        (_, MysqlValue::NULL) => None,
        (Encoding::Unsigned { bits }, MysqlValue::Int(i)) => {
            let mask = if *bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
            Some(((i as u64) & mask).to_string())
        }
        (Encoding::Enum { labels }, MysqlValue::Int(i)) => {
            let label = usize::try_from(i).ok().and_then(|i| i.checked_sub(1)).and_then(|i| labels.get(i));
            Some(
                label
                    .cloned()
                    .ok_or_else(|| ValueError(format!("enum index {i} is not one of the column's labels")))?,
            )
        }
        (Encoding::Boolean, MysqlValue::Int(i)) => Some(boolean(&i.to_string())?),
        (_, MysqlValue::Int(i)) => Some(i.to_string()),
        (_, MysqlValue::UInt(u)) => Some(u.to_string()),
        (_, MysqlValue::Float(f)) => Some(f.to_string()),
        (_, MysqlValue::Double(d)) => Some(d.to_string()),
        (Encoding::Set { labels }, MysqlValue::Bytes(mask)) => {
            let members: Vec<&str> = labels
                .iter()
                .enumerate()
                .filter(|(i, _)| mask.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0))
                .map(|(_, label)| label.as_str())
                .collect();
            Some(array_literal(&members))
        }
        // ISO 8859-1: every byte is the code point of the same number.
        (Encoding::Latin1, MysqlValue::Bytes(bytes)) => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        (Encoding::Timestamp, MysqlValue::Bytes(bytes)) => {
            let text = std::str::from_utf8(&bytes).map_err(|_| ValueError("bad TIMESTAMP".into()))?;
            let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
            let seconds: i64 = seconds.parse().map_err(|_| ValueError(format!("bad TIMESTAMP {text}")))?;
            if seconds == 0 && fraction.trim_matches('0').is_empty() {
                None
            } else {
                let (y, m, d) = crate::position::civil_from_days(seconds.div_euclid(86_400));
                let second_of_day = seconds.rem_euclid(86_400);
                let fraction = if fraction.is_empty() { String::new() } else { format!(".{fraction}") };
                Some(format!(
                    "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}{fraction}+00",
                    second_of_day / 3600,
                    second_of_day / 60 % 60,
                    second_of_day % 60
                ))
            }
        }
        (Encoding::Date, MysqlValue::Date(y, m, d, ..)) => {
            (y != 0 && m != 0 && d != 0).then(|| format!("{y:04}-{m:02}-{d:02}"))
        }
        (_, MysqlValue::Date(y, m, d, h, mi, s, us)) => {
            (y != 0 && m != 0 && d != 0).then(|| format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"))
        }
        (_, MysqlValue::Time(negative, days, h, m, s, us)) => {
            let hours = u64::from(days) * 24 + u64::from(h);
            Some(format!("{}{hours}:{m:02}:{s:02}.{us:06}", if negative { "-" } else { "" }))
        }
        (_, MysqlValue::Bytes(bytes)) => utf8(&bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(data_type: &str, column_type: &str) -> MysqlColumn {
        MysqlColumn {
            name: "c".into(),
            data_type: data_type.into(),
            column_type: column_type.into(),
            numeric_precision: Some(12),
            numeric_scale: Some(4),
            datetime_precision: Some(6),
            character_maximum_length: Some(40),
            is_json: false,
            charset: None,
        }
    }

    #[test]
    fn maps_the_documented_types() {
        let target = |d: &str, t: &str| map_column(&column(d, t)).map(|m| m.target_type).unwrap_or_default();
        assert_eq!(target("tinyint", "tinyint(1)"), "boolean");
        assert_eq!(target("tinyint", "tinyint(3) unsigned"), "smallint");
        assert_eq!(target("smallint", "smallint(5) unsigned"), "integer");
        assert_eq!(target("mediumint", "mediumint(8) unsigned"), "integer");
        assert_eq!(target("int", "int(10) unsigned"), "bigint");
        assert_eq!(target("bigint", "bigint(20) unsigned"), "numeric(20,0)");
        assert_eq!(target("decimal", "decimal(12,4)"), "numeric(12,4)");
        assert_eq!(target("varchar", "varchar(40)"), "varchar(40)");
        assert_eq!(target("datetime", "datetime(6)"), "timestamp(6)");
        assert_eq!(target("timestamp", "timestamp(6)"), "timestamptz(6)");
        assert_eq!(target("time", "time"), "interval");
        assert_eq!(target("set", "set('a','b')"), "text[]");
        assert_eq!(target("bit", "bit(12)"), "bit varying(12)");
        assert!(map_column(&column("vector", "vector(3)")).is_err());
        let labels = map_column(&column("enum", "enum('sad','it''s ok')")).ok().and_then(|m| m.enum_labels);
        assert_eq!(labels, Some(vec!["sad".to_string(), "it's ok".to_string()]));
    }

    #[test]
    fn encodes_values() {
        let enc = |e: Encoding, v: &[u8]| encode(&e, v).ok().flatten();
        assert_eq!(enc(Encoding::Bytes, &[0, 255]), Some("\\x00ff".into()));
        assert_eq!(enc(Encoding::Boolean, b"1"), Some("1".into()));
        assert!(encode(&Encoding::Boolean, b"5").is_err());
        assert_eq!(enc(Encoding::Bits { width: 12 }, &[0x0a, 0xbc]), Some("101010111100".into()));
        assert_eq!(enc(Encoding::Date, b"0000-00-00"), None);
        assert_eq!(enc(Encoding::Date, b"2024-02-00"), None);
        assert_eq!(enc(Encoding::DateTime, b"2024-02-29 10:00:00.5"), Some("2024-02-29 10:00:00.5".into()));
        assert_eq!(enc(Encoding::Timestamp, b"2024-02-29 10:00:00"), Some("2024-02-29 10:00:00+00".into()));
        let set = || Encoding::Set { labels: vec!["a".to_string(), "b".to_string()].into() };
        assert_eq!(enc(set(), b"a,b"), Some("{\"a\",\"b\"}".into()));
        assert_eq!(enc(set(), b""), Some("{}".into()));
        let bin = |e: Encoding, v: MysqlValue| encode_binlog(&e, BinlogValue::Value(v)).ok().flatten();
        assert_eq!(bin(Encoding::Unsigned { bits: 32 }, MysqlValue::Int(-1)), Some("4294967295".into()));
        assert_eq!(bin(Encoding::Unsigned { bits: 64 }, MysqlValue::Int(-1)), Some("18446744073709551615".into()));
        assert_eq!(bin(set(), MysqlValue::Bytes(vec![0b10])), Some("{\"b\"}".into()));
        assert_eq!(bin(Encoding::Latin1, MysqlValue::Bytes(vec![b'Z', 0xfc])), Some("Zü".into()));
        assert_eq!(
            bin(Encoding::Timestamp, MysqlValue::Bytes(b"1709251199.654321".to_vec())),
            Some("2024-02-29 23:59:59.654321+00".into())
        );
        assert_eq!(bin(Encoding::Timestamp, MysqlValue::Bytes(b"0".to_vec())), None);
        assert_eq!(bin(Encoding::Time, MysqlValue::Time(true, 34, 22, 59, 59, 0)), Some("-838:59:59.000000".into()));
        assert_eq!(bin(Encoding::Date, MysqlValue::Date(0, 0, 0, 0, 0, 0, 0)), None);
        assert_eq!(
            bin(Encoding::DateTime, MysqlValue::Date(1999, 12, 31, 23, 59, 59, 5)),
            Some("1999-12-31 23:59:59.000005".into())
        );
    }
}
