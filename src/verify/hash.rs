//! Chunks compared where both sides speak the same dialect: each server hashes its own
//! rows, a chunk is a row count and a sum of row hashes, and one that differs is
//! bisected by key (or split into key-hash buckets) until it is small enough to compare
//! row by row. Across dialects a chunk goes straight to the rows.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;

use crate::sql::Rows;

use super::plan::{Bound, Buckets, KeyOrder, Range, Side};
use super::{Hashing, TableCheck, LEAF_ROWS};

impl TableCheck<'_> {
    /// Compares one chunk; bisects it when the servers' hashes differ.
    pub(super) async fn chunk(&mut self, source: &mut Side, target: &mut Side, range: Range) -> anyhow::Result<()> {
        self.report.chunks += 1;
        if self.hashing == Hashing::Canonical {
            let (s, t) = self.rows(source, target, &range).await?;
            self.leaf(range, &s, &t);
            return Ok(());
        }
        let (s, t) = self.digests(source, target, &range).await?;
        let mut pending = vec![(range, s, t)];
        while let Some((range, s, t)) = pending.pop() {
            // Counts are taken where the comparison ends: a live target may catch up in between.
            if s == t {
                self.report.source_rows += s.0;
                self.report.target_rows += t.0;
                continue;
            }
            let larger = s.0.max(t.0);
            if larger > LEAF_ROWS && self.plan.key_order == KeyOrder::Whole {
                self.buckets(source, target, &range, larger / LEAF_ROWS).await?;
                continue;
            }
            if larger > LEAF_ROWS {
                let side = if s.0 >= t.0 { &mut *source } else { &mut *target };
                if let Some(middle) = self.middle(side, &range, larger / 2).await? {
                    let left = Range { lo: range.lo.clone(), hi: Some(middle.clone()), buckets: None };
                    let right = Range { lo: Some(middle), hi: range.hi.clone(), buckets: None };
                    let (ls, lt) = self.digests(source, target, &left).await?;
                    let (rs, rt) = self.digests(source, target, &right).await?;
                    pending.push((left, ls, lt));
                    pending.push((right, rs, rt));
                    continue;
                }
            }
            let (s, t) = self.rows(source, target, &range).await?;
            self.leaf(range, &s, &t);
        }
        Ok(())
    }

    /// A differing part of a table no range splits alike on both sides, in about `of` buckets
    /// by key hash: every bucket's digest in one pass per side, then the rows of those that differ.
    async fn buckets(&mut self, source: &mut Side, target: &mut Side, range: &Range, of: u64) -> anyhow::Result<()> {
        let of = of.clamp(2, 100_000);
        self.report.chunks += of as usize - 1;
        let (source_sql, target_sql) =
            (self.plan.bucket_digests_sql(source, range, of), self.plan.bucket_digests_sql(target, range, of));
        let (s, t) = tokio::join!(source.run(&source_sql), target.run(&target_sql));
        let (s, t) = (bucket_digests(&s?)?, bucket_digests(&t?)?);
        let buckets: BTreeSet<u64> = s.keys().chain(t.keys()).copied().collect();
        let mut differing = Vec::new();
        for bucket in buckets {
            match (s.get(&bucket), t.get(&bucket)) {
                (Some(s), Some(t)) if s == t => {
                    self.report.source_rows += s.0;
                    self.report.target_rows += t.0;
                }
                _ => differing.push(bucket),
            }
        }
        for these in differing.chunks(LEAF_ROWS as usize) {
            let slice = Range { buckets: Some(Buckets { of, these: these.to_vec() }), ..range.clone() };
            let (s, t) = self.rows(source, target, &slice).await?;
            self.leaf(slice, &s, &t);
        }
        Ok(())
    }

    async fn digests(
        &self,
        source: &mut Side,
        target: &mut Side,
        range: &Range,
    ) -> anyhow::Result<((u64, String), (u64, String))> {
        let (source_sql, target_sql) = (self.plan.digest_sql(source, range), self.plan.digest_sql(target, range));
        let (s, t) = tokio::join!(source.run(&source_sql), target.run(&target_sql));
        Ok((parse_count(&s?)?, parse_count(&t?)?))
    }

    /// The first key column's value `offset` rows into a range, when it splits the range.
    async fn middle(&self, side: &mut Side, range: &Range, offset: u64) -> anyhow::Result<Option<Bound>> {
        let dialect = side.dialect();
        let Some(key) = self.plan.first_key(dialect) else { return Ok(None) };
        let sql = format!(
            "SELECT {key} FROM {} WHERE {} ORDER BY {key} LIMIT 1 OFFSET {offset}",
            self.plan.table(side),
            self.plan.predicate(dialect, range)
        );
        let value = side.run(&sql).await?.into_iter().next().and_then(|row| row.into_iter().next().flatten());
        let middle = value.map(Bound::new);
        // Rows sharing the first key column's value cannot be split by it.
        Ok(middle.filter(|m| range.lo.as_ref() != Some(m)))
    }
}

/// A count query's row: the row count and the hash sum.
fn digest(row: &[Option<String>]) -> anyhow::Result<(u64, String)> {
    let count = row.first().cloned().flatten().unwrap_or_default();
    let count = count.parse::<u64>().with_context(|| format!("row count `{count}` is not a number"))?;
    Ok((count, row.get(1).cloned().flatten().unwrap_or_default()))
}

fn parse_count(rows: &Rows) -> anyhow::Result<(u64, String)> {
    digest(rows.first().context("a count query returned no row")?)
}

/// Bucket digests by bucket number.
fn bucket_digests(rows: &Rows) -> anyhow::Result<BTreeMap<u64, (u64, String)>> {
    let mut digests = BTreeMap::new();
    for row in rows {
        let bucket = row.first().cloned().flatten().unwrap_or_default();
        let bucket = bucket.parse::<u64>().with_context(|| format!("bucket `{bucket}` is not a number"))?;
        digests.insert(bucket, digest(row.get(1..).unwrap_or_default())?);
    }
    Ok(digests)
}
