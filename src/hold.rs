//! Holding the applier at a source position, for `verify --repair` on a live pipeline.
//!
//! A repair writes the source's rows into the target beside the running applier. Rows
//! read from the source now are ahead of a target that is behind, and a change applied
//! between the read and the write would be overwritten by an older row. So the repair
//! first holds the applier between two transactions ([`HoldPoint::Next`]), pins a
//! snapshot of the source, then has the applier take exactly the transactions ordered
//! before the snapshot ([`HoldPoint::Before`]) and hold again: the target then is the
//! snapshot, for every table, and the snapshot's rows may be written into it. Letting go
//! applies every later transaction on top, as on a target that never differed.

use tokio::sync::watch;

use crate::change::Event;
use crate::position::Position;

/// Where the applier is asked to hold.
#[derive(Clone, Debug, PartialEq)]
pub enum HoldPoint {
    /// Before the next source transaction begins.
    Next,
    /// Before the first source transaction ordered at or after this position (a pinned
    /// snapshot's: the transactions before it are exactly the ones the snapshot sees).
    Before(Position),
}

impl std::fmt::Display for HoldPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldPoint::Next => write!(f, "the next transaction"),
            HoldPoint::Before(position) => write!(f, "{position}"),
        }
    }
}

/// What the applier says once it holds: the point, and the position the target has
/// applied then, or why it cannot hold there.
type Held = (HoldPoint, Result<Position, String>);

/// The switch between whoever asks for a hold (the control socket) and the applier.
pub struct Hold {
    asked: watch::Sender<Option<HoldPoint>>,
    held: watch::Sender<Option<Held>>,
    /// The stream ended while a hold was asked for (the pipeline resumes from its checkpoint,
    /// and may copy tables again, or stops): what the hold promised may no longer be true,
    /// so it answers no more until let go.
    broken: watch::Sender<bool>,
}

impl Default for Hold {
    fn default() -> Hold {
        Hold { asked: watch::channel(None).0, held: watch::channel(None).0, broken: watch::channel(false).0 }
    }
}

/// Why a hold that was broken answers no more.
const BROKEN: &str = "the pipeline stopped streaming or resumed from its checkpoint while held (it may have copied \
                      tables since): this table's repair is rolled back (tables repaired before it stay repaired); \
                      run verify --repair again";

impl Hold {
    /// Asks the applier to hold at `point`; `None` lets it go on, and forgets what the hold said.
    pub fn ask(&self, point: Option<HoldPoint>) {
        // Forgotten before the hold ends: a hold asked next never sees this one's answers.
        if point.is_none() {
            self.held.send_replace(None);
            self.broken.send_replace(false);
        }
        self.asked.send_replace(point);
    }

    /// Whether a hold is asked for.
    pub fn is_asked(&self) -> bool {
        self.asked.borrow().is_some()
    }

    /// Waits until the applier holds at `point`: the position the target has applied then.
    /// Asked again at the same point, it says whether the hold still stands.
    pub async fn held(&self, point: &HoldPoint) -> anyhow::Result<Position> {
        let (mut held, mut broken) = (self.held.subscribe(), self.broken.subscribe());
        let answer = tokio::select! {
            biased;
            _ = broken.wait_for(|broken| *broken) => anyhow::bail!(BROKEN),
            answer = held.wait_for(|held| held.as_ref().is_some_and(|(at, _)| at == point)) => {
                answer.map_err(|_| anyhow::anyhow!("the applier is gone"))?.clone()
            }
        };
        match answer {
            Some((_, Ok(position))) => Ok(position),
            Some((_, Err(why))) => anyhow::bail!("{why}"),
            None => anyhow::bail!("the applier said nothing"),
        }
    }

    /// What the applier watches.
    pub(crate) fn asked(&self) -> watch::Receiver<Option<HoldPoint>> {
        self.asked.subscribe()
    }

    /// The stream ends: a hold asked for is broken.
    pub(crate) fn stream_ended(&self) {
        if self.is_asked() {
            self.broken.send_replace(true);
        }
    }

    /// The applier holds at `point`, with everything up to `applied` on the target.
    pub(crate) fn report(&self, point: HoldPoint, applied: Result<Position, String>) {
        self.held.send_replace(Some((point, applied)));
    }
}

/// Whether `event` is a transaction the applier must not take while asked to hold at `point`.
pub(crate) fn stops_at(point: Option<&HoldPoint>, event: &Event) -> bool {
    match (point, event) {
        (Some(HoldPoint::Next), Event::Begin { .. }) => true,
        (Some(HoldPoint::Before(before)), Event::Begin { position, .. }) => position >= before,
        _ => false,
    }
}
