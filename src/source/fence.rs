//! Fencing a source for a switchover: what PostgreSQL's and MySQL's fences share.

use std::time::Duration;

use crate::position::Position;

/// What fencing a source did ([`super::Source::fence`]).
#[derive(Debug)]
pub struct Fence {
    /// The source's position once every ended session is gone.
    pub final_position: Position,
    pub sessions_ended: u64,
    /// Who can still write to the source after the fence, and how to stop them.
    pub still_writing: Vec<String>,
}

/// How long an ended session may take to be gone.
pub(crate) const SESSION_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Refuses to go on while prepared transactions exist: each commits whenever its
/// coordinator says so, after the switchover's final position, so its writes would never
/// reach the target. `transactions` describe them; `state` says what was fenced so far.
pub(crate) fn refuse_prepared(transactions: &[String], state: &str, finish: &str) -> anyhow::Result<()> {
    if transactions.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the source holds {} prepared transaction(s): {}. A prepared transaction commits whenever its coordinator \
         says so — after the switchover's final position, so its writes would never reach the target; {state}. \
         Finish them first ({finish}), then run switchover again",
        transactions.len(),
        transactions.join(", ")
    )
}
