//! PostgreSQL source: publications + a logical slot with pgoutput.
//!
//! Why nothing is lost or doubled:
//! - The publications exist before the slot, so every change the slot decodes
//!   to a selected table is published.
//! - `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` returns the slot's consistent
//!   point and a snapshot that sees exactly the transactions committed before it.
//!   Every copy worker imports that snapshot (`SET TRANSACTION SNAPSHOT`) while
//!   the exporting connection stays idle; the stream starts at the consistent
//!   point, and the server decodes only transactions that commit at or after it.
//! - A table copied later (restart mid-snapshot, table added to the config) is
//!   copied under a temporary slot's snapshot; the pipeline applies its stream
//!   changes only from that snapshot's position on, as PostgreSQL's table-sync
//!   workers do.
//! - The server is told as flushed only what the target committed, or — while
//!   no transaction is pending — the position it reported itself, so a quiet
//!   database never makes the slot hold WAL.
//!
//! Its parts: [`reader`] splits a table into chunks and copies each inside the
//! snapshot (page ranges by TID range scans, a chunk per partition, the lock and
//! TRUNCATE check per table); [`stream`] turns the slot's pgoutput into events and
//! tells the server what is flushed; [`insert_only`] watches the tables without
//! replica identity for the UPDATEs and DELETEs that cannot stream. [`catalog`]
//! reads the tables, [`ddl`] captures schema changes, [`fence`] fences the source
//! for a switchover, [`pgoutput`] decodes the messages and [`replication`] speaks
//! the walsender protocol. This module sets up the publications and the slot,
//! exports the snapshots and implements [`Source`].

mod catalog;
mod ddl;
mod fence;
mod insert_only;
pub mod pgoutput;
mod reader;
mod replication;
mod stream;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use tokio::sync::watch;

use self::insert_only::{untracked_changes, InsertOnlyWatch};
use self::reader::PostgresTableReader;
use self::replication::ReplicationConnection;
use self::stream::PostgresChangeStream;
use super::{ChangeStream, LogEnd, SnapshotPoint, Source, TableReader};
use crate::change::{Identity, TableName};
use crate::checkpoint::PipelineIdentity;
use crate::config::TableFilter;
use crate::copy::{Chunk, SourceDialect};
use crate::finding::Finding;
use crate::pgconn::ConnectParams;
use crate::position::{Lsn, Position};
use crate::schema::{quote_ident, quote_literal, quote_table, SourceSchema, TableDefinition};

/// A PostgreSQL database as a change source.
pub struct PostgresSource {
    params: ConnectParams,
    filter: TableFilter,
    slot: String,
    client: tokio_postgres::Client,
    major: u32,
    /// The replication connection whose exported snapshot is pinned, kept idle.
    exporting: Option<ReplicationConnection>,
    /// Tables without a replica identity: only their INSERTs and TRUNCATEs stream.
    insert_only: Vec<TableName>,
    /// `[source] capture_ddl`: install the DDL capture when the role may.
    capture_ddl: bool,
    /// Whether this run installed (or found) the capture.
    capturing: bool,
}

/// The replication slot a pipeline streams from (its publications are named alike).
pub fn slot_name(pipeline: &str) -> String {
    format!("cutover_{pipeline}")
}

impl PostgresSource {
    pub async fn connect(
        params: ConnectParams,
        filter: TableFilter,
        pipeline: &str,
        capture_ddl: bool,
    ) -> anyhow::Result<Self> {
        let client = params.connect().await?;
        let major = crate::pgconn::server_major(&client, "source").await?;
        if major < 14 {
            anyhow::bail!("the source at {} runs PostgreSQL {major}; cutover needs 14 or newer", params.endpoint());
        }
        Ok(PostgresSource {
            params,
            filter,
            slot: slot_name(pipeline),
            client,
            major,
            exporting: None,
            insert_only: Vec::new(),
            capture_ddl,
            capturing: false,
        })
    }

    async fn is_superuser(&self) -> anyhow::Result<bool> {
        Ok(self
            .client
            .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await
            .context("reading the source role's attributes")?
            .get(0))
    }

    /// Installs the DDL capture (see [`ddl`]) before a stream is created or resumed, so
    /// every schema change after the stream's start reaches it. Without the rights, or
    /// with `capture_ddl = false`, the stream sees what pgoutput says: columns added.
    async fn install_ddl_capture(&mut self) -> anyhow::Result<()> {
        if !self.capture_ddl {
            return Ok(());
        }
        if !self.is_superuser().await? {
            tracing::warn!(
                "schema changes are not captured: event triggers need a superuser on the source. ADD COLUMN still \
                 streams; other DDL on a replicated table stops the pipeline when it matters ([source] capture_ddl)"
            );
            return Ok(());
        }
        self.client.batch_execute(ddl::INSTALL).await.with_context(|| {
            format!("installing the DDL capture on the source (event triggers {})", ddl::TRIGGERS.join(", "))
        })?;
        tracing::info!(
            "schema changes on the source are captured in order with the rows (event triggers cutover_ddl_*)"
        );
        self.capturing = true;
        Ok(())
    }

    /// `(all changes, inserts and truncates only)`: the two publications.
    fn publications(&self) -> [String; 2] {
        [self.slot.clone(), format!("{}_inserts", self.slot)]
    }

    async fn system_identity(&self) -> anyhow::Result<String> {
        let row = self
            .client
            .query_one("SELECT system_identifier::text, current_database()::text FROM pg_control_system()", &[])
            .await
            .context("reading the source's system identifier")?;
        Ok(format!("postgres system {} database {}", row.get::<_, String>(0), row.get::<_, String>(1)))
    }

    /// Makes both publications list exactly the given tables. Never drops a
    /// publication: WAL decoded while it was missing would lose changes.
    async fn sync_publications(&mut self, tables: &[TableDefinition]) -> anyhow::Result<()> {
        let (full, inserts): (Vec<&TableDefinition>, Vec<&TableDefinition>) =
            tables.iter().partition(|t| t.schema.identity != Identity::Nothing);
        self.insert_only = inserts.iter().map(|t| t.schema.name.clone()).collect();
        for t in &inserts {
            tracing::warn!(
                "table {} has no primary key and no replica identity: only its INSERTs and TRUNCATEs replicate, \
                 and an UPDATE or DELETE on it stops the pipeline. To replicate it fully: ALTER TABLE {} REPLICA IDENTITY FULL",
                t.schema.name,
                quote_table(&t.schema.name)
            );
        }
        let [full_name, inserts_name] = self.publications();
        for (name, members, publish) in
            [(full_name, full, "insert, update, delete, truncate"), (inserts_name, inserts, "insert, truncate")]
        {
            let list: Vec<String> = members.iter().map(|t| quote_table(&t.schema.name)).collect();
            let exists = self
                .client
                .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
                .await
                .context("reading the source's publications")?
                .is_some();
            let sql = match (exists, list.is_empty()) {
                // Via the partition root: a partitioned table's changes arrive as its own,
                // whichever partition they hit (a row moved between partitions included).
                (false, true) => format!(
                    "CREATE PUBLICATION {} WITH (publish = '{publish}', publish_via_partition_root = true)",
                    quote_ident(&name)
                ),
                (false, false) => format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = '{publish}', publish_via_partition_root = true)",
                    quote_ident(&name),
                    list.join(", ")
                ),
                (true, false) => format!(
                    "ALTER PUBLICATION {0} SET TABLE {1}; ALTER PUBLICATION {0} SET (publish_via_partition_root = true)",
                    quote_ident(&name),
                    list.join(", ")
                ),
                (true, true) => {
                    let current = self
                        .client
                        .query(
                            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                            &[&name],
                        )
                        .await
                        .context("reading the source's publications")?;
                    for row in current {
                        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
                        self.client
                            .batch_execute(&format!(
                                "ALTER PUBLICATION {} DROP TABLE {}",
                                quote_ident(&name),
                                quote_table(&table)
                            ))
                            .await
                            .with_context(|| format!("removing {table} from publication {name}"))?;
                    }
                    continue;
                }
            };
            if let Err(e) = self.client.batch_execute(&sql).await {
                // A table read from the catalog a moment ago was dropped or renamed since:
                // the next attempt reads the catalog again.
                if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                    return Err(crate::retry::ResumeFromCheckpoint(format!(
                        "a selected table was dropped or renamed while publication {name} was set up ({e})"
                    ))
                    .into());
                }
                return Err(e).with_context(|| {
                    format!(
                        "creating publication {name} on the source (needs CREATE on the database and ownership of the tables)"
                    )
                });
            }
        }
        Ok(())
    }

    async fn slot_exists(&self) -> anyhow::Result<bool> {
        Ok(self
            .client
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot])
            .await
            .context("reading the source's replication slots")?
            .is_some())
    }

    async fn export_snapshot(&mut self, slot: &str, temporary: bool) -> anyhow::Result<SnapshotPoint> {
        // Read before the snapshot: a change counted here is in the copy, so the
        // baseline can only make the watch stricter, never blind.
        let untracked = untracked_changes(&self.client, &self.insert_only).await?;
        let mut conn = ReplicationConnection::connect(&self.params).await?;
        let created = conn.create_slot(slot, temporary).await.with_context(|| {
            format!(
                "creating replication slot {slot} on {} (needs wal_level = logical, a free slot in max_replication_slots and the REPLICATION attribute)",
                self.params.endpoint()
            )
        })?;
        self.exporting = Some(conn);
        Ok(SnapshotPoint {
            position: Position::Lsn(created.consistent_point),
            id: created.snapshot_name,
            untracked,
            shapes: HashMap::new(),
        })
    }
}

#[async_trait]
impl Source for PostgresSource {
    fn captures_schema_changes(&self) -> bool {
        self.capturing
    }

    fn dialect(&self) -> SourceDialect {
        SourceDialect::Postgres { major: self.major }
    }

    async fn schema(&mut self) -> anyhow::Result<SourceSchema> {
        let filter = self.filter.clone();
        catalog::read_schema(&self.client, |name| filter.includes(name)).await
    }

    async fn preflight(&mut self, schema: &SourceSchema) -> anyhow::Result<Vec<Finding>> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int4, \
                        (SELECT count(*)::int4 FROM pg_replication_slots), current_setting('max_wal_senders')::int4, \
                        current_user::text, (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[],
            )
            .await
            .context("reading the source's settings")?;
        let (wal_level, slots, used, senders, user, replication): (String, i32, i32, i32, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
        let mut findings = Vec::new();
        if wal_level != "logical" {
            findings.push(Finding::error(
                "source",
                format!("wal_level = {wal_level}"),
                "logical",
                "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into(),
            ));
        }
        let slot_exists = self.slot_exists().await?;
        if used >= slots && !slot_exists {
            findings.push(Finding::error(
                "source",
                format!("max_replication_slots = {slots}, all {used} in use"),
                "one free slot (two while a table is re-copied)",
                format!("ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL", used + 2),
            ));
        }
        if senders < 2 {
            findings.push(Finding::error(
                "source",
                format!("max_wal_senders = {senders}"),
                "at least 2",
                "ALTER SYSTEM SET max_wal_senders = 10; then restart PostgreSQL".into(),
            ));
        }
        if !replication {
            findings.push(Finding::error(
                "source",
                format!("role {user} has neither REPLICATION nor superuser"),
                "REPLICATION",
                format!("ALTER ROLE {} REPLICATION;", quote_ident(&user)),
            ));
        }
        for table in schema.tables.iter().filter(|t| t.schema.identity == Identity::Nothing) {
            findings.push(Finding::warning(
                "source",
                format!("table {} has no primary key and no replica identity", table.schema.name),
                "REPLICA IDENTITY FULL to replicate its UPDATEs and DELETEs (until then an UPDATE or DELETE on it stops the pipeline)",
                format!("ALTER TABLE {} REPLICA IDENTITY FULL;", quote_table(&table.schema.name)),
            ));
        }
        // Table-like relations the selection matches that no publication can carry.
        let others = catalog::uncopied_relations(&self.client).await?;
        for (name, kind) in others {
            if !self.filter.includes(&name.to_string()) {
                continue;
            }
            findings.push(Finding::warning(
                "source",
                format!("{kind} {name} is matched by [source] tables but is not copied or streamed"),
                "it on the target by other means",
                match kind.as_str() {
                    "materialized view" => format!(
                        "create it on the target (CREATE MATERIALIZED VIEW …, then REFRESH MATERIALIZED VIEW {}), or exclude it",
                        quote_table(&name)
                    ),
                    _ => "create the foreign table and its server on the target, or exclude it".to_string(),
                },
            ));
        }
        let capturing = self.capture_ddl && self.is_superuser().await?;
        if !capturing {
            findings.push(Finding::warning(
                "source",
                match self.capture_ddl {
                    true => format!("role {user} is not a superuser: schema changes are not captured"),
                    false => "[source] capture_ddl = false: schema changes are not captured".to_string(),
                },
                "no DDL on replicated tables while the pipeline runs but ADD COLUMN (a column dropped or renamed \
                 stops it; other changes reach the target only by hand)",
                format!(
                    "let cutover start once with a superuser role on the source (it installs the event triggers {}), \
                     or make each change on the target by hand and run `cutover resync --table …` for the tables it \
                     rewrote",
                    ddl::TRIGGERS.join(", ")
                ),
            ));
        }
        // Published via the root, a partition's own TRUNCATE is not sent (PostgreSQL's rule);
        // without the DDL capture, ATTACH / DETACH and new partitions are not seen either.
        for table in schema.tables.iter().filter(|t| t.partitioning.is_some()) {
            let (required, fix) = match capturing {
                true => (
                    "no TRUNCATE of a single partition while the pipeline runs (the change log does not carry it)",
                    String::new(),
                ),
                false => (
                    "no TRUNCATE of a single partition, no ATTACH / DETACH PARTITION and no new partition while the \
                     pipeline runs (the change log carries none of them as changes to the table)",
                    "; create partitions ahead of time, or create them on the target too before rows reach them".into(),
                ),
            };
            findings.push(Finding::warning(
                "source",
                format!("table {} is partitioned", table.schema.name),
                required,
                format!("TRUNCATE {} itself, or DELETE from the partition{fix}", quote_table(&table.schema.name)),
            ));
        }
        Ok(findings)
    }

    async fn create_stream(&mut self, tables: &[TableDefinition]) -> anyhow::Result<(PipelineIdentity, SnapshotPoint)> {
        if self.slot_exists().await? {
            anyhow::bail!(
                "replication slot {} already exists on the source, but this state dir is new: use the state dir that \
                 belongs to it, or drop the slot (SELECT pg_drop_replication_slot('{}')) to start over",
                self.slot,
                self.slot
            );
        }
        let source = self.system_identity().await?;
        self.install_ddl_capture().await?;
        self.sync_publications(tables).await?;
        let slot = self.slot.clone();
        let snapshot = self.export_snapshot(&slot, false).await?;
        let identity = PipelineIdentity { source, stream: slot, consistent_point: snapshot.position.clone() };
        Ok((identity, snapshot))
    }

    async fn resume_stream(&mut self, identity: &PipelineIdentity, tables: &[TableDefinition]) -> anyhow::Result<()> {
        identity.check_source(&self.system_identity().await?)?;
        if !self.slot_exists().await? {
            anyhow::bail!(
                "replication slot {} is gone from the source, so the changes since the last checkpoint cannot be read: \
                 start over with an empty target and a new state dir",
                identity.stream
            );
        }
        self.install_ddl_capture().await?;
        self.sync_publications(tables).await
    }

    async fn new_snapshot(&mut self) -> anyhow::Result<SnapshotPoint> {
        let slot = format!("{}_copy_{}", self.slot, std::process::id());
        self.export_snapshot(&slot, true).await
    }

    async fn snapshot_reader(&self, snapshot: &SnapshotPoint) -> anyhow::Result<Box<dyn TableReader>> {
        let client = self.params.connect().await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot.id)
            ))
            .await
            .context("importing the exported snapshot into a copy connection")?;
        Ok(Box::new(PostgresTableReader { client, checked: HashSet::new() }))
    }

    async fn release_snapshot(&mut self) {
        self.exporting = None;
    }

    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
        // A source fenced by a switchover is read-only by default; cutover's own objects still go.
        self.client
            .batch_execute("SET default_transaction_read_only = off")
            .await
            .context("making cutover's session on the source read-write")?;
        let mut dropped = Vec::new();
        let active: Option<bool> = self
            .client
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot])
            .await
            .context("reading the source's replication slots")?
            .map(|r| r.get(0));
        match active {
            Some(true) => {
                anyhow::bail!("replication slot {} is in use: stop `cutover run` for this pipeline first", self.slot)
            }
            Some(false) => {
                self.client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                    .await
                    .with_context(|| format!("dropping replication slot {}", self.slot))?;
                dropped.push(format!("source: replication slot {}", self.slot));
            }
            None => {}
        }
        for publication in self.publications() {
            let exists = self
                .client
                .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
                .await
                .context("reading the source's publications")?
                .is_some();
            if exists {
                self.client
                    .batch_execute(&format!("DROP PUBLICATION {}", quote_ident(&publication)))
                    .await
                    .with_context(|| format!("dropping publication {publication}"))?;
                dropped.push(format!("source: publication {publication}"));
            }
        }
        // The DDL capture serves every pipeline reading this database: it goes with the last one.
        let capture_installed = self
            .client
            .query_opt("SELECT 1 FROM pg_event_trigger WHERE evtname = $1", &[&ddl::TRIGGERS[0]])
            .await
            .context("reading the source's event triggers")?
            .is_some();
        let other_pipelines: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cutover\\_%' AND database = current_database()",
                &[],
            )
            .await
            .context("reading the source's replication slots")?
            .get(0);
        if capture_installed && other_pipelines == 0 {
            self.client.batch_execute(ddl::UNINSTALL).await.context("removing the DDL capture from the source")?;
            dropped.push(format!("source: event triggers {} and their functions", ddl::TRIGGERS.join(", ")));
        }
        Ok(dropped)
    }

    /// `default_transaction_read_only` on the database, every other client session ended
    /// (and waited for), background writers named, then the insert LSN.
    async fn fence(&mut self) -> anyhow::Result<super::fence::Fence> {
        fence::fence(&self.params).await
    }

    async fn confirmed_position(&mut self) -> anyhow::Result<Option<Position>> {
        let row = self
            .client
            .query_opt(
                "SELECT 'lsn:' || confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .context("reading the slot's confirmed position")?;
        let confirmed: Option<String> = row.and_then(|row| row.get(0));
        confirmed.map(|text| text.parse().with_context(|| format!("the slot's confirmed position {text}"))).transpose()
    }

    /// The flushed WAL position: what the walsender can read, so a keepalive's `wal_end`
    /// reaches it. A commit is flushed before it returns (asynchronous commits within
    /// `wal_writer_delay`), so every transaction committed before `clock` lies before it.
    async fn log_end(&mut self) -> anyhow::Result<Option<LogEnd>> {
        // The clock first: what committed before it is flushed by the time the position is read.
        let micros: i64 = self
            .client
            .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
            .await
            .context("reading the source's clock")?
            .get(0);
        let lsn: String = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .context("reading the source's WAL position")?
            .get(0);
        let position = Position::Lsn(lsn.parse().with_context(|| format!("the source's WAL position {lsn}"))?);
        Ok(Some(LogEnd { position, clock: UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0)) }))
    }

    fn chunks(&self, table: &TableDefinition, workers: usize) -> Vec<Chunk> {
        reader::chunks(table, workers)
    }

    async fn start_stream(
        &mut self,
        from: &Position,
        confirmed: watch::Receiver<Position>,
        copies: &HashMap<String, crate::checkpoint::TableProgress>,
    ) -> anyhow::Result<Box<dyn ChangeStream>> {
        let Some(from) = from.lsn() else {
            anyhow::bail!(
                "a PostgreSQL slot resumes from an LSN, not from {from}: this state dir belongs to another source"
            )
        };
        let mut conn = ReplicationConnection::connect(&self.params).await?;
        conn.start_replication(&self.slot, from, &self.publications())
            .await
            .with_context(|| format!("starting replication from slot {} at {from}", self.slot))?;
        let catalog = self.params.connect().await?;
        let untracked: HashMap<String, i64> =
            copies.iter().filter_map(|(name, copy)| Some((name.clone(), copy.untracked?))).collect();
        let watched = InsertOnlyWatch::start(&catalog, &self.insert_only, &untracked).await?;
        let ddl_key = match self.capturing {
            true => ddl::capture_key(&catalog).await?,
            false => None,
        };
        Ok(Box::new(PostgresChangeStream {
            conn,
            catalog,
            filter: self.filter.clone(),
            ddl_key,
            relations: HashMap::new(),
            selected: Default::default(),
            unannounced: Default::default(),
            queued: Default::default(),
            type_names: HashMap::new(),
            confirmed,
            last_commit_end: from,
            reported_flush: Lsn(0),
            in_transaction: false,
            last_status: Instant::now(),
            last_housekeeping: Instant::now(),
            watched,
        }))
    }
}
