//! The query language subset: dotted paths, BSON comparison, filters, sorts and projections.

use std::cmp::Ordering;

use bson::{Bson, Document};

use super::CommandError;

/// The value at a dotted `path` (`a.b.c`), descending through embedded documents only.
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut value = doc.get(parts.next()?)?;
    for part in parts {
        value = match value {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// The rank of a value's type in MongoDB's cross-type comparison order; numbers share one rank.
fn type_rank(value: &Bson) -> u8 {
    match value {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::MaxKey => 13,
        _ => 12,
    }
}

fn as_f64(value: &Bson) -> Option<f64> {
    match value {
        Bson::Int32(v) => Some(*v as f64),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

/// MongoDB's total order over BSON values (numbers compare by value whatever their type).
pub fn compare(a: &Bson, b: &Bson) -> Ordering {
    let rank = type_rank(a).cmp(&type_rank(b));
    if rank != Ordering::Equal {
        return rank;
    }
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => x.cmp(y),
        (Bson::Int64(x), Bson::Int64(y)) => x.cmp(y),
        (Bson::Int32(x), Bson::Int64(y)) => (*x as i64).cmp(y),
        (Bson::Int64(x), Bson::Int32(y)) => x.cmp(&(*y as i64)),
        (x, y) if as_f64(x).is_some() && as_f64(y).is_some() => {
            as_f64(x).unwrap().partial_cmp(&as_f64(y).unwrap()).unwrap_or(Ordering::Equal)
        }
        (Bson::String(x), Bson::String(y)) => x.cmp(y),
        (Bson::Document(x), Bson::Document(y)) => {
            for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
                let ord = compare(vx, vy).then_with(|| kx.cmp(ky));
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Array(x), Bson::Array(y)) => {
            for (vx, vy) in x.iter().zip(y.iter()) {
                let ord = compare(vx, vy);
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x.bytes.len().cmp(&y.bytes.len()).then_with(|| x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => (x.time, x.increment).cmp(&(y.time, y.increment)),
        _ => Ordering::Equal,
    }
}

/// Equality as the query language sees it: `1 == 1.0`, a missing field equals `null`.
pub fn values_equal(a: Option<&Bson>, b: &Bson) -> bool {
    match a {
        None => matches!(b, Bson::Null),
        Some(a) => {
            if type_rank(a) != type_rank(b) {
                return false;
            }
            compare(a, b) == Ordering::Equal
        }
    }
}

/// Equality that also matches an array field containing the value, as `{tags: "x"}` does.
fn equality_matches(field: Option<&Bson>, wanted: &Bson) -> bool {
    if values_equal(field, wanted) {
        return true;
    }
    matches!(field, Some(Bson::Array(items)) if items.iter().any(|item| values_equal(Some(item), wanted)))
}

fn bad_value(message: impl Into<String>) -> CommandError {
    CommandError::new(2, "BadValue", message)
}

/// Whether `doc` satisfies `filter`. Supports equality, `$eq $ne $gt $gte $lt $lte $in $nin $exists`,
/// and `$and $or $nor`; anything else is an error rather than a silent mismatch.
pub fn matches(doc: &Document, filter: &Document) -> Result<bool, CommandError> {
    for (key, condition) in filter {
        let ok = match key.as_str() {
            "$and" | "$or" | "$nor" => {
                let clauses = match condition {
                    Bson::Array(items) if !items.is_empty() => items,
                    _ => return Err(bad_value(format!("{key} must be a nonempty array"))),
                };
                let mut results = Vec::with_capacity(clauses.len());
                for clause in clauses {
                    let Bson::Document(clause) = clause else {
                        return Err(bad_value(format!("{key} entries must be objects")));
                    };
                    results.push(matches(doc, clause)?);
                }
                match key.as_str() {
                    "$and" => results.iter().all(|&r| r),
                    "$or" => results.iter().any(|&r| r),
                    _ => !results.iter().any(|&r| r),
                }
            }
            k if k.starts_with('$') => return Err(bad_value(format!("unknown top level operator: {k}"))),
            path => field_matches(get_path(doc, path), condition)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn field_matches(field: Option<&Bson>, condition: &Bson) -> Result<bool, CommandError> {
    let operators = match condition {
        Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => d,
        _ => return Ok(equality_matches(field, condition)),
    };
    for (op, operand) in operators {
        let ok = match op.as_str() {
            "$eq" => equality_matches(field, operand),
            "$ne" => !equality_matches(field, operand),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                // Like the server, range operators only compare values of the same type class.
                let check = |v: &Bson| {
                    type_rank(v) == type_rank(operand) && {
                        let ord = compare(v, operand);
                        match op.as_str() {
                            "$gt" => ord == Ordering::Greater,
                            "$gte" => ord != Ordering::Less,
                            "$lt" => ord == Ordering::Less,
                            _ => ord != Ordering::Greater,
                        }
                    }
                };
                match field {
                    Some(Bson::Array(items)) => items.iter().any(check),
                    Some(v) => check(v),
                    None => false,
                }
            }
            "$in" | "$nin" => {
                let Bson::Array(candidates) = operand else {
                    return Err(bad_value(format!("{op} needs an array")));
                };
                let found = candidates.iter().any(|c| equality_matches(field, c));
                found == (op == "$in")
            }
            "$exists" => {
                let wanted = !matches!(operand, Bson::Boolean(false) | Bson::Int32(0) | Bson::Int64(0) | Bson::Null);
                field.is_some() == wanted
            }
            other => return Err(bad_value(format!("unknown operator: {other}"))),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Orders documents by a `{field: 1 | -1, ...}` sort specification.
pub fn sort_documents(docs: &mut [Document], spec: &Document) -> Result<(), CommandError> {
    let mut keys = Vec::new();
    for (field, direction) in spec {
        let descending = match as_f64(direction) {
            Some(1.0) => false,
            Some(-1.0) => true,
            _ => return Err(bad_value(format!("bad sort direction for {field}"))),
        };
        keys.push((field.clone(), descending));
    }
    docs.sort_by(|a, b| {
        for (field, descending) in &keys {
            let null = Bson::Null;
            let ord = compare(get_path(a, field).unwrap_or(&null), get_path(b, field).unwrap_or(&null));
            let ord = if *descending { ord.reverse() } else { ord };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        Ordering::Equal
    });
    Ok(())
}

/// Applies a top-level inclusion or exclusion projection (`_id` is kept unless excluded).
pub fn project(doc: &Document, projection: &Document) -> Result<Document, CommandError> {
    if projection.is_empty() {
        return Ok(doc.clone());
    }
    let included = |v: &Bson| {
        !matches!(v, Bson::Boolean(false) | Bson::Int32(0) | Bson::Int64(0))
            && !matches!(v, Bson::Double(d) if *d == 0.0)
    };
    let inclusion = projection.iter().any(|(k, v)| k != "_id" && included(v));
    if projection.keys().any(|k| k.contains('.') || k.starts_with('$')) {
        return Err(CommandError::new(2, "BadValue", "only top-level projections are supported by the test server"));
    }
    let keep_id = projection.get("_id").is_none_or(included);
    let mut out = Document::new();
    for (key, value) in doc {
        let keep = if key == "_id" {
            keep_id
        } else if inclusion {
            projection.get(key).is_some_and(included)
        } else {
            projection.get(key).is_none_or(included)
        };
        if keep {
            out.insert(key.clone(), value.clone());
        }
    }
    Ok(out)
}
