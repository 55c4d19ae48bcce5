//! The watch on tables without replica identity: UPDATE/DELETE counters read at each snapshot, checked while streaming.

use std::collections::HashMap;

use anyhow::Context as _;

use crate::change::TableName;
use crate::schema::quote_table;

/// UPDATEs + DELETEs so far on each table, per the statistics collector, keyed
/// by the table's display name.
pub(super) async fn untracked_changes(
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
pub(super) struct InsertOnlyWatch {
    tables: Vec<TableName>,
    baselines: HashMap<String, i64>,
    /// As read when the watch started: a reset since then makes a table's counters
    /// unknown even where they climbed back to their baseline.
    stats_reset: Option<String>,
}

impl InsertOnlyWatch {
    /// Tables without a stored baseline (never copied by cutover) start from now.
    pub(super) async fn start(
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

    pub(super) async fn check(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
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
