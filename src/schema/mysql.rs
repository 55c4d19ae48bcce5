//! MySQL / MariaDB → PostgreSQL: the type mapping and the value encoding, one
//! rule for the snapshot and the stream.
//!
//! Values arrive in MySQL's text form (the text protocol) and leave in
//! PostgreSQL's text form, ready for text `COPY` or a cast on the server.

use std::fmt::Write as _;

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

/// The value rewrite a column needs between MySQL's and PostgreSQL's text forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The text is the same in both.
    Same,
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
    /// `set('a','b')`: `a,b` → `{"a","b"}`.
    Set,
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
    let inner = column_type
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_default();
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
            with("boolean".into(), Encoding::Same, Some("values other than 0 and 1 do not fit boolean"))
        }
        "tinyint" | "smallint" if !(column.data_type == "smallint" && unsigned) => same("smallint"),
        "smallint" | "mediumint" => same("integer"),
        "int" | "integer" if !unsigned => same("integer"),
        "int" | "integer" => same("bigint"),
        "bigint" if !unsigned => same("bigint"),
        "bigint" => same("numeric(20,0)"),
        "decimal" | "numeric" => same(&format!(
            "numeric({},{})",
            column.numeric_precision.unwrap_or(10),
            column.numeric_scale.unwrap_or(0)
        )),
        "float" => same("real"),
        "double" | "real" => same("double precision"),
        "char" | "varchar" => same(&format!("varchar({})", column.character_maximum_length.unwrap_or(1))),
        "longtext" if column.is_json => same("jsonb"),
        "json" => same("jsonb"),
        "tinytext" | "text" | "mediumtext" | "longtext" => same("text"),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            with("bytea".into(), Encoding::Bytes, None)
        }
        "date" => with("date".into(), Encoding::Date, Some("zero dates become NULL")),
        "datetime" => with(format!("timestamp({fraction})"), Encoding::DateTime, Some("zero dates become NULL")),
        "timestamp" => with(format!("timestamptz({fraction})"), Encoding::Timestamp, Some("zero dates become NULL")),
        "time" => same("interval"),
        "year" => same("smallint"),
        "enum" => ColumnMapping {
            target_type: String::new(),
            encoding: Encoding::Same,
            loss: None,
            enum_labels: Some(labels(&column.column_type)),
        },
        "set" => with("text[]".into(), Encoding::Set, None),
        "bit" => {
            let width = column.numeric_precision.unwrap_or(1);
            with(format!("bit varying({width})"), Encoding::Bits { width: u32::try_from(width).unwrap_or(64) }, None)
        }
        "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon"
        | "geometrycollection" => with("bytea".into(), Encoding::Bytes, Some("geometry is copied as SRID + WKB bytes")),
        _ => {
            return Err(UnsupportedType { column: column.name.clone(), column_type: column.column_type.clone() })
        }
    })
}

/// A value in MySQL's text form → PostgreSQL's text form; `None` is NULL.
pub fn encode(encoding: Encoding, value: &[u8]) -> Result<Option<String>, std::str::Utf8Error> {
    let text = || std::str::from_utf8(value);
    let zero_date = |t: &str| t.starts_with("0000-00-00") || t.get(5..10).is_some_and(|md| md.contains("-00") || md.starts_with("00"));
    Ok(match encoding {
        Encoding::Same => Some(text()?.to_string()),
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
            let width = width as usize;
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
        Encoding::Set => {
            let t = text()?;
            let elements: Vec<String> = if t.is_empty() {
                Vec::new()
            } else {
                t.split(',').map(|e| format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\""))).collect()
            };
            Some(format!("{{{}}}", elements.join(",")))
        }
    })
}

/// Appends one value to a PostgreSQL text-`COPY` row (escaped; NULL as `\N`).
pub fn push_copy_field(row: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        row.extend_from_slice(b"\\N");
        return;
    };
    for &byte in value.as_bytes() {
        match byte {
            b'\\' => row.extend_from_slice(b"\\\\"),
            b'\t' => row.extend_from_slice(b"\\t"),
            b'\n' => row.extend_from_slice(b"\\n"),
            b'\r' => row.extend_from_slice(b"\\r"),
            other => row.push(other),
        }
    }
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
        let enc = |e: Encoding, v: &[u8]| encode(e, v).ok().flatten();
        assert_eq!(enc(Encoding::Bytes, &[0, 255]), Some("\\x00ff".into()));
        assert_eq!(enc(Encoding::Bits { width: 12 }, &[0x0a, 0xbc]), Some("101010111100".into()));
        assert_eq!(enc(Encoding::Date, b"0000-00-00"), None);
        assert_eq!(enc(Encoding::Date, b"2024-02-00"), None);
        assert_eq!(enc(Encoding::DateTime, b"2024-02-29 10:00:00.5"), Some("2024-02-29 10:00:00.5".into()));
        assert_eq!(enc(Encoding::Timestamp, b"2024-02-29 10:00:00"), Some("2024-02-29 10:00:00+00".into()));
        assert_eq!(enc(Encoding::Set, b"a,b"), Some("{\"a\",\"b\"}".into()));
        assert_eq!(enc(Encoding::Set, b""), Some("{}".into()));
        let mut row = Vec::new();
        push_copy_field(&mut row, Some("a\tb\\c\n"));
        push_copy_field(&mut row, None);
        assert_eq!(row, b"a\\tb\\\\c\\n\\N");
    }
}
