//! The factory: the one place that names concrete sources and sinks. Everything else —
//! the pipeline, `check`, `cleanup`, `switchover`, `verify` — asks it for a
//! `Box<dyn Source>` / `Box<dyn Sink>` built from the config.

use anyhow::Context as _;

use crate::config::{Config, SourceKind, TargetKind};
use crate::myconn::MysqlParams;
use crate::pgconn::ConnectParams;
use crate::sink::mysql::MysqlSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::Sink;
use crate::source::mongodb::MongoSource;
use crate::source::mysql::MysqlSource;
use crate::source::postgres::PostgresSource;
use crate::source::sqlite::{self, SqliteSource};
use crate::source::Source;

/// Opens the configured source and sink.
pub async fn source_and_sink(config: &Config) -> anyhow::Result<(Box<dyn Source>, Box<dyn Sink>)> {
    Ok((source(config).await?, sink(config).await?))
}

/// Opens the configured source.
pub async fn source(config: &Config) -> anyhow::Result<Box<dyn Source>> {
    Ok(match config.source.kind {
        SourceKind::Postgres => {
            let params = ConnectParams::from_endpoint(config.source.endpoint()).context("[source] url")?;
            Box::new(
                PostgresSource::connect(
                    params,
                    config.table_filter(),
                    &config.name,
                    config.source.capture_ddl.unwrap_or(true),
                )
                .await?,
            )
        }
        SourceKind::Mysql => {
            let params = MysqlParams::from_endpoint(config.source.endpoint()).context("[source] url")?;
            Box::new(MysqlSource::connect(params, config.table_filter(), &config.name).await?)
        }
        SourceKind::Sqlite => {
            let path = sqlite::path_from_url(config.source.url.expose()).context("[source] url")?;
            let on_mismatch = config.source.on_type_mismatch.unwrap_or_default();
            Box::new(SqliteSource::open(path, config.table_filter(), on_mismatch)?)
        }
        SourceKind::Mongodb => {
            let mapping = config.source.mapping.unwrap_or_default();
            let source = MongoSource::connect(config.source.endpoint(), config.table_filter(), mapping);
            Box::new(source.await.context("[source] url")?)
        }
    })
}

/// Opens the configured sink (its first apply connection).
pub async fn sink(config: &Config) -> anyhow::Result<Box<dyn Sink>> {
    apply_sink(config, 0).await
}

/// Opens the configured sink as apply connection `lane` (of `[pipeline]
/// apply_connections`): each records its progress apart.
pub async fn apply_sink(config: &Config, lane: usize) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match config.target.kind {
        TargetKind::Postgres => {
            let params = ConnectParams::from_endpoint(config.target.endpoint()).context("[target] url")?;
            let sink = PostgresSink::connect(params, &config.name, config.target.partitions());
            let lsn_positions = config.source.kind == SourceKind::Postgres;
            Box::new(sink.await?.disabling_triggers(config.target.disable_triggers()).on_lane(lane, lsn_positions))
        }
        TargetKind::Mysql => {
            let params = MysqlParams::from_endpoint(config.target.endpoint()).context("[target] url")?;
            Box::new(MysqlSink::connect(params, &config.name, &home_schema(config)?).await?.on_lane(lane))
        }
    })
}

/// The source schema that lands in a MySQL target URL's own database: a MySQL
/// source's database, as PostgreSQL's `public` does.
fn home_schema(config: &Config) -> anyhow::Result<String> {
    Ok(match config.source.kind {
        SourceKind::Mysql => MysqlParams::from_endpoint(config.source.endpoint())?.database,
        _ => "public".to_string(),
    })
}

/// The MySQL target database a source schema's tables land in.
pub fn target_database(config: &Config, schema: &str) -> anyhow::Result<String> {
    let url_database = MysqlParams::from_endpoint(config.target.endpoint()).context("[target] url")?.database;
    Ok(crate::sink::mysql::database_for(&url_database, &home_schema(config)?, schema))
}
