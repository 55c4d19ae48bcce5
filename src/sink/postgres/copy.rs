//! Bulk loading on a connection of its own: COPY in, then keys and indexes.

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::create_missing;
use crate::change::TableName;
use crate::copy::{Chunk, CopyFormat, CopyStream};
use crate::schema::postgres as ddl;
use crate::schema::{quote_ident, quote_table, TableDefinition};
use crate::sink::{chunks_condition, TableWriter};

/// A copy connection on the target.
pub(super) struct PostgresTableWriter {
    pub(super) client: Client,
}

#[async_trait]
impl TableWriter for PostgresTableWriter {
    async fn truncate(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
        let list: Vec<String> = tables.iter().map(quote_table).collect();
        self.client.batch_execute(&format!("TRUNCATE {}", list.join(", "))).await.with_context(|| {
            format!(
                "emptying {} on the target before copying again (a table that foreign keys reference is emptied \
                 only with the tables that reference it: copy those again too)",
                list.join(", ")
            )
        })
    }

    async fn count_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<(u64, u64)> {
        let name = &table.schema.name;
        let sql = format!(
            "SELECT count(*) FILTER (WHERE {}), count(*) FROM ONLY {}",
            chunks_condition(table, chunks, quote_ident),
            quote_table(name)
        );
        let row = self
            .client
            .query_one(&sql, &[])
            .await
            .with_context(|| format!("counting the rows of {name}'s finished key ranges on the target"))?;
        let count = |i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok((count(0), count(1)))
    }

    async fn delete_chunks(&mut self, table: &TableDefinition, chunks: &[Chunk]) -> anyhow::Result<()> {
        let name = &table.schema.name;
        let sql =
            format!("DELETE FROM ONLY {} WHERE {}", quote_table(name), chunks_condition(table, chunks, quote_ident));
        self.client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("emptying the unfinished key ranges of {name} on the target"))
    }

    async fn write(&mut self, table: &TableDefinition, mut rows: CopyStream) -> anyhow::Result<u64> {
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let format = match rows.format {
            CopyFormat::PostgresBinary => "binary",
            CopyFormat::PostgresText => "text",
        };
        let name = &table.schema.name;
        let sql = format!("COPY {} ({}) FROM STDIN (FORMAT {format})", quote_table(name), columns.join(", "));
        let sink = self
            .client
            .copy_in::<_, bytes::Bytes>(&sql)
            .await
            .with_context(|| format!("starting to copy {name} into the target"))?;
        futures_util::pin_mut!(sink);
        while let Some(chunk) = rows.data.next().await {
            sink.feed(chunk?).await.with_context(|| format!("copying {name} into the target"))?;
        }
        sink.as_mut().finish().await.with_context(|| format!("finishing the copy of {name} into the target"))
    }

    async fn build_indexes(&mut self, table: &TableDefinition) -> anyhow::Result<()> {
        create_missing(&self.client, table, ddl::post_data(table)).await
    }
}
