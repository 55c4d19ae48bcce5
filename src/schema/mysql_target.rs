//! Into MySQL / MariaDB: column types from the (PostgreSQL-dialect) definitions,
//! and values from PostgreSQL's text form, one rule for the bulk load and the
//! streamed changes.
//!
//! Every source hands values over in PostgreSQL's text form. Most of it is what
//! MySQL reads too (numbers, text, dates, `timestamp`); what differs is rewritten
//! by [`Conversion`]: booleans, `bytea` hex, `timestamptz` offsets, arrays (JSON,
//! or a `SET`'s comma list), bit strings.

use std::fmt::Write as _;

/// A MySQL column type for a PostgreSQL type name, and what the plan should say
/// about it (`None` when nothing is lost).
pub fn map_type(pg_type: &str, enum_labels: Option<&[String]>) -> (String, Option<&'static str>) {
    let t = pg_type.trim();
    if t.ends_with("[]") {
        return ("json".into(), None);
    }
    if let Some(labels) = enum_labels {
        let quoted: Vec<String> = labels.iter().map(|l| quote_string(l)).collect();
        return (format!("enum({})", quoted.join(",")), None);
    }
    let (base, args) = split_modifier(t);
    let numbers: Vec<u32> = args.split(',').filter_map(|a| a.trim().parse().ok()).collect();
    let precision = |default: u32| numbers.first().copied().unwrap_or(default).min(6);
    match base.as_str() {
        "smallint" | "int2" => ("smallint".into(), None),
        "integer" | "int" | "int4" => ("int".into(), None),
        "bigint" | "int8" => ("bigint".into(), None),
        "numeric" | "decimal" => match numbers.as_slice() {
            [p, s] if *p <= 65 && *s <= 30 => (format!("decimal({p},{s})"), None),
            [p] if *p <= 65 => (format!("decimal({p},0)"), None),
            [] => ("decimal(65,30)".into(), Some("unconstrained numeric: decimal(65,30) rounds past 30 decimals and overflows past 35 integer digits")),
            _ => ("decimal(65,30)".into(), Some("precision beyond decimal(65,30)")),
        },
        "real" | "float4" => ("float".into(), None),
        "double precision" | "float8" => ("double".into(), Some("NaN and ±Infinity cannot be stored")),
        "boolean" | "bool" => ("tinyint(1)".into(), None),
        "character varying" | "varchar" => match numbers.first() {
            Some(n) if *n <= 16_383 => (format!("varchar({n})"), None),
            _ => ("longtext".into(), None),
        },
        "character" | "char" | "bpchar" => match numbers.first() {
            Some(n) if *n <= 255 => (format!("char({n})"), None),
            _ => ("longtext".into(), None),
        },
        "text" | "citext" | "name" => ("longtext".into(), None),
        "bytea" => ("longblob".into(), None),
        "date" => ("date".into(), Some("dates before 1000-01-01 are outside MySQL's documented range")),
        "timestamp" | "timestamp without time zone" => (format!("datetime({})", precision(6)), None),
        "timestamp with time zone" | "timestamptz" => (format!("datetime({})", precision(6)), Some("stored in UTC without the zone")),
        "time" | "time without time zone" => (format!("time({})", precision(6)), None),
        "interval" => ("time(6)".into(), Some("only intervals within ±838:59:59 without months or days fit")),
        "uuid" => ("char(36)".into(), None),
        "json" | "jsonb" => ("json".into(), None),
        "bit" | "bit varying" | "varbit" => match numbers.first() {
            Some(n) if *n <= 64 => (format!("bit({n})"), None),
            _ => ("longtext".into(), Some("bit strings longer than 64 bits are stored as text")),
        },
        _ => ("longtext".into(), Some("no MySQL counterpart: stored as its PostgreSQL text")),
    }
}

/// A type name without its modifier, and the modifier: `numeric(12,2)` → (`numeric`,
/// `12,2`); `timestamp(3) with time zone` (modifier in the middle) → (`timestamp with time zone`, `3`).
fn split_modifier(pg_type: &str) -> (String, &str) {
    let t = pg_type.trim();
    match (t.find('('), t.find(')')) {
        (Some(open), Some(close)) if open < close => {
            (format!("{} {}", t[..open].trim(), t[close + 1..].trim()).trim().to_string(), &t[open + 1..close])
        }
        _ => (t.to_string(), ""),
    }
}

/// A PostgreSQL generation expression in MySQL's syntax, when it is `+ - * %` over the
/// table's `columns` and numbers with functions both dialects read the same; `None`
/// otherwise (`/`, which divides integers differently, casts other than to `numeric`,
/// string literals, `||`, keywords, other functions).
pub fn mysql_expression(pg: &str, columns: &[&str]) -> Option<String> {
    const SAME_IN_BOTH: [&str; 6] = ["abs", "coalesce", "greatest", "least", "lower", "upper"];
    let bytes = pg.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        // Casts MySQL makes itself: an integer operand to numeric (it mixes them so), an
        // integer to bigint (its integer arithmetic is 64-bit).
        if let Some(cast) = widening_cast(&pg[i..]) {
            i += cast;
            continue;
        }
        let b = bytes[i];
        match b {
            b'"' => {
                let end = i + 1 + pg[i + 1..].find('"')?;
                let name = &pg[i + 1..end];
                if !columns.contains(&name) {
                    return None;
                }
                out.push_str(&quote_ident(name));
                i = end + 1;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let end = pg[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(pg.len(), |n| i + n);
                let word = &pg[i..end];
                if pg[end..].trim_start().starts_with('(') {
                    if !SAME_IN_BOTH.contains(&word.to_ascii_lowercase().as_str()) {
                        return None;
                    }
                    out.push_str(word);
                } else if columns.contains(&word) {
                    out.push_str(&quote_ident(word));
                } else {
                    return None;
                }
                i = end;
            }
            b'0'..=b'9' | b'.' | b'(' | b')' | b'+' | b'*' | b'%' | b',' | b' ' => {
                out.push(b as char);
                i += 1;
            }
            // A minus, but not `--` (a comment).
            b'-' if bytes.get(i + 1) != Some(&b'-') => {
                out.push('-');
                i += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The length of the `::numeric` or `::bigint` cast `text` starts with.
fn widening_cast(text: &str) -> Option<usize> {
    ["::numeric", "::bigint"].into_iter().find_map(|cast| {
        let rest = text.strip_prefix(cast)?;
        (!rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '(')).then_some(cast.len())
    })
}

/// `'text'` for MySQL (standard quotes doubled, backslashes doubled).
pub fn quote_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// `` `ident` `` with embedded backticks doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// How one column's PostgreSQL text becomes what MySQL stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// The text is what MySQL reads.
    Same,
    /// `t` / `f` → 1 / 0.
    Boolean,
    /// `\x0a0b` → the bytes.
    Bytes,
    /// `2024-01-01 10:00:00+00` → `2024-01-01 10:00:00` (the session is UTC).
    UtcTimestamp,
    /// `{1,NULL,"a b"}` → `[1,null,"a b"]`; `numeric` elements stay numbers.
    ArrayToJson { numeric: bool },
    /// `{a,c}` → `a,c`, for a `SET` column.
    ArrayToSet,
    /// `101` → the number 5, for a `BIT(n)` column.
    Bits,
}

impl Conversion {
    /// The rewrite from a source column of PostgreSQL type `pg_type` into a target
    /// column whose `information_schema` `DATA_TYPE` is `mysql_type`.
    pub fn between(pg_type: &str, mysql_type: &str) -> Conversion {
        let pg = pg_type.trim();
        let my = mysql_type.trim().to_ascii_lowercase();
        if pg.ends_with("[]") {
            return match my.as_str() {
                "set" => Conversion::ArrayToSet,
                "json" | "longtext" => {
                    let element = pg.trim_end_matches("[]");
                    Conversion::ArrayToJson {
                        numeric: ["smallint", "integer", "bigint", "real", "double precision"].contains(&element)
                            || element.starts_with("numeric"),
                    }
                }
                _ => Conversion::Same,
            };
        }
        match (split_modifier(pg).0.as_str(), my.as_str()) {
            // The spellings `map_type` takes: a MySQL source names its TIMESTAMP `timestamptz(n)`.
            ("boolean" | "bool", _) => Conversion::Boolean,
            ("bytea", _) => Conversion::Bytes,
            ("timestamp with time zone" | "timestamptz", _) => Conversion::UtcTimestamp,
            ("bit varying" | "varbit" | "bit", "bit") => Conversion::Bits,
            _ => Conversion::Same,
        }
    }

    /// The stored form of one value given in PostgreSQL's text form.
    pub fn apply(self, text: &str) -> Result<Vec<u8>, String> {
        match self {
            Conversion::Same => Ok(text.as_bytes().to_vec()),
            // Every spelling PostgreSQL's boolean input takes (a MySQL source sends 1 and 0).
            Conversion::Boolean => match text.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "1" | "y" | "yes" | "on" => Ok(b"1".to_vec()),
                "f" | "false" | "0" | "n" | "no" | "off" => Ok(b"0".to_vec()),
                other => Err(format!("`{other}` is not a boolean")),
            },
            Conversion::Bytes => {
                let hex = text.strip_prefix("\\x").ok_or_else(|| format!("`{text}` is not bytea hex (\\x…)"))?;
                (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                            .ok_or_else(|| "bytea hex with an odd length or a non-hex digit".to_string())
                    })
                    .collect()
            }
            Conversion::UtcTimestamp => {
                let bare = text.strip_suffix("+00:00").or_else(|| text.strip_suffix("+00")).ok_or_else(|| {
                    format!("`{text}` is not a UTC timestamp (infinity and years BC do not fit MySQL)")
                })?;
                Ok(bare.as_bytes().to_vec())
            }
            Conversion::ArrayToJson { numeric } => {
                let items = parse_array(text)?;
                let mut json = String::from("[");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        json.push(',');
                    }
                    match item {
                        None => json.push_str("null"),
                        Some(value) if numeric && value.parse::<f64>().is_ok_and(f64::is_finite) => {
                            json.push_str(value)
                        }
                        Some(value) => json.push_str(&serde_json::Value::String(value.clone()).to_string()),
                    }
                }
                json.push(']');
                Ok(json.into_bytes())
            }
            Conversion::ArrayToSet => {
                let items = parse_array(text)?;
                Ok(items.into_iter().flatten().collect::<Vec<_>>().join(",").into_bytes())
            }
            Conversion::Bits => parse_bits(text)
                .map(|n| n.to_string().into_bytes())
                .ok_or_else(|| format!("`{text}` is not a bit string of at most 64 bits")),
        }
    }
}

fn parse_bits(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 64 || !text.bytes().all(|b| b == b'0' || b == b'1') {
        return None;
    }
    u64::from_str_radix(text, 2).ok()
}

/// A one-dimensional PostgreSQL array literal → its elements (`None` for NULL).
fn parse_array(text: &str) -> Result<Vec<Option<String>>, String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("`{text}` is not an array literal"))?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => item.extend(chars.next()),
                    Some('"') => break,
                    Some(c) => item.push(c),
                    None => return Err(format!("`{text}`: an unterminated quoted element")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' {
                    return Err(format!("`{text}`: multi-dimensional arrays do not map to MySQL"));
                }
                item.push(c);
                chars.next();
            }
        }
        items.push(if !quoted && item == "NULL" { None } else { Some(item) });
        match chars.next() {
            Some(',') | None => {}
            Some(c) => return Err(format!("`{text}`: unexpected `{c}` after an element")),
        }
    }
    Ok(items)
}

/// PostgreSQL text-`COPY` rows in, `LOAD DATA` rows out (tab-separated, `\N` for
/// NULL, backslash escapes MySQL reads), converting each column on the way.
/// Rows may be split across chunks.
pub struct CopyToLoadData {
    conversions: Vec<Conversion>,
    pending: Vec<u8>,
    /// Rows converted so far.
    pub rows: u64,
}

impl CopyToLoadData {
    pub fn new(conversions: Vec<Conversion>) -> CopyToLoadData {
        CopyToLoadData { conversions, pending: Vec::new(), rows: 0 }
    }

    /// Converts every complete row in `chunk` (and what was left of the last one).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, String> {
        self.pending.extend_from_slice(chunk);
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else { return Ok(Vec::new()) };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        let mut out = Vec::with_capacity(complete.len() + complete.len() / 8);
        for line in complete[..complete.len() - 1].split(|&b| b == b'\n') {
            self.convert_row(line, &mut out)?;
        }
        Ok(out)
    }

    /// Whatever is left must be nothing: a row without its newline is a broken stream.
    pub fn finish(&self) -> Result<(), String> {
        match self.pending.is_empty() {
            true => Ok(()),
            false => Err("the copy stream ended in the middle of a row".into()),
        }
    }

    fn convert_row(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        if fields.len() != self.conversions.len() {
            return Err(format!("a row with {} fields for {} columns", fields.len(), self.conversions.len()));
        }
        for (i, (field, conversion)) in fields.iter().zip(&self.conversions).enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            if *field == b"\\N" {
                out.extend_from_slice(b"\\N");
                continue;
            }
            let value = unescape_copy(field)?;
            let stored = match conversion {
                Conversion::Same => value,
                other => {
                    other.apply(&String::from_utf8(value).map_err(|_| "a value that is not UTF-8".to_string())?)?
                }
            };
            escape_load_data(&stored, out);
        }
        out.push(b'\n');
        self.rows += 1;
        Ok(())
    }
}

/// PostgreSQL text-`COPY` escapes → bytes.
fn unescape_copy(field: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] != b'\\' {
            out.push(field[i]);
            i += 1;
            continue;
        }
        let next = *field.get(i + 1).ok_or("a copy field ending in a lone backslash")?;
        i += 2;
        out.push(match next {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'x' => {
                let digits = field[i..].iter().take(2).take_while(|b| b.is_ascii_hexdigit()).count();
                let value =
                    std::str::from_utf8(&field[i..i + digits]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                i += digits;
                value.ok_or("a \\x escape without hex digits")?
            }
            b'0'..=b'7' => {
                let digits = 1 + field[i..].iter().take(2).take_while(|b| (b'0'..=b'7').contains(b)).count();
                let start = i - 1;
                i = start + digits;
                let text = std::str::from_utf8(&field[start..i]).map_err(|e| e.to_string())?;
                u8::from_str_radix(text, 8).map_err(|_| "an octal escape beyond \\377")?
            }
            other => other,
        });
    }
    Ok(out)
}

/// Bytes → a `LOAD DATA` field (`FIELDS ESCAPED BY '\\'`).
pub fn escape_load_data(value: &[u8], out: &mut Vec<u8>) {
    for &byte in value {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0 => out.extend_from_slice(b"\\0"),
            other => out.push(other),
        }
    }
}

/// A value for a message: at most 60 characters.
pub fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        let _ = write!(short, "…");
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_types_map_to_mysql() {
        for (pg, my) in [
            ("integer", "int"),
            ("numeric(12,2)", "decimal(12,2)"),
            ("numeric", "decimal(65,30)"),
            ("boolean", "tinyint(1)"),
            ("text", "longtext"),
            ("character varying(40)", "varchar(40)"),
            ("bytea", "longblob"),
            ("timestamp with time zone", "datetime(6)"),
            ("timestamp(3) without time zone", "datetime(3)"),
            ("uuid", "char(36)"),
            ("jsonb", "json"),
            ("integer[]", "json"),
            ("bit varying(12)", "bit(12)"),
            ("tsvector", "longtext"),
        ] {
            assert_eq!(map_type(pg, None).0, my, "{pg}");
        }
        assert!(map_type("numeric", None).1.is_some());
        let labels = vec!["sad".to_string(), "it's".to_string()];
        assert_eq!(map_type("public.mood", Some(&labels)).0, "enum('sad','it''s')");
    }

    #[test]
    fn values_convert() {
        let to = |c: Conversion, t: &str| c.apply(t).map(|v| String::from_utf8_lossy(&v).into_owned());
        assert_eq!(to(Conversion::Boolean, "t"), Ok("1".into()));
        assert_eq!(Conversion::Bytes.apply("\\xdeadbeef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert!(Conversion::Bytes.apply("\\xabc").is_err());
        assert_eq!(to(Conversion::UtcTimestamp, "2024-02-29 23:59:59.5+00"), Ok("2024-02-29 23:59:59.5".into()));
        assert!(Conversion::UtcTimestamp.apply("infinity").is_err());
        assert_eq!(to(Conversion::ArrayToJson { numeric: true }, "{1,NULL,-3}"), Ok("[1,null,-3]".into()));
        assert_eq!(
            to(Conversion::ArrayToJson { numeric: false }, r#"{"a,b",NULL,"\"q\"","NULL"}"#),
            Ok(r#"["a,b",null,"\"q\"","NULL"]"#.into())
        );
        assert_eq!(to(Conversion::ArrayToSet, "{a,c}"), Ok("a,c".into()));
        assert_eq!(to(Conversion::Bits, "101"), Ok("5".into()));
        assert_eq!(Conversion::between("text[]", "set"), Conversion::ArrayToSet);
        assert_eq!(Conversion::between("bit varying(12)", "bit"), Conversion::Bits);
        assert_eq!(Conversion::between("integer", "int"), Conversion::Same);
        assert_eq!(Conversion::between("timestamp(3) with time zone", "datetime"), Conversion::UtcTimestamp);
        let columns = ["price", "qty", "Net", "a"];
        assert_eq!(mysql_expression("(price * qty)", &columns).as_deref(), Some("(`price` * `qty`)"));
        assert_eq!(mysql_expression("abs(\"Net\" - 1.5)", &columns).as_deref(), Some("abs(`Net` - 1.5)"));
        assert_eq!(mysql_expression("(price * (qty)::numeric)", &columns).as_deref(), Some("(`price` * (`qty`))"));
        assert_eq!(mysql_expression("(price * (qty)::numeric(5,1))", &columns), None);
        assert_eq!(mysql_expression("(qty / 2)", &columns), None);
        assert_eq!(mysql_expression("((qty)::bigint * 2)", &columns).as_deref(), Some("((`qty`) * 2)"));
        assert_eq!(mysql_expression("((qty)::bigint2 * 2)", &columns), None);
        assert_eq!(mysql_expression("(a || 'x')", &columns), None);
        assert_eq!(mysql_expression("md5(a)", &columns), None);
        assert_eq!(mysql_expression("coalesce(a, NULL)", &columns), None);
        assert_eq!(mysql_expression("(a -- 1\n)", &columns), None);
        // What a MySQL source calls its TIMESTAMP columns.
        assert_eq!(Conversion::between("timestamptz(6)", "timestamp"), Conversion::UtcTimestamp);
        assert_eq!(Conversion::between("bool", "tinyint"), Conversion::Boolean);
    }

    #[test]
    fn copy_rows_become_load_data_rows_across_chunks() {
        let mut converter = CopyToLoadData::new(vec![Conversion::Same, Conversion::Boolean, Conversion::Bytes]);
        let first = converter.push(b"1\tt\t\\\\x00ff\nfor\\fm").expect("converts");
        assert_eq!(first, b"1\t1\t\\0\xff\n");
        let second = converter.push(b"feed\\t\\\\\t\\N\t\\\\x\n").expect("converts");
        assert_eq!(second, b"for\x0cmfeed\\t\\\\\t\\N\t\n");
        assert_eq!(converter.rows, 2);
        assert!(converter.finish().is_ok());
        assert!(converter.push(b"only\tthree").is_ok());
        assert!(converter.finish().is_err());
        assert!(CopyToLoadData::new(vec![Conversion::Same]).push(b"a\tb\n").is_err());
    }
}
