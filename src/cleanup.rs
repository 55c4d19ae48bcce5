//! `cutover cleanup`: drops what a pipeline created — the source's slot and
//! publications, the target's replication origin and progress row, the state
//! dir — after asking, unless `--yes`. It never drops user data.

use std::io::{BufRead, Write};

use anyhow::Context as _;

use crate::config::Config;

/// Runs the cleanup; `Ok(false)` when the user said no.
pub async fn cleanup(config: &Config, yes: bool) -> anyhow::Result<bool> {
    // The fallback stream after a switchover keeps its state inside this state dir.
    if let Some(status) = crate::status::running(&config.state.dir).await? {
        anyhow::bail!("cutover is running for pipeline {} (phase {}): stop it first", config.name, status.phase);
    }
    if !yes {
        print!(
            "Drop replication slot, publications, replication origin and progress of pipeline {} and remove {}? \
             (the replicated tables stay) [yes/no] ",
            config.name,
            config.state.dir.display()
        );
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            println!("nothing dropped");
            return Ok(false);
        }
    }
    let (mut source, mut sink) = crate::connect::source_and_sink(config).await?;
    let mut dropped = source.cleanup().await?;
    dropped.extend(sink.cleanup().await?);
    if config.state.dir.exists() {
        std::fs::remove_dir_all(&config.state.dir)
            .with_context(|| format!("removing state dir {}", config.state.dir.display()))?;
        dropped.push(format!("state dir {}", config.state.dir.display()));
    }
    if dropped.is_empty() {
        println!("nothing to drop for pipeline {}", config.name);
    }
    for item in dropped {
        println!("dropped {item}");
    }
    Ok(true)
}
