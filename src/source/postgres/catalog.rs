//! Reads the source's catalog: the tables to replicate with their columns,
//! identity, constraints and indexes, plus enum types and sequences.

use anyhow::Context as _;
use tokio_postgres::GenericClient;

use crate::change::{Column, Identity, TableName, TableSchema};
use crate::schema::{
    ColumnDefinition, EnumType, GeneratedColumn, Partition, Partitioning, Sequence, SourceSchema, TableDefinition,
};

/// First OID a user object can have; types below it are built in.
const FIRST_NORMAL_OID: u32 = 16384;

const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover') \
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
        let mut table = read_table(client, oid, name, &replident, row.get::<_, i64>(4), row.get::<_, i64>(5)).await?;
        if row.get::<_, bool>(7) {
            table.partitioning = Some(read_partitioning(client, oid, &table.schema.name).await?);
        }
        schema.tables.push(table);
    }
    schema.enums = read_enums(client).await?;
    schema.sequences = read_sequences(client, &schema.tables).await?;
    Ok(schema)
}

async fn read_table(
    client: &impl GenericClient,
    oid: u32,
    name: TableName,
    replident: &str,
    estimated_rows: i64,
    pages: i64,
) -> anyhow::Result<TableDefinition> {
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

    let constraint_rows = client
        .query(
            "SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = $1 AND contype IN ('p', 'u', 'c', 'x', 'f') ORDER BY conname",
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
            "f" => foreign_keys.push(entry),
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
    })
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
