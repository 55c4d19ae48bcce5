//! The PostgreSQL source's fence for a switchover.

use anyhow::Context as _;

use crate::pgconn::ConnectParams;
use crate::source::fence::{refuse_prepared, Fence, SESSION_EXIT_WAIT};

/// The source database's prepared transactions (two-phase commit), described.
async fn postgres_prepared(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT gid, owner::text, prepared::text FROM pg_prepared_xacts \
             WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .context("reading the source's prepared transactions (pg_prepared_xacts)")?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "{} (prepared {} by {})",
                crate::schema::quote_literal(r.get(0)),
                r.get::<_, String>(2),
                r.get::<_, String>(1)
            )
        })
        .collect())
}

/// Background workers connected to the source database: they do not end with the
/// client sessions and may write (a subscription's apply worker ignores read-only).
async fn postgres_background_writers(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.pid, a.backend_type, s.subname::text FROM pg_stat_activity a \
             LEFT JOIN pg_stat_subscription s ON s.pid = a.pid \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
             AND a.backend_type NOT IN ('client backend', 'walsender', 'autovacuum worker', 'parallel worker') \
             ORDER BY a.pid",
            &[],
        )
        .await
        .context("listing the source's background workers")?;
    Ok(rows
        .iter()
        .map(|row| {
            let (pid, kind, subscription): (i32, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
            match subscription {
                Some(name) => format!(
                    "{kind} of subscription {name} (pid {pid}) applies another server's changes: ALTER SUBSCRIPTION {} DISABLE",
                    crate::schema::quote_ident(&name)
                ),
                None if kind.contains("cron") => {
                    format!("{kind} (pid {pid}) runs scheduled jobs: UPDATE cron.job SET active = false")
                }
                None => format!("{kind} (pid {pid}), a background worker, may write: stop what runs it"),
            }
        })
        .collect())
}

/// Makes the source database refuse writes, ends the sessions that could still write
/// and waits until they are gone, then reads the WAL position.
pub(super) async fn fence(params: &ConnectParams) -> anyhow::Result<Fence> {
    let client = params.connect().await?;
    refuse_prepared(&postgres_prepared(&client).await?, "nothing was fenced", POSTGRES_FINISH_PREPARED)?;
    let database = crate::schema::quote_ident(&params.database);
    let undo =
        format!("the source stays read-only (ALTER DATABASE {database} RESET default_transaction_read_only to undo)");
    client
        .batch_execute(&format!("ALTER DATABASE {database} SET default_transaction_read_only = on"))
        .await
        .with_context(|| format!("making database {} read-only on the source", params.database))?;
    // Every client session of the database but cutover's own (its walsender is not a client backend).
    let sessions: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND application_name <> 'cutover'",
            &[],
        )
        .await
        .context("listing the source's client sessions")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // With a timeout, pg_terminate_backend waits until the backend is gone (false: gone already, or
    // not gone in time — asked below).
    let timeout = i64::try_from(SESSION_EXIT_WAIT.as_millis()).unwrap_or(i64::MAX);
    for pid in &sessions {
        client
            .query_one("SELECT pg_terminate_backend($1, $2)", &[pid, &timeout])
            .await
            .with_context(|| format!("ending session {pid} on the source"))?;
    }
    let left: Vec<i32> = client
        .query("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)", &[&sessions])
        .await
        .context("checking that the ended sessions are gone")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    anyhow::ensure!(
        left.is_empty(),
        "sessions {left:?} of database {} were told to end but are still there after {} s; {undo}. \
         See pg_stat_activity for what they do, then run switchover again",
        params.database,
        SESSION_EXIT_WAIT.as_secs()
    );
    // One may have been prepared by a session that has just ended.
    refuse_prepared(&postgres_prepared(&client).await?, &undo, POSTGRES_FINISH_PREPARED)?;
    let still_writing = postgres_background_writers(&client).await?;
    // The insert position: a commit not yet written out of the WAL buffers is before it. (Should
    // it sit right after a page header, the slot reaches it with the next record the server logs,
    // at the latest its running-transactions snapshot within 15 s.)
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .context("reading the final LSN")?
        .get(0);
    Ok(Fence {
        final_position: format!("lsn:{lsn}").parse()?,
        sessions_ended: u64::try_from(sessions.len()).unwrap_or(u64::MAX),
        still_writing,
    })
}

const POSTGRES_FINISH_PREPARED: &str = "COMMIT PREPARED 'gid' or ROLLBACK PREPARED 'gid' in the source database";
