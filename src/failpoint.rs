//! Named crash points for tests: `CUTOVER_FAILPOINT=<name>` makes the process abort
//! (as a kill -9 would end it) when it reaches the point of that name, so a test can
//! crash the daemon exactly between two steps whose order matters.

use std::sync::OnceLock;

/// Aborts the process if `CUTOVER_FAILPOINT` names this point.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    if ARMED.get_or_init(|| std::env::var("CUTOVER_FAILPOINT").ok()).as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
