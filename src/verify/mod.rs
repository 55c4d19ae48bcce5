//! `cutover verify`: source against target, table by table, in key-range chunks.
//!
//! Where both sides speak the same dialect, each server hashes its own rows: a
//! chunk is a row count and a sum of 64-bit row hashes, and a chunk that differs
//! is bisected by key until it is small enough to compare rows by their md5 one by one.
//! Across dialects the rows travel to cutover and each value is brought to one
//! canonical text (`compare::canonical`, by column type) before rows are compared.
//!
//! Chunks are ranges of the first key column. Only types every dialect orders
//! alike (integers, decimals, dates and times) are split by range; a table keyed
//! by text (whose order depends on collations) or without a key is split by key
//! hash into buckets: where the servers hash, one pass per side gives every bucket's
//! digest; across dialects, by the md5 of a column both print alike (the key if it is
//! text or uuid, without a key the first text, uuid or integer column), one ordered
//! pass per side, a bucket at a time in memory.
//!
//! On a live pipeline a row the target has not caught up with yet looks changed:
//! rows found different are read again on the source, then on the target once it
//! has applied everything the source had written by then.
//!
//! Its parts: [`plan`] is how a table is seen on each side (column classes, key
//! order, chunk boundaries, the SQL each side runs); [`hash`] compares each chunk,
//! by the servers' row hashes within one dialect, bisecting those that differ;
//! [`rows`] reads rows and compares them one by one (every chunk across dialects,
//! a small differing one within one); [`report`] holds what was found and renders
//! it. This module runs the tables through them and re-checks differing rows on a
//! live pipeline.

mod hash;
mod plan;
mod repair;
mod report;
mod rows;

pub use repair::Repair;
pub use report::{render, Differences, TableReport, Verification};

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::Config;
use crate::sql::{SqlClient, SqlDialect};
use crate::status::Request;

use plan::{Range, Side, TablePlan};
use rows::diff_rows;

/// Rows per chunk when each server hashes its own rows.
const SERVER_CHUNK_ROWS: u64 = 100_000;
/// Rows per chunk when rows travel to cutover to be compared.
const CANONICAL_CHUNK_ROWS: u64 = 10_000;
/// A differing chunk this small is compared row by row instead of split again.
const LEAF_ROWS: u64 = 1_000;
/// Keys shown per kind of difference.
pub const SHOWN_KEYS: usize = 20;
/// How often differing rows of a live pipeline are read again.
const RECHECK_ROUNDS: usize = 3;
/// How long a re-check waits for the target to catch up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// How chunks are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hashing {
    /// Same dialect: the servers hash their rows.
    Server,
    /// Different dialects: rows come to cutover in canonical form.
    Canonical,
}

/// Verifies one table: its report and the ranges that held differing rows.
struct TableCheck<'a> {
    plan: &'a TablePlan,
    /// The table as the source's catalog describes it.
    table: &'a crate::schema::TableDefinition,
    hashing: Hashing,
    report: TableReport,
    /// Ranges that held differing rows, with the rows each side had in them.
    differing: Vec<(Range, u64, u64)>,
}

/// One side's rows of one range, keyed as [`diff_rows`] takes them.
type RangeRows = Vec<(String, String)>;

impl TableCheck<'_> {
    /// Reads the differing ranges again: the source first, then, once the target has applied
    /// everything the source had written by then, the target. Returns the position waited for.
    async fn recheck(
        &mut self,
        config: &Config,
        source: &mut Side,
        target: &mut Side,
    ) -> anyhow::Result<Option<String>> {
        let source_rows = self.differing_rows(source).await?;
        let position = crate::pipeline::source_position(config).await?;
        // A daemon that stopped meanwhile: compare the rows as they are.
        let (reached, applied) =
            crate::pipeline::wait_until_applied(config, &position, CATCH_UP_WAIT).await.unwrap_or((false, None));
        if !reached {
            tracing::warn!(
                "the target did not reach the source's position {position} within {} s (applied: {}); \
                 differing rows are compared as they are",
                CATCH_UP_WAIT.as_secs(),
                applied.as_deref().unwrap_or("none")
            );
        }
        self.compare_again(source_rows, target).await?;
        Ok(applied.filter(|_| reached))
    }

    /// One side's rows of each differing range.
    async fn differing_rows(&self, side: &mut Side) -> anyhow::Result<Vec<RangeRows>> {
        let mut rows = Vec::with_capacity(self.differing.len());
        for (range, _, _) in &self.differing {
            rows.push(self.side_rows(side, range).await?);
        }
        Ok(rows)
    }

    /// Compares the differing ranges again, the source's rows read before against the
    /// target's now; keeps the ranges that still differ, and reports what differs in them.
    async fn compare_again(&mut self, source_rows: Vec<RangeRows>, target: &mut Side) -> anyhow::Result<()> {
        let ranges = std::mem::take(&mut self.differing);
        self.report.missing = Differences::default();
        self.report.extra = Differences::default();
        self.report.changed = Differences::default();
        for ((range, old_s, old_t), s) in ranges.into_iter().zip(source_rows) {
            let t = self.side_rows(target, &range).await?;
            let (new_s, new_t) = (s.len() as u64, t.len() as u64);
            self.report.source_rows = self.report.source_rows.saturating_sub(old_s) + new_s;
            self.report.target_rows = self.report.target_rows.saturating_sub(old_t) + new_t;
            if diff_rows(&s, &t, self.plan.key.is_empty(), &mut self.report) {
                self.differing.push((range, new_s, new_t));
            }
        }
        Ok(())
    }
}

/// Compares every selected table.
pub async fn verify(config: &Config) -> anyhow::Result<Verification> {
    verify_and_repair(config, &Repair::default()).await
}

/// Compares every selected table, then writes (or runs) the SQL that gives the target the
/// source's rows where they still differ: [`Repair`].
pub async fn verify_and_repair(config: &Config, repair: &Repair) -> anyhow::Result<Verification> {
    let started = Instant::now();
    let source_dialect = SqlDialect::of_source(config, "verify")?;
    let target_dialect = SqlDialect::of_target(config);
    let repairing = repair.apply || repair.script.is_some();
    let hashing = if source_dialect == target_dialect { Hashing::Server } else { Hashing::Canonical };
    let mut source = Side {
        client: SqlClient::open(source_dialect, config.source.endpoint()).await.context("[source]")?,
        name: "source",
    };
    let mut target = Side {
        client: SqlClient::open(target_dialect, config.target.endpoint()).await.context("[target]")?,
        name: "target",
    };
    // Also what a repair reads the source's rows through, as the copy reads them.
    let mut source_rows = crate::connect::source(config).await?;
    let schema = source_rows.schema().await?;
    let live = crate::status::ask(&config.state.dir, &Request::Status).await.ok().flatten().is_some_and(|s| s.running);

    let mut checks = Vec::new();
    let plans: Vec<TablePlan> = schema
        .tables
        .iter()
        .map(|table| TablePlan::new(config, table, source_dialect, target_dialect))
        .collect::<anyhow::Result<_>>()?;
    for (plan, table) in plans.iter().zip(&schema.tables) {
        let mut check = TableCheck {
            plan,
            table,
            hashing,
            report: TableReport { table: plan.display.clone(), ..TableReport::default() },
            differing: Vec::new(),
        };
        match check.buckets_across(&mut source, &mut target).await? {
            Some(of) => check
                .buckets_in_one_pass(&mut source, &mut target, of)
                .await
                .with_context(|| format!("comparing {}", plan.display))?,
            None => {
                for range in check.ranges(&mut source).await.with_context(|| format!("splitting {}", plan.display))? {
                    check
                        .chunk(&mut source, &mut target, range)
                        .await
                        .with_context(|| format!("comparing {}", plan.display))?;
                }
            }
        }
        checks.push(check);
    }

    let mut consistent_at = None;
    if live {
        for _ in 0..RECHECK_ROUNDS {
            let mut rechecked = false;
            for check in checks.iter_mut().filter(|c| !c.differing.is_empty()) {
                consistent_at = check.recheck(config, &mut source, &mut target).await?;
                rechecked = true;
            }
            if !rechecked {
                break;
            }
        }
    }
    let mut repaired = Vec::new();
    if repairing && checks.iter().any(|c| !c.differing.is_empty()) {
        // On a live pipeline the applier holds while the repair writes; see [`crate::hold::Hold`].
        let mut held = match repair.apply && live {
            true => Some(
                crate::status::HeldPipeline::next(&config.state.dir)
                    .await?
                    .context("the daemon stopped while verify ran: run verify --repair again")?,
            ),
            false => None,
        };
        // The source's rows are read inside one snapshot, as the copy reads them.
        let snapshot = source_rows.new_snapshot().await.context("pinning a snapshot of the source for the repair")?;
        let reader = source_rows.snapshot_reader(&snapshot).await;
        let joined = match held.is_some() {
            true => source.client.join_snapshot(&snapshot).await,
            false => Ok(()),
        };
        source_rows.release_snapshot().await;
        let (mut reader, ()) = (reader?, joined?);
        if let Some(hold) = held.as_mut() {
            // The target now holds exactly what the snapshot sees: compare there once more,
            // and repair only what still differs.
            let at = hold.before(&snapshot.position).await?;
            tracing::info!(%at, "the target holds at the repair's snapshot: comparing the differing rows there");
            for check in checks.iter_mut().filter(|c| !c.differing.is_empty()) {
                let source_rows = check.differing_rows(&mut source).await?;
                check.compare_again(source_rows, &mut target).await?;
            }
            consistent_at = Some(at.to_string());
        }
        let mut repairs = Vec::new();
        for check in checks.iter().filter(|c| !c.differing.is_empty()) {
            let ranges = check.differing.iter().map(|(range, _, _)| range);
            let table = repair::TableRepair::of(check.plan, check.table, ranges, reader.as_mut(), &mut target)
                .await
                .with_context(|| format!("writing the repair of {}", check.plan.display))?;
            repairs.push(table);
        }
        crate::failpoint::hit("repair-rows-read");
        if let Some(path) = &repair.script {
            let script: String = std::iter::once(repair::script_session(target_dialect).to_string())
                .chain(repairs.iter().map(|r| r.script(target_dialect)))
                .collect();
            std::fs::write(path, script).with_context(|| format!("writing the repair script {}", path.display()))?;
        }
        if repair.apply {
            for table in &repairs {
                table.apply(&mut target, held.as_mut()).await?;
            }
        }
        // Dropped only now: the applier goes on from the snapshot, over the repaired rows.
        drop(held);
        repaired = repairs.into_iter().map(|r| r.table).collect();
    }
    Ok(Verification {
        tables: checks.into_iter().map(|c| c.report).collect(),
        consistent_at,
        elapsed: started.elapsed(),
        repaired,
    })
}
