//! The checkpoint store: RocksDB in the pipeline's state directory.
//!
//! It holds the position of the last source transaction the target committed,
//! each table's snapshot progress and the pipeline's identity (which source it
//! replicates, from which slot). Every write is synced: once `save_position`
//! returns, a crash cannot take the position back. The target holds the same
//! position in the same transaction as the rows; at startup the target wins.

use std::path::Path;

use anyhow::Context as _;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::change::TableName;
use crate::copy::Chunk;
use crate::position::Position;

const POSITION: &str = "position";
const IDENTITY: &str = "identity";
const SWITCHOVER: &str = "switchover";

/// How a pipeline ended at a switchover: its last position and whether its
/// fallback stream (new primary → old source) takes over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRecord {
    pub final_position: String,
    pub fallback: bool,
}
const TABLE_PREFIX: &str = "table/";
const CHUNKS_PREFIX: &str = "chunks/";

/// What a state directory belongs to; a mismatch means the wrong state dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineIdentity {
    /// The source's identity (PostgreSQL: `system_identifier` and database).
    pub source: String,
    /// Where the change stream comes from (PostgreSQL: the slot name).
    pub stream: String,
    /// Where the initial snapshot's stream begins.
    pub consistent_point: Position,
}

impl PipelineIdentity {
    /// Fails unless `source` (the identity the source reports now) is the one this
    /// state dir was made for.
    pub fn check_source(&self, source: &str) -> anyhow::Result<()> {
        if source != self.source {
            anyhow::bail!(
                "this state dir belongs to {}, but the source is {source}: point [state] dir at this pipeline's own directory",
                self.source
            );
        }
        Ok(())
    }
}

/// How far one table's snapshot copy got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Stream changes to the table are applied only from this position on: the
    /// position of the snapshot its rows were copied under.
    pub copied_at: Position,
    /// Rows copied.
    pub rows: u64,
    /// The source's count of changes its stream cannot carry for this table, as of
    /// the copy (the source's `SnapshotPoint::untracked`).
    #[serde(default)]
    pub untracked: Option<i64>,
    /// The table's definition as copied, in the source's form (its `SnapshotPoint::shapes`).
    #[serde(default)]
    pub shape: Option<String>,
    /// A copy resumed under a later snapshot: each key range with the snapshot it was
    /// copied under (`copied_at` is the earliest). Empty when one snapshot copied it all.
    #[serde(default)]
    pub ranges: Vec<ChunkCopy>,
}

impl TableProgress {
    /// Whether a change at `position` to the row whose integer key is `key` is newer than
    /// the copy that holds the row.
    pub fn applies(&self, position: &Position, key: i64) -> bool {
        *position >= self.copied_at
            && self.ranges.iter().find(|r| r.chunk.holds_key(key)).is_none_or(|r| r.copied_at <= *position)
    }

    /// Whether changes at `position` must be placed row by row: some of the table's
    /// ranges were copied at or before it, others after.
    pub fn splits_at(&self, position: &Position) -> bool {
        *position >= self.copied_at && self.ranges.iter().any(|range| range.copied_at > *position)
    }
}

/// One finished chunk of a table's copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCopy {
    pub chunk: Chunk,
    /// The snapshot it was copied under.
    pub copied_at: Position,
    pub rows: u64,
}

/// A table's copy split by key ranges, while it runs: the ranges planned, those finished
/// (each with its snapshot) and what the table looked like when the first began. A copy
/// cut short resumes with the ranges not finished, under a new snapshot; the stream, which
/// begins no later than the earliest finished range's snapshot, brings those up to date.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPlan {
    pub chunks: Vec<Chunk>,
    pub finished: Vec<ChunkCopy>,
    /// The table's columns as the first range was copied (name, type, key), and its
    /// definition in the source's form (its `SnapshotPoint::shapes`, which say how the
    /// source's log is read): a table whose columns or shape changed since is copied from
    /// the start.
    pub columns: Vec<String>,
    #[serde(default)]
    pub shape: Option<String>,
}

/// Writes that are on disk when they return.
fn synced() -> rocksdb::WriteOptions {
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(true);
    options
}

/// The RocksDB-backed checkpoint store.
pub struct CheckpointStore {
    db: rocksdb::DB,
}

impl CheckpointStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<CheckpointStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, dir.join("checkpoint")).with_context(|| {
            format!(
                "cannot open the checkpoint store in {} (is another cutover running with this state dir?)",
                dir.display()
            )
        })?;
        Ok(CheckpointStore { db })
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        let Some(bytes) = self.db.get(key).with_context(|| format!("checkpoint store: reading {key}"))? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&bytes).with_context(|| format!("checkpoint store: {key} is corrupt"))?;
        Ok(Some(value))
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.db.put_opt(key, bytes, &synced()).with_context(|| format!("checkpoint store: writing {key}"))
    }

    pub fn identity(&self) -> anyhow::Result<Option<PipelineIdentity>> {
        self.get(IDENTITY)
    }

    pub fn save_identity(&self, identity: &PipelineIdentity) -> anyhow::Result<()> {
        self.put(IDENTITY, identity)
    }

    /// The end position of the last source transaction known committed on the target.
    pub fn position(&self) -> anyhow::Result<Option<Position>> {
        self.get(POSITION)
    }

    pub fn save_position(&self, position: &Position) -> anyhow::Result<()> {
        self.put(POSITION, position)
    }

    /// The switchover this pipeline ended with, if it did.
    pub fn switchover(&self) -> anyhow::Result<Option<SwitchoverRecord>> {
        self.get(SWITCHOVER)
    }

    pub fn save_switchover(&self, record: &SwitchoverRecord) -> anyhow::Result<()> {
        self.put(SWITCHOVER, record)
    }

    pub fn table(&self, table: &TableName) -> anyhow::Result<Option<TableProgress>> {
        self.get(&format!("{TABLE_PREFIX}{table}"))
    }

    /// Records a table's copy finished; its chunk plan goes in the same write.
    pub fn save_table(&self, table: &TableName, progress: &TableProgress) -> anyhow::Result<()> {
        let key = format!("{TABLE_PREFIX}{table}");
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(&key, serde_json::to_vec(progress)?);
        batch.delete(format!("{CHUNKS_PREFIX}{table}"));
        self.db.write_opt(batch, &synced()).with_context(|| format!("checkpoint store: writing {key}"))
    }

    /// Forgets that a table (`schema.table`, as [`TableName`] prints it) was copied, or
    /// how far its copy got: the next start copies it again from the start.
    pub fn forget_table(&self, table: &str) -> anyhow::Result<()> {
        let key = format!("{TABLE_PREFIX}{table}");
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete(&key);
        batch.delete(format!("{CHUNKS_PREFIX}{table}"));
        self.db.write_opt(batch, &synced()).with_context(|| format!("checkpoint store: deleting {key}"))
    }

    /// How far a table's copy by key ranges got, while it is not finished.
    pub fn chunk_plan(&self, table: &TableName) -> anyhow::Result<Option<ChunkPlan>> {
        self.get(&format!("{CHUNKS_PREFIX}{table}"))
    }

    pub fn save_chunk_plan(&self, table: &TableName, plan: &ChunkPlan) -> anyhow::Result<()> {
        self.put(&format!("{CHUNKS_PREFIX}{table}"), plan)
    }

    pub fn forget_chunk_plan(&self, table: &TableName) -> anyhow::Result<()> {
        let key = format!("{CHUNKS_PREFIX}{table}");
        self.db.delete_opt(&key, &synced()).with_context(|| format!("checkpoint store: deleting {key}"))
    }

    /// Every table whose copy finished, with its progress.
    pub fn tables(&self) -> anyhow::Result<Vec<(String, TableProgress)>> {
        let mut tables = Vec::new();
        for item in self.db.prefix_iterator(TABLE_PREFIX) {
            let (key, value) = item.context("checkpoint store: listing tables")?;
            let Some(name) = key.strip_prefix(TABLE_PREFIX.as_bytes()) else { break };
            let progress = serde_json::from_slice(&value).context("checkpoint store: a table's progress is corrupt")?;
            tables.push((String::from_utf8_lossy(name).into_owned(), progress));
        }
        Ok(tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Lsn;

    #[test]
    fn values_survive_reopen() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cutover-ckpt-{}", std::process::id()));
        let table = TableName::new("public", "t");
        {
            let store = CheckpointStore::open(&dir)?;
            assert_eq!(store.position()?, None);
            store.save_position(&Position::Lsn(Lsn(42)))?;
            store.save_table(
                &table,
                &TableProgress {
                    copied_at: Position::Lsn(Lsn(7)),
                    rows: 3,
                    untracked: None,
                    shape: None,
                    ranges: Vec::new(),
                },
            )?;
            let plan = ChunkPlan { chunks: vec![Chunk::Whole], finished: Vec::new(), columns: Vec::new(), shape: None };
            store.save_chunk_plan(&table, &plan)?;
        }
        let store = CheckpointStore::open(&dir)?;
        assert_eq!(store.position()?, Some(Position::Lsn(Lsn(42))));
        assert_eq!(store.table(&table)?.map(|t| t.rows), Some(3));
        assert_eq!(store.tables()?.len(), 1);
        assert!(store.chunk_plan(&table)?.is_some(), "a plan saved after the table stays until the next save");
        store.forget_table(&table.to_string())?;
        assert_eq!((store.table(&table)?, store.chunk_plan(&table)?), (None, None));
        drop(store);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_change_applies_where_the_copy_holding_its_row_is_older() {
        let lsn = |n| Position::Lsn(Lsn(n));
        let range = |start, end, at| ChunkCopy { chunk: Chunk::KeyRange { start, end }, copied_at: lsn(at), rows: 0 };
        let progress = TableProgress {
            copied_at: lsn(10),
            rows: 0,
            untracked: None,
            shape: None,
            ranges: vec![range(None, Some(100), 10), range(Some(100), None, 20)],
        };
        assert!(!progress.applies(&lsn(9), 5), "before every range");
        assert!(
            progress.applies(&lsn(10), 5) && progress.applies(&lsn(15), 99) && progress.applies(&lsn(15), i64::MIN)
        );
        assert!(!progress.applies(&lsn(15), 100) && !progress.applies(&lsn(19), i64::MAX));
        assert!(progress.applies(&lsn(20), 100));
        assert!(progress.splits_at(&lsn(10)) && progress.splits_at(&lsn(19)));
        assert!(!progress.splits_at(&lsn(9)) && !progress.splits_at(&lsn(20)));
    }
}
