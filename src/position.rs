//! Source positions: where a change sits in the source's log, how positions
//! order, and how they are written down (RocksDB, logs, `status`).
//!
//! A position is always the point a source can resume from. For PostgreSQL that
//! is an LSN: a transaction's *commit* LSN orders it, and its *end* LSN (the byte
//! after its commit record) is what gets checkpointed, as the native subscriber
//! stores in its replication origin.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

mod gtid;
pub use gtid::{Gtid, GtidSet};

/// A PostgreSQL write-ahead-log location.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PositionError(format!("`{s}` is not an LSN (expected the form 0/16B3748)"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A position in some source's change log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    /// PostgreSQL: an LSN.
    Lsn(Lsn),
    /// MySQL / MariaDB: a binlog coordinate.
    Binlog(BinlogPosition),
    /// A one-shot copy of a source without a change log (SQLite): nothing to stream from.
    Snapshot,
    /// MongoDB: a change stream's resume token, its `_data` hex string. The hex strings
    /// compare in stream order (the token is an order-preserving key encoding).
    Mongo(String),
}

/// A binlog file and the offset of the next event in it, with the GTID state
/// that coordinate stands for, when the server has GTIDs. The GTID state follows
/// from the coordinate, so only the coordinate is compared. A position with no
/// file is a GTID state alone (`start = "gtid:…"`): the server finds the binlog.
/// A transaction's begin position carries the transaction's own GTID instead.
#[derive(Clone, Debug)]
pub struct BinlogPosition {
    pub file: String,
    pub pos: u64,
    pub gtid: Option<GtidSet>,
}

impl BinlogPosition {
    pub fn new(file: impl Into<String>, pos: u64) -> BinlogPosition {
        BinlogPosition { file: file.into(), pos, gtid: None }
    }
}

impl PartialEq for BinlogPosition {
    fn eq(&self, other: &Self) -> bool {
        (&self.file, self.pos) == (&other.file, other.pos)
    }
}

impl Eq for BinlogPosition {}

impl PartialOrd for BinlogPosition {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BinlogPosition {
    /// By file sequence number (`binlog.999999` comes before `binlog.1000000`), then offset.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let sequence = |file: &str| -> (String, u64) {
            match file.rsplit_once('.') {
                Some((stem, number)) if number.bytes().all(|b| b.is_ascii_digit()) => {
                    (stem.to_string(), number.parse().unwrap_or(u64::MAX))
                }
                _ => (file.to_string(), 0),
            }
        };
        (sequence(&self.file), &self.file, self.pos).cmp(&(sequence(&other.file), &other.file, other.pos))
    }
}

impl std::hash::Hash for BinlogPosition {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.file, self.pos).hash(state);
    }
}

impl Position {
    /// Whether a target that has applied up to `applied` holds everything the source had
    /// written by this position. Binlog coordinates move without a transaction (a rotation):
    /// where both sides carry GTID states, holding every GTID is enough.
    pub fn is_reached_by(&self, applied: &Position) -> bool {
        if applied >= self {
            return true;
        }
        match (self, applied) {
            (
                Position::Binlog(BinlogPosition { gtid: Some(mine), .. }),
                Position::Binlog(BinlogPosition { gtid: Some(theirs), .. }),
            ) => mine.within(theirs),
            _ => false,
        }
    }

    /// Whether this position, as a `skip` entry, names the transaction that begins at
    /// `begin`: a bare GTID matches the transaction's GTID, anything else its position.
    pub fn names(&self, begin: &Position) -> bool {
        match (self, begin) {
            (Position::Binlog(entry), Position::Binlog(b)) if entry.file.is_empty() => {
                entry.gtid.is_some() && entry.gtid == b.gtid
            }
            _ => self == begin,
        }
    }

    /// The LSN, for a PostgreSQL position.
    pub fn lsn(&self) -> Option<Lsn> {
        match self {
            Position::Lsn(lsn) => Some(*lsn),
            Position::Binlog { .. } | Position::Snapshot | Position::Mongo(_) => None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Lsn(lsn) => write!(f, "lsn:{lsn}"),
            Position::Snapshot => f.write_str("snapshot"),
            Position::Mongo(token) => write!(f, "mongo:{token}"),
            Position::Binlog(BinlogPosition { file, gtid: Some(gtid), .. }) if file.is_empty() => {
                write!(f, "gtid:{gtid}")
            }
            Position::Binlog(BinlogPosition { file, pos, gtid: None }) => write!(f, "{file}:{pos}"),
            Position::Binlog(BinlogPosition { file, pos, gtid: Some(gtid) }) => write!(f, "{file}:{pos};gtid={gtid}"),
        }
    }
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "snapshot" => Ok(Position::Snapshot),
            Some(("lsn", rest)) => Ok(Position::Lsn(rest.parse()?)),
            Some(("mongo", token)) if !token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Position::Mongo(token.to_string()))
            }
            Some(("mongo", _)) => {
                Err(PositionError(format!("`{s}` is not a MongoDB resume token (expected mongo:<_data hex>)")))
            }
            // A MariaDB GTID state alone: the binlog is found by it.
            Some(("gtid", state)) => {
                Ok(Position::Binlog(BinlogPosition { file: String::new(), pos: 4, gtid: Some(GtidSet::parse(state)?) }))
            }
            _ => {
                let (coordinate, gtid) = match s.split_once(";gtid=") {
                    Some((coordinate, gtid)) => (coordinate, Some(GtidSet::parse(gtid)?)),
                    None => (s, None),
                };
                match coordinate.rsplit_once(':') {
                Some((file, pos)) if !file.is_empty() && pos.bytes().all(|b| b.is_ascii_digit()) && !pos.is_empty() => {
                    let pos = pos.parse().map_err(|_| PositionError(format!("`{s}`: binlog offset out of range")))?;
                    Ok(Position::Binlog(BinlogPosition { file: file.to_string(), pos, gtid }))
                }
                _ => Err(PositionError(format!(
                    "`{s}` is not a position (expected lsn:0/16B3748 or a binlog file:offset such as binlog.000042:1234)"
                ))),
                }
            }
        }
    }
}

// Positions are stored as their display form: readable in `ldb` dumps and stable.
impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a replay stops (`[stream] stop_at`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopAt {
    /// Apply every transaction that committed before this time.
    Time(SystemTime),
    /// Apply every transaction up to this position (an LSN: including a transaction
    /// that commits there; a binlog offset: transactions starting before it; a GTID
    /// set: the transactions in it).
    Position(Position),
}

impl StopAt {
    /// Whether a transaction ordered at `position` and committed at `commit_time`
    /// lies beyond the stop point.
    pub fn is_past(&self, position: &Position, commit_time: SystemTime) -> bool {
        match (self, position) {
            (StopAt::Time(time), _) => commit_time >= *time,
            (StopAt::Position(stop @ Position::Lsn(_)), _) => position > stop,
            (StopAt::Position(Position::Binlog(BinlogPosition { file, gtid: Some(stop), .. })), _)
                if file.is_empty() =>
            {
                // A transaction's begin position carries its own GTID; without one
                // (a server without GTIDs) nothing can be past a GTID.
                match position {
                    Position::Binlog(BinlogPosition { gtid: Some(own), .. }) => !own.within(stop),
                    _ => false,
                }
            }
            (StopAt::Position(stop), _) => position >= stop,
        }
    }
}

impl FromStr for StopAt {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.as_bytes().get(4) == Some(&b'-') && s.contains('T') {
            return parse_rfc3339(s).map(StopAt::Time);
        }
        s.parse().map(StopAt::Position).map_err(|_| {
            PositionError(format!(
                "`{s}` is neither an RFC 3339 time (2026-11-25T14:03:00Z) nor a position (lsn:0/1A2B3C8, binlog.000042:1234)"
            ))
        })
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// A point in time as RFC 3339 in UTC, with microseconds: `2026-11-25T14:03:00.000000Z`.
pub fn format_rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (y, m, d) = civil_from_days(seconds.div_euclid(86_400));
    let of_day = seconds.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    )
}

/// (year, month, day) → days since 1970-01-01, proleptic Gregorian.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-25T14:03:00Z`, `2026-11-25T15:03:00.5+01:00` → a point in time.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, PositionError> {
    let bad = || PositionError(format!("`{s}` is not an RFC 3339 time such as 2026-11-25T14:03:00Z"));
    let number = |range: std::ops::Range<usize>| -> Result<i64, PositionError> {
        s.get(range).and_then(|t| t.parse().ok()).ok_or_else(bad)
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if ![4, 7, 13, 16].iter().all(|&i| matches!(s.as_bytes().get(i), Some(b'-' | b':'))) || !(1..=12).contains(&month) {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        let text = format!("{:0<9}", &fraction[..digits.min(9)]);
        nanos = text.parse().map_err(|_| bad())?;
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') && rest.as_bytes()[3] == b':' => {
            let hours: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let minutes: i64 = rest[4..6].parse().map_err(|_| bad())?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, u32::try_from(month).map_err(|_| bad())?, u32::try_from(day).map_err(|_| bad())?);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let seconds = u64::try_from(seconds).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_nanos(u64::from(nanos)))
}

/// A position that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PositionError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for value in [0u64, 1, 0x16B3748, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>().ok(), Some(lsn));
        }
        assert_eq!(Lsn(0x1_0000_00A0).to_string(), "1/A0");
    }

    #[test]
    fn binlog_files_order_by_number_and_rotations_are_reached_by_gtid() {
        let at = |s: &str| s.parse::<Position>().expect("position");
        assert!(at("binlog.999999:500") < at("binlog.1000000:4"));
        assert!(at("binlog.000042:1234") < at("binlog.000042:1300"));
        // FLUSH LOGS: the coordinate moved on, no transaction did.
        let fenced = at("binlog.000043:385;gtid=0-1-1200");
        assert!(fenced.is_reached_by(&at("binlog.000042:9000;gtid=0-1-1200")));
        assert!(!fenced.is_reached_by(&at("binlog.000042:9000;gtid=0-1-1199")));
        assert!(!at("binlog.000043:385").is_reached_by(&at("binlog.000042:9000")));
    }

    #[test]
    fn stop_points_parse_times_and_positions() {
        let at = |s: &str| s.parse::<StopAt>();
        let Ok(StopAt::Time(t)) = at("2026-11-25T14:03:00Z") else { panic!("time") };
        assert_eq!(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok(), Some(1_795_615_380));
        assert_eq!(format_rfc3339(t), "2026-11-25T14:03:00.000000Z");
        let Ok(StopAt::Time(u)) = at("2026-11-25T15:03:00.5+01:00") else { panic!("offset") };
        assert_eq!(u.duration_since(t).ok(), Some(Duration::from_millis(500)));
        assert_eq!(at("lsn:0/10").ok(), Some(StopAt::Position(Position::Lsn(Lsn(16)))));
        assert!(at("2026-13-01T00:00:00Z").is_err());
        assert!(at("yesterday").is_err());
        let stop = StopAt::Position(Position::Lsn(Lsn(100)));
        assert!(!stop.is_past(&Position::Lsn(Lsn(100)), UNIX_EPOCH));
        assert!(stop.is_past(&Position::Lsn(Lsn(101)), UNIX_EPOCH));
    }

    #[test]
    fn position_parses_and_orders() {
        let a: Position = "lsn:0/10".parse().expect("valid");
        let b: Position = "lsn:1/0".parse().expect("valid");
        assert!(a < b);
        assert!("lsn:zz".parse::<Position>().is_err());
        assert!("0/10".parse::<Position>().is_err());
        let binlog: Position = "binlog.000042:1234".parse().expect("valid");
        assert_eq!(binlog, Position::Binlog(BinlogPosition::new("binlog.000042", 1234)));
        assert_eq!(binlog.to_string(), "binlog.000042:1234");
        assert!(binlog < "binlog.000043:4".parse().expect("valid"));
        let with_gtid: Position = "binlog.000042:1234;gtid=0-1-100,1-2-7".parse().expect("valid");
        assert_eq!(with_gtid.to_string(), "binlog.000042:1234;gtid=0-1-100,1-2-7");
        let gtid_only: Position = "gtid:0-1-1200".parse().expect("valid");
        assert_eq!(gtid_only.to_string(), "gtid:0-1-1200");
        // The GTID state follows the coordinate: it does not change the order.
        assert_eq!(with_gtid.cmp(&binlog), std::cmp::Ordering::Equal);
        let token: Position = "mongo:8200000000000000050".parse().expect("valid");
        assert_eq!(token, Position::Mongo("8200000000000000050".into()));
        assert_eq!(token.to_string(), "mongo:8200000000000000050");
        assert!(token < "mongo:8200000000000000060".parse().expect("valid"));
        assert!("mongo:".parse::<Position>().is_err() && "mongo:zz".parse::<Position>().is_err());
        let stop = StopAt::Position(token.clone());
        assert!(stop.is_past(&token, UNIX_EPOCH));
        assert!(!stop.is_past(&"mongo:8200000000000000040".parse().expect("valid"), UNIX_EPOCH));
    }
}
