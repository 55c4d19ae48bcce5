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

mod catalog;
mod ddl;
mod fence;
pub mod pgoutput;
mod replication;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::TryStreamExt;
use tokio::sync::watch;

use self::pgoutput::{Message, OldTuple, PG_EPOCH_OFFSET_MICROS};
use self::replication::{ReplicationConnection, ReplicationMessage};
use super::{ChangeStream, LogEnd, SnapshotPoint, Source, TableReader, TableRewritten};
use crate::change::{Change, Column, Event, Identity, TableName, TableSchema};
use crate::checkpoint::PipelineIdentity;
use crate::config::TableFilter;
use crate::copy::{Chunk, CopyFormat, CopyStream, SourceDialect};
use crate::finding::Finding;
use crate::pgconn::ConnectParams;
use crate::position::{Lsn, Position};
use crate::schema::{quote_ident, quote_literal, quote_table, SourceSchema, TableDefinition};

/// Tables larger than this many 8 kB pages are copied in page ranges by several workers.
const CHUNK_MIN_PAGES: u64 = 8192;

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
        Ok(Box::new(PostgresTableReader { client }))
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
        // A partitioned table: a chunk per partition that holds rows (none: the table, empty).
        if table.partitioning.is_some() {
            let holders = table.row_holders().len();
            return if holders == 0 { vec![Chunk::Whole] } else { (0..holders).map(Chunk::Partition).collect() };
        }
        let per_chunk = (table.pages / (workers as u64 * 2).max(1)).max(CHUNK_MIN_PAGES);
        if workers < 2 || table.pages < 2 * CHUNK_MIN_PAGES {
            return vec![Chunk::Whole];
        }
        let mut chunks = Vec::new();
        let mut start = 0u64;
        while start < table.pages {
            let end = start + per_chunk;
            // The last chunk is open-ended: the table may have grown since it was measured.
            let end = if end >= table.pages { u32::MAX } else { u32::try_from(end).unwrap_or(u32::MAX) };
            chunks.push(Chunk::Pages { start: u32::try_from(start).unwrap_or(u32::MAX), end });
            start += per_chunk;
        }
        chunks
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

/// A copy connection inside the exported snapshot.
struct PostgresTableReader {
    client: tokio_postgres::Client,
}

#[async_trait]
impl TableReader for PostgresTableReader {
    async fn read(&mut self, table: &TableDefinition, chunk: Chunk, format: CopyFormat) -> anyhow::Result<CopyStream> {
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        // The table that holds the chunk's rows: a partition, or the table itself.
        let name = match chunk {
            Chunk::Partition(n) => table
                .row_holders()
                .get(n)
                .map(|&p| p.clone())
                .with_context(|| format!("{} has no partition {n} that holds rows", table.schema.name))?,
            _ => table.schema.name.clone(),
        };
        let qualified = quote_table(&name);
        let source = match chunk {
            // A partitioned table without partitions: COPY reads no partitioned table itself.
            Chunk::Whole if table.partitioning.is_some() => {
                format!("(SELECT {} FROM {qualified})", columns.join(", "))
            }
            Chunk::Whole | Chunk::KeyRange { .. } | Chunk::Partition(_) => {
                format!("{qualified} ({})", columns.join(", "))
            }
            Chunk::Pages { start, end } => {
                let upper = if end == u32::MAX { String::new() } else { format!(" AND ctid < '({end},0)'::tid") };
                format!("(SELECT {} FROM {qualified} WHERE ctid >= '({start},0)'::tid{upper})", columns.join(", "))
            }
        };
        let options = match format {
            CopyFormat::PostgresBinary => "FORMAT binary",
            CopyFormat::PostgresText => "FORMAT text",
        };
        // Lock the table (its read would, until this transaction ends), then compare the
        // file the snapshot's catalog names with the table's file now: TRUNCATE swaps the
        // file, and the snapshot would read the new one (empty of what it can see). Without
        // waiting: a TRUNCATE queued for a table another reader holds would make this one
        // wait behind it, and the TRUNCATE waits for the copy to end. (A failed statement
        // ends a transaction: inside a savepoint.)
        let checking = || format!("checking that {name} was not truncated since the snapshot");
        let lock = format!(
            "SAVEPOINT cutover_lock; LOCK TABLE ONLY {qualified} IN ACCESS SHARE MODE NOWAIT; RELEASE SAVEPOINT cutover_lock"
        );
        match self.client.batch_execute(&lock).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                self.client.batch_execute("ROLLBACK TO SAVEPOINT cutover_lock").await.with_context(checking)?;
                return Err(TableRewritten(name).into());
            }
            Err(e) => return Err(e).with_context(checking),
        }
        let rewritten = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_class c WHERE c.oid = $1::text::regclass \
                 AND pg_relation_filenode(c.oid) IS NOT DISTINCT FROM nullif(c.relfilenode, 0)",
                &[&qualified],
            )
            .await
            .with_context(checking)?
            .is_none();
        if rewritten {
            return Err(TableRewritten(name).into());
        }
        let stream = self
            .client
            .copy_out(&format!("COPY {source} TO STDOUT ({options})"))
            .await
            .with_context(|| format!("starting to copy {name} out of the source"))?
            .map_err(move |e| anyhow::anyhow!("copying {name} out of the source: {e:#}"));
        Ok(CopyStream { format, data: Box::pin(stream) })
    }
}

/// UPDATEs + DELETEs so far on each table, per the statistics collector, keyed
/// by the table's display name.
async fn untracked_changes(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> anyhow::Result<HashMap<String, i64>> {
    if tables.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<String> = tables.iter().map(quote_table).collect();
    let rows = client
        .query(
            // Summed over the partitions of a partitioned table (a plain table has no tree).
            "SELECT n.ord::int4, coalesce(sum(s.n_tup_upd + s.n_tup_del), 0)::int8 \
             FROM unnest($1::text[]) WITH ORDINALITY AS n(name, ord) \
             LEFT JOIN pg_stat_user_tables s ON s.relid = n.name::regclass \
                  OR s.relid IN (SELECT t.relid FROM pg_partition_tree(n.name::regclass) t) \
             GROUP BY n.ord",
            &[&names],
        )
        .await
        .context("reading update/delete counters of tables without replica identity")?;
    let mut counts = HashMap::new();
    for row in rows {
        let index = usize::try_from(row.get::<_, i32>(0) - 1).unwrap_or(usize::MAX);
        if let Some(table) = tables.get(index) {
            counts.insert(table.to_string(), row.get(1));
        }
    }
    Ok(counts)
}

/// When the source database's statistics were last reset (`pg_stat_reset()`, or one
/// table's counters): `None` if never.
async fn stats_reset(client: &tokio_postgres::Client) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_opt("SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .context("reading when the source's statistics were last reset")?
        .and_then(|row| row.get(0)))
}

/// Tables whose UPDATEs and DELETEs cannot replicate: their counters are watched
/// against the counts taken when each was copied, and the first such change
/// stops the pipeline instead of being lost silently — also one made while
/// cutover was not running. Counters that went back (`pg_stat_reset()`, a crash)
/// can no longer tell: that stops the pipeline too, and is never taken as a new
/// baseline, so a restart stops again.
struct InsertOnlyWatch {
    tables: Vec<TableName>,
    baselines: HashMap<String, i64>,
    /// As read when the watch started: a reset since then makes a table's counters
    /// unknown even where they climbed back to their baseline.
    stats_reset: Option<String>,
}

impl InsertOnlyWatch {
    /// Tables without a stored baseline (never copied by cutover) start from now.
    async fn start(
        client: &tokio_postgres::Client,
        tables: &[TableName],
        stored: &HashMap<String, i64>,
    ) -> anyhow::Result<InsertOnlyWatch> {
        // Read before the counts: a reset in between makes the watch stricter, never blind.
        let stats_reset = stats_reset(client).await?;
        let mut baselines = untracked_changes(client, tables).await?;
        for (table, count) in &mut baselines {
            if let Some(&at_copy) = stored.get(table) {
                *count = at_copy;
            }
        }
        Ok(InsertOnlyWatch { tables: tables.to_vec(), baselines, stats_reset })
    }

    async fn check(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        if self.tables.is_empty() {
            return Ok(());
        }
        let reset_since_start = stats_reset(client).await? != self.stats_reset;
        let counts = untracked_changes(client, &self.tables).await?;
        let mut changed = Vec::new();
        let mut unknown = Vec::new();
        for table in &self.tables {
            let name = table.to_string();
            let count = counts.get(&name).copied().unwrap_or(0);
            let baseline = self.baselines.get(&name).copied().unwrap_or(0);
            if count > baseline {
                changed.push(table);
            } else if count < baseline || (reset_since_start && baseline > 0) {
                unknown.push((table, format!("{name}: {baseline} when copied, {count} now")));
            }
        }
        let recopy = |tables: &[&TableName]| {
            let fixes: Vec<String> =
                tables.iter().map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", quote_table(t))).collect();
            format!(
                "Fix: {} then re-copy the table (remove it from the target and start over with a new state dir)",
                fixes.join(" ")
            )
        };
        if !changed.is_empty() {
            let names: Vec<String> = changed.iter().map(|t| t.to_string()).collect();
            anyhow::bail!(
                "an UPDATE or DELETE ran on the source on a table without primary key or replica identity ({}); \
                 it cannot be replicated, so cutover stopped at its last checkpoint. {}",
                names.join(", "),
                recopy(&changed)
            )
        }
        if !unknown.is_empty() {
            let tables: Vec<&TableName> = unknown.iter().map(|(t, _)| *t).collect();
            let counters: Vec<&str> = unknown.iter().map(|(_, counters)| counters.as_str()).collect();
            anyhow::bail!(
                "the UPDATE/DELETE counters of tables without primary key or replica identity went back on the source \
                 ({}{}): pg_stat_reset() or a crash reset them, so whether an UPDATE or DELETE ran on these tables \
                 since is unknown, and cutover stopped at its last checkpoint rather than guess. {}",
                counters.join("; "),
                if reset_since_start { "; statistics reset while streaming" } else { "" },
                recopy(&tables)
            )
        }
        Ok(())
    }
}

/// The decoded pgoutput stream of one slot.
struct PostgresChangeStream {
    conn: ReplicationConnection,
    catalog: tokio_postgres::Client,
    /// Which tables the pipeline's are (renamed ones stay in the publication until a restart).
    filter: TableFilter,
    /// The key the DDL capture signs its messages with; `None` when not capturing.
    ddl_key: Option<String>,
    relations: HashMap<u32, Arc<TableSchema>>,
    /// Relations described but not passed on yet: one goes out right before the first
    /// change that uses it. (Published via the partition root, pgoutput also describes
    /// the partition a change hit, which no change then names.)
    unannounced: std::collections::HashSet<u32>,
    /// Events decoded from one message and not returned yet.
    queued: std::collections::VecDeque<Event>,
    type_names: HashMap<(u32, i32), String>,
    confirmed: watch::Receiver<Position>,
    last_commit_end: Lsn,
    reported_flush: Lsn,
    in_transaction: bool,
    last_status: Instant,
    last_housekeeping: Instant,
    watched: InsertOnlyWatch,
}

/// How often the server hears from us even when nothing changes.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often confirmed positions are passed on and watched tables checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

impl PostgresChangeStream {
    fn confirmed_lsn(&self) -> Lsn {
        // The pipeline only ever confirms positions this stream produced: LSNs.
        self.confirmed.borrow().lsn().unwrap_or_default()
    }

    async fn send_status(&mut self, received: Lsn, flushed: Lsn, reply: bool) -> anyhow::Result<()> {
        self.conn.send_status(received.max(flushed), flushed, reply).await?;
        self.reported_flush = flushed;
        self.last_status = Instant::now();
        Ok(())
    }

    async fn type_name(&mut self, oid: u32, modifier: i32) -> anyhow::Result<String> {
        if let Some(name) = self.type_names.get(&(oid, modifier)) {
            return Ok(name.clone());
        }
        let name: String = self
            .catalog
            .query_one("SELECT format_type($1, $2)", &[&oid, &modifier])
            .await
            .with_context(|| format!("looking up the name of type OID {oid}"))?
            .get(0);
        self.type_names.insert((oid, modifier), name.clone());
        Ok(name)
    }

    async fn relation(&mut self, rel: pgoutput::Relation) -> anyhow::Result<Arc<TableSchema>> {
        // One catalog read per Relation: each column's default and primary-key membership.
        let catalog: HashMap<String, (Option<String>, bool)> = self
            .catalog
            .query(
                "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid), coalesce(a.attnum = ANY(i.indkey), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&rel.relid],
            )
            .await
            .with_context(|| format!("looking up the columns of {}.{} on the source", rel.namespace, rel.name))?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let mut columns = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            columns.push(Column {
                name: c.name.clone(),
                type_name: self.type_name(c.type_oid, c.type_modifier).await?,
                type_oid: c.type_oid,
                is_key: c.is_key,
                default: catalog.get(&c.name).and_then(|(default, _)| default.clone()),
            });
        }
        let identity = match rel.replica_identity {
            // FULL flags every column; when a primary key exists, match by it instead.
            b'f' => {
                for column in &mut columns {
                    column.is_key = catalog.get(&column.name).is_some_and(|(_, in_key)| *in_key);
                }
                if columns.iter().any(|c| c.is_key) {
                    Identity::Key
                } else {
                    Identity::Full
                }
            }
            _ if columns.iter().any(|c| c.is_key) => Identity::Key,
            _ => Identity::Nothing,
        };
        let schema = Arc::new(TableSchema { name: TableName::new(rel.namespace, rel.name), columns, identity });
        self.relations.insert(rel.relid, schema.clone());
        Ok(schema)
    }

    fn table(&self, relid: u32, at: Lsn) -> anyhow::Result<Arc<TableSchema>> {
        self.relations.get(&relid).cloned().with_context(|| {
            format!("the source sent a change for relation {relid} at {at} before describing it (protocol error)")
        })
    }

    /// Turns one pgoutput message into an event, if it is one.
    async fn event(&mut self, message: Message, at: Lsn) -> anyhow::Result<Option<Event>> {
        Ok(Some(match message {
            Message::Begin { final_lsn, commit_time, .. } => {
                self.in_transaction = true;
                Event::Begin { position: Position::Lsn(Lsn(final_lsn)), commit_time: pg_time(commit_time) }
            }
            Message::Commit { end_lsn, commit_time, .. } => {
                self.in_transaction = false;
                self.last_commit_end = Lsn(end_lsn);
                Event::Commit { position: Position::Lsn(Lsn(end_lsn)), commit_time: pg_time(commit_time) }
            }
            Message::Relation(rel) => {
                let relid = rel.relid;
                self.relation(rel).await?;
                self.unannounced.insert(relid);
                return Ok(None);
            }
            Message::Insert { relid, new } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                Event::Change(Change::Insert { table, row: new })
            }
            Message::Update { relid, old, new } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                let old = old.map(|o| match o {
                    OldTuple::Key(row) | OldTuple::Full(row) => row,
                });
                Event::Change(Change::Update { table, old, new })
            }
            Message::Delete { relid, old: OldTuple::Key(old) | OldTuple::Full(old) } => {
                let Some(table) = self.selected_table(relid, at)? else { return Ok(None) };
                Event::Change(Change::Delete { table, old })
            }
            Message::Truncate { relids, cascade, restart_identity } => {
                let mut tables = Vec::new();
                for relid in relids {
                    tables.extend(self.selected_table(relid, at)?);
                }
                if tables.is_empty() {
                    return Ok(None);
                }
                Event::Change(Change::Truncate { tables, cascade, restart_identity })
            }
            Message::Message { transactional: true, prefix, content, .. } if prefix == ddl::MESSAGE_PREFIX => {
                let filter = &self.filter;
                let Some(key) = self.ddl_key.as_deref() else { return Ok(None) };
                let changes = ddl::schema_changes(&content, key, |name| filter.includes(&name.to_string()))
                    .with_context(|| format!("at {at}"))?;
                for change in changes {
                    tracing::info!(
                        table = %change.table,
                        ops = ?change.ops.iter().map(|op| op.kind()).collect::<Vec<_>>(),
                        at = %at,
                        "schema change on the source"
                    );
                    self.queued.push_back(Event::Change(Change::Schema(change)));
                }
                return Ok(None);
            }
            Message::Type { .. } | Message::Origin { .. } | Message::Message { .. } => return Ok(None),
        }))
    }

    /// The table a change names, if the selection matches it (a table renamed out of the
    /// selection stays in the publication until the next start syncs it), with a
    /// `Relation` event queued before the change when it was not passed on since it was described.
    fn selected_table(&mut self, relid: u32, at: Lsn) -> anyhow::Result<Option<Arc<TableSchema>>> {
        let table = self.table(relid, at)?;
        if !self.filter.includes(&table.name.to_string()) {
            return Ok(None);
        }
        if self.unannounced.remove(&relid) {
            self.queued.push_back(Event::Change(Change::Relation(table.clone())));
        }
        Ok(Some(table))
    }
}

#[async_trait]
impl ChangeStream for PostgresChangeStream {
    async fn next(&mut self) -> anyhow::Result<Event> {
        if let Some(event) = self.queued.pop_front() {
            return Ok(event);
        }
        loop {
            let housekeeping = tokio::time::sleep_until((self.last_housekeeping + HOUSEKEEPING_INTERVAL).into());
            tokio::select! {
                message = self.conn.recv() => match message? {
                    ReplicationMessage::XLogData { wal_start, data } => {
                        let decoded = pgoutput::decode(&data)
                            .with_context(|| format!("decoding the replication stream at {wal_start}"))?;
                        if let Some(event) = self.event(decoded, wal_start).await? {
                            // The relations it uses first.
                            self.queued.push_back(event);
                        }
                        if let Some(event) = self.queued.pop_front() {
                            return Ok(event);
                        }
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        let confirmed = self.confirmed_lsn();
                        // Idle and fully applied: the server's own position is safe to confirm.
                        let idle = !self.in_transaction && self.last_commit_end <= confirmed;
                        let flushed = if idle { confirmed.max(wal_end) } else { confirmed };
                        crate::metrics::METRICS.lag_bytes.set(i64::try_from(wal_end.0.saturating_sub(flushed.0)).unwrap_or(i64::MAX));
                        if reply_requested || flushed != self.reported_flush || self.last_status.elapsed() >= STATUS_INTERVAL {
                            self.send_status(wal_end, flushed, false).await?;
                        }
                        // wal_end is where the walsender has read to: every transaction that
                        // committed before it has been sent.
                        if !self.in_transaction {
                            return Ok(Event::Heartbeat { position: Position::Lsn(wal_end) });
                        }
                    }
                },
                _ = housekeeping => {
                    self.last_housekeeping = Instant::now();
                    let confirmed = self.confirmed_lsn();
                    if confirmed > self.reported_flush || self.last_status.elapsed() >= STATUS_INTERVAL {
                        // Asks for a keepalive back: an idle server sends none of its own while
                        // it hears from us, and its wal_end is what a replay to a time waits for.
                        self.send_status(self.last_commit_end, confirmed.max(self.reported_flush), true).await?;
                    }
                    self.watched.check(&self.catalog).await?;
                }
            }
        }
    }
}

fn pg_time(micros_since_2000: i64) -> SystemTime {
    let micros = micros_since_2000.saturating_add(PG_EPOCH_OFFSET_MICROS);
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}
