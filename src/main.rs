use std::process::ExitCode;

use clap::Parser as _;
use cutover::cli::{Cli, Command};
use cutover::config::Config;

/// Changes are many small allocations made on the decoding task and freed on the apply
/// tasks; glibc's malloc spent nearly half of cutover's CPU on that during a binlog
/// catch-up (consolidating and unlinking chunks across threads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours and progress bars only for a person at a terminal, never into files or the journal.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if terminal && format != "json" {
        cutover::progress::enable_bars();
    }
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(cutover::progress::LogWriter).with_ansi(terminal);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM or SIGINT, listened for once for the whole process: a signal that arrives
/// while the forward pipeline hands over to the fallback stream still stops the latter.
fn shutdown_signals() -> tokio::sync::watch::Receiver<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let terminate = async {
            match terminate {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        let _ = stop.send(true);
    });
    stopped
}

/// Resolves once a shutdown signal has arrived (at once if it already has).
async fn shutdown(mut stopped: tokio::sync::watch::Receiver<bool>) {
    // An error means the listener is gone: no signal can come any more.
    if stopped.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn main_command(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let signals = shutdown_signals();
            cutover::pipeline::run(&config, shutdown(signals.clone())).await?;
            // A switchover with fallback ends the forward pipeline; the same process streams back.
            if let Some(fallback) = cutover::switchover::fallback_after_switchover(&config).await? {
                tracing::info!("switched over: streaming the new primary's writes back to the old source");
                cutover::pipeline::run(&fallback, shutdown(signals)).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Switchover { config } => {
            let config = Config::load(&config)?;
            let summary = cutover::switchover::switchover(&config).await?;
            print!("{}", cutover::switchover::render(&summary));
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let ready = cutover::preflight::check(&config).await?;
            Ok(if ready { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let status = cutover::status::query(&config.state.dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", cutover::status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup { config, yes } => {
            let config = Config::load(&config)?;
            let done = cutover::cleanup::cleanup(&config, yes).await?;
            Ok(if done { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Resync { config, tables } => {
            let config = Config::load(&config)?;
            print!("{}", cutover::resync::resync(&config, &tables).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { config, repair_script, repair } => {
            let config = Config::load(&config)?;
            let asked = cutover::verify::Repair { script: repair_script, apply: repair };
            let verification = cutover::verify::verify_and_repair(&config, &asked).await?;
            print!("{}", cutover::verify::render(&verification));
            if let Some(path) = &asked.script {
                println!("repair script for {} table(s) written to {}", verification.repaired.len(), path.display());
            }
            if !asked.apply || verification.repaired.is_empty() {
                return Ok(if verification.matches() { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
            println!("\nrepaired {}; verifying again:\n", verification.repaired.join(", "));
            let again = cutover::verify::verify(&config).await?;
            print!("{}", cutover::verify::render(&again));
            Ok(if again.matches() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::CompareQueries { config, queries, runs } => {
            let config = Config::load(&config)?;
            let text = std::fs::read_to_string(&queries)
                .map_err(|e| anyhow::anyhow!("cannot read the queries file {}: {e}", queries.display()))?;
            let path = queries;
            let queries = cutover::compare::split_queries(&text);
            anyhow::ensure!(!queries.is_empty(), "{} holds no query", path.display());
            let reports = cutover::compare::compare(&config, &queries, runs).await?;
            print!("{}", cutover::compare::render(&reports));
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { source, scale, seconds } => {
            cutover::demo::run(source, scale, seconds).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    // The daemon reports through its log (which may be JSON); the other commands talk to a person.
    let daemon = matches!(cli.command, Command::Run { .. });
    match main_command(cli).await {
        Ok(code) => code,
        Err(e) if daemon => {
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
