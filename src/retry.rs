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
/// failure (stop and tell the user). Each connection module says which of its driver's
/// errors are transient.
pub fn is_transient(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        crate::pgconn::is_transient(cause)
            || crate::myconn::is_transient(cause)
            || cause.is::<ConnectionLost>()
            || cause.is::<std::io::Error>()
    })
}
