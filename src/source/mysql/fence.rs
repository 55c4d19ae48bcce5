//! The MySQL / MariaDB source's fence for a switchover.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use mysql_async::prelude::Queryable;

use crate::myconn::MysqlParams;
use crate::position::Position;
use crate::source::fence::{refuse_prepared, Fence, SESSION_EXIT_WAIT};

/// The source's prepared XA transactions, described.
async fn mysql_prepared(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<String>> {
    let rows: Vec<mysql_async::Row> = conn
        .query("XA RECOVER")
        .await
        .context("XA RECOVER on the source, to find prepared transactions (needs SUPER or XA_RECOVER_ADMIN)")?;
    // Columns: formatID, gtrid_length, bqual_length, data (the xid's bytes).
    Ok(rows
        .iter()
        .map(|row| {
            let data: Vec<u8> = row.get_opt(3).and_then(Result::ok).unwrap_or_default();
            format!("xid '{}'", String::from_utf8_lossy(&data))
        })
        .collect())
}

const MYSQL_FINISH_PREPARED: &str = "XA COMMIT 'xid' or XA ROLLBACK 'xid'";

/// `read_only` on (and `super_read_only` on MySQL), client sessions killed and gone;
/// returns the binlog position after that.
pub(super) async fn fence(params: &MysqlParams) -> anyhow::Result<Fence> {
    let mut conn = params.connect().await?;
    refuse_prepared(&mysql_prepared(&mut conn).await?, "nothing was fenced", MYSQL_FINISH_PREPARED)?;
    let undo = "the source stays read-only (SET GLOBAL read_only = OFF to undo)";
    conn.query_drop("SET GLOBAL read_only = ON").await.context("SET GLOBAL read_only = ON on the source")?;
    // MySQL only; MariaDB has no super_read_only.
    let super_read_only = conn.query_drop("SET GLOBAL super_read_only = ON").await.is_ok();
    // Every client session, those of accounts read_only does not hold back included.
    let sessions: Vec<u64> = conn
        .query(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() \
             AND COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon') AND USER NOT IN ('system user', 'event_scheduler')",
        )
        .await
        .context("listing the source's sessions")?;
    for id in &sessions {
        // A session that ended meanwhile is fine; one that did not end is found below.
        let _ = conn.query_drop(format!("KILL CONNECTION {id}")).await;
    }
    // KILL only flags a session: it ends at its next check, a commit in progress first.
    let started = Instant::now();
    let left = loop {
        let left: Vec<u64> = if sessions.is_empty() {
            Vec::new()
        } else {
            conn.query(format!(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN ({})",
                sessions.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ))
            .await
            .context("checking that the killed sessions are gone")?
        };
        if left.is_empty() || started.elapsed() >= SESSION_EXIT_WAIT {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    anyhow::ensure!(
        left.is_empty(),
        "sessions {left:?} were killed but are still there after {} s; {undo}. See SHOW PROCESSLIST for what they \
         do, then run switchover again",
        SESSION_EXIT_WAIT.as_secs()
    );
    refuse_prepared(&mysql_prepared(&mut conn).await?, undo, MYSQL_FINISH_PREPARED)?;
    let still_writing = mysql_writers(&mut conn, super_read_only).await?;
    let position = crate::myconn::binlog_position(&mut conn).await.context("reading the final binlog position")?;
    Ok(Fence {
        final_position: Position::Binlog(position),
        sessions_ended: u64::try_from(sessions.len()).unwrap_or(u64::MAX),
        still_writing,
    })
}

/// Who `read_only` does not hold back: without `super_read_only` (MariaDB), accounts with
/// SUPER or READ_ONLY ADMIN, and enabled events (they run with their definer's rights).
async fn mysql_writers(conn: &mut mysql_async::Conn, super_read_only: bool) -> anyhow::Result<Vec<String>> {
    let mut writers = Vec::new();
    if !super_read_only {
        let accounts: Vec<String> = conn
            .query(
                "SELECT DISTINCT GRANTEE FROM information_schema.USER_PRIVILEGES \
                 WHERE PRIVILEGE_TYPE IN ('SUPER', 'READ_ONLY ADMIN') ORDER BY GRANTEE",
            )
            .await
            .context("listing the source's accounts with SUPER or READ_ONLY ADMIN")?;
        if !accounts.is_empty() {
            writers.push(format!(
                "accounts {} still write despite read_only (this server has no super_read_only): their sessions were \
                 ended, but a new one of theirs can write; keep applications off them (or REVOKE SUPER, READ_ONLY \
                 ADMIN) while the old source must stay unchanged",
                accounts.join(", ")
            ));
        }
    }
    let events: Option<i64> = conn
        .query_first(
            "SELECT COUNT(*) FROM information_schema.EVENTS WHERE STATUS = 'ENABLED' AND @@event_scheduler = 'ON'",
        )
        .await
        .context("counting the source's enabled events")?;
    if let Some(events) = events.filter(|&n| n > 0) {
        writers.push(format!(
            "{events} enabled event(s) run on the event scheduler with their definer's rights: SET GLOBAL \
             event_scheduler = OFF"
        ));
    }
    Ok(writers)
}
