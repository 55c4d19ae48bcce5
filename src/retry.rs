//! What the retry loop makes of an error: a lost connection is retried with backoff
//! from the last checkpoint, a resume starts over from it at once, anything else stops.

/// A connection that broke: the pipeline reconnects and resumes from its checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectionLost(pub String);

/// Not a failure: the work in flight was rolled back on purpose and must be done again
/// from the last checkpoint (a sink that had to run DDL outside a transaction). The
/// pipeline resumes at once, without backoff and without spending its retry budget.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResumeFromCheckpoint(pub String);

/// Whether the error asks for a resume from the checkpoint ([`ResumeFromCheckpoint`]).
pub fn is_resume(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<ResumeFromCheckpoint>())
}

/// Whether an error is a lost or refused connection (retry) rather than a definite
/// failure (stop and tell the user).
pub fn is_transient(error: &anyhow::Error) -> bool {
    use crate::pgconn::PgError;
    // Class 08: connection exceptions; 57P01-57P03: shutdown, crash, not yet accepting.
    let transient_sqlstate = |code: &str| code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    error.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
            let code = e.code().map(|c| c.code());
            return e.is_closed()
                || code.is_some_and(transient_sqlstate)
                || (code.is_none() && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()));
        }
        if let Some(PgError::Server { code, .. }) = cause.downcast_ref::<PgError>() {
            return transient_sqlstate(code);
        }
        if let Some(e) = cause.downcast_ref::<mysql_async::Error>() {
            return match e {
                mysql_async::Error::Io(_) => true,
                mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed) => true,
                // Server shutdown in progress, connection killed, lost connection.
                mysql_async::Error::Server(server) => matches!(server.code, 1053 | 1927 | 2006 | 2013),
                _ => false,
            };
        }
        matches!(cause.downcast_ref::<PgError>(), Some(PgError::Io(_)))
            || cause.is::<ConnectionLost>()
            || cause.is::<std::io::Error>()
    })
}
