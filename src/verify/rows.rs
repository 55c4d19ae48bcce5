//! Row by row: both sides' rows of a range read, keyed, sorted and walked side by side.
//! Across dialects every chunk is compared this way (values in canonical form); within
//! one, only the small slices that hashing found different (rows by their md5).

use std::cmp::Ordering;

use anyhow::Context as _;
use futures_util::StreamExt as _;

use crate::sql::{RowStream, Rows};

use super::plan::{Buckets, Range, Side, TablePlan};
use super::{Hashing, TableCheck, TableReport};

impl TableCheck<'_> {
    /// Rows compared one by one: counted, and their range kept for a re-check if they differ.
    pub(super) fn leaf(&mut self, range: Range, source: &[(String, String)], target: &[(String, String)]) {
        self.report.source_rows += source.len() as u64;
        self.report.target_rows += target.len() as u64;
        if diff_rows(source, target, self.plan.key.is_empty(), &mut self.report) {
            self.differing.push((range, source.len() as u64, target.len() as u64));
        }
    }

    /// Both sides' rows of a range, read at once.
    pub(super) async fn rows(
        &self,
        source: &mut Side,
        target: &mut Side,
        range: &Range,
    ) -> anyhow::Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        let (s, t) = tokio::join!(self.side_rows(source, range), self.side_rows(target, range));
        Ok((s?, t?))
    }

    /// One side's rows of a range, keyed and sorted.
    pub(super) async fn side_rows(&self, side: &mut Side, range: &Range) -> anyhow::Result<Vec<(String, String)>> {
        let sql = self.plan.rows_sql(side, range, self.hashing);
        Ok(self.plan.keyed_rows(side.table_rows(&sql, self.plan).await?, self.hashing))
    }
}

/// One side's rows ordered by bucket ([`TablePlan::bucketed_rows_sql`]), taken a bucket at a time.
struct Bucketed<'a> {
    rows: std::pin::Pin<Box<futures_util::stream::Peekable<RowStream<'a>>>>,
    side: &'static str,
}

impl Bucketed<'_> {
    /// The bucket of the next row; `None` at the end.
    async fn next_bucket(&mut self) -> anyhow::Result<Option<u64>> {
        let bucket = match self.rows.as_mut().peek().await {
            None => return Ok(None),
            Some(Ok(row)) => row.first().cloned().flatten(),
            Some(Err(_)) => None,
        };
        match bucket.and_then(|b| b.parse().ok()) {
            Some(bucket) => Ok(Some(bucket)),
            None => {
                let error = self.rows.next().await.and_then(Result::err);
                Err(error.unwrap_or_else(|| anyhow::anyhow!("a row without its bucket number")))
                    .with_context(|| format!("reading the {}'s rows by bucket", self.side))
            }
        }
    }

    /// The rows of `bucket` (the bucket number left out), if it is the next one.
    async fn take(&mut self, bucket: u64) -> anyhow::Result<Rows> {
        let mut rows = Vec::new();
        while self.next_bucket().await? == Some(bucket) {
            if let Some(Ok(mut row)) = self.rows.next().await {
                row.remove(0);
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

impl TableCheck<'_> {
    /// Across dialects, a table keyed by text: each side's rows read once, ordered by
    /// their key's bucket of `of`, and compared a bucket at a time (one bucket's rows in
    /// memory, not the table's).
    pub(super) async fn buckets_in_one_pass(
        &mut self,
        source: &mut Side,
        target: &mut Side,
        of: u64,
    ) -> anyhow::Result<()> {
        let (source_sql, target_sql) =
            (self.plan.bucketed_rows_sql(source, of), self.plan.bucketed_rows_sql(target, of));
        let (source_name, target_name) = (source.name, target.name);
        let (s, t) = tokio::join!(source.client.stream(&source_sql), target.client.stream(&target_sql));
        let mut s = Bucketed { rows: Box::pin(futures_util::StreamExt::peekable(s?)), side: source_name };
        let mut t = Bucketed { rows: Box::pin(futures_util::StreamExt::peekable(t?)), side: target_name };
        loop {
            let bucket = match (s.next_bucket().await?, t.next_bucket().await?) {
                (None, None) => return Ok(()),
                (a, b) => a.into_iter().chain(b).min().unwrap_or_default(),
            };
            let (s_rows, t_rows) = (s.take(bucket).await?, t.take(bucket).await?);
            self.report.chunks += 1;
            let range = Range { lo: None, hi: None, buckets: Some(Buckets { of, these: vec![bucket] }) };
            let (s_rows, t_rows) =
                (self.plan.keyed_rows(s_rows, self.hashing), self.plan.keyed_rows(t_rows, self.hashing));
            self.leaf(range, &s_rows, &t_rows);
        }
    }
}

impl TablePlan {
    /// Rows of a range as `(key, compared value)`, sorted; without a key, `(the row's
    /// identity, its text as shown)`.
    fn keyed_rows(&self, rows: Rows, hashing: Hashing) -> Vec<(String, String)> {
        let mut keyed: Vec<(String, String)> = rows
            .into_iter()
            .map(|row| match hashing {
                // Without a key a row is its own identity (its md5), shown by its text.
                Hashing::Server if self.key.is_empty() => (
                    row.get(1).cloned().flatten().unwrap_or_default(),
                    shorten(row.first().cloned().flatten().unwrap_or_default()),
                ),
                Hashing::Server => {
                    let key: Vec<Option<String>> = row[..self.key.len().min(row.len())].to_vec();
                    (key_text(&key), row.last().cloned().flatten().unwrap_or_default())
                }
                Hashing::Canonical => {
                    let values: Vec<Option<String>> = row
                        .iter()
                        .zip(&self.columns)
                        .map(|(value, (_, class))| value.as_deref().map(|v| class.canonical(v)))
                        .collect();
                    let compared = values
                        .iter()
                        .map(|v| v.as_deref().map_or("\u{0}N".to_string(), |v| format!("{}:{v}", v.len())))
                        .collect::<Vec<_>>()
                        .join(",");
                    match self.key.is_empty() {
                        // Without a key a row is its own identity, shown by its values.
                        true => (compared, shorten(key_text(&values))),
                        false => {
                            let key = self.key.iter().map(|&i| values.get(i).cloned().flatten()).collect::<Vec<_>>();
                            (key_text(&key), compared)
                        }
                    }
                }
            })
            .collect();
        keyed.sort();
        keyed
    }
}

/// A key as the report shows it: the value, or `(a, b)` for a composite key.
fn key_text(values: &[Option<String>]) -> String {
    let shown: Vec<&str> = values.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
    match shown.as_slice() {
        [one] => one.to_string(),
        many => format!("({})", many.join(", ")),
    }
}

/// A table without a key is reported by its rows' values, cut to a readable length.
fn shorten(text: String) -> String {
    const SHOWN: usize = 120;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Walks two sorted row lists, recording what one has and the other lacks (rows
/// without a key are named by their text, and are never "changed"). Returns whether
/// anything differed.
pub(super) fn diff_rows(
    source: &[(String, String)],
    target: &[(String, String)],
    keyless: bool,
    report: &mut TableReport,
) -> bool {
    let shown = |row: &(String, String)| if keyless { row.1.clone() } else { row.0.clone() };
    let (mut i, mut j, mut differed) = (0, 0, false);
    while i < source.len() || j < target.len() {
        let order = match (source.get(i), target.get(j)) {
            (Some(s), Some(t)) => s.0.cmp(&t.0),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                report.missing.add(&shown(&source[i]));
                i += 1;
                differed = true;
            }
            Ordering::Greater => {
                report.extra.add(&shown(&target[j]));
                j += 1;
                differed = true;
            }
            Ordering::Equal => {
                if !keyless && source[i].1 != target[j].1 {
                    report.changed.add(&source[i].0);
                    differed = true;
                }
                i += 1;
                j += 1;
            }
        }
    }
    differed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn row_lists_differ_by_missing_extra_and_changed_keys() {
        let mut report = TableReport::default();
        let source = rows(&[("1", "a"), ("2", "b"), ("3", "c"), ("5", "e")]);
        let target = rows(&[("1", "a"), ("3", "C"), ("4", "d"), ("5", "e")]);
        assert!(diff_rows(&source, &target, false, &mut report));
        assert_eq!(report.missing.keys, vec!["2"]);
        assert_eq!(report.extra.keys, vec!["4"]);
        assert_eq!(report.changed.keys, vec!["3"]);
        assert!(!diff_rows(&source, &source, false, &mut TableReport::default()));
        // Without a key: rows named by their text, never changed.
        let mut report = TableReport::default();
        assert!(diff_rows(&rows(&[("h1", "(1,a)")]), &rows(&[("h2", "(1,b)")]), true, &mut report));
        assert_eq!(
            (report.missing.keys.clone(), report.extra.keys.clone(), report.changed.count),
            (vec!["(1,a)".to_string()], vec!["(1,b)".to_string()], 0)
        );
    }

    #[test]
    fn long_keyless_rows_are_shortened_for_the_report() {
        let long = "x".repeat(500);
        assert_eq!(shorten(long).chars().count(), 121);
        assert_eq!(key_text(&[Some("1".into()), None]), "(1, NULL)");
    }
}
