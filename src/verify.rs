//! Source against target: row counts and an order-independent checksum of
//! every row's canonical text, computed on each server.

use anyhow::Context as _;

use crate::config::{Config, SourceKind, TargetKind};
use crate::pgconn::ConnectParams;
use crate::schema::{quote_ident, quote_table, TableDefinition};
use crate::source::postgres::PostgresSource;
use crate::source::Source;

/// One table's counts and checksums on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub source_checksum: String,
    pub target_checksum: String,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows && self.source_checksum == self.target_checksum
    }
}

/// Counts and sums a 64-bit hash of each row's text form (same session settings
/// on both sides, so equal values print equally).
pub async fn table_checksum(client: &tokio_postgres::Client, table: &TableDefinition) -> anyhow::Result<(i64, String)> {
    let columns: Vec<String> = table.schema.columns.iter().map(|c| format!("t.{}", quote_ident(&c.name))).collect();
    let sql = format!(
        "SELECT count(*), coalesce(sum(('x' || substr(md5(ROW({})::text), 1, 16))::bit(64)::int8::numeric), 0)::text FROM {} t",
        columns.join(", "),
        quote_table(&table.schema.name)
    );
    let row = client.query_one(&sql, &[]).await.with_context(|| format!("checksumming {}", table.schema.name))?;
    Ok((row.get(0), row.get(1)))
}

/// Every table of `schema` in one PostgreSQL database: name, row count and an md5 of its
/// rows' text in order. Two databases loaded by different paths compare by these.
pub async fn schema_digests(
    client: &tokio_postgres::Client,
    schema: &str,
) -> anyhow::Result<Vec<(String, i64, String)>> {
    let tables = client
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1", &[&schema])
        .await
        .context("listing tables")?;
    let mut digests = Vec::new();
    for row in tables {
        let table: String = row.get(0);
        let name = crate::change::TableName::new(schema, table.clone());
        let digest = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {} t",
                    quote_table(&name)
                ),
                &[],
            )
            .await
            .with_context(|| format!("digesting {name}"))?;
        digests.push((table, digest.get(0), digest.get(1)));
    }
    Ok(digests)
}

/// Compares every selected table.
pub async fn verify(config: &Config) -> anyhow::Result<Vec<TableReport>> {
    if config.source.kind != SourceKind::Postgres || config.target.kind != TargetKind::Postgres {
        anyhow::bail!("verify compares PostgreSQL with PostgreSQL only so far; across dialects it is not built yet");
    }
    let source_params = ConnectParams::from_endpoint(config.source.endpoint())?;
    let target = ConnectParams::from_endpoint(config.target.endpoint())?.connect().await?;
    let source_client = source_params.connect().await?;
    let mut source = PostgresSource::connect(source_params, config.table_filter(), &config.name).await?;
    let schema = source.schema().await?;
    let mut reports = Vec::new();
    for table in &schema.tables {
        let (source_rows, source_checksum) = table_checksum(&source_client, table).await?;
        let (target_rows, target_checksum) = table_checksum(&target, table).await?;
        reports.push(TableReport {
            table: table.schema.name.to_string(),
            source_rows,
            target_rows,
            source_checksum,
            target_checksum,
        });
    }
    Ok(reports)
}

/// A table of reports for a terminal.
pub fn render(reports: &[TableReport]) -> String {
    let mut out = format!("{:<40} {:>12} {:>12}  {}\n", "table", "source rows", "target rows", "checksum");
    for r in reports {
        out.push_str(&format!(
            "{:<40} {:>12} {:>12}  {}\n",
            r.table,
            r.source_rows,
            r.target_rows,
            if r.matches() { "ok" } else { "DIFFER" }
        ));
    }
    out
}
