//! Bulk loading on a connection of its own: the copy stream fed to `LOAD DATA LOCAL
//! INFILE`, then keys and indexes; foreign keys as MySQL clauses.

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;

use super::{column_types, database_for};
use crate::change::TableName;
use crate::copy::{Chunk, CopyStream};
use crate::schema::mysql_target::{quote_ident, Conversion, CopyToLoadData};
use crate::schema::TableDefinition;
use crate::sink::{chunks_condition, TableWriter};

/// A copy connection.
pub(super) struct MysqlTableWriter {
    pub(super) conn: mysql_async::Conn,
    pub(super) url_database: String,
    pub(super) home_schema: String,
}

impl MysqlTableWriter {
    /// The table, qualified, and the condition selecting the rows of key ranges of it.
    fn chunks_of(&self, table: &TableDefinition, chunks: &[Chunk]) -> (String, String) {
        let name = &table.schema.name;
        let database = database_for(&self.url_database, &self.home_schema, &name.schema);
        (
            format!("{}.{}", quote_ident(&database), quote_ident(&name.name)),
            chunks_condition(table, chunks, quote_ident),
        )
    }
}

#[async_trait]
impl TableWriter for MysqlTableWriter {
    async fn truncate(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
        // One at a time: this session does not check foreign keys.
        for table in tables {
            let database = database_for(&self.url_database, &self.home_schema, &table.schema);
            let sql = format!("TRUNCATE TABLE {}.{}", quote_ident(&database), quote_ident(&table.name));
            self.conn.query_drop(&sql).await.with_context(|| format!("emptying {table} on the target"))?;
        }
        Ok(())
    }

    async fn count_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<(u64, u64)> {
        let (qualified, condition) = self.chunks_of(table, chunks);
        let sql = format!("SELECT COALESCE(SUM({condition}), 0), COUNT(*) FROM {qualified}");
        let counts: Option<(u64, u64)> = self.conn.query_first(sql).await.with_context(|| {
            format!("counting the rows of {}'s finished key ranges on the target", table.schema.name)
        })?;
        Ok(counts.unwrap_or_default())
    }

    async fn delete_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<()> {
        let (qualified, condition) = self.chunks_of(table, chunks);
        let sql = format!("DELETE FROM {qualified} WHERE {condition}");
        self.conn
            .query_drop(&sql)
            .await
            .with_context(|| format!("emptying the unfinished key ranges of {} on the target", table.schema.name))
    }

    async fn write(&mut self, table: &TableDefinition, mut rows: CopyStream) -> anyhow::Result<u64> {
        let name = &table.schema.name;
        let database = database_for(&self.url_database, &self.home_schema, &name.schema);
        let types = column_types(&mut self.conn, &database, &name.name).await?;
        let mut targets = Vec::new();
        let mut sets = Vec::new();
        let mut conversions = Vec::new();
        for (i, column) in table.schema.columns.iter().enumerate() {
            let data_type = types.get(&column.name).map(String::as_str).unwrap_or("longtext");
            conversions.push(Conversion::between(&column.type_name, data_type));
            // LOAD DATA reads a BIT column's field as raw bytes: go through a variable.
            if data_type == "bit" {
                targets.push(format!("@v{i}"));
                sets.push(format!("{} = CAST(@v{i} AS UNSIGNED)", quote_ident(&column.name)));
            } else {
                targets.push(quote_ident(&column.name));
            }
        }
        let mut converter = CopyToLoadData::new(conversions);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        let feeder_name = name.clone();
        let feeder = async move {
            while let Some(chunk) = rows.data.next().await {
                let converted = chunk
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
                    .and_then(|c| converter.push(&c).map_err(|e| std::io::Error::other(format!("{feeder_name}: {e}"))));
                let failed = converted.is_err();
                if tx.send(converted.map(bytes::Bytes::from)).await.is_err() || failed {
                    return;
                }
            }
            if let Err(e) = converter.finish() {
                let _ = tx.send(Err(std::io::Error::other(format!("{feeder_name}: {e}")))).await;
            }
        };
        let data: mysql_async::InfileData =
            Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
        let data = std::sync::Mutex::new(Some(data));
        self.conn.set_infile_handler(async move {
            data.lock()
                .ok()
                .and_then(|mut d| d.take())
                .ok_or_else(|| mysql_async::Error::Other("the copy stream was already taken".into()))
        });
        let sql = format!(
            "LOAD DATA LOCAL INFILE 'cutover' INTO TABLE {}.{} CHARACTER SET utf8mb4 FIELDS TERMINATED BY '\\t' \
             ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({}){}",
            quote_ident(&database),
            quote_ident(&name.name),
            targets.join(", "),
            if sets.is_empty() { String::new() } else { format!(" SET {}", sets.join(", ")) }
        );
        // The feeder runs on its own: if the server never asks for the data (the statement
        // failed first), nothing reads the channel and the feeder must not hold the load up.
        let feeder = tokio::spawn(feeder);
        let loaded = self.conn.query_drop(&sql).await;
        feeder.abort();
        loaded.with_context(|| format!("loading {name} into the target"))?;
        let rows = self.conn.affected_rows();
        let warnings = self.conn.get_warnings();
        if warnings > 0 {
            let shown: Vec<(String, u32, String)> =
                self.conn.query("SHOW WARNINGS LIMIT 3").await.context("reading the load's warnings")?;
            let shown: Vec<String> = shown.into_iter().map(|(_, code, message)| format!("{code}: {message}")).collect();
            anyhow::bail!(
                "loading {name} into the target raised {warnings} warning(s) — MySQL would have changed or dropped \
                 values: {}; cutover stopped before the table counted as copied",
                shown.join("; ")
            );
        }
        Ok(rows)
    }

    async fn build_indexes(&mut self, table: &TableDefinition) -> anyhow::Result<()> {
        let database = database_for(&self.url_database, &self.home_schema, &table.schema.name.schema);
        let existing: Vec<String> = self
            .conn
            .exec(
                "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&database, &table.schema.name.name),
            )
            .await
            .context("reading indexes on the target")?;
        let clauses: Vec<String> = index_clauses(table)
            .into_iter()
            .filter(|clause| !existing.iter().any(|name| clause.contains(&quote_ident(name))))
            .collect();
        if clauses.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "ALTER TABLE {}.{} {}",
            quote_ident(&database),
            quote_ident(&table.schema.name.name),
            clauses.join(", ")
        );
        self.conn.query_drop(&sql).await.with_context(|| format!("building indexes on the target: {sql}"))
    }
}

/// The names inside the first parentheses of a definition (`UNIQUE ("a", b)`),
/// unquoted; `None` when one is an expression.
pub(super) fn column_list(definition: &str) -> Option<Vec<String>> {
    let open = definition.find('(')?;
    let inner = &definition[open + 1..];
    let close = inner.find(')')?;
    // A nested parenthesis is a function call: an expression, not a column list.
    if inner[..close].contains('(') {
        return None;
    }
    let mut columns = Vec::new();
    for part in inner[..close].split(',') {
        let part = part.trim();
        let name = match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None if !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                part.to_string()
            }
            None => return None,
        };
        columns.push(name);
    }
    Some(columns)
}

/// Secondary indexes and unique constraints of a table as MySQL `ADD …` clauses;
/// what cannot be expressed (expressions, CHECK, EXCLUDE) is logged and left out.
fn index_clauses(table: &TableDefinition) -> Vec<String> {
    let list = |cols: &[String]| cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let mut clauses = Vec::new();
    for (name, definition) in &table.constraints {
        match (definition.trim_start().starts_with("UNIQUE"), column_list(definition)) {
            (true, Some(cols)) => clauses.push(format!("ADD UNIQUE KEY {} ({})", quote_ident(name), list(&cols))),
            _ => {
                tracing::warn!(table = %table.schema.name, constraint = name, definition, "constraint not recreated on MySQL")
            }
        }
    }
    for statement in &table.indexes {
        let upper = statement.to_ascii_uppercase();
        let name = statement
            .split_whitespace()
            .skip_while(|w| !w.eq_ignore_ascii_case("INDEX"))
            .nth(1)
            .map(|n| n.trim_matches('"').replace("\"\"", "\""));
        let simple = !upper.contains(" WHERE ") && !upper.contains("USING GIN") && !upper.contains("USING GIST");
        // The column list follows the table name: look after ` ON `.
        let columns = upper.find(" ON ").and_then(|on| column_list(&statement[on..]));
        match (name, columns.filter(|_| simple)) {
            (Some(name), Some(cols)) => clauses.push(format!(
                "ADD {}INDEX {} ({})",
                if upper.starts_with("CREATE UNIQUE") { "UNIQUE " } else { "" },
                quote_ident(&name),
                list(&cols)
            )),
            _ => tracing::warn!(table = %table.schema.name, statement, "index not recreated on MySQL"),
        }
    }
    clauses
}

/// `FOREIGN KEY (a) REFERENCES s.t(b) ON DELETE CASCADE` → the MySQL clause.
pub(super) fn foreign_key_clause(name: &str, definition: &str, database: impl Fn(&str) -> String) -> Option<String> {
    let upper = definition.to_ascii_uppercase();
    let references = upper.find("REFERENCES")?;
    let from = column_list(&definition[..references])?;
    let rest = definition[references + "REFERENCES".len()..].trim_start();
    let open = rest.find('(')?;
    let target = rest[..open].trim();
    let (schema, table) = match target.rsplit_once('.') {
        Some((schema, table)) => (schema.trim_matches('"').to_string(), table.trim_matches('"').to_string()),
        None => ("public".to_string(), target.trim_matches('"').to_string()),
    };
    let close = open + rest[open..].find(')')?;
    let to = column_list(&rest[..=close])?;
    let actions: String = ["ON DELETE", "ON UPDATE"]
        .iter()
        .filter_map(|event| {
            let at = upper[references..].find(event)? + references + event.len();
            let action = ["CASCADE", "SET NULL", "RESTRICT", "NO ACTION"]
                .into_iter()
                .find(|a| upper[at..].trim_start().starts_with(a))?;
            Some(format!(" {event} {action}"))
        })
        .collect();
    let list = |cols: &[String]| cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    Some(format!(
        "ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {}.{} ({}){actions}",
        quote_ident(name),
        list(&from),
        quote_ident(&database(&schema)),
        quote_ident(&table),
        list(&to)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_become_mysql_clauses() {
        assert_eq!(column_list("UNIQUE (\"e\"\"mail\", name)"), Some(vec!["e\"mail".to_string(), "name".to_string()]));
        assert_eq!(column_list("CREATE INDEX i ON t USING btree (lower(name))"), None);
        let clause = foreign_key_clause(
            "child_fk",
            "FOREIGN KEY (parent_id) REFERENCES public.parent(id) ON DELETE CASCADE",
            |s| database_for("shop", "public", s),
        );
        assert_eq!(
            clause.as_deref(),
            Some("ADD CONSTRAINT `child_fk` FOREIGN KEY (`parent_id`) REFERENCES `shop`.`parent` (`id`) ON DELETE CASCADE")
        );
        assert_eq!(database_for("app", "public", "sales"), "sales");
        assert_eq!(database_for("app", "shop", "shop"), "app");
    }
}
