//! Reads the source's catalog: the tables to replicate with their columns,
//! identity, constraints and indexes, plus enum types and sequences.

use std::collections::HashMap;

use anyhow::Context as _;
use tokio_postgres::GenericClient;

use crate::change::{Column, Identity, TableName, TableSchema};
use crate::schema::{
    quote_ident, quote_table, signature, ColumnDefinition, EnumType, Extension, GeneratedColumn, Partition,
    Partitioning, Sequence, SourceSchema, TableDefinition, UserType, UserTypeKind,
};

/// First OID a user object can have; types below it are built in.
const FIRST_NORMAL_OID: u32 = 16384;

const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover', 'cutover_ddl') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Reads every selected table (`include` decides on `schema.table`).
pub async fn read_schema(client: &impl GenericClient, include: impl Fn(&str) -> bool) -> anyhow::Result<SourceSchema> {
    let mut schema = SourceSchema::default();
    // Plain and partitioned tables, partitions included: a partition is a table of its own
    // when the selection matches it but none of its ancestors. Sizes of a partitioned table
    // are its partitions' (it holds no rows itself; a plain table has no partition tree).
    let rows = client
        .query(
            &format!(
                "SELECT c.oid, n.nspname, c.relname, c.relreplident::text, \
                        coalesce(CASE WHEN c.relkind = 'p' THEN s.tuples ELSE greatest(c.reltuples, 0) END, 0)::int8, \
                        coalesce(CASE WHEN c.relkind = 'p' THEN s.pages \
                                 ELSE pg_relation_size(c.oid) / current_setting('block_size')::int8 END, 0)::int8, \
                        ARRAY(SELECT an.nspname || '.' || ac.relname FROM pg_partition_ancestors(c.oid) a \
                              JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace \
                              WHERE a.relid <> c.oid), \
                        c.relkind = 'p' \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, \
                 LATERAL (SELECT sum(greatest(pc.reltuples, 0)) AS tuples, \
                                 sum(pg_relation_size(pc.oid) / current_setting('block_size')::int8) AS pages \
                          FROM pg_partition_tree(c.oid) t JOIN pg_class pc ON pc.oid = t.relid \
                          WHERE t.isleaf AND c.relkind = 'p') s \
                 WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS} \
                 ORDER BY n.nspname, c.relname"
            ),
            &[],
        )
        .await
        .context("reading the source's tables")?;
    for row in rows {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        let ancestors: Vec<String> = row.get(6);
        if !include(&name.to_string()) || ancestors.iter().any(|a| include(a)) {
            continue;
        }
        let oid: u32 = row.get(0);
        let replident: String = row.get(3);
        let mut table =
            read_table(client, oid, name, &replident, row.get::<_, i64>(4), row.get::<_, i64>(5), &include).await?;
        if row.get::<_, bool>(7) {
            table.partitioning = Some(read_partitioning(client, oid, &table.schema.name).await?);
        }
        schema.tables.push(table);
    }
    schema.enums = read_enums(client).await?;
    (schema.types, schema.extensions) = read_types(client, &schema.tables).await?;
    schema.sequences = read_sequences(client, &schema.tables).await?;
    Ok(schema)
}

/// The [`signature`] of the table of that name as the client's transaction sees the
/// catalog (inside an imported snapshot: as of the snapshot); `None` if it had no table of
/// that name. Only columns are read: an index or constraint dropped since has no
/// definition to print any more.
pub(super) async fn signature_as_seen(
    client: &impl GenericClient,
    name: &TableName,
) -> anyhow::Result<Option<Vec<String>>> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema, &name.name],
        )
        .await
        .with_context(|| format!("reading {name} in the catalog"))?;
    let Some(row) = row else { return Ok(None) };
    let replident: String = row.get(1);
    let TableColumns { columns, generated, .. } = read_columns(client, row.get(0), name, &replident).await?;
    Ok(Some(signature(&columns, &generated)))
}

/// A table's columns as its catalog rows give them, without reading indexes or constraints.
struct TableColumns {
    columns: Vec<Column>,
    definitions: Vec<ColumnDefinition>,
    generated: Vec<GeneratedColumn>,
    has_user_types: bool,
    identity: Identity,
}

async fn read_columns(
    client: &impl GenericClient,
    oid: u32,
    name: &TableName,
    replident: &str,
) -> anyhow::Result<TableColumns> {
    let context = || format!("reading the columns of {name}");
    let column_rows = client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                    pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, \
                    (a.atttypid >= $2 OR t.typelem >= $2), \
                    coalesce(a.attnum = ANY(i.indkey), false), a.attgenerated::text \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid, &FIRST_NORMAL_OID],
        )
        .await
        .with_context(context)?;
    let mut columns = Vec::new();
    let mut definitions = Vec::new();
    let mut has_user_types = false;
    let mut has_primary_key = false;
    let mut generated = Vec::new();
    for (position, row) in column_rows.iter().enumerate() {
        if row.get::<_, &str>(8) == "s" {
            generated.push(GeneratedColumn {
                name: row.get(0),
                type_name: row.get(1),
                expression: row.get::<_, Option<String>>(4).unwrap_or_default(),
                position,
            });
            continue;
        }
        let in_primary_key: bool = row.get(7);
        has_primary_key |= in_primary_key;
        has_user_types |= row.get::<_, bool>(6);
        columns.push(Column {
            name: row.get(0),
            type_name: row.get(1),
            type_oid: row.get(2),
            is_key: in_primary_key,
            default: row.get(4),
        });
        let identity: String = row.get(5);
        definitions.push(ColumnDefinition {
            not_null: row.get(3),
            identity: identity.chars().next(),
            source_type: None,
            loss: None,
        });
    }
    let identity = match (replident, has_primary_key) {
        ("d", true) | ("f", true) => Identity::Key,
        ("f", false) => Identity::Full,
        ("i", _) => {
            let key_columns = client
                .query(
                    "SELECT a.attname FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = $1 AND i.indisreplident",
                    &[&oid],
                )
                .await
                .with_context(context)?;
            for column in &mut columns {
                column.is_key = key_columns.iter().any(|r| r.get::<_, &str>(0) == column.name);
            }
            Identity::Key
        }
        _ => Identity::Nothing,
    };
    Ok(TableColumns { columns, definitions, generated, has_user_types, identity })
}

async fn read_table(
    client: &impl GenericClient,
    oid: u32,
    name: TableName,
    replident: &str,
    estimated_rows: i64,
    pages: i64,
    include: impl Fn(&str) -> bool,
) -> anyhow::Result<TableDefinition> {
    let context = || format!("reading the columns of {name}");
    let TableColumns { columns, definitions, generated, has_user_types, identity } =
        read_columns(client, oid, &name, replident).await?;
    let constraint_rows = client
        .query(
            "SELECT k.conname, k.contype::text, pg_get_constraintdef(k.oid), rn.nspname || '.' || r.relname \
             FROM pg_constraint k LEFT JOIN pg_class r ON r.oid = k.confrelid \
             LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE k.conrelid = $1 AND k.contype IN ('p', 'u', 'c', 'x', 'f') ORDER BY k.conname",
            &[&oid],
        )
        .await
        .with_context(context)?;
    let mut primary_key = None;
    let mut constraints = Vec::new();
    let mut foreign_keys = Vec::new();
    for row in constraint_rows {
        let entry = (row.get::<_, String>(0), row.get::<_, String>(2));
        match row.get::<_, &str>(1) {
            "p" => primary_key = Some(entry),
            // The target has no table outside the selection for the key to point at.
            "f" => match row.get::<_, Option<String>>(3) {
                Some(references) if !include(&references) => tracing::warn!(
                    table = %name, foreign_key = %entry.0, %references,
                    "a foreign key to a table outside the selection is not created on the target"
                ),
                _ => foreign_keys.push(entry),
            },
            _ => constraints.push(entry),
        }
    }
    let index_rows = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
             WHERE i.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid) \
             ORDER BY i.indexrelid",
            &[&oid],
        )
        .await
        .with_context(context)?;
    // A partition's parent is its partitioned table, described as partitioning instead.
    let inherits = client
        .query(
            "SELECT pn.nspname::text, pc.relname::text FROM pg_inherits i \
             JOIN pg_class pc ON pc.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace \
             WHERE i.inhrelid = $1 AND NOT (SELECT relispartition FROM pg_class WHERE oid = $1) \
             ORDER BY i.inhseqno",
            &[&oid],
        )
        .await
        .with_context(context)?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let key_span = match integer_key(&columns, identity) {
        Some(key) if u64::try_from(pages).unwrap_or(0) >= 2 * super::reader::CHUNK_MIN_PAGES => {
            let sql = format!("SELECT min({key})::int8, max({key})::int8 FROM ONLY {}", quote_table(&name));
            let row = client.query_one(&sql, &[]).await.with_context(context)?;
            row.get::<_, Option<i64>>(0).zip(row.get::<_, Option<i64>>(1))
        }
        _ => None,
    };
    Ok(TableDefinition {
        schema: TableSchema { name, columns, identity },
        columns: definitions,
        primary_key,
        constraints,
        foreign_keys,
        indexes: index_rows.iter().map(|r| r.get(0)).collect(),
        estimated_rows: u64::try_from(estimated_rows).unwrap_or(0),
        pages: u64::try_from(pages).unwrap_or(0),
        has_user_types,
        partitioning: None,
        generated,
        inherits,
        key_span,
    })
}

/// The key column, quoted, when the row identity is a single `smallint`, `integer` or
/// `bigint` column.
fn integer_key(columns: &[Column], identity: Identity) -> Option<String> {
    let mut keys = columns.iter().filter(|c| c.is_key);
    match (identity, keys.next(), keys.next()) {
        (Identity::Key, Some(key), None) if matches!(key.type_oid, 20 | 21 | 23) => Some(quote_ident(&key.name)),
        _ => None,
    }
}

/// Table-like relations no publication carries, so never copied or streamed: materialized
/// views and foreign tables, each with what it is.
pub(super) async fn uncopied_relations(client: &impl GenericClient) -> anyhow::Result<Vec<(TableName, String)>> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, CASE c.relkind WHEN 'm' THEN 'materialized view' \
                        ELSE 'foreign table' END \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('m', 'f') AND {SYSTEM_SCHEMAS} ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .context("reading the source's materialized views and foreign tables")?;
    Ok(rows.iter().map(|r| (TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)), r.get(2))).collect())
}

/// A partitioned table's key and its partitions, parents before their own partitions.
async fn read_partitioning(client: &impl GenericClient, oid: u32, name: &TableName) -> anyhow::Result<Partitioning> {
    let context = || format!("reading the partitions of {name}");
    let key: String =
        client.query_one("SELECT pg_get_partkeydef($1::oid)", &[&oid]).await.with_context(context)?.get(0);
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, pn.nspname::text, pc.relname::text, \
                    pg_get_expr(c.relpartbound, c.oid), \
                    CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END \
             FROM pg_partition_tree($1::oid::regclass) t \
             JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class pc ON pc.oid = t.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace \
             WHERE t.level > 0 ORDER BY t.level, n.nspname, c.relname",
            &[&oid],
        )
        .await
        .with_context(context)?;
    let partitions = rows
        .iter()
        .map(|r| Partition {
            name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            parent: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            bound: r.get(4),
            key: r.get(5),
        })
        .collect();
    Ok(Partitioning { key, partitions })
}

/// The domains, composite and range types the tables' columns use (through arrays,
/// domains, composites and ranges, to any depth), each after the types it is made of; and
/// the source database's extensions, each with the columns whose types it provides.
async fn read_types(
    client: &impl GenericClient,
    tables: &[TableDefinition],
) -> anyhow::Result<(Vec<UserType>, Vec<Extension>)> {
    let names: Vec<String> = tables.iter().map(|t| quote_table(&t.schema.name)).collect();
    let context = || "reading the source's user-defined types";
    // Every type reachable from the columns, with the types each is made of.
    let rows = client
        .query(
            "WITH RECURSIVE reach(oid, used_by) AS ( \
                 SELECT a.atttypid, cn.nspname || '.' || c.relname || '.' || a.attname \
                 FROM unnest($1::text[]) AS n(name) JOIN pg_class c ON c.oid = n.name::regclass \
                 JOIN pg_namespace cn ON cn.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
               UNION \
                 SELECT d.part, r.used_by FROM reach r JOIN pg_type t ON t.oid = r.oid, \
                 LATERAL (SELECT t.typelem AS part WHERE t.typelem <> 0 \
                          UNION ALL SELECT t.typbasetype WHERE t.typbasetype <> 0 \
                          UNION ALL SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = t.typrelid \
                                AND t.typtype = 'c' AND a.attnum > 0 AND NOT a.attisdropped \
                          UNION ALL SELECT g.rngsubtype FROM pg_range g WHERE g.rngtypid = t.oid) d \
             ) \
             SELECT t.oid, n.nspname::text, t.typname::text, t.typtype::text, t.typcategory = 'A', \
                    min(r.used_by), \
                    (SELECT e.extname::text FROM pg_depend dep JOIN pg_extension e ON e.oid = dep.refobjid \
                     WHERE dep.classid = 'pg_type'::regclass AND dep.objid = t.oid AND dep.deptype = 'e'), \
                    ARRAY(SELECT x FROM (SELECT t.typelem UNION ALL SELECT t.typbasetype \
                          UNION ALL SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = t.typrelid \
                                AND t.typtype = 'c' AND a.attnum > 0 AND NOT a.attisdropped \
                          UNION ALL SELECT g.rngsubtype FROM pg_range g WHERE g.rngtypid = t.oid) parts(x) WHERE x <> 0) \
             FROM reach r JOIN pg_type t ON t.oid = r.oid JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.oid >= $2 GROUP BY t.oid, n.nspname, t.typname ORDER BY t.oid",
            &[&names, &FIRST_NORMAL_OID],
        )
        .await
        .with_context(context)?;
    let mut extension_users: HashMap<String, Vec<String>> = HashMap::new();
    let mut parts: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut pending: Vec<(u32, TableName, String)> = Vec::new();
    for row in &rows {
        let oid: u32 = row.get(0);
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        let used_by: String = row.get(5);
        parts.insert(oid, row.get(7));
        if let Some(extension) = row.get::<_, Option<String>>(6) {
            extension_users.entry(extension).or_default().push(used_by);
            continue;
        }
        match (row.get::<_, &str>(3), row.get::<_, bool>(4)) {
            // Arrays come with their element type; enums are read on their own.
            (_, true) | ("e", _) => {}
            (kind @ ("d" | "c" | "r"), _) => pending.push((oid, name, kind.to_string())),
            (kind, _) => anyhow::bail!(
                "column {used_by} uses type {name} (typtype {kind}), which cutover cannot create on the target: \
                 create it there first, or leave the table out ([source] exclude)"
            ),
        }
    }
    // Each type after the types it is made of (an array stands for its element).
    let element: HashMap<u32, u32> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(4))
        .filter_map(|r| Some((r.get(0), r.get::<_, Vec<u32>>(7).first().copied()?)))
        .collect();
    let mut ordered: Vec<(u32, TableName, String)> = Vec::new();
    while !pending.is_empty() {
        let placed: Vec<u32> = ordered.iter().map(|(oid, ..)| *oid).collect();
        let waiting: Vec<u32> = pending.iter().map(|(oid, ..)| *oid).collect();
        let ready = pending.iter().position(|(oid, ..)| {
            parts
                .get(oid)
                .into_iter()
                .flatten()
                .map(|p| element.get(p).unwrap_or(p))
                .all(|p| !waiting.contains(p) || placed.contains(p))
        });
        let Some(ready) = ready else {
            anyhow::bail!("the source's types {waiting:?} are made of each other: cutover cannot order their creation");
        };
        ordered.push(pending.remove(ready));
    }
    let mut types = Vec::with_capacity(ordered.len());
    for (oid, name, kind) in ordered {
        types.push(UserType { kind: read_type_kind(client, oid, &kind, &name).await?, name });
    }
    let extensions = client
        .query(
            "SELECT e.extname::text, n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname <> 'plpgsql' ORDER BY e.oid",
            &[],
        )
        .await
        .context("reading the source's extensions")?
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let needed_by = extension_users.remove(&name).unwrap_or_default();
            Extension { name, schema: r.get(1), needed_by }
        })
        .collect();
    Ok((types, extensions))
}

/// What a domain (`d`), composite (`c`) or range (`r`) type is made of.
async fn read_type_kind(
    client: &impl GenericClient,
    oid: u32,
    kind: &str,
    name: &TableName,
) -> anyhow::Result<UserTypeKind> {
    let context = || format!("reading the definition of type {name}");
    Ok(match kind {
        "d" => {
            let row = client
                .query_one(
                    "SELECT format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault, \
                            ARRAY(SELECT c.conname::text FROM pg_constraint c WHERE c.contypid = t.oid AND c.contype = 'c' ORDER BY c.conname), \
                            ARRAY(SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contypid = t.oid AND c.contype = 'c' ORDER BY c.conname) \
                     FROM pg_type t WHERE t.oid = $1",
                    &[&oid],
                )
                .await
                .with_context(context)?;
            let names: Vec<String> = row.get(3);
            let definitions: Vec<String> = row.get(4);
            UserTypeKind::Domain {
                base: row.get(0),
                not_null: row.get(1),
                default: row.get(2),
                checks: names.into_iter().zip(definitions).collect(),
            }
        }
        "c" => {
            let rows = client
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_type t \
                     JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped \
                     WHERE t.oid = $1 ORDER BY a.attnum",
                    &[&oid],
                )
                .await
                .with_context(context)?;
            UserTypeKind::Composite { attributes: rows.iter().map(|r| (r.get(0), r.get(1))).collect() }
        }
        _ => {
            let row = client
                .query_one("SELECT format_type(rngsubtype, NULL) FROM pg_range WHERE rngtypid = $1", &[&oid])
                .await
                .with_context(context)?;
            UserTypeKind::Range { subtype: row.get(0) }
        }
    })
}

async fn read_enums(client: &impl GenericClient) -> anyhow::Result<Vec<EnumType>> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname, t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                 JOIN pg_enum e ON e.enumtypid = t.oid WHERE {SYSTEM_SCHEMAS} \
                 GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .context("reading the source's enum types")?;
    Ok(rows
        .iter()
        .map(|r| EnumType { name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)), labels: r.get(2) })
        .collect())
}

/// Sequences in the schemas of the selected tables, with their current values.
async fn read_sequences(client: &impl GenericClient, tables: &[TableDefinition]) -> anyhow::Result<Vec<Sequence>> {
    let mut schemas: Vec<String> = tables.iter().map(|t| t.schema.name.schema.clone()).collect();
    schemas.dedup();
    let rows = client
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.data_type::regtype::text, s.start_value, \
                    s.increment_by, s.min_value, s.max_value, s.cache_size, s.cycle, s.last_value, \
                    tn.nspname::text, tc.relname::text, a.attname::text, coalesce(d.deptype = 'i', false) \
             FROM pg_sequences s \
             JOIN pg_class c ON c.relname = s.sequencename \
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname \
             LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
             LEFT JOIN pg_class tc ON tc.oid = d.refobjid \
             LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace \
             LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE s.schemaname = ANY($1) ORDER BY 1, 2",
            &[&schemas],
        )
        .await
        .context("reading the source's sequences")?;
    Ok(rows
        .iter()
        .map(|r| {
            let owner_schema: Option<String> = r.get(10);
            let owner_table: Option<String> = r.get(11);
            let owner_column: Option<String> = r.get(12);
            let owned_by = match (owner_schema, owner_table, owner_column) {
                (Some(s), Some(t), Some(c)) => Some((TableName::new(s, t), c)),
                _ => None,
            };
            Sequence {
                name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                data_type: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min: r.get(5),
                max: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
                last_value: r.get(9),
                owned_by,
                identity: r.get(13),
            }
        })
        .collect())
}
