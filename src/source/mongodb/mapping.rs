//! Documents → rows, pure: the one rule the snapshot and the change stream share.
//!
//! `jsonb`: every collection is `(_id text primary key, doc jsonb)`, the document as relaxed extended JSON.
//! `flatten`: a [`Shape`] per collection learns its columns from the documents it is shown — nested
//! fields joined by `_`, a column type from the BSON type, `jsonb` for arrays and for fields whose type
//! differs between documents. Values travel in PostgreSQL's text form.

use std::collections::HashMap;

use bson::{Bson, Document};

use crate::change::{Column, Identity, TableName, TableSchema};
use crate::config::MongoMapping;
use crate::position::civil_from_days;

/// PostgreSQL's limit on identifier length (bytes); longer names would be cut and could collide.
const MAX_IDENTIFIER: usize = 63;

/// A column's type, from the BSON type of its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ObjectId,
    Int32,
    Int64,
    Double,
    Decimal,
    Date,
    Bool,
    Binary,
    String,
    /// Arrays, empty documents, rarer BSON types, and fields whose type differs between documents.
    Json,
}

impl Kind {
    /// The value's kind; `None` for null (it fits every column).
    pub fn of(value: &Bson) -> Option<Kind> {
        Some(match value {
            Bson::Null | Bson::Undefined => return None,
            Bson::ObjectId(_) => Kind::ObjectId,
            Bson::Int32(_) => Kind::Int32,
            Bson::Int64(_) => Kind::Int64,
            Bson::Double(_) => Kind::Double,
            Bson::Decimal128(_) => Kind::Decimal,
            Bson::DateTime(_) => Kind::Date,
            Bson::Boolean(_) => Kind::Bool,
            Bson::Binary(_) => Kind::Binary,
            Bson::String(_) => Kind::String,
            _ => Kind::Json,
        })
    }

    /// The PostgreSQL type of a column of this kind.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::ObjectId | Kind::String => "text",
            Kind::Int32 => "integer",
            Kind::Int64 => "bigint",
            Kind::Double => "double precision",
            Kind::Decimal => "numeric",
            Kind::Date => "timestamptz",
            Kind::Bool => "boolean",
            Kind::Binary => "bytea",
            Kind::Json => "jsonb",
        }
    }

    /// The BSON type's name, for the plan.
    fn bson_name(self) -> &'static str {
        match self {
            Kind::ObjectId => "objectId",
            Kind::Int32 => "int",
            Kind::Int64 => "long",
            Kind::Double => "double",
            Kind::Decimal => "decimal",
            Kind::Date => "date",
            Kind::Bool => "bool",
            Kind::Binary => "binData",
            Kind::String => "string",
            Kind::Json => "array/mixed",
        }
    }
}

/// A mapped column: its name on the target, the document path it comes from, its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeColumn {
    pub name: String,
    pub path: String,
    /// `None` while only nulls were seen (inference); such a column is created as text.
    pub kind: Option<Kind>,
    /// Values of different types were seen: the column is jsonb.
    pub mixed: bool,
}

/// What the documents of one collection look like, as rows: the columns after `_id`, in order of first sight.
#[derive(Clone, Debug)]
pub struct Shape {
    pub mapping: MongoMapping,
    pub columns: Vec<ShapeColumn>,
    by_name: HashMap<String, usize>,
    /// The table exists: every column has its type (see [`Shape::settle`]).
    settled: bool,
}

/// A document does not fit the collection's columns (copy) or cannot be mapped at all.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("fields `{0}` and `{1}` both become column {2}; rename one, or use [source] mapping = \"jsonb\"")]
    Collision(String, String, String),
    #[error(
        "field `{0}` becomes column name {1}, longer than PostgreSQL's 63 bytes; use [source] mapping = \"jsonb\""
    )]
    TooLong(String, String),
    #[error("field `{0}` holds a string with a NUL character, which PostgreSQL text cannot store")]
    Nul(String),
    #[error("field `{0}` holds a date outside PostgreSQL's timestamptz range")]
    DateRange(String),
}

/// The `_id` as the target's key: the 24-hex form of an ObjectId, else its canonical extended JSON.
pub fn id_text(id: &Bson) -> String {
    match id {
        Bson::ObjectId(oid) => oid.to_hex(),
        other => other.clone().into_canonical_extjson().to_string(),
    }
}

impl Shape {
    pub fn new(mapping: MongoMapping) -> Shape {
        Shape { mapping, columns: Vec::new(), by_name: HashMap::new(), settled: false }
    }

    /// The target table for collection `name`.
    pub fn table_schema(&self, name: TableName) -> TableSchema {
        let column = |name: &str, type_name: &str, is_key: bool| Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid: 0,
            is_key,
            default: None,
        };
        let mut columns = vec![column("_id", "text", true)];
        match self.mapping {
            MongoMapping::Jsonb => columns.push(column("doc", "jsonb", false)),
            MongoMapping::Flatten => columns.extend(
                self.columns.iter().map(|c| column(&c.name, c.kind.unwrap_or(Kind::String).type_name(), false)),
            ),
        }
        TableSchema { name, columns, identity: Identity::Key }
    }

    /// For the plan: each column's BSON type(s), and what the mapping gives up.
    pub fn describe(&self, index: usize) -> (Option<String>, Option<&'static str>) {
        match (self.mapping, index.checked_sub(1).and_then(|i| self.columns.get(i))) {
            (MongoMapping::Jsonb, _) | (_, None) => (None, None),
            (_, Some(c)) if c.mixed => (Some("mixed types".into()), Some("values of different types: stored as jsonb")),
            (_, Some(c)) => (Some(c.kind.map_or("null", Kind::bson_name).into()), None),
        }
    }

    /// Ends inference: a column that held only nulls becomes text, and from now on a new column takes
    /// the type of its first value (text for null), since the table exists with these types.
    pub fn settle(&mut self) {
        for column in &mut self.columns {
            column.kind.get_or_insert(Kind::String);
        }
        self.settled = true;
    }

    /// Learns the columns `doc` needs. Returns whether the shape changed: a new column, or a column
    /// that turned jsonb.
    pub fn observe(&mut self, doc: &Document) -> Result<bool, MappingError> {
        let settled = self.settled;
        if self.mapping == MongoMapping::Jsonb {
            return Ok(false);
        }
        let mut changed = false;
        for (path, name, value) in leaves(doc) {
            let kind = Kind::of(value);
            match self.by_name.get(&name) {
                None => {
                    if name.len() > MAX_IDENTIFIER {
                        return Err(MappingError::TooLong(path, name));
                    }
                    let kind = if settled { Some(kind.unwrap_or(Kind::String)) } else { kind };
                    self.by_name.insert(name.clone(), self.columns.len());
                    self.columns.push(ShapeColumn { name, path, kind, mixed: kind == Some(Kind::Json) });
                    changed = true;
                }
                Some(&i) => {
                    let column = &mut self.columns[i];
                    if column.path != path {
                        return Err(MappingError::Collision(column.path.clone(), path, name));
                    }
                    match (column.kind, kind) {
                        (_, None) | (Some(Kind::Json), _) => {}
                        (None, Some(_)) => column.kind = kind,
                        (Some(known), Some(new)) if known != new => {
                            column.kind = Some(Kind::Json);
                            column.mixed = true;
                            changed = true;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(changed)
    }

    /// The row for `doc`, in [`Shape::table_schema`] order (`None` is SQL NULL). The flag says whether
    /// every field fit its column: a document written after the shape was learnt may not (the copy writes
    /// what fits; the change stream brings the document again).
    pub fn row(&self, doc: &Document) -> Result<(Vec<Option<String>>, bool), MappingError> {
        let id = doc.get("_id").unwrap_or(&Bson::Null);
        let mut row = vec![Some(id_text(id))];
        if self.mapping == MongoMapping::Jsonb {
            check_nul("_id", id)?;
            let mut json = Document::new();
            for (key, value) in doc {
                check_nul(key, value)?;
                json.insert(key.clone(), value.clone());
            }
            row.push(Some(Bson::Document(json).into_relaxed_extjson().to_string()));
            return Ok((row, true));
        }
        check_nul("_id", id)?;
        let mut fits = true;
        let mut values: Vec<Option<String>> = vec![None; self.columns.len()];
        for (path, name, value) in leaves(doc) {
            let Some(&i) = self.by_name.get(&name) else {
                fits = false;
                continue;
            };
            let column = &self.columns[i];
            let kind = Kind::of(value);
            values[i] = match (column.kind.unwrap_or(Kind::String), kind) {
                (_, None) => None,
                (Kind::Json, _) => {
                    check_nul(&path, value)?;
                    Some(value.clone().into_relaxed_extjson().to_string())
                }
                (want, Some(have)) if want == have => Some(pg_text(&path, value)?),
                _ => {
                    fits = false;
                    None
                }
            };
        }
        row.extend(values);
        Ok((row, fits))
    }
}

/// The mapped leaves of a document: (dotted path, column name, value). `_id` is the key, not a leaf;
/// a non-empty embedded document is descended into; everything else is a leaf.
fn leaves(doc: &Document) -> Vec<(String, String, &Bson)> {
    fn walk<'a>(doc: &'a Document, path: &str, name: &str, out: &mut Vec<(String, String, &'a Bson)>) {
        for (key, value) in doc {
            if path.is_empty() && key == "_id" {
                continue;
            }
            let (path, name) = if path.is_empty() {
                (key.clone(), key.clone())
            } else {
                (format!("{path}.{key}"), format!("{name}_{key}"))
            };
            match value {
                Bson::Document(inner) if !inner.is_empty() => walk(inner, &path, &name, out),
                _ => out.push((path, name, value)),
            }
        }
    }
    let mut out = Vec::new();
    walk(doc, "", "", &mut out);
    out
}

/// A scalar in PostgreSQL's text form for a column of its own kind.
fn pg_text(path: &str, value: &Bson) -> Result<String, MappingError> {
    Ok(match value {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Double(f) if f.is_nan() => "NaN".into(),
        Bson::Double(f) if f.is_infinite() => if *f > 0.0 { "Infinity" } else { "-Infinity" }.into(),
        Bson::Double(f) => f.to_string(),
        Bson::Decimal128(d) => d.to_string(),
        Bson::DateTime(t) => {
            timestamp_text(t.timestamp_millis()).ok_or_else(|| MappingError::DateRange(path.into()))?
        }
        Bson::Boolean(b) => b.to_string(),
        Bson::Binary(b) => {
            let mut hex = String::with_capacity(2 + b.bytes.len() * 2);
            hex.push_str("\\x");
            for byte in &b.bytes {
                hex.push_str(&format!("{byte:02x}"));
            }
            hex
        }
        Bson::String(s) if s.contains('\0') => return Err(MappingError::Nul(path.into())),
        Bson::String(s) => s.clone(),
        // Every other kind maps to jsonb, which takes extended JSON instead.
        other => other.clone().into_relaxed_extjson().to_string(),
    })
}

/// Milliseconds since 1970 as a `timestamptz` literal in UTC; `None` past PostgreSQL's year 294276.
fn timestamp_text(millis: i64) -> Option<String> {
    let seconds = millis.div_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    if !(-4712..=294_276).contains(&year) {
        return None;
    }
    let of_day = seconds.rem_euclid(86_400);
    let time =
        format!("{:02}:{:02}:{:02}.{:03}+00", of_day / 3600, of_day / 60 % 60, of_day % 60, millis.rem_euclid(1000));
    // PostgreSQL has no year 0: astronomical year 0 is 1 BC.
    Some(if year > 0 {
        format!("{year:04}-{month:02}-{day:02} {time}")
    } else {
        format!("{:04}-{month:02}-{day:02} {time} BC", 1 - year)
    })
}

/// PostgreSQL text and jsonb cannot hold NUL: say which field, instead of the target's bare error.
fn check_nul(path: &str, value: &Bson) -> Result<(), MappingError> {
    let bad = match value {
        Bson::String(s) => s.contains('\0'),
        Bson::Document(d) => {
            return d.iter().try_for_each(|(k, v)| {
                if k.contains('\0') {
                    return Err(MappingError::Nul(format!("{path}.{k}")));
                }
                check_nul(&format!("{path}.{k}"), v)
            })
        }
        Bson::Array(items) => {
            return items.iter().enumerate().try_for_each(|(i, v)| check_nul(&format!("{path}.{i}"), v))
        }
        _ => false,
    };
    if bad {
        return Err(MappingError::Nul(path.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, DateTime, Decimal128};

    fn flatten(docs: &[Document]) -> Shape {
        let mut shape = Shape::new(MongoMapping::Flatten);
        for d in docs {
            shape.observe(d).expect("maps");
        }
        shape
    }

    fn types(shape: &Shape) -> Vec<(String, String)> {
        let schema = shape.table_schema(TableName::new("shop", "c"));
        schema.columns.iter().map(|c| (c.name.clone(), c.type_name.clone())).collect()
    }

    #[test]
    fn nested_fields_become_columns_and_types_follow_bson() {
        let oid = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").expect("oid");
        let decimal: Decimal128 = "12.50".parse().expect("decimal");
        let d = doc! {
            "_id": oid, "name": "Ada", "age": 36, "big": 1i64 << 40, "score": 1.5, "price": decimal,
            "born": DateTime::from_millis(-1000), "ok": true,
            "blob": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 255] },
            "address": { "city": "Paris", "geo": { "lat": 48.8 } }, "tags": ["a", 1], "empty": {}, "gone": null,
        };
        let shape = flatten(std::slice::from_ref(&d));
        let want = [
            ("_id", "text"),
            ("name", "text"),
            ("age", "integer"),
            ("big", "bigint"),
            ("score", "double precision"),
            ("price", "numeric"),
            ("born", "timestamptz"),
            ("ok", "boolean"),
            ("blob", "bytea"),
            ("address_city", "text"),
            ("address_geo_lat", "double precision"),
            ("tags", "jsonb"),
            ("empty", "jsonb"),
            ("gone", "text"),
        ];
        assert_eq!(types(&shape), want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec());
        let (row, fits) = shape.row(&d).expect("row");
        assert!(fits);
        let text: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        assert_eq!(
            text,
            vec![
                Some("64b7f0c2a1b2c3d4e5f60718"),
                Some("Ada"),
                Some("36"),
                Some("1099511627776"),
                Some("1.5"),
                Some("12.50"),
                Some("1969-12-31 23:59:59.000+00"),
                Some("true"),
                Some("\\x00ff"),
                Some("Paris"),
                Some("48.8"),
                Some(r#"["a",1]"#),
                Some("{}"),
                None,
            ]
        );
    }

    #[test]
    fn differing_types_turn_a_column_into_jsonb() {
        let mut shape =
            flatten(&[doc! { "_id": 1, "v": 1 }, doc! { "_id": 2, "v": "one" }, doc! { "_id": 3, "v": null }]);
        assert_eq!(types(&shape)[1], ("v".to_string(), "jsonb".to_string()));
        assert_eq!(shape.describe(1).1, Some("values of different types: stored as jsonb"));
        assert_eq!(shape.row(&doc! { "_id": 1, "v": 1 }).expect("row").0[1].as_deref(), Some("1"));
        assert_eq!(shape.row(&doc! { "_id": 2, "v": "one" }).expect("row").0[1].as_deref(), Some("\"one\""));
        // Once settled, a new field adds a column (text when its first value is null); a type clash widens.
        shape.settle();
        assert!(shape.observe(&doc! { "_id": 4, "w": null }).expect("maps"));
        assert!(!shape.observe(&doc! { "_id": 5, "w": "x" }).expect("maps"));
        assert!(shape.observe(&doc! { "_id": 6, "w": 5 }).expect("maps"));
        assert_eq!(types(&shape)[2], ("w".to_string(), "jsonb".to_string()));
    }

    #[test]
    fn documents_that_do_not_fit_are_flagged() {
        let shape = flatten(&[doc! { "_id": 1, "v": 1 }]);
        assert!(!shape.row(&doc! { "_id": 2, "v": "x" }).expect("row").1);
        assert!(!shape.row(&doc! { "_id": 3, "new": 1 }).expect("row").1);
    }

    #[test]
    fn ids_colliding_names_and_nul_are_handled() {
        assert_eq!(
            id_text(&Bson::ObjectId(ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").expect("oid"))),
            "64b7f0c2a1b2c3d4e5f60718"
        );
        assert_eq!(id_text(&Bson::Int32(7)), r#"{"$numberInt":"7"}"#);
        assert_eq!(id_text(&Bson::String("k".into())), r#""k""#);
        let mut shape = Shape::new(MongoMapping::Flatten);
        let clash = shape.observe(&doc! { "_id": 1, "a": { "b": 1 }, "a_b": 2 });
        assert!(matches!(clash, Err(MappingError::Collision(..))));
        let nul = Shape::new(MongoMapping::Jsonb).row(&doc! { "_id": 1, "s": "a\0b" });
        assert!(matches!(nul, Err(MappingError::Nul(p)) if p == "s"));
    }

    #[test]
    fn jsonb_mapping_keeps_the_whole_document_as_relaxed_extended_json() {
        let shape = Shape::new(MongoMapping::Jsonb);
        let (row, _) = shape.row(&doc! { "_id": 1, "when": DateTime::from_millis(0), "n": 2i64 }).expect("row");
        assert_eq!(row[0].as_deref(), Some(r#"{"$numberInt":"1"}"#));
        assert_eq!(row[1].as_deref(), Some(r#"{"_id":1,"when":{"$date":"1970-01-01T00:00:00Z"},"n":2}"#));
        assert_eq!(types(&shape), vec![("_id".into(), "text".into()), ("doc".into(), "jsonb".into())]);
    }

    #[test]
    fn timestamps_cover_bc_and_far_future() {
        assert_eq!(timestamp_text(0).as_deref(), Some("1970-01-01 00:00:00.000+00"));
        assert_eq!(timestamp_text(-62_167_219_200_000).as_deref(), Some("0001-01-01 00:00:00.000+00 BC"));
        assert_eq!(timestamp_text(i64::MAX), None);
    }
}
