//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Change-data-capture replication for near-zero-downtime database migrations.
#[derive(Debug, Parser)]
#[command(name = "cutover", version)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy a consistent snapshot, then stream every committed transaction until stopped.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the config, check both servers' settings and privileges, print the plan; exit 1 on a problem.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Where the pipeline stands: phase, applied position, lag, snapshot progress, last error.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drop what the pipeline created (slot, publications, origin, progress, state dir), after asking.
    Cleanup {
        #[arg(long)]
        config: PathBuf,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// End the migration: fence the source, wait until the target has everything, sync sequences,
    /// and (with `[switchover] fallback = true`) stream the new primary's writes back. Needs `cutover run`.
    Switchover {
        #[arg(long)]
        config: PathBuf,
    },
    /// Copy tables again under a fresh snapshot (the running daemon does it at once; else the next run).
    Resync {
        #[arg(long)]
        config: PathBuf,
        /// A table to copy again, as `schema.table` (repeatable).
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
    },
    /// Compare source and target: row counts and checksums per table; exit 1 on a difference.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// Write the SQL that gives the target the source's rows where they differ to this file.
        #[arg(long)]
        repair_script: Option<PathBuf>,
        /// Run that SQL on the target (a transaction per table; a running pipeline is held at the
        /// repair's snapshot of the source meanwhile), then verify again.
        #[arg(long)]
        repair: bool,
    },
    /// Run each `;`-separated query on source and target: median times and whether the results agree.
    CompareQueries {
        #[arg(long)]
        config: PathBuf,
        /// A file of SQL queries separated by `;`.
        #[arg(long)]
        queries: PathBuf,
        /// How many times each query runs on each side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Throwaway source and target, a live write load, snapshot then streaming, then verification.
    Demo {
        /// Where the demo's data comes from.
        #[arg(long, value_enum, default_value = "postgres")]
        source: crate::demo::DemoSource,
        /// Source data size: pgbench scale (PostgreSQL) or 100 000-row units of orders (MySQL).
        #[arg(long, default_value_t = 5)]
        scale: u32,
        /// Seconds of write load during snapshot and streaming.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
}
