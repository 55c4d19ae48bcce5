//! DDL for a PostgreSQL target, from the source's definitions.
//!
//! Tables are created bare (columns, NOT NULL, defaults); keys, constraints and
//! indexes come after their data, foreign keys after all tables, as pg_dump
//! orders a restore. Every statement is safe to run again.

use super::{
    quote_ident, quote_literal, quote_table, EnumType, Sequence, SourceSchema, TableDefinition, UserType, UserTypeKind,
};
use crate::change::TableName;
use crate::config::Partitions;

/// Schemas, enum types and sequences the tables need: run before `create_table`.
pub fn prerequisites(schema: &SourceSchema) -> Vec<String> {
    let mut statements = Vec::new();
    let mut schemas: Vec<&str> = schema.tables.iter().map(|t| t.schema.name.schema.as_str()).collect();
    schemas.extend(
        schema.tables.iter().flat_map(|t| &t.partitioning).flat_map(|p| &p.partitions).map(|p| p.name.schema.as_str()),
    );
    schemas.extend(schema.enums.iter().map(|e| e.name.schema.as_str()));
    schemas.extend(schema.types.iter().map(|t| t.name.schema.as_str()));
    schemas.extend(schema.extensions.iter().map(|e| e.schema.as_str()));
    schemas.sort_unstable();
    schemas.dedup();
    for name in schemas {
        statements.push(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(name)));
    }
    // One a column needs must be there (`check` says so first); another (an operator class
    // of an index, a function) is created where the target has it, else left to the user.
    statements.extend(schema.extensions.iter().map(|e| {
        let create =
            format!("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}", quote_ident(&e.name), quote_ident(&e.schema));
        match e.needed_by.is_empty() {
            false => create,
            true => format!(
                "DO $cutover$ BEGIN {create}; EXCEPTION WHEN OTHERS THEN RAISE WARNING 'extension % not created on the \
                 target: %', {}, SQLERRM; END $cutover$",
                quote_literal(&e.name)
            ),
        }
    }));
    statements.extend(schema.enums.iter().map(create_enum));
    statements.extend(schema.types.iter().map(create_type));
    statements.extend(schema.sequences.iter().filter(|s| !s.identity).map(create_sequence));
    statements
}

fn create_enum(e: &EnumType) -> String {
    let labels: Vec<String> = e.labels.iter().map(|l| quote_literal(l)).collect();
    unless_it_exists(&format!("CREATE TYPE {} AS ENUM ({})", quote_table(&e.name), labels.join(", ")))
}

fn create_type(t: &UserType) -> String {
    let name = quote_table(&t.name);
    unless_it_exists(&match &t.kind {
        UserTypeKind::Domain { base, not_null, default, checks } => {
            let mut sql = format!("CREATE DOMAIN {name} AS {base}");
            if let Some(default) = default {
                sql.push_str(&format!(" DEFAULT {default}"));
            }
            if *not_null {
                sql.push_str(" NOT NULL");
            }
            for (check, definition) in checks {
                sql.push_str(&format!(" CONSTRAINT {} {definition}", quote_ident(check)));
            }
            sql
        }
        UserTypeKind::Composite { attributes } => {
            let attributes: Vec<String> = attributes.iter().map(|(a, t)| format!("{} {t}", quote_ident(a))).collect();
            format!("CREATE TYPE {name} AS ({})", attributes.join(", "))
        }
        UserTypeKind::Range { subtype } => format!("CREATE TYPE {name} AS RANGE (SUBTYPE = {subtype})"),
    })
}

/// `CREATE TYPE` and `CREATE DOMAIN` have no IF NOT EXISTS.
fn unless_it_exists(create: &str) -> String {
    format!("DO $cutover$ BEGIN {create}; EXCEPTION WHEN duplicate_object THEN NULL; END $cutover$")
}

fn create_sequence(s: &Sequence) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {} AS {} INCREMENT {} MINVALUE {} MAXVALUE {} START {} CACHE {}{}",
        quote_table(&s.name),
        s.data_type,
        s.increment,
        s.min,
        s.max,
        s.start,
        s.cache,
        if s.cycle { " CYCLE" } else { "" }
    )
}

/// `CREATE TABLE` with columns only; for a partitioned table kept as one, its
/// partitions after it, each parent before its own partitions.
pub fn create_table(table: &TableDefinition, partitions: Partitions) -> Vec<String> {
    let create = create_columns(table);
    match (&table.partitioning, partitions) {
        (Some(partitioning), Partitions::Keep) => {
            let mut statements = vec![format!("{create} PARTITION BY {}", partitioning.key)];
            statements.extend(partitioning.partitions.iter().map(|p| {
                let sub = p.key.as_ref().map(|key| format!(" PARTITION BY {key}")).unwrap_or_default();
                format!(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} {}{sub}",
                    quote_table(&p.name),
                    quote_table(&p.parent),
                    p.bound
                )
            }));
            statements
        }
        _ => vec![create],
    }
}

/// `CREATE TABLE` with the table's columns.
fn create_columns(table: &TableDefinition) -> String {
    let mut columns: Vec<String> = table
        .schema
        .columns
        .iter()
        .zip(&table.columns)
        .map(|(column, definition)| {
            let mut sql = format!("{} {}", quote_ident(&column.name), column.type_name);
            match definition.identity {
                Some('a') => sql.push_str(" GENERATED ALWAYS AS IDENTITY"),
                Some('d') => sql.push_str(" GENERATED BY DEFAULT AS IDENTITY"),
                _ => {
                    if let Some(default) = &column.default {
                        sql.push_str(&format!(" DEFAULT {default}"));
                    }
                }
            }
            if definition.not_null {
                sql.push_str(" NOT NULL");
            }
            sql
        })
        .collect();
    // Computed on the target as on the source, in the same place among the columns.
    for generated in &table.generated {
        let sql = format!(
            "{} {} GENERATED ALWAYS AS ({}) STORED",
            quote_ident(&generated.name),
            generated.type_name,
            generated.expression
        );
        columns.insert(generated.position.min(columns.len()), sql);
    }
    format!("CREATE TABLE IF NOT EXISTS {} ({})", quote_table(&table.schema.name), columns.join(", "))
}

/// A named object to create after the table's data, and the statement that does.
pub struct PostDataObject {
    pub name: String,
    pub sql: String,
}

/// Primary key, unique / check / exclusion constraints and plain indexes.
pub fn post_data(table: &TableDefinition) -> Vec<PostDataObject> {
    let constraint = |(name, definition): &(String, String)| PostDataObject {
        name: name.clone(),
        sql: add_constraint(&table.schema.name, name, definition, false),
    };
    let mut objects: Vec<PostDataObject> = table.primary_key.iter().map(constraint).collect();
    objects.extend(table.constraints.iter().map(constraint));
    for index in &table.indexes {
        // pg_get_indexdef prints `CREATE [UNIQUE] INDEX name ON ...`.
        let name = index
            .split_once(" INDEX ")
            .and_then(|(_, rest)| rest.split_once(" ON "))
            .map(|(name, _)| name.trim_matches('"').to_string())
            .unwrap_or_default();
        objects.push(PostDataObject { name, sql: create_index(index) });
    }
    objects
}

/// An index as `pg_get_indexdef` prints it, as the target creates it: once only, and on a
/// partitioned table's partitions too (the source prints `ON ONLY` for a partitioned table).
pub fn create_index(definition: &str) -> String {
    definition.replacen(" INDEX ", " INDEX IF NOT EXISTS ", 1).replacen(" ON ONLY ", " ON ", 1)
}

/// `ALTER TABLE … ADD CONSTRAINT` for a constraint as `pg_get_constraintdef` prints it. With
/// `deferrable`, a foreign key is made DEFERRABLE (still INITIALLY IMMEDIATE for the
/// applications) where the source's is not.
pub fn add_constraint(table: &TableName, name: &str, definition: &str, deferrable: bool) -> String {
    let defer = match deferrable && definition.starts_with("FOREIGN KEY") && !definition.contains(" DEFERRABLE") {
        true => " DEFERRABLE",
        false => "",
    };
    format!("ALTER TABLE {} ADD CONSTRAINT {} {definition}{defer}", quote_table(table), quote_ident(name))
}

/// Foreign keys: after every table has its data and keys (DEFERRABLE with `deferrable`).
pub fn foreign_keys(table: &TableDefinition, deferrable: bool) -> Vec<PostDataObject> {
    table
        .foreign_keys
        .iter()
        .map(|(name, definition)| PostDataObject {
            name: name.clone(),
            sql: add_constraint(&table.schema.name, name, definition, deferrable),
        })
        .collect()
}

/// Sequence ownership and values, once the tables exist.
pub fn sequence_values(schema: &SourceSchema) -> Vec<String> {
    let mut statements = Vec::new();
    for s in &schema.sequences {
        let owner_included =
            s.owned_by.as_ref().filter(|(table, _)| schema.tables.iter().any(|t| &t.schema.name == table));
        let name = match (s.identity, owner_included) {
            // Identity sequences are created with their column; find them by it.
            (true, Some((table, column))) => {
                format!("pg_get_serial_sequence({}, {})", quote_literal(&quote_table(table)), quote_literal(column))
            }
            (true, None) => continue,
            (false, owner) => {
                if let Some((table, column)) = owner {
                    statements.push(format!(
                        "ALTER SEQUENCE {} OWNED BY {}.{}",
                        quote_table(&s.name),
                        quote_table(table),
                        quote_ident(column)
                    ));
                }
                quote_literal(&quote_table(&s.name))
            }
        };
        if let Some(value) = s.last_value {
            // Never backwards: a target that took writes (after a switchover) keeps its values.
            statements.push(format!(
                "SELECT setval({name}, greatest({value}, coalesce(pg_sequence_last_value({name}::regclass), {value})), true)"
            ));
        }
    }
    statements
}
