//! `cutover resync`: copy tables again under a fresh snapshot.
//!
//! The tables' copies are forgotten in the checkpoint store. A running daemon is told
//! over its control socket: it finishes the source transaction in progress, commits,
//! and resumes from its checkpoint, which empties the forgotten tables on the target,
//! copies them under a new snapshot and streams on, applying their changes only from
//! that snapshot's position (what a restart in the middle of a snapshot does). The
//! other tables' changes wait while the copy runs and are applied after it. Without a
//! running daemon the next `cutover run` does the same.

use crate::change::TableName;
use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::status::{ask, Request};

/// Asks for `tables` (`schema.table`, each one of the pipeline's) to be copied again;
/// returns what will happen, for a person.
pub async fn resync(config: &Config, tables: &[String]) -> anyhow::Result<String> {
    anyhow::ensure!(!tables.is_empty(), "name the tables to copy again: --table schema.table (repeatable)");
    let mut source = crate::connect::source(config).await?;
    let known: Vec<TableName> = source.schema().await?.tables.into_iter().map(|t| t.schema.name).collect();
    let mut names = Vec::with_capacity(tables.len());
    for table in tables {
        let Some(name) = known.iter().find(|k| &k.to_string() == table) else {
            let known: Vec<String> = known.iter().map(ToString::to_string).collect();
            anyhow::bail!(
                "{table} is not one of this pipeline's tables (those [source] tables / exclude select on the source: {})",
                known.join(", ")
            );
        };
        names.push(name.clone());
    }
    let list = tables.join(", ");
    // Emptied together on the target, a table goes with those whose foreign keys point at it.
    let referencing = crate::connect::sink(config).await?.referencing_tables(&names).await?;
    if !referencing.is_empty() {
        let referencing: Vec<String> = referencing.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "{list}: foreign keys of {} on the target reference them, so they are emptied only together: \
             add --table for each of those",
            referencing.join(", ")
        );
    }
    if ask(&config.state.dir, &Request::Resync { tables: tables.to_vec() }).await?.is_some() {
        return Ok(format!(
            "{list}: copying again now — the running daemon finishes the source transaction in progress, empties \
             them on the target and copies them under a new snapshot; the other tables' changes are applied once \
             that copy is done. `cutover status` shows the copy.\n"
        ));
    }
    let store = CheckpointStore::open(&config.state.dir)?;
    for table in tables {
        store.forget_table(table)?;
    }
    Ok(format!("{list}: no daemon runs for this pipeline; the next `cutover run` empties them on the target and copies them again.\n"))
}
