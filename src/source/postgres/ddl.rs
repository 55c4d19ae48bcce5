//! Schema changes captured on a PostgreSQL source, in order with the rows.
//!
//! Logical decoding carries no DDL. An event trigger (`ddl_command_end`, `sql_drop`)
//! describes each table a command touched as it is after the command (its *shape*:
//! columns by attribute number, indexes and constraints by OID, partitions), compares
//! it with the shape it stored for the table before, and writes both into the change
//! log as a transactional logical message (`pg_logical_emit_message`). The message is
//! decoded at its place in its transaction, so a DDL reaches the target exactly between
//! the rows written before and after it. The shapes live in `cutover_ddl.table_shapes`,
//! written in the same transaction as the DDL: the shape before is always the one the
//! log's rows before it were written under.
//!
//! This module holds the trigger's SQL and turns a message into [`SchemaChange`]s: a
//! pure comparison of two shapes, unit-tested below.

use anyhow::Context as _;
use serde::Deserialize;

use crate::change::{ExistingRows, SchemaChange, SchemaOp, TableName};

/// The logical message prefix the trigger writes under.
pub const MESSAGE_PREFIX: &str = "cutover_ddl";

/// The event triggers' names (one pair per database, shared by the pipelines reading it).
pub const TRIGGERS: [&str; 3] = ["cutover_ddl_command_end", "cutover_sql_drop", "cutover_table_rewrite"];

/// Installs (or updates) the capture: functions replaced in place, the triggers and the
/// stored shapes created once. One transaction, serialized by an advisory lock: two
/// pipelines starting together install once. Needs a superuser (event triggers).
pub const INSTALL: &str = r#"
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('cutover_ddl_capture'));
CREATE SCHEMA IF NOT EXISTS cutover_ddl;
CREATE TABLE IF NOT EXISTS cutover_ddl.table_shapes (relid oid PRIMARY KEY, shape jsonb NOT NULL);
-- Any role may write a logical message under any prefix: each of the trigger's carries
-- this key, which only superusers can read (the schema grants nothing to others).
CREATE TABLE IF NOT EXISTS cutover_ddl.capture_key (key text NOT NULL);
INSERT INTO cutover_ddl.capture_key SELECT gen_random_uuid()::text
  WHERE NOT EXISTS (SELECT 1 FROM cutover_ddl.capture_key);

-- Writes one message into the change log, with the key and (the start of) the statement.
CREATE OR REPLACE FUNCTION cutover_ddl.emit(message jsonb) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $f$
SELECT pg_logical_emit_message(true, 'cutover_ddl', (message || jsonb_build_object(
  'key', (SELECT key FROM cutover_ddl.capture_key LIMIT 1),
  'statement', left(current_query(), 2000)))::text)::text::void
$f$;

-- Tables rewritten in this transaction (a type change: its USING expression, if any,
-- changed every row and the log carries none of it), as a transaction-local setting.
CREATE OR REPLACE FUNCTION cutover_ddl.on_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  PERFORM set_config('cutover_ddl.rewritten', coalesce(current_setting('cutover_ddl.rewritten', true), '')
                     || pg_event_trigger_table_rewrite_oid()::text || ',', true);
END
$f$;

-- A table as it is now: columns by attnum, indexes and constraints by OID, partitions.
-- Every name qualified (search_path is pg_catalog only).
CREATE OR REPLACE FUNCTION cutover_ddl.table_shape(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $f$
SELECT jsonb_build_object(
  'schema', n.nspname::text, 'name', c.relname::text, 'kind', c.relkind::text,
  'parent', (SELECT jsonb_build_object('schema', pn.nspname::text, 'name', p.relname::text)
             FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE i.inhrelid = c.oid AND c.relispartition),
  'root', (SELECT jsonb_build_object('schema', rn.nspname::text, 'name', r.relname::text)
           FROM pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace
           WHERE c.relispartition AND r.oid = pg_partition_root(c.oid)),
  'bound', pg_get_expr(c.relpartbound, c.oid),
  'partition_key', CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
  'columns', coalesce((
     SELECT jsonb_agg(jsonb_build_object(
              'attnum', a.attnum, 'name', a.attname::text, 'type', format_type(a.atttypid, a.atttypmod),
              'not_null', a.attnotnull, 'expression', pg_get_expr(d.adbin, d.adrelid),
              'generated', a.attgenerated <> '', 'identity', a.attidentity <> '',
              'user_type', EXISTS (SELECT 1 FROM pg_type ty
                                   WHERE ty.oid IN (a.atttypid, (SELECT e.typelem FROM pg_type e WHERE e.oid = a.atttypid))
                                     AND ty.typnamespace <> 'pg_catalog'::regnamespace),
              'missing', CASE WHEN a.atthasmissing THEN a.attmissingval::text
                              -- A partitioned table's rows are its leaves': one of theirs.
                              WHEN c.relkind = 'p' THEN (
                                SELECT l.attmissingval::text FROM pg_partition_tree(c.oid) t
                                JOIN pg_attribute l ON l.attrelid = t.relid AND l.attname = a.attname
                                WHERE t.isleaf AND l.atthasmissing LIMIT 1) END)
            ORDER BY a.attnum)
     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::jsonb),
  'indexes', coalesce((
     SELECT jsonb_agg(jsonb_build_object('oid', i.indexrelid::int8, 'name', x.relname::text,
                                         'definition', pg_get_indexdef(i.indexrelid)) ORDER BY i.indexrelid)
     FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
     WHERE i.indrelid = c.oid
       AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = c.oid
                                                      AND k.contype IN ('p', 'u', 'x'))), '[]'::jsonb),
  'constraints', coalesce((
     SELECT jsonb_agg(jsonb_build_object('oid', k.oid::int8, 'name', k.conname::text,
                                         'definition', pg_get_constraintdef(k.oid),
                                         'references', (SELECT jsonb_build_object('schema', rn.nspname::text, 'name', r.relname::text)
                                                        FROM pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace
                                                        WHERE r.oid = k.confrelid)) ORDER BY k.oid)
     FROM pg_constraint k
     WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u', 'f', 'c', 'x') AND k.conparentid = 0 AND k.conislocal),
     '[]'::jsonb),
  'partitions', coalesce((
     SELECT jsonb_agg(jsonb_build_object('oid', i.inhrelid::int8, 'schema', pn.nspname::text, 'name', p.relname::text)
                      ORDER BY i.inhrelid)
     FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
     WHERE i.inhparent = c.oid), '[]'::jsonb))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = rel AND c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover', 'cutover_ddl') AND n.nspname NOT LIKE 'pg\_%'
$f$;

-- Stores the table's shape; with emit, writes the change into the log when it differs.
-- Brought up to date silently: a table's partitions, and a new partition's parent (the
-- partition is its own message, not a change of its parent). Silently, a table never
-- seen is not stored: its own command announces it.
CREATE OR REPLACE FUNCTION cutover_ddl.capture_shape(rel oid, tag text, emit boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
  SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
  SET bytea_output = 'hex' AS $f$
DECLARE
  old jsonb;
  new jsonb;
  related oid;
BEGIN
  SELECT shape INTO old FROM cutover_ddl.table_shapes WHERE relid = rel;
  IF old IS NULL AND NOT emit THEN
    RETURN;
  END IF;
  new := cutover_ddl.table_shape(rel);
  IF new IS NULL OR new = old THEN
    RETURN;
  END IF;
  INSERT INTO cutover_ddl.table_shapes VALUES (rel, new) ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape;
  IF emit THEN
    PERFORM cutover_ddl.emit(jsonb_build_object(
      'op', CASE WHEN old IS NULL THEN 'create' ELSE 'alter' END, 'tag', tag, 'old', old, 'new', new,
      'rewritten', EXISTS (SELECT 1 FROM (SELECT rel AS relid UNION SELECT relid FROM pg_partition_tree(rel)) t
                           WHERE t.relid::oid::text = ANY (string_to_array(
                             coalesce(current_setting('cutover_ddl.rewritten', true), ''), ',')))));
  END IF;
  FOR related IN
    SELECT (value->>'oid')::oid FROM jsonb_array_elements(coalesce(old->'partitions', '[]') || (new->'partitions'))
    UNION SELECT inhparent FROM pg_inherits WHERE inhrelid = rel AND old IS NULL
  LOOP
    PERFORM cutover_ddl.capture_shape(related, tag, false);
  END LOOP;
END
$f$;

CREATE OR REPLACE FUNCTION cutover_ddl.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = d.objid), d.objid) AS rel,
           d.command_tag
    FROM pg_event_trigger_ddl_commands() d
    WHERE d.classid = 'pg_class'::regclass
  LOOP
    PERFORM cutover_ddl.capture_shape(r.rel, r.command_tag, true);
  END LOOP;
  PERFORM set_config('cutover_ddl.rewritten', '', true);
EXCEPTION WHEN OTHERS THEN
  -- Never fail the user's DDL: the pipeline stops at this message instead.
  PERFORM cutover_ddl.emit(jsonb_build_object('op', 'error', 'tag', tg_tag, 'message', SQLERRM));
END
$f$;

CREATE OR REPLACE FUNCTION cutover_ddl.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  r record;
BEGIN
  -- Tables that lost a column, an index or a constraint (and still exist) first: a
  -- table dropped with CASCADE takes other tables' foreign keys with it.
  FOR r IN
    SELECT DISTINCT t.relid
    FROM pg_event_trigger_dropped_objects() o JOIN cutover_ddl.table_shapes t
      ON (o.object_type = 'table column' AND t.relid = o.objid)
      OR (o.object_type = 'index'
          AND t.shape->'indexes' @> jsonb_build_array(jsonb_build_object('oid', o.objid::int8)))
      OR (o.object_type = 'table constraint'
          AND t.shape->'constraints' @> jsonb_build_array(jsonb_build_object('oid', o.objid::int8)))
    WHERE NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() x
                      WHERE x.object_type = 'table' AND x.objid = t.relid)
  LOOP
    PERFORM cutover_ddl.capture_shape(r.relid, tg_tag, true);
  END LOOP;
  FOR r IN
    SELECT t.relid, t.shape FROM pg_event_trigger_dropped_objects() o JOIN cutover_ddl.table_shapes t ON t.relid = o.objid
    WHERE o.object_type = 'table'
  LOOP
    DELETE FROM cutover_ddl.table_shapes WHERE relid = r.relid;
    PERFORM cutover_ddl.emit(jsonb_build_object('op', 'drop', 'tag', tg_tag, 'old', r.shape));
  END LOOP;
  -- The parents of dropped partitions, silently.
  FOR r IN
    SELECT t.relid FROM cutover_ddl.table_shapes t, jsonb_array_elements(t.shape->'partitions') p
    WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = (p.value->>'oid')::oid)
  LOOP
    PERFORM cutover_ddl.capture_shape(r.relid, tg_tag, false);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  PERFORM cutover_ddl.emit(jsonb_build_object('op', 'error', 'tag', tg_tag, 'message', SQLERRM));
END
$f$;

DO $d$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'cutover_ddl_command_end') THEN
    -- Installed anew: the shapes start from the catalog as it is.
    DELETE FROM cutover_ddl.table_shapes;
    INSERT INTO cutover_ddl.table_shapes
      SELECT s.relid, s.shape FROM (SELECT oid AS relid, cutover_ddl.table_shape(oid) AS shape FROM pg_class
                                    WHERE relkind IN ('r', 'p')) s
      WHERE s.shape IS NOT NULL;
    CREATE EVENT TRIGGER cutover_ddl_command_end ON ddl_command_end EXECUTE FUNCTION cutover_ddl.on_ddl_command_end();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'cutover_sql_drop') THEN
    CREATE EVENT TRIGGER cutover_sql_drop ON sql_drop EXECUTE FUNCTION cutover_ddl.on_sql_drop();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'cutover_table_rewrite') THEN
    CREATE EVENT TRIGGER cutover_table_rewrite ON table_rewrite EXECUTE FUNCTION cutover_ddl.on_table_rewrite();
  END IF;
END
$d$;
COMMIT;
"#;

/// Removes the capture (when no pipeline reads the database any more).
pub const UNINSTALL: &str = "DROP EVENT TRIGGER IF EXISTS cutover_ddl_command_end; \
     DROP EVENT TRIGGER IF EXISTS cutover_sql_drop; DROP EVENT TRIGGER IF EXISTS cutover_table_rewrite; \
     DROP SCHEMA IF EXISTS cutover_ddl CASCADE";

#[derive(Clone, Debug, Deserialize, PartialEq)]
struct Name {
    schema: String,
    name: String,
}

impl Name {
    fn table(&self) -> TableName {
        TableName::new(&self.schema, &self.name)
    }
}

#[derive(Clone, Debug, Deserialize)]
struct ShapeColumn {
    attnum: i32,
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    not_null: bool,
    expression: Option<String>,
    generated: bool,
    identity: bool,
    /// The type (or its element type) is not built in.
    #[serde(default)]
    user_type: bool,
    /// PostgreSQL's array text of the one value rows that predate the column hold.
    missing: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Definition {
    oid: i64,
    name: String,
    definition: String,
    /// A foreign key's referenced table.
    #[serde(default)]
    references: Option<Name>,
}

#[derive(Clone, Debug, Deserialize)]
struct Partition {
    oid: i64,
    schema: String,
    name: String,
}

/// A table as the trigger describes it.
#[derive(Clone, Debug, Deserialize)]
struct Shape {
    schema: String,
    name: String,
    kind: String,
    parent: Option<Name>,
    root: Option<Name>,
    bound: Option<String>,
    partition_key: Option<String>,
    columns: Vec<ShapeColumn>,
    indexes: Vec<Definition>,
    constraints: Vec<Definition>,
    partitions: Vec<Partition>,
}

impl Shape {
    fn table(&self) -> TableName {
        TableName::new(&self.schema, &self.name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Captured {
    Create {
        statement: String,
        new: Shape,
    },
    // Boxed: the variants' sizes differ by a shape.
    Alter {
        statement: String,
        old: Box<Shape>,
        new: Box<Shape>,
        /// Whether the transaction rewrote the table's rows before this message.
        #[serde(default)]
        rewritten: bool,
    },
    Drop {
        statement: String,
        old: Shape,
    },
    Error {
        tag: String,
        statement: String,
        message: String,
    },
}

/// The key the capture signs its messages with, if it is installed.
pub async fn capture_key(client: &tokio_postgres::Client) -> anyhow::Result<Option<String>> {
    let installed = client
        .query_one("SELECT to_regclass('cutover_ddl.capture_key') IS NOT NULL", &[])
        .await
        .context("looking for the DDL capture on the source")?;
    if !installed.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT key FROM cutover_ddl.capture_key LIMIT 1", &[])
        .await
        .context("reading the DDL capture's key on the source")?;
    Ok(row.map(|r| r.get(0)))
}

/// Only the key is read before the key is checked.
#[derive(Deserialize)]
struct Signed {
    key: Option<String>,
}

/// The schema changes one captured message means for the pipeline's tables;
/// `selected` says whether the selection matches a table name. A message without the
/// capture's `key` was not written by its trigger (any role may write a logical
/// message): it is ignored, with a warning.
pub fn schema_changes(
    content: &[u8],
    key: &str,
    selected: impl Fn(&TableName) -> bool,
) -> anyhow::Result<Vec<SchemaChange>> {
    let garbled = |e: serde_json::Error| {
        anyhow::anyhow!(
            "a schema change message from the source's DDL capture does not decode ({e}): {}",
            String::from_utf8_lossy(content).chars().take(500).collect::<String>()
        )
    };
    let signed: Signed = serde_json::from_slice(content).map_err(garbled)?;
    if signed.key.as_deref() != Some(key) {
        tracing::warn!(
            "ignored a logical message under the prefix {MESSAGE_PREFIX} that the DDL capture did not write \
             (some session called pg_logical_emit_message with it)"
        );
        return Ok(Vec::new());
    }
    let captured: Captured = serde_json::from_slice(content).map_err(garbled)?;
    // A table of the pipeline: one the selection matches that is not a partition of a
    // table the selection matches (that one's changes arrive as the root's).
    let own_table =
        |shape: &Shape| shape.root.as_ref().is_none_or(|root| !selected(&root.table())) && selected(&shape.table());
    let selected_root = |shape: &Shape| shape.root.as_ref().map(Name::table).filter(|root| selected(root));
    let change = |table: TableName, statement: &str, ops: Vec<SchemaOp>| SchemaChange {
        table,
        statement: statement.to_string(),
        ops,
    };
    Ok(match captured {
        Captured::Error { tag, statement, message } => anyhow::bail!(
            "the source's DDL capture failed on {tag} ({message}) for: {statement}. What the statement changed is \
             unknown, so nothing after it was applied. Make the same change on the target, then run `cutover resync \
             --config … --table <each table it touched>` and list this transaction's position in [stream] skip"
        ),
        Captured::Create { statement, new } => match (selected_root(&new), &new.parent, &new.bound) {
            (Some(root), Some(parent), Some(bound)) => vec![change(
                root,
                &statement,
                vec![SchemaOp::CreatePartition {
                    name: new.table(),
                    parent: parent.table(),
                    bound: bound.clone(),
                    partition_key: new.partition_key.clone(),
                }],
            )],
            _ if own_table(&new) => vec![change(new.table(), &statement, vec![SchemaOp::CreateTable])],
            _ => Vec::new(),
        },
        Captured::Drop { statement, old } => match selected_root(&old) {
            Some(root) => vec![change(root, &statement, vec![SchemaOp::DropPartition { name: old.table() }])],
            None if own_table(&old) => vec![change(old.table(), &statement, vec![SchemaOp::DropTable])],
            None => Vec::new(),
        },
        Captured::Alter { statement, mut old, mut new, rewritten } => {
            // Foreign keys to tables outside the selection are not the target's (it has no
            // table for them to point at), before and after alike.
            let points_out = |k: &Definition| k.references.as_ref().is_some_and(|r| !selected(&r.table()));
            for added in
                new.constraints.iter().filter(|k| points_out(k) && !old.constraints.iter().any(|o| o.oid == k.oid))
            {
                tracing::warn!(table = %new.table(), foreign_key = %added.name, "a foreign key to a table outside the selection is not created on the target");
            }
            for shape in [&mut old, &mut new] {
                shape.constraints.retain(|k| !points_out(k));
            }
            if old.table() != new.table() {
                // Renamed or moved to another schema: the old name is gone, the new one joins.
                let mut changes = Vec::new();
                if own_table(&old) {
                    changes.push(change(old.table(), &statement, vec![SchemaOp::DropTable]));
                }
                if own_table(&new) {
                    changes.push(change(new.table(), &statement, vec![SchemaOp::CreateTable]));
                }
                changes
            } else if own_table(&new) {
                let mut ops = compare(&old, &new);
                if rewritten && ops.iter().any(|op| matches!(op, SchemaOp::SetType { .. })) {
                    // Rewritten: a USING expression may have changed every row, and no row
                    // change is in the log. (Without one the values kept are the cast's.)
                    ops = vec![SchemaOp::CopyAgain {
                        why: "a type change rewrote the table's rows, which the change log does not carry".into(),
                    }];
                }
                let mut changes = vec![change(new.table(), &statement, ops)];
                // A detached partition the selection matches is a table of its own now.
                for partition in &old.partitions {
                    let name = TableName::new(&partition.schema, &partition.name);
                    if !new.partitions.iter().any(|p| p.oid == partition.oid) && selected(&name) {
                        changes.push(change(name, &statement, vec![SchemaOp::CreateTable]));
                    }
                }
                changes.retain(|c| !c.ops.is_empty());
                changes
            } else {
                // A partition's own DDL (an index on one partition): its root's is what the target mirrors.
                Vec::new()
            }
        }
    })
}

/// What turns a table of shape `old` into one of shape `new`, in an order the target
/// can run: what goes first, then renames, column changes, additions, then what comes
/// back. One [`SchemaOp::CopyAgain`] alone when rows changed in a way no op carries.
fn compare(old: &Shape, new: &Shape) -> Vec<SchemaOp> {
    let mut why = Vec::new();
    if old.kind != new.kind || old.partition_key != new.partition_key {
        why.push("its partitioning changed".to_string());
    }
    // Columns renamed (same attribute number), by old name: definitions that name them
    // change their text, not their meaning.
    let column_renames: Vec<(String, String)> = old
        .columns
        .iter()
        .filter_map(|o| {
            new.columns
                .iter()
                .find(|n| n.attnum == o.attnum && n.name != o.name)
                .map(|n| (o.name.clone(), n.name.clone()))
        })
        .collect();
    let renamed = |text: &Option<String>| text.as_deref().map(|t| rename_identifiers(t, &column_renames));
    let mut drops = Vec::new();
    let mut renames = Vec::new();
    let mut alters = Vec::new();
    let mut adds = Vec::new();
    for o in &old.columns {
        match new.columns.iter().find(|n| n.attnum == o.attnum) {
            None => drops.push(SchemaOp::DropColumn { name: o.name.clone() }),
            Some(n) => {
                if n.name != o.name {
                    renames.push((o.name.clone(), n.name.clone()));
                }
                if n.generated != o.generated || n.identity != o.identity {
                    why.push(format!("column {} changed how it is generated", n.name));
                } else if n.type_name != o.type_name {
                    if keeps_values(&o.type_name, &n.type_name) {
                        alters.push(SchemaOp::SetType { column: n.name.clone(), type_name: n.type_name.clone() });
                    } else {
                        why.push(format!("column {} changed type from {} to {}", n.name, o.type_name, n.type_name));
                    }
                } else if n.generated && n.expression != renamed(&o.expression) {
                    why.push(format!("column {} changed its generation expression", n.name));
                }
                if !n.generated && !n.identity && n.expression != o.expression {
                    alters.push(SchemaOp::SetDefault { column: n.name.clone(), default: n.expression.clone() });
                }
                if n.not_null != o.not_null {
                    alters.push(SchemaOp::SetNotNull { column: n.name.clone(), not_null: n.not_null });
                }
            }
        }
    }
    for n in new.columns.iter().filter(|n| !old.columns.iter().any(|o| o.attnum == n.attnum)) {
        if n.user_type {
            // Created on the source (an enum, a domain, an extension's): the target may lack it,
            // and only the copy creates types.
            why.push(format!("column {} was added with a type of the source's own ({})", n.name, n.type_name));
            continue;
        }
        let existing = if n.generated {
            ExistingRows::Generated
        } else if let Some(missing) = &n.missing {
            match single_array_element(missing) {
                Some(Some(value)) => ExistingRows::Value(value),
                Some(None) => ExistingRows::Null,
                None => {
                    why.push(format!(
                        "column {} was added with a value the capture could not read ({missing})",
                        n.name
                    ));
                    continue;
                }
            }
        } else if n.expression.is_none() && !n.identity {
            ExistingRows::Null
        } else {
            // A volatile default or an identity: the source wrote a value into each row.
            why.push(format!("column {} was added with values computed row by row", n.name));
            continue;
        };
        adds.push(SchemaOp::AddColumn {
            name: n.name.clone(),
            type_name: n.type_name.clone(),
            not_null: n.not_null,
            expression: n.expression.clone(),
            existing,
        });
    }
    let mut ops = Vec::new();
    let (index_drops, index_renames, index_adds) = compare_definitions(&old.indexes, &new.indexes, &column_renames);
    let (constraint_drops, constraint_renames, constraint_adds) =
        compare_definitions(&old.constraints, &new.constraints, &column_renames);
    ops.extend(constraint_drops.into_iter().map(|name| SchemaOp::DropConstraint { name }));
    ops.extend(index_drops.into_iter().map(|name| SchemaOp::DropIndex { name }));
    ops.extend(drops);
    // Two renames in one command may swap names: through a temporary name each, then.
    if renames.len() > 1 {
        for (i, (from, _)) in renames.iter_mut().enumerate() {
            let temporary = format!("cutover_rename_{i}");
            ops.push(SchemaOp::RenameColumn { from: std::mem::replace(from, temporary.clone()), to: temporary });
        }
    }
    ops.extend(renames.into_iter().map(|(from, to)| SchemaOp::RenameColumn { from, to }));
    ops.extend(alters);
    ops.extend(adds);
    ops.extend(index_renames.into_iter().map(|(from, to)| SchemaOp::RenameIndex { from, to }));
    ops.extend(constraint_renames.into_iter().map(|(from, to)| SchemaOp::RenameConstraint { from, to }));
    ops.extend(index_adds.into_iter().map(|(name, definition)| SchemaOp::CreateIndex { name, definition }));
    ops.extend(constraint_adds.into_iter().map(|(name, definition)| SchemaOp::AddConstraint { name, definition }));
    for p in &old.partitions {
        if !new.partitions.iter().any(|n| n.oid == p.oid) {
            ops.push(SchemaOp::DetachPartition { name: TableName::new(&p.schema, &p.name), parent: new.table() });
        }
    }
    if new.partitions.iter().any(|n| !old.partitions.iter().any(|p| p.oid == n.oid)) {
        why.push("a partition was attached (its rows are not in the change log)".to_string());
    }
    if !why.is_empty() {
        return vec![SchemaOp::CopyAgain { why: why.join("; ") }];
    }
    ops
}

/// `(dropped names, renames, added (name, definition))` between two lists keyed by OID;
/// a definition that changed under the same OID, other than by its own name or by the
/// `column_renames` it names, is dropped and added again.
#[allow(clippy::type_complexity)]
fn compare_definitions(
    old: &[Definition],
    new: &[Definition],
    column_renames: &[(String, String)],
) -> (Vec<String>, Vec<(String, String)>, Vec<(String, String)>) {
    let (mut drops, mut renames, mut adds) = (Vec::new(), Vec::new(), Vec::new());
    for o in old {
        let Some(n) = new.iter().find(|n| n.oid == o.oid) else {
            drops.push(o.name.clone());
            continue;
        };
        let mut expected = column_renames.to_vec();
        if n.name != o.name {
            // An index's definition holds its name.
            expected.push((o.name.clone(), n.name.clone()));
        }
        if rename_identifiers(&o.definition, &expected) != n.definition {
            drops.push(o.name.clone());
            adds.push((n.name.clone(), n.definition.clone()));
        } else if n.name != o.name {
            renames.push((o.name.clone(), n.name.clone()));
        }
    }
    adds.extend(
        new.iter().filter(|n| !old.iter().any(|o| o.oid == n.oid)).map(|n| (n.name.clone(), n.definition.clone())),
    );
    (drops, renames, adds)
}

/// `text` (as `pg_get_indexdef` and its kind print SQL) with each identifier that is a
/// `from` of `renames` replaced by its `to`, quoted the way PostgreSQL prints it; string
/// literals are left alone. An identifier PostgreSQL would quote as a keyword prints
/// otherwise here: the comparison then sees a change, and the safe way is taken.
fn rename_identifiers(text: &str, renames: &[(String, String)]) -> String {
    let print = |name: &str| {
        let bare = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
        if bare {
            name.to_string()
        } else {
            format!("\"{}\"", name.replace('"', "\"\""))
        }
    };
    let renamed = |name: &str| renames.iter().find(|(from, _)| from == name).map(|(_, to)| print(to));
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            '\'' | '"' => {
                // Through the closing quote; a doubled quote is one inside.
                let mut content = String::new();
                let mut end = text.len();
                while let Some((i, d)) = chars.next() {
                    if d == c {
                        if chars.peek().is_some_and(|&(_, e)| e == c) {
                            chars.next();
                            content.push(c);
                            continue;
                        }
                        end = i + c.len_utf8();
                        break;
                    }
                    content.push(d);
                }
                let token = &text[start..end];
                match (c, renamed(&content)) {
                    ('"', Some(to)) => out.push_str(&to),
                    _ => out.push_str(token),
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut end = start + c.len_utf8();
                while let Some(&(i, d)) = chars.peek() {
                    if !(d.is_alphanumeric() || d == '_' || d == '$') {
                        break;
                    }
                    end = i + d.len_utf8();
                    chars.next();
                }
                let token = &text[start..end];
                out.push_str(&renamed(token).unwrap_or_else(|| token.to_string()));
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether changing a column from type `old` to `new` keeps every value's text, so the
/// target converts what it holds to exactly what the source holds.
fn keeps_values(old: &str, new: &str) -> bool {
    let parse = |t: &str| -> (String, Vec<u32>) {
        match t.split_once('(') {
            Some((base, rest)) if rest.ends_with(')') => {
                (base.to_string(), rest[..rest.len() - 1].split(',').filter_map(|n| n.trim().parse().ok()).collect())
            }
            _ => (t.to_string(), Vec::new()),
        }
    };
    let (old_base, old_mods) = parse(old);
    let (new_base, new_mods) = parse(new);
    let integer_rank = |t: &str| ["smallint", "integer", "bigint"].iter().position(|i| *i == t);
    match (old_base.as_str(), new_base.as_str()) {
        (o, n) if integer_rank(o).is_some() && integer_rank(n).is_some() => integer_rank(o) <= integer_rank(n),
        ("character varying", "text") => true,
        ("character varying", "character varying") => {
            new_mods.is_empty() || (old_mods.len() == 1 && new_mods.len() == 1 && new_mods[0] >= old_mods[0])
        }
        ("numeric", "numeric") => {
            new_mods.is_empty()
                || (old_mods.len() == 2
                    && new_mods.len() == 2
                    && new_mods[1] == old_mods[1]
                    && new_mods[0] >= old_mods[0])
        }
        _ => false,
    }
}

/// The one element of a PostgreSQL array's text form (`{abc}`, `{"a b"}`, `{NULL}`):
/// `Some(None)` for NULL, `None` when the text is not a one-element array.
fn single_array_element(text: &str) -> Option<Option<String>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    if let Some(quoted) = inner.strip_prefix('"') {
        let quoted = quoted.strip_suffix('"')?;
        let mut value = String::with_capacity(quoted.len());
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next()?),
                '"' => return None,
                c => value.push(c),
            }
        }
        return Some(Some(value));
    }
    if inner.is_empty() || inner.contains([',', '"', '{', '}', '\\']) {
        return None;
    }
    Some((!inner.eq_ignore_ascii_case("NULL")).then(|| inner.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(
        columns: serde_json::Value,
        indexes: serde_json::Value,
        partitions: serde_json::Value,
    ) -> serde_json::Value {
        serde_json::json!({
            "schema": "public", "name": "t", "kind": "r", "parent": null, "root": null, "bound": null,
            "partition_key": null, "columns": columns, "indexes": indexes, "constraints": [], "partitions": partitions
        })
    }

    fn column(attnum: i32, name: &str, type_name: &str) -> serde_json::Value {
        serde_json::json!({"attnum": attnum, "name": name, "type": type_name, "not_null": false, "expression": null,
                           "generated": false, "identity": false, "missing": null})
    }

    fn alter(old: serde_json::Value, new: serde_json::Value) -> Vec<SchemaChange> {
        let message = serde_json::json!({"key": "k", "op": "alter", "tag": "ALTER TABLE", "statement": "ALTER …", "old": old, "new": new});
        schema_changes(message.to_string().as_bytes(), "k", |_| true).expect("decodes")
    }

    fn ops(changes: Vec<SchemaChange>) -> Vec<SchemaOp> {
        changes.into_iter().flat_map(|c| c.ops).collect()
    }

    #[test]
    fn columns_are_followed_by_attribute_number() {
        let old = shape(
            serde_json::json!([column(1, "id", "integer"), column(2, "a", "text"), column(3, "b", "text")]),
            serde_json::json!([]),
            serde_json::json!([]),
        );
        let mut added = column(4, "c", "integer");
        added["expression"] = "7".into();
        added["missing"] = "{7}".into();
        let new = shape(
            serde_json::json!([column(1, "id", "bigint"), column(2, "renamed", "text"), added]),
            serde_json::json!([]),
            serde_json::json!([]),
        );
        assert_eq!(
            ops(alter(old, new)),
            vec![
                SchemaOp::DropColumn { name: "b".into() },
                SchemaOp::RenameColumn { from: "a".into(), to: "renamed".into() },
                SchemaOp::SetType { column: "id".into(), type_name: "bigint".into() },
                SchemaOp::AddColumn {
                    name: "c".into(),
                    type_name: "integer".into(),
                    not_null: false,
                    expression: Some("7".into()),
                    existing: ExistingRows::Value("7".into()),
                },
            ]
        );
    }

    #[test]
    fn swapped_names_go_through_temporary_ones() {
        let old = shape(
            serde_json::json!([column(1, "a", "text"), column(2, "b", "text")]),
            serde_json::json!([]),
            serde_json::json!([]),
        );
        let new = shape(
            serde_json::json!([column(1, "b", "text"), column(2, "a", "text")]),
            serde_json::json!([]),
            serde_json::json!([]),
        );
        let rename = |from: &str, to: &str| SchemaOp::RenameColumn { from: from.into(), to: to.into() };
        assert_eq!(
            ops(alter(old, new)),
            vec![
                rename("a", "cutover_rename_0"),
                rename("b", "cutover_rename_1"),
                rename("cutover_rename_0", "b"),
                rename("cutover_rename_1", "a"),
            ]
        );
    }

    #[test]
    fn rows_the_log_does_not_carry_mean_a_copy_again() {
        let base = || serde_json::json!([column(1, "id", "integer"), column(2, "price", "numeric(10,2)")]);
        let retyped = serde_json::json!([column(1, "id", "integer"), column(2, "price", "numeric(10,4)")]);
        let changed = ops(alter(
            shape(base(), serde_json::json!([]), serde_json::json!([])),
            shape(retyped, serde_json::json!([]), serde_json::json!([])),
        ));
        assert!(matches!(&changed[..], [SchemaOp::CopyAgain { why }] if why.contains("numeric(10,4)")), "{changed:?}");
        let mut volatile = column(3, "at", "timestamp with time zone");
        volatile["expression"] = "clock_timestamp()".into();
        let mut with_volatile = base();
        if let Some(columns) = with_volatile.as_array_mut() {
            columns.push(volatile);
        }
        let changed = ops(alter(
            shape(base(), serde_json::json!([]), serde_json::json!([])),
            shape(with_volatile, serde_json::json!([]), serde_json::json!([])),
        ));
        assert!(matches!(&changed[..], [SchemaOp::CopyAgain { why }] if why.contains("row by row")), "{changed:?}");
        let attached = serde_json::json!([{"oid": 9, "schema": "public", "name": "t_2027"}]);
        let changed = ops(alter(
            shape(base(), serde_json::json!([]), serde_json::json!([])),
            shape(base(), serde_json::json!([]), attached),
        ));
        assert!(matches!(&changed[..], [SchemaOp::CopyAgain { why }] if why.contains("attached")), "{changed:?}");
    }

    #[test]
    fn indexes_are_followed_by_oid() {
        let index = |oid: i64, name: &str| serde_json::json!({"oid": oid, "name": name, "definition": format!("CREATE INDEX {name} ON public.t USING btree (id)")});
        let cols = || serde_json::json!([column(1, "id", "integer")]);
        let old = shape(cols(), serde_json::json!([index(1, "a"), index(2, "b")]), serde_json::json!([]));
        let new = shape(cols(), serde_json::json!([index(2, "b2"), index(3, "c")]), serde_json::json!([]));
        assert_eq!(
            ops(alter(old, new)),
            vec![
                SchemaOp::DropIndex { name: "a".into() },
                SchemaOp::RenameIndex { from: "b".into(), to: "b2".into() },
                SchemaOp::CreateIndex {
                    name: "c".into(),
                    definition: "CREATE INDEX c ON public.t USING btree (id)".into()
                },
            ]
        );
    }

    #[test]
    fn a_column_of_a_type_the_source_made_copies_the_table_again() {
        let cols = serde_json::json!([column(1, "id", "integer")]);
        let mut mood = column(2, "mood", "mood[]");
        mood["user_type"] = true.into();
        let changed = ops(alter(
            shape(cols.clone(), serde_json::json!([]), serde_json::json!([])),
            shape(serde_json::json!([column(1, "id", "integer"), mood]), serde_json::json!([]), serde_json::json!([])),
        ));
        assert!(matches!(&changed[..], [SchemaOp::CopyAgain { why }] if why.contains("mood[]")), "{changed:?}");
    }

    #[test]
    fn a_renamed_column_renames_what_names_it_and_nothing_else() {
        let definition =
            |oid: i64, name: &str, text: &str| serde_json::json!({"oid": oid, "name": name, "definition": text});
        let mut old = shape(
            serde_json::json!([column(1, "id", "integer"), column(2, "Code", "text")]),
            serde_json::json!([definition(
                5,
                "by_code",
                "CREATE INDEX by_code ON public.t USING btree (\"Code\", id)"
            )]),
            serde_json::json!([]),
        );
        old["constraints"] = serde_json::json!([
            definition(6, "t_pkey", "PRIMARY KEY (id)"),
            definition(7, "t_check", "CHECK ((\"Code\" <> 'id'::text))"),
        ]);
        let mut new = shape(
            serde_json::json!([column(1, "tid", "integer"), column(2, "code", "text")]),
            serde_json::json!([definition(5, "by_code", "CREATE INDEX by_code ON public.t USING btree (code, tid)")]),
            serde_json::json!([]),
        );
        new["constraints"] = serde_json::json!([
            definition(6, "t_pkey", "PRIMARY KEY (tid)"),
            definition(7, "t_check", "CHECK ((code <> 'id'::text))"),
        ]);
        let changed = ops(alter(old.clone(), new.clone()));
        assert!(changed.iter().all(|op| matches!(op, SchemaOp::RenameColumn { .. })), "{changed:?}");
        // A literal that the rename does not touch on the source is no rename.
        new["constraints"][1]["definition"] = "CHECK ((code <> 'tid'::text))".into();
        let changed = ops(alter(old, new));
        assert!(changed.contains(&SchemaOp::DropConstraint { name: "t_check".into() }), "{changed:?}");
    }

    #[test]
    fn renamed_tables_leave_and_join_and_partitions_follow_their_root() {
        let cols = serde_json::json!([column(1, "id", "integer")]);
        let old = shape(cols.clone(), serde_json::json!([]), serde_json::json!([]));
        let mut new = old.clone();
        new["name"] = "t_new".into();
        let changes = alter(old, new);
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].table.name.as_str(), &changes[0].ops[0]), ("t", &SchemaOp::DropTable));
        assert_eq!((changes[1].table.name.as_str(), &changes[1].ops[0]), ("t_new", &SchemaOp::CreateTable));

        let mut partition = shape(cols, serde_json::json!([]), serde_json::json!([]));
        partition["name"] = "t_2027".into();
        partition["parent"] = serde_json::json!({"schema": "public", "name": "t"});
        partition["root"] = serde_json::json!({"schema": "public", "name": "t"});
        partition["bound"] = "FOR VALUES FROM (1) TO (10)".into();
        let message = serde_json::json!({"key": "k", "op": "create", "tag": "CREATE TABLE", "statement": "CREATE …", "new": partition});
        let changes = schema_changes(message.to_string().as_bytes(), "k", |_| true).expect("decodes");
        assert_eq!(changes[0].table, TableName::new("public", "t"));
        assert!(matches!(&changes[0].ops[0], SchemaOp::CreatePartition { name, .. } if name.name == "t_2027"));
        let message =
            serde_json::json!({"key": "k", "op": "drop", "tag": "DROP TABLE", "statement": "DROP …", "old": partition});
        let only_partitions = |t: &TableName| t.name != "t";
        let changes = schema_changes(message.to_string().as_bytes(), "k", only_partitions).expect("decodes");
        assert_eq!(changes[0].table.name, "t_2027");
        assert_eq!(changes[0].ops, vec![SchemaOp::DropTable]);
    }

    #[test]
    fn messages_without_the_key_are_ignored_and_a_rewritten_type_change_copies_again() {
        let cols = serde_json::json!([column(1, "id", "integer"), column(2, "a", "integer")]);
        let retyped = serde_json::json!([column(1, "id", "integer"), column(2, "a", "bigint")]);
        let (old, new) = (
            shape(cols, serde_json::json!([]), serde_json::json!([])),
            shape(retyped, serde_json::json!([]), serde_json::json!([])),
        );
        let drop = |key: serde_json::Value| serde_json::json!({"key": key, "op": "drop", "tag": "DROP TABLE", "statement": "DROP …", "old": old.clone()});
        for forged in [drop("guess".into()), drop(serde_json::Value::Null)] {
            assert!(schema_changes(forged.to_string().as_bytes(), "k", |_| true).expect("decodes").is_empty());
        }
        assert_eq!(
            ops(schema_changes(drop("k".into()).to_string().as_bytes(), "k", |_| true).expect("decodes")),
            vec![SchemaOp::DropTable]
        );
        assert!(matches!(&ops(alter(old.clone(), new.clone()))[..], [SchemaOp::SetType { .. }]));
        let message = serde_json::json!({"key": "k", "op": "alter", "tag": "ALTER TABLE", "statement": "ALTER …",
                                         "old": old, "new": new, "rewritten": true});
        let changes = schema_changes(message.to_string().as_bytes(), "k", |_| true).expect("decodes");
        assert!(matches!(&ops(changes)[..], [SchemaOp::CopyAgain { why }] if why.contains("rewrote")));
    }

    #[test]
    fn garbled_messages_and_capture_errors_stop_with_the_statement() {
        let error = schema_changes(b"{\"op\":\"alter\"", "k", |_| true).expect_err("garbled");
        assert!(error.to_string().contains("does not decode"));
        let message =
            br#"{"key": "k", "op": "error", "tag": "ALTER TABLE", "statement": "ALTER TABLE x", "message": "boom"}"#;
        let error = schema_changes(message, "k", |_| true).expect_err("capture error");
        assert!(error.to_string().contains("ALTER TABLE x") && error.to_string().contains("boom"));
    }

    #[test]
    fn value_keeping_type_changes_and_array_elements() {
        assert!(keeps_values("character varying(10)", "character varying(20)"));
        assert!(keeps_values("character varying(10)", "text"));
        assert!(keeps_values("integer", "bigint"));
        assert!(keeps_values("numeric(10,2)", "numeric(12,2)"));
        assert!(!keeps_values("character varying(20)", "character varying(10)"));
        assert!(!keeps_values("bigint", "integer"));
        assert!(!keeps_values("real", "double precision"));
        assert!(!keeps_values("timestamp without time zone", "timestamp with time zone"));
        assert_eq!(single_array_element("{7}"), Some(Some("7".into())));
        assert_eq!(single_array_element(r#"{"a \"b\" \\ c"}"#), Some(Some(r#"a "b" \ c"#.into())));
        assert_eq!(single_array_element("{NULL}"), Some(None));
        assert_eq!(single_array_element(r#"{"NULL"}"#), Some(Some("NULL".into())));
        assert_eq!(single_array_element("{1,2}"), None);
        assert_eq!(single_array_element("7"), None);
    }
}
