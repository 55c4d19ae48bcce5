//! PostgreSQL sink.
//!
//! Why replay is safe and nothing doubles: every target transaction ends on a
//! source transaction boundary and records the source position it reaches with
//! `pg_replication_origin_xact_setup`, as PostgreSQL's own subscriber does. The
//! origin's progress commits atomically with the rows, so after a crash the
//! target itself says which transactions it has, and the pipeline resumes after
//! them — even for tables without a key, where an upsert could not absorb a replay.
//!
//! Changes are applied as multi-row statements over `unnest` of text arrays
//! (one prepared statement per table and shape, any batch size); values travel
//! in PostgreSQL's text form and are cast to the column type on the server.
//!
//! Its parts: this module connects, checks the role, creates tables and commits;
//! [`apply`] turns batches into statements; [`copy`] bulk-loads the snapshot.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use tokio_postgres::{Client, Statement};

mod apply;
mod copy;

use self::apply::{group_by_table, is_unique_violation};
use self::copy::PostgresTableWriter;
use super::{InPlace, Sink, TableWriter, TargetColumn};
use crate::change::{Change, SchemaOp, TableName};
use crate::config::Partitions;
use crate::copy::{CopyFormat, SourceDialect};
use crate::finding::Finding;
use crate::pgconn::ConnectParams;
use crate::position::{Lsn, Position};
use crate::schema::postgres::{self as ddl, PostDataObject};
use crate::schema::{quote_ident, quote_literal, quote_table, SourceSchema, TableDefinition};

/// A PostgreSQL database as the target.
pub struct PostgresSink {
    params: ConnectParams,
    client: Client,
    origin: String,
    major: u32,
    statements: HashMap<String, Statement>,
    /// Target columns per table, to notice columns added on the source.
    /// Each table's columns on the target: (name, type as `format_type` prints it).
    columns: HashMap<TableName, Vec<TargetColumn>>,
    /// The apply session is bound to the origin.
    session_ready: bool,
    /// What partitioned tables become here.
    partitions: Partitions,
    /// What the target role may do beyond writing its tables.
    powers: Powers,
    /// `[target] disable_triggers`: tables whose user triggers may be disabled while
    /// applying, when the role may not set session_replication_role.
    disable_triggers: Vec<glob::Pattern>,
    /// Which apply connection this is.
    lane: usize,
    /// The source's positions are LSNs, which a replication origin can hold.
    lsn_positions: bool,
}

/// What the target role may do beyond writing its own tables; a managed service's
/// role (RDS, Cloud SQL, Azure, Supabase, Neon) is no superuser.
#[derive(Clone, Copy, Debug)]
struct Powers {
    /// Superuser, or EXECUTE on the `pg_replication_origin_*` functions: the position is
    /// recorded in the replication origin; else in `cutover.progress`, in the same
    /// transaction as the rows either way.
    origins: bool,
    /// Superuser, or (PostgreSQL 15+) `GRANT SET ON PARAMETER session_replication_role`:
    /// triggers and foreign keys rest while changes are applied; else foreign keys are
    /// created DEFERRABLE and deferred to the end of each target transaction, which ends
    /// on a source transaction boundary, where the source had them satisfied.
    replica_role: bool,
}

/// Where positions go that are no LSN, or when the role may not use replication origins.
const PROGRESS_TABLE: [&str; 2] = [
    "CREATE SCHEMA IF NOT EXISTS cutover",
    "CREATE TABLE IF NOT EXISTS cutover.progress (pipeline text PRIMARY KEY, position text NOT NULL, \
     commit_time timestamptz, updated_at timestamptz NOT NULL DEFAULT now())",
];

/// A user trigger on the target that fires in cutover's session.
struct UserTrigger {
    table: TableName,
    name: String,
    /// Enabled ALWAYS (else enabled for origin sessions, the default).
    always: bool,
    /// `[target] disable_triggers` names its table.
    consented: bool,
}

/// The replication origin functions the sink calls, as `has_function_privilege` names them.
const ORIGIN_FUNCTIONS: [&str; 5] = [
    "pg_replication_origin_create(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_progress(text, boolean)",
    "pg_replication_origin_drop(text)",
];

impl Powers {
    async fn read(client: &Client, major: u32) -> anyhow::Result<Powers> {
        let origins = ORIGIN_FUNCTIONS.map(|f| format!("has_function_privilege('{f}', 'EXECUTE')")).join(" AND ");
        let replica_role = match major >= 15 {
            true => "has_parameter_privilege('session_replication_role', 'SET')",
            false => "false",
        };
        let row = client
            .query_one(
                &format!("SELECT {origins}, rolsuper OR {replica_role} FROM pg_roles WHERE rolname = current_user"),
                &[],
            )
            .await
            .context("reading what the target role may do")?;
        Ok(Powers { origins: row.get(0), replica_role: row.get(1) })
    }
}

impl PostgresSink {
    /// Free space on the volume of the target's data directory against what the
    /// snapshot will write: the tables' size, and about as much again for indexes and WAL.
    async fn free_space_finding(&mut self, copy_bytes: u64) -> Option<Finding> {
        use crate::finding::human_bytes;
        let need = human_bytes(copy_bytes);
        match self.free_bytes().await {
            Ok(free) if free < copy_bytes => Some(Finding::error(
                "target",
                format!("{} free on the volume of the target's data directory", human_bytes(free)),
                &format!("at least {need} for the source tables, about twice that with indexes and WAL"),
                "free or grow that volume, or copy fewer tables ([source] tables / exclude)".into(),
            )),
            Ok(free) if free < copy_bytes.saturating_mul(2) => Some(Finding::warning(
                "target",
                format!("{} free on the volume of the target's data directory", human_bytes(free)),
                &format!(
                    "about {} (the source tables take {need}; indexes and WAL need room too)",
                    human_bytes(copy_bytes.saturating_mul(2))
                ),
                "watch the target's disk during the snapshot, or grow the volume first".into(),
            )),
            Ok(_) => None,
            Err(e) => Some(Finding::warning(
                "target",
                format!("free disk space unknown ({e:#})"),
                &format!("about {} free for the snapshot", human_bytes(copy_bytes.saturating_mul(2))),
                "check the free space on the target's data directory volume by hand".into(),
            )),
        }
    }

    /// Bytes free on the data directory's volume, read with `df` through
    /// `COPY FROM PROGRAM` (superuser; a managed service may not allow it).
    async fn free_bytes(&mut self) -> anyhow::Result<u64> {
        let dir: String = self
            .client
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .context("reading data_directory")?
            .get(0);
        let program = format!("df -Pk -- '{}'", dir.replace('\'', "'\\''"));
        let transaction = self.client.transaction().await.context("opening a transaction")?;
        transaction
            .batch_execute(&format!(
                "CREATE TEMP TABLE cutover_df (line text) ON COMMIT DROP; COPY cutover_df FROM PROGRAM {}",
                quote_literal(&program)
            ))
            .await
            .context("running df on the target server")?;
        let lines = transaction.query("SELECT line FROM cutover_df", &[]).await.context("reading df's output")?;
        let available = lines
            .get(1)
            .and_then(|row| row.get::<_, Option<String>>(0))
            .and_then(|line| line.split_whitespace().nth(3).and_then(|kb| kb.parse::<u64>().ok()))
            .context("df printed no free space")?;
        transaction.rollback().await.context("closing the transaction")?;
        Ok(available.saturating_mul(1024))
    }

    pub async fn connect(
        params: ConnectParams,
        pipeline: &str,
        partitions: Partitions,
    ) -> anyhow::Result<PostgresSink> {
        let client = params.connect().await?;
        // After a switchover the old source is read-only by default for every session;
        // the fallback stream applying into it lifts that for itself only.
        client
            .batch_execute("SET default_transaction_read_only = off")
            .await
            .context("setting up the target session")?;
        let major = crate::pgconn::server_major(&client, "target").await?;
        let origin = format!("cutover_{pipeline}");
        let powers = Powers::read(&client, major).await?;
        let sink = PostgresSink {
            major,
            params,
            client,
            origin,
            statements: HashMap::new(),
            columns: HashMap::new(),
            session_ready: false,
            partitions,
            powers,
            disable_triggers: Vec::new(),
            lane: 0,
            lsn_positions: true,
        };
        Ok(sink)
    }

    /// With `[target] disable_triggers`: the tables whose user triggers it may disable.
    pub fn disabling_triggers(self, tables: Vec<glob::Pattern>) -> PostgresSink {
        PostgresSink { disable_triggers: tables, ..self }
    }

    /// As apply connection `lane`, for a source whose positions are LSNs or not.
    pub fn on_lane(self, lane: usize, lsn_positions: bool) -> PostgresSink {
        PostgresSink { lane, lsn_positions, ..self }
    }

    /// This apply connection's replication origin, and its row in `cutover.progress`.
    fn progress_record(&self) -> String {
        crate::sink::lane_record(&self.origin, self.lane)
    }

    /// The target's user triggers that fire in cutover's (origin) session — enabled, or
    /// enabled ALWAYS; not those enabled for REPLICA sessions only — and whether `[target]
    /// disable_triggers` names the table. cutover's own tables are never among them.
    async fn user_triggers(&self) -> anyhow::Result<Vec<UserTrigger>> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text, t.tgname::text, t.tgenabled::text FROM pg_trigger t \
                 JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE NOT t.tgisinternal AND t.tgenabled IN ('O', 'A') AND n.nspname <> 'cutover' ORDER BY 1, 2, 3",
                &[],
            )
            .await
            .context("reading the target's triggers")?;
        Ok(rows
            .iter()
            .map(|r| {
                let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
                let consented = self.disable_triggers.iter().any(|p| p.matches(&table.to_string()));
                UserTrigger { table, name: r.get(2), always: r.get::<_, String>(3) == "A", consented }
            })
            .collect())
    }

    /// Disables the consented tables' user triggers that fire for cutover, each recorded
    /// (in the same transaction) in `cutover.disabled_triggers` with how it was enabled,
    /// so that the switchover and `cleanup` enable exactly those again, as they were.
    /// Triggers created later are disabled at the next start.
    async fn disable_user_triggers(&self) -> anyhow::Result<()> {
        let triggers: Vec<UserTrigger> = self.user_triggers().await?.into_iter().filter(|t| t.consented).collect();
        if triggers.is_empty() {
            return Ok(());
        }
        let mut sql = vec![
            "CREATE SCHEMA IF NOT EXISTS cutover".to_string(),
            "CREATE TABLE IF NOT EXISTS cutover.disabled_triggers (pipeline text, schema_name text, table_name text, \
             trigger_name text, always boolean NOT NULL, PRIMARY KEY (pipeline, schema_name, table_name, trigger_name))"
                .to_string(),
        ];
        for trigger in &triggers {
            let (table, name) = (&trigger.table, &trigger.name);
            tracing::info!(%table, trigger = name, "disabling a user trigger while applying ([target] disable_triggers)");
            sql.push(format!(
                "INSERT INTO cutover.disabled_triggers VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING",
                quote_literal(&self.origin),
                quote_literal(&table.schema),
                quote_literal(&table.name),
                quote_literal(name),
                trigger.always
            ));
            sql.push(format!("ALTER TABLE {} DISABLE TRIGGER {}", quote_table(table), quote_ident(name)));
        }
        // Each apply connection does this as it starts, maybe at the same moment as another.
        create_if_missing(&self.client, &format!("BEGIN; {}; COMMIT", sql.join(";\n")))
            .await
            .context("disabling user triggers on the target ([target] disable_triggers; the role must own the tables)")
    }

    /// Enables again, as they were enabled, the user triggers this pipeline disabled that
    /// are still there and still disabled (a table copied again, or a trigger dropped or
    /// renamed, leaves its record behind: forgotten); returns them.
    async fn enable_user_triggers(&self) -> anyhow::Result<Vec<String>> {
        let recorded = self
            .client
            .query(
                "SELECT d.schema_name, d.table_name, d.trigger_name, d.always FROM cutover.disabled_triggers d \
                 JOIN pg_namespace n ON n.nspname = d.schema_name \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.table_name \
                 JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = d.trigger_name AND t.tgenabled = 'D' \
                 WHERE d.pipeline = $1 ORDER BY 1, 2, 3",
                &[&self.origin],
            )
            .await;
        let recorded = match recorded {
            Ok(rows) => rows,
            // Never disabled any: the table is not there.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
            Err(e) => return Err(e).context("reading cutover.disabled_triggers on the target"),
        };
        let mut sql = Vec::new();
        let mut enabled = Vec::new();
        for row in &recorded {
            let (table, trigger) =
                (TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)), row.get::<_, String>(2));
            let always = if row.get::<_, bool>(3) { "ALWAYS " } else { "" };
            sql.push(format!("ALTER TABLE {} ENABLE {always}TRIGGER {}", quote_table(&table), quote_ident(&trigger)));
            enabled.push(format!("{trigger} on {table}"));
        }
        sql.push(format!("DELETE FROM cutover.disabled_triggers WHERE pipeline = {}", quote_literal(&self.origin)));
        self.client
            .batch_execute(&format!("BEGIN; {}; COMMIT", sql.join(";\n")))
            .await
            .context("enabling again the user triggers cutover disabled on the target")?;
        Ok(enabled)
    }

    /// Each apply connection records its position in a replication origin of its own, and
    /// the server keeps the progress of at most `max_replication_slots` origins
    /// (`max_active_replication_origins` from PostgreSQL 18): too few free for the
    /// connections' origins not there yet fails the first parallel apply.
    async fn origin_slots_finding(&self, apply_connections: usize) -> anyhow::Result<Option<Finding>> {
        let setting = if self.major >= 18 { "max_active_replication_origins" } else { "max_replication_slots" };
        let records: Vec<String> =
            (0..apply_connections).map(|lane| crate::sink::lane_record(&self.origin, lane)).collect();
        // pg_replication_origin_status is for superusers unless granted: without it, no count.
        let readable: bool = self
            .client
            .query_one("SELECT has_table_privilege('pg_replication_origin_status', 'SELECT')", &[])
            .await
            .context("reading the target role's privileges")?
            .get(0);
        if !readable {
            return Ok(None);
        }
        let row = self
            .client
            .query_one(
                "SELECT current_setting($1)::int8, \
                        (SELECT count(*) FROM pg_replication_origin_status), \
                        (SELECT count(*) FROM pg_replication_origin_status s \
                         JOIN pg_replication_origin o ON o.roident = s.local_id WHERE o.roname = ANY($2))",
                &[&setting, &records],
            )
            .await
            .context("reading the target's replication origins")?;
        let (limit, in_use, ours): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let needed = i64::try_from(apply_connections).unwrap_or(i64::MAX) - ours;
        if in_use + needed <= limit {
            return Ok(None);
        }
        Ok(Some(Finding::error(
            "target",
            format!(
                "{setting} = {limit} on the target, {in_use} replication origin(s) in use: [pipeline] \
                 apply_connections = {apply_connections} needs {needed} more"
            ),
            &format!("{setting} of at least {}", in_use + needed),
            format!(
                "ALTER SYSTEM SET {setting} = {}; then restart the target, or lower [pipeline] apply_connections",
                in_use + needed
            ),
        )))
    }

    /// Before the first apply: binds this session to the replication origin (created if
    /// needed) and, as PostgreSQL's own subscriber does, turns off triggers and
    /// foreign-key checks (the source checked them), which also lets a batch group its
    /// changes by table — each as far as the role may ([`Powers`]).
    async fn prepare_session(&mut self) -> anyhow::Result<()> {
        if self.session_ready {
            return Ok(());
        }
        if self.powers.origins {
            self.setup_origin().await?;
        }
        if !self.powers.origins || !self.lsn_positions {
            self.create_progress_table().await?;
        }
        if self.powers.replica_role {
            self.client
                .batch_execute("SET session_replication_role = replica")
                .await
                .context("setting session_replication_role = replica on the target")?;
        } else {
            self.disable_user_triggers().await?;
        }
        self.session_ready = true;
        Ok(())
    }

    /// Creates `cutover.progress` if needed, before any apply transaction: inside one
    /// that began before another connection created it, `IF NOT EXISTS` can miss it (the
    /// transaction's catalog lookups may not see it yet) and fail on the duplicate.
    async fn create_progress_table(&self) -> anyhow::Result<()> {
        for sql in PROGRESS_TABLE {
            create_if_missing(&self.client, sql).await.with_context(|| format!("{sql} on the target"))?;
        }
        Ok(())
    }

    /// Creates the replication origin if needed and binds this session to it.
    async fn setup_origin(&self) -> anyhow::Result<()> {
        let needs_grant = "(needs superuser, or GRANT EXECUTE on the pg_replication_origin_* functions)";
        let origin = self.progress_record();
        self.client
            .execute(
                "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
                &[&origin],
            )
            .await
            .with_context(|| format!("creating replication origin {} on the target {needs_grant}", origin))?;
        // A killed predecessor's session may hold the origin until its backend notices.
        let mut attempts = 0;
        loop {
            match self.client.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempts < 50 && e.code().map(|c| c.code()) == Some("55006") => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "binding to replication origin {} on the target {needs_grant}; \
                         is another cutover running this pipeline?",
                        origin
                    )))
                }
            }
        }
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn copy_format(&self, table: &TableDefinition, source: SourceDialect) -> CopyFormat {
        // Binary is the fastest path, but carries type OIDs (user types differ between
        // databases) and is documented as less portable across major versions.
        match source {
            SourceDialect::Postgres { major } if major == self.major && !table.has_user_types => {
                CopyFormat::PostgresBinary
            }
            SourceDialect::Postgres { .. } | SourceDialect::Mysql | SourceDialect::Sqlite | SourceDialect::Mongodb => {
                CopyFormat::PostgresText
            }
        }
    }

    async fn applied_position(&mut self) -> anyhow::Result<Option<Position>> {
        // Every apply connection's record: the highest is where the target stands (they commit in source order).
        let records = crate::sink::lane_records(&self.origin);
        // A function the role may not execute fails the query even where CASE skips it.
        let origins = match self.powers.origins {
            true => {
                "SELECT pg_replication_origin_progress(roname, true)::text FROM pg_replication_origin \
                     WHERE roname = ANY($1)"
            }
            false => "SELECT NULL::text WHERE $1::text[] IS NULL",
        };
        let progress_table: bool = self
            .client
            .query_one("SELECT to_regclass('cutover.progress') IS NOT NULL", &[])
            .await
            .context("reading the target's progress records")?
            .get(0);
        let sql = match progress_table {
            true => format!("{origins} UNION ALL SELECT position FROM cutover.progress WHERE pipeline = ANY($1)"),
            false => origins.to_string(),
        };
        let rows = self.client.query(&sql, &[&records]).await.context("reading the target's progress records")?;
        let mut highest = None;
        for text in rows.iter().filter_map(|r| r.get::<_, Option<String>>(0)) {
            let position = match text.parse::<Lsn>() {
                Ok(Lsn(0)) => continue,
                Ok(lsn) => Position::Lsn(lsn),
                Err(_) => text.parse().context("cutover.progress holds a position cutover cannot read")?,
            };
            highest = highest.max(Some(position));
        }
        Ok(highest)
    }

    async fn preflight(
        &mut self,
        schema: &SourceSchema,
        copy_bytes: u64,
        apply_connections: usize,
    ) -> anyhow::Result<Vec<Finding>> {
        let row = self
            .client
            .query_one("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await
            .context("reading the target role")?;
        let (user, superuser): (String, bool) = (row.get(0), row.get(1));
        let role = quote_ident(&user);
        let mut findings = Vec::new();
        let database: String = self
            .client
            .query_one("SELECT current_database()::text", &[])
            .await
            .context("reading the target database")?
            .get(0);
        let may_create: bool = self
            .client
            .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
            .await
            .context("reading the target role's privileges")?
            .get(0);
        if !may_create {
            findings.push(Finding::error(
                "target",
                format!("role {user} may not create schemas in database {database}"),
                "CREATE on the database (cutover creates the source's schemas and its own `cutover` schema)",
                format!("GRANT CREATE ON DATABASE {} TO {role};", quote_ident(&database)),
            ));
        }
        if !superuser && !self.powers.origins {
            let functions = ORIGIN_FUNCTIONS.join(", ");
            findings.push(Finding::warning(
                "target",
                format!("role {user} may not use replication origins"),
                "EXECUTE on the replication origin functions, to record positions as PostgreSQL's own subscriber \
                 does (without it they go into cutover.progress, in the same transaction as the rows)",
                format!("GRANT EXECUTE ON FUNCTION {functions} TO {role};"),
            ));
        }
        if !self.powers.replica_role {
            let grant = match self.major >= 15 {
                true => format!("GRANT SET ON PARAMETER session_replication_role TO {role};"),
                false => format!("ALTER ROLE {role} SUPERUSER; (before PostgreSQL 15 only a superuser may)"),
            };
            findings.push(Finding::warning(
                "target",
                format!("role {user} may not set session_replication_role"),
                "it to apply with triggers and foreign keys at rest (without it, foreign keys are created \
                 DEFERRABLE and checked at the end of each target transaction, and user triggers fire unless \
                 [target] disable_triggers names their tables)",
                grant.clone(),
            ));
            let selected: Vec<String> = schema.tables.iter().map(|t| t.schema.name.to_string()).collect();
            for UserTrigger { table, name, .. } in self.user_triggers().await?.into_iter().filter(|t| !t.consented) {
                if selected.contains(&table.to_string()) {
                    findings.push(Finding::warning(
                        "target",
                        format!("trigger {name} on {table} fires on every change cutover applies"),
                        "triggers at rest while applying, as on a replica",
                        format!(
                            "add \"{table}\" to [target] disable_triggers (cutover disables its user triggers while \
                             it applies and enables them again at the switchover), or {grant}"
                        ),
                    ));
                }
            }
        }
        if self.powers.origins && self.lsn_positions {
            findings.extend(self.origin_slots_finding(apply_connections).await?);
        }
        if copy_bytes > 0 {
            findings.extend(self.free_space_finding(copy_bytes).await);
        }
        let available: Vec<String> = self
            .client
            .query("SELECT name::text FROM pg_available_extensions", &[])
            .await
            .context("reading the target's available extensions")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for extension in schema.extensions.iter().filter(|e| !available.contains(&e.name)) {
            let what = format!("extension {} is not available on the target", extension.name);
            let fix = "install the package that provides it on the target's server (for contrib extensions: \
                       postgresql-contrib), or leave out the tables that use it ([source] exclude)"
                .to_string();
            findings.push(match extension.needed_by.is_empty() {
                false => Finding::error(
                    "target",
                    what,
                    &format!("{} for columns {}", extension.name, extension.needed_by.join(", ")),
                    fix,
                ),
                true => Finding::warning(
                    "target",
                    what,
                    "it for what the source uses it for (an index's operator class, a function)",
                    fix,
                ),
            });
        }
        Ok(findings)
    }

    async fn create_tables(
        &mut self,
        schema: &SourceSchema,
        tables: &[&TableDefinition],
        fresh: bool,
    ) -> anyhow::Result<()> {
        let mut sql = ddl::prerequisites(schema);
        // Copied again, tables go without the foreign keys on them or pointing at them, as in a
        // first copy (their rows land in any order); `finish_snapshot` adds the keys back.
        if !fresh {
            let names: Vec<String> = tables.iter().map(|t| quote_table(&t.schema.name)).collect();
            let drops = self
                .client
                .query(
                    "SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname) \
                     FROM pg_constraint WHERE contype = 'f' \
                       AND (conrelid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t) \
                            OR confrelid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t))",
                    &[&names],
                )
                .await
                .context("reading the foreign keys of the tables to copy again")?;
            sql.extend(drops.iter().map(|r| r.get::<_, String>(0)));
        }
        for table in tables {
            // Whether the table exists, and whether as a partition.
            let found: Option<bool> = self
                .client
                .query_opt(
                    "SELECT c.relispartition FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[&table.schema.name.schema, &table.schema.name.name],
                )
                .await
                .context("looking for existing tables on the target")?
                .map(|row| row.get(0));
            let exists = found.is_some();
            // Copied again (a restart in the middle of the snapshot, `cutover resync`, a schema
            // change) with other columns than the source has now (one dropped or renamed
            // there), or still a partition on the target where the source detached it (read at
            // a restart before the stream applied the DETACH): created again.
            if exists && !fresh {
                let mut columns: Vec<String> =
                    target_columns(&self.client, &table.schema.name).await?.into_iter().map(|c| c.name).collect();
                columns.sort();
                let mut wanted: Vec<String> = table.column_names().iter().map(|c| c.to_string()).collect();
                wanted.sort();
                let partition = found == Some(true);
                if columns != wanted || partition {
                    tracing::warn!(
                        table = %table.schema.name,
                        "the target's table has other columns than the source's, or is a partition there: dropped \
                         (with what depends on it: views, foreign keys, which come back with the keys after the copy) \
                         and created again"
                    );
                    sql.push(format!("DROP TABLE {} CASCADE", quote_table(&table.schema.name)));
                }
            }
            if exists && fresh {
                let has_rows = self
                    .client
                    .query_opt(&format!("SELECT 1 FROM {} LIMIT 1", quote_table(&table.schema.name)), &[])
                    .await
                    .with_context(|| format!("looking into {} on the target", table.schema.name))?
                    .is_some();
                if has_rows {
                    anyhow::bail!(
                        "table {} already holds rows on the target, and cutover never overwrites data it did not write: \
                         empty or drop it, or set [snapshot] mode = \"never\" if the target already has the data",
                        table.schema.name
                    );
                }
            }
            sql.extend(ddl::create_table(table, self.partitions));
        }
        let script = format!("BEGIN; {}; COMMIT", sql.join(";\n"));
        self.client
            .batch_execute(&script)
            .await
            .map_err(|e| anyhow::Error::new(e).context("creating the schema on the target"))?;
        // A table that was there already may have triggers the copy would fire.
        if !self.powers.replica_role {
            self.disable_user_triggers().await?;
        }
        Ok(())
    }

    async fn table_writer(&self) -> anyhow::Result<Box<dyn TableWriter>> {
        let client = self.params.connect().await?;
        // Index builds after the data go faster with room to sort in; the rows go in as a
        // replica's would, without firing triggers, where the role may say so.
        let replica = if self.powers.replica_role { "; SET session_replication_role = replica" } else { "" };
        client
            .batch_execute(&format!("SET maintenance_work_mem = '1GB'; SET synchronous_commit = off{replica}"))
            .await
            .context("setting up a copy connection on the target")?;
        Ok(Box::new(PostgresTableWriter { client }))
    }

    async fn finish_snapshot(&mut self, schema: &SourceSchema) -> anyhow::Result<()> {
        for table in &schema.tables {
            create_missing(&self.client, table, ddl::foreign_keys(table, !self.powers.replica_role)).await?;
        }
        for sql in ddl::sequence_values(schema) {
            self.client.batch_execute(&sql).await.with_context(|| format!("setting sequences on the target: {sql}"))?;
        }
        Ok(())
    }

    async fn hand_over(&mut self) -> anyhow::Result<Vec<String>> {
        self.enable_user_triggers().await
    }

    async fn cleanup(&mut self) -> anyhow::Result<Vec<String>> {
        let triggers = self.enable_user_triggers().await?;
        let mut dropped: Vec<String> = triggers.iter().map(|t| format!("target: trigger {t} enabled again")).collect();
        let records = crate::sink::lane_records(&self.origin);
        let origins: Vec<String> = self
            .client
            .query("SELECT roname FROM pg_replication_origin WHERE roname = ANY($1)", &[&records])
            .await
            .context("reading the target's replication origins")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for origin in origins {
            self.client
                .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
                .await
                .with_context(|| format!("dropping replication origin {origin} (is `cutover run` still running?)"))?;
            dropped.push(format!("target: replication origin {origin}"));
        }
        let progress = self
            .client
            .query("DELETE FROM cutover.progress WHERE pipeline = ANY($1) RETURNING pipeline", &[&records])
            .await;
        for row in progress.iter().flatten() {
            dropped.push(format!("target: row {} of cutover.progress", row.get::<_, String>(0)));
        }
        // Its tables and the schema go with the last pipeline that used them.
        self.client
            .batch_execute(
                "DO $cutover$ BEGIN \
                 IF to_regclass('cutover.progress') IS NOT NULL THEN \
                   IF NOT EXISTS (SELECT 1 FROM cutover.progress) THEN DROP TABLE cutover.progress; END IF; END IF; \
                 IF to_regclass('cutover.disabled_triggers') IS NOT NULL THEN \
                   IF NOT EXISTS (SELECT 1 FROM cutover.disabled_triggers) THEN \
                     DROP TABLE cutover.disabled_triggers; END IF; END IF; \
                 IF to_regnamespace('cutover') IS NOT NULL \
                    AND NOT EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = to_regnamespace('cutover')) THEN \
                   DROP SCHEMA cutover; END IF; END $cutover$",
            )
            .await
            .context("dropping cutover's tables on the target")?;
        Ok(dropped)
    }

    async fn referencing_tables(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        let names: Vec<String> = tables.iter().map(quote_table).collect();
        let rows = self
            .client
            .query(
                "SELECT DISTINCT n.nspname::text, c.relname::text FROM pg_constraint f \
                 JOIN pg_class c ON c.oid = f.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE f.contype = 'f' AND f.confrelid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t) \
                   AND f.conrelid <> ALL (SELECT coalesce(to_regclass(t), 0) FROM unnest($1::text[]) t) \
                 ORDER BY 1, 2",
                &[&names],
            )
            .await
            .context("reading the target's foreign keys")?;
        Ok(rows.iter().map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect())
    }

    async fn missing_tables(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        tables_where(&self.client, tables, "WHERE to_regclass(t) IS NULL").await
    }

    async fn drop_tables(&mut self, tables: &[TableName]) -> anyhow::Result<()> {
        for table in tables {
            let sql = format!("DROP TABLE IF EXISTS {} CASCADE", quote_table(table));
            self.client.batch_execute(&sql).await.with_context(|| format!("dropping {table} on the target"))?;
        }
        Ok(())
    }

    async fn partitions_of(&mut self, tables: &[TableName]) -> anyhow::Result<Vec<TableName>> {
        tables_where(&self.client, tables, "JOIN pg_class c ON c.oid = to_regclass(t) WHERE c.relispartition").await
    }

    /// Foreign keys are not checked while applying (replica role) or only at commit
    /// (created deferrable, deferred), and a batch's changes are applied table by table.
    fn reorders_tables(&self) -> bool {
        true
    }

    fn in_place(&self) -> InPlace {
        let partitions = self.partitions;
        Box::new(move |op| match op {
            SchemaOp::CreateTable | SchemaOp::CopyAgain { .. } => false,
            // Flattened, a partition's rows are mixed into one table: nothing says which they are.
            SchemaOp::DetachPartition { .. } | SchemaOp::DropPartition { .. } => partitions == Partitions::Keep,
            _ => true,
        })
    }

    fn forget_tables(&mut self, tables: &[TableName]) {
        for table in tables {
            self.columns.remove(table);
        }
    }

    async fn bound_lock_waits(&mut self, bounded: bool) -> anyhow::Result<()> {
        let sql = match bounded {
            true => format!("SET lock_timeout = '{}s'", super::LOCK_WAIT_BOUND_SECONDS),
            false => "RESET lock_timeout".to_string(),
        };
        self.client.batch_execute(&sql).await.with_context(|| format!("{sql} on the target"))
    }

    async fn begin(&mut self) -> anyhow::Result<()> {
        self.prepare_session().await?;
        // Without session_replication_role, foreign keys (created DEFERRABLE) are checked
        // at commit, on a source transaction boundary.
        let begin = if self.powers.replica_role { "BEGIN" } else { "BEGIN; SET CONSTRAINTS ALL DEFERRED" };
        self.client.batch_execute(begin).await.context("opening a target transaction")
    }

    async fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()> {
        // Grouped by table and compacted, a batch is a few statements. That reorders
        // rows of a table, which a secondary unique constraint may object to in
        // passing: then the batch runs again exactly in source order.
        self.client.batch_execute("SAVEPOINT cutover_batch").await.context("opening a savepoint on the target")?;
        match self.apply_in_order(&group_by_table(changes), true).await {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {
                tracing::debug!("a reordered batch hit a unique constraint; applying it in source order");
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT cutover_batch")
                    .await
                    .context("rolling back a batch")?;
                // The rollback also undid any column the batch added: read them again.
                self.columns.clear();
                let in_order: Vec<&Change> = changes.iter().collect();
                self.apply_in_order(&in_order, false).await?;
            }
            Err(e) => return Err(e),
        }
        self.client
            .batch_execute("RELEASE SAVEPOINT cutover_batch")
            .await
            .context("releasing a savepoint on the target")
    }

    async fn commit(&mut self, position: &Position, commit_time: SystemTime) -> anyhow::Result<()> {
        let micros = commit_time.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        let seconds = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
        // An LSN goes into the replication origin, as PostgreSQL's own subscriber keeps it;
        // other sources' positions into cutover.progress, in the same transaction.
        let record = match position.lsn().filter(|_| self.powers.origins) {
            Some(lsn) => format!("SELECT pg_replication_origin_xact_setup('{lsn}', to_timestamp({seconds}))"),
            None => format!(
                "INSERT INTO cutover.progress (pipeline, position, commit_time) VALUES ({}, {}, to_timestamp({seconds})) \
                 ON CONFLICT (pipeline) DO UPDATE SET position = EXCLUDED.position, commit_time = EXCLUDED.commit_time, \
                     updated_at = now()",
                quote_literal(&self.progress_record()),
                quote_literal(&position.to_string())
            ),
        };
        self.client
            .batch_execute(&format!("{record}; COMMIT"))
            .await
            .with_context(|| format!("committing the target transaction that reaches {position}"))
    }
}

/// Runs statements that create what may be missing (`IF NOT EXISTS`). That is no guard
/// against another session creating the same at the same moment, nor inside a transaction
/// that began before another session created it (its catalog lookups may not see it yet):
/// the duplicate fails, and a new transaction finds it there.
async fn create_if_missing(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    let mut attempts = 0;
    loop {
        match client.batch_execute(sql).await {
            Err(e) if attempts < 3 && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                attempts += 1;
                // A transaction the statements opened is aborted: end it (a warning if none).
                client.batch_execute("ROLLBACK").await?;
            }
            result => return result,
        }
    }
}

/// Those of `tables` the target's catalog matches: `condition` follows
/// `SELECT t FROM unnest(<the tables' quoted names>) t`.
async fn tables_where(client: &Client, tables: &[TableName], condition: &str) -> anyhow::Result<Vec<TableName>> {
    let names: Vec<String> = tables.iter().map(quote_table).collect();
    let sql = format!("SELECT t FROM unnest($1::text[]) t {condition}");
    let matched: Vec<String> = client
        .query(&sql, &[&names])
        .await
        .with_context(|| format!("looking for tables on the target ({sql})"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(tables.iter().zip(&names).filter(|(_, n)| matched.contains(n)).map(|(t, _)| t.clone()).collect())
}

/// The table's columns on the target, in their order.
async fn target_columns(client: &Client, table: &TableName) -> anyhow::Result<Vec<TargetColumn>> {
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), attgenerated <> '', attidentity = 'a' \
             FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&quote_table(table)],
        )
        .await
        .with_context(|| format!("reading the columns of {table} on the target"))?;
    Ok(rows
        .iter()
        .map(|r| TargetColumn { name: r.get(0), type_name: r.get(1), generated: r.get(2), identity_always: r.get(3) })
        .collect())
}

/// Runs the statements for objects the table does not have yet (a restart may
/// have built some already). Only the table's own constraints and indexes count: a
/// name another relation holds makes its statement fail, naming it, where skipping it
/// would leave the table without its key.
async fn create_missing(client: &Client, table: &TableDefinition, objects: Vec<PostDataObject>) -> anyhow::Result<()> {
    let name = &table.schema.name;
    let existing: Vec<String> = client
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::text::regclass \
             UNION SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1::text::regclass",
            &[&quote_table(name)],
        )
        .await
        .with_context(|| format!("reading the constraints of {name} on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for object in objects.into_iter().filter(|o| !existing.contains(&o.name)) {
        client
            .batch_execute(&object.sql)
            .await
            .with_context(|| format!("creating {} on {name} on the target: {}", object.name, object.sql))?;
    }
    Ok(())
}
