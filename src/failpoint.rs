//! Named points for tests: `CUTOVER_FAILPOINT=<name>` makes the process abort (as a
//! kill -9 would end it) when it reaches the point of that name, so a test can crash the
//! daemon exactly between two steps whose order matters; `CUTOVER_FAILPOINT=<name>:sleep=<s>`
//! makes it wait there that many seconds instead, so a test can change the source at
//! exactly that moment.

use std::sync::OnceLock;
use std::time::Duration;

/// What `CUTOVER_FAILPOINT` asks for at one point.
enum Action {
    Abort,
    Sleep(Duration),
}

fn armed() -> Option<&'static (String, Action)> {
    static ARMED: OnceLock<Option<(String, Action)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var("CUTOVER_FAILPOINT").ok()?;
            Some(match value.split_once(":sleep=") {
                Some((name, seconds)) => (name.to_string(), Action::Sleep(Duration::from_secs(seconds.parse().ok()?))),
                None => (value, Action::Abort),
            })
        })
        .as_ref()
}

/// Aborts the process, or sleeps (blocking the thread: tests only), if `CUTOVER_FAILPOINT`
/// names this point.
pub fn hit(name: &str) {
    match armed() {
        Some((armed, Action::Abort)) if armed == name => {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        Some((armed, Action::Sleep(duration))) if armed == name => {
            eprintln!("failpoint {name}: sleeping {} s", duration.as_secs());
            std::thread::sleep(*duration);
        }
        _ => {}
    }
}
