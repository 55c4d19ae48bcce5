//! Update documents: replacements and the `$set`, `$unset`, `$inc`, `$setOnInsert` operators, with the
//! `updateDescription` a change stream reports for them.

use bson::{Bson, Document};

use super::query::{compare, get_path};
use super::CommandError;

/// What an operator update changed, in the shape of a change event's `updateDescription`.
#[derive(Debug, Default)]
pub struct UpdateDescription {
    pub updated_fields: Document,
    pub removed_fields: Vec<String>,
}

/// Whether `update` is an operator update (`{$set: ...}`) rather than a replacement document.
pub fn is_operator_update(update: &Document) -> bool {
    update.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn immutable_id() -> CommandError {
    CommandError::new(
        66,
        "ImmutableField",
        "Performing an update on the path '_id' would modify the immutable field '_id'",
    )
}

/// The document that replaces `old` with `replacement`, keeping `old`'s `_id` first.
pub fn apply_replacement(old: &Document, replacement: &Document) -> Result<Document, CommandError> {
    if replacement.keys().any(|k| k.starts_with('$')) {
        return Err(CommandError::new(2, "BadValue", "replacement document must not contain update operators"));
    }
    let id = old.get("_id").cloned().unwrap_or(Bson::Null);
    if let Some(new_id) = replacement.get("_id") {
        if compare(new_id, &id) != std::cmp::Ordering::Equal {
            return Err(immutable_id());
        }
    }
    let mut doc = Document::new();
    doc.insert("_id", id);
    for (k, v) in replacement {
        if k != "_id" {
            doc.insert(k.clone(), v.clone());
        }
    }
    Ok(doc)
}

/// Applies operator `update` to `doc` in place and describes the change. `inserting` enables `$setOnInsert`.
pub fn apply_operators(
    doc: &mut Document,
    update: &Document,
    inserting: bool,
) -> Result<UpdateDescription, CommandError> {
    check_conflicts(update)?;
    let mut description = UpdateDescription::default();
    for (op, fields) in update {
        let Bson::Document(fields) = fields else {
            return Err(CommandError::new(
                9,
                "FailedToParse",
                format!("Modifiers operate on fields but we found a {op} that is not an object"),
            ));
        };
        for (path, value) in fields {
            if (path == "_id" || path.starts_with("_id.")) && !inserting {
                let unchanged = op == "$set" && get_path(doc, path).is_some_and(|v| compare(v, value).is_eq());
                if !unchanged {
                    return Err(immutable_id());
                }
                continue;
            }
            match op.as_str() {
                "$set" => set_field(doc, path, value.clone(), &mut description)?,
                "$setOnInsert" if inserting => set_field(doc, path, value.clone(), &mut description)?,
                "$setOnInsert" => {}
                "$unset" => {
                    if remove_path(doc, path) {
                        description.removed_fields.push(path.clone());
                    }
                }
                "$inc" => {
                    let new = match get_path(doc, path) {
                        None => numeric(value, path)?.clone(),
                        Some(current) => add(numeric(current, path)?, numeric(value, path)?),
                    };
                    set_field(doc, path, new, &mut description)?;
                }
                other => {
                    return Err(CommandError::new(
                        9,
                        "FailedToParse",
                        format!("Unknown modifier: {other} (not supported by the test server)"),
                    ))
                }
            }
        }
    }
    Ok(description)
}

/// Two operators touching the same path or a path and its prefix is an error on the real server too.
fn check_conflicts(update: &Document) -> Result<(), CommandError> {
    let mut paths: Vec<&str> = Vec::new();
    for (_, fields) in update {
        if let Bson::Document(fields) = fields {
            for path in fields.keys() {
                let overlaps = |other: &&str| {
                    *other == path || path.starts_with(&format!("{other}.")) || other.starts_with(&format!("{path}."))
                };
                if paths.iter().any(overlaps) {
                    return Err(CommandError::new(
                        40,
                        "ConflictingUpdateOperators",
                        format!("Updating the path '{path}' would create a conflict"),
                    ));
                }
                paths.push(path);
            }
        }
    }
    Ok(())
}

fn numeric<'a>(value: &'a Bson, path: &str) -> Result<&'a Bson, CommandError> {
    match value {
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) => Ok(value),
        _ => Err(CommandError::new(14, "TypeMismatch", format!("Cannot apply $inc to a non-numeric value at {path}"))),
    }
}

/// Numeric addition with the server's type promotion: int32 widens to int64 on overflow, doubles win.
fn add(a: &Bson, b: &Bson) -> Bson {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => {
            x.checked_add(*y).map(Bson::Int32).unwrap_or(Bson::Int64(*x as i64 + *y as i64))
        }
        (Bson::Int32(x), Bson::Int64(y)) | (Bson::Int64(y), Bson::Int32(x)) => {
            Bson::Int64((*x as i64).wrapping_add(*y))
        }
        (Bson::Int64(x), Bson::Int64(y)) => Bson::Int64(x.wrapping_add(*y)),
        _ => {
            let f = |v: &Bson| match v {
                Bson::Int32(v) => *v as f64,
                Bson::Int64(v) => *v as f64,
                Bson::Double(v) => *v,
                _ => 0.0,
            };
            Bson::Double(f(a) + f(b))
        }
    }
}

/// Sets `path`, creating intermediate documents; records it only if the value really changed.
fn set_field(
    doc: &mut Document,
    path: &str,
    value: Bson,
    description: &mut UpdateDescription,
) -> Result<(), CommandError> {
    if get_path(doc, path).is_some_and(|old| old == &value) {
        return Ok(());
    }
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut current = doc;
    for part in parts {
        let entry = current.entry(part.to_string()).or_insert_with(|| Bson::Document(Document::new()));
        current = match entry {
            Bson::Document(d) => d,
            _ => {
                return Err(CommandError::new(
                    28,
                    "PathNotViable",
                    format!("Cannot create field '{last}' in element {{{part}: ...}}"),
                ))
            }
        };
    }
    current.insert(last, value.clone());
    description.updated_fields.insert(path, value);
    Ok(())
}

/// Removes `path`; false if it was not there.
fn remove_path(doc: &mut Document, path: &str) -> bool {
    match path.split_once('.') {
        None => doc.remove(path).is_some(),
        Some((head, rest)) => match doc.get_mut(head) {
            Some(Bson::Document(inner)) => remove_path(inner, rest),
            _ => false,
        },
    }
}
