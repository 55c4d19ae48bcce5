//! Global transaction ids, in the two dialects binlogs speak.
//!
//! - MariaDB: `domain-server-sequence` (`0-1-1200`). A server's state is the last
//!   GTID per replication domain (`0-1-1200,1-2-7`); everything up to that
//!   sequence number in the domain is applied.
//! - MySQL: `uuid:number` (`3e11fa47-71ca-11e1-9e33-c80aa9429562:77`). A server's
//!   state is a set of intervals per server UUID
//!   (`3e11fa47-71ca-11e1-9e33-c80aa9429562:1-77:80`), as `gtid_executed` shows it.
//!
//! Both are kept as a [`GtidSet`] with the same three operations: does it hold a
//! transaction, add one, and write it down. One transaction's GTID is the set
//! holding exactly it, so `skip` entries compare as sets too.

use std::collections::BTreeMap;
use std::fmt;

use super::PositionError;

/// One transaction's global id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gtid {
    MariaDb { domain: u32, server: u32, seq: u64 },
    Mysql { uuid: [u8; 16], gno: u64 },
}

/// The transactions a server has executed, or one transaction, as GTIDs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GtidSet {
    /// Per domain: the server id and sequence number of its last transaction.
    MariaDb(BTreeMap<u32, (u32, u64)>),
    /// Per server UUID: sorted, disjoint, non-adjacent inclusive intervals.
    Mysql(BTreeMap<[u8; 16], Vec<(u64, u64)>>),
}

impl GtidSet {
    /// The set holding exactly `gtid` (for MariaDB: its domain up to it).
    pub fn of(gtid: Gtid) -> GtidSet {
        match gtid {
            Gtid::MariaDb { domain, server, seq } => GtidSet::MariaDb(BTreeMap::from([(domain, (server, seq))])),
            Gtid::Mysql { uuid, gno } => GtidSet::Mysql(BTreeMap::from([(uuid, vec![(gno, gno)])])),
        }
    }

    /// Whether every transaction of this set is in `other` (for one transaction's
    /// GTID: whether `other` holds it).
    pub fn within(&self, other: &GtidSet) -> bool {
        match (self, other) {
            (GtidSet::MariaDb(mine), GtidSet::MariaDb(theirs)) => {
                mine.iter().all(|(domain, (_, seq))| theirs.get(domain).is_some_and(|(_, last)| seq <= last))
            }
            (GtidSet::Mysql(mine), GtidSet::Mysql(theirs)) => mine.iter().all(|(uuid, intervals)| {
                let theirs = theirs.get(uuid).map(Vec::as_slice).unwrap_or_default();
                intervals.iter().all(|(a, b)| theirs.iter().any(|(c, d)| c <= a && b <= d))
            }),
            _ => false,
        }
    }

    /// Adds a committed transaction. A GTID of the other dialect replaces the set
    /// (a server speaks one dialect; this keeps the operation total).
    pub fn add(&mut self, gtid: Gtid) {
        match (self, gtid) {
            (GtidSet::MariaDb(state), Gtid::MariaDb { domain, server, seq }) => {
                state.insert(domain, (server, seq));
            }
            (GtidSet::Mysql(sets), Gtid::Mysql { uuid, gno }) => {
                let intervals = sets.entry(uuid).or_default();
                intervals.push((gno, gno));
                merge(intervals);
            }
            (set, gtid) => *set = GtidSet::of(gtid),
        }
    }

    /// A MariaDB state (`0-1-100,1-2-7`) or a MySQL set (`uuid:1-77:80,uuid2:5`);
    /// MySQL's own line breaks after the commas are allowed.
    pub fn parse(text: &str) -> Result<GtidSet, PositionError> {
        let entries = text.split(',').map(str::trim).filter(|e| !e.is_empty());
        if text.contains(':') {
            let mut sets = BTreeMap::new();
            for entry in entries {
                let bad = |why: &str| {
                    PositionError(format!(
                        "`{entry}` is not a MySQL GTID set entry ({why}; expected uuid:1-77 or uuid:77)"
                    ))
                };
                let mut parts = entry.split(':');
                let uuid = parse_uuid(parts.next().unwrap_or_default()).ok_or_else(|| bad("bad server UUID"))?;
                let intervals: &mut Vec<(u64, u64)> = sets.entry(uuid).or_default();
                for interval in parts {
                    if interval.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
                        return Err(bad("tagged GTIDs (MySQL 8.4) are not supported"));
                    }
                    let (start, end) = interval.split_once('-').unwrap_or((interval, interval));
                    let (Ok(start), Ok(end)) = (start.parse::<u64>(), end.parse::<u64>()) else {
                        return Err(bad("bad interval"));
                    };
                    if start == 0 || start > end {
                        return Err(bad("an interval runs from 1 upwards"));
                    }
                    intervals.push((start, end));
                }
                if intervals.is_empty() {
                    return Err(bad("no interval"));
                }
                merge(intervals);
            }
            Ok(GtidSet::Mysql(sets))
        } else {
            let mut state = BTreeMap::new();
            for entry in entries {
                let bad =
                    || PositionError(format!("`{entry}` is not a MariaDB GTID (domain-server-sequence, like 0-1-100)"));
                let parts: Vec<&str> = entry.split('-').collect();
                let [domain, server, seq] = parts.as_slice() else { return Err(bad()) };
                state.insert(
                    domain.parse().map_err(|_| bad())?,
                    (server.parse().map_err(|_| bad())?, seq.parse().map_err(|_| bad())?),
                );
            }
            if state.is_empty() {
                return Err(PositionError(format!("`{text}` names no GTID")));
            }
            Ok(GtidSet::MariaDb(state))
        }
    }
}

/// Sorts intervals and joins those that overlap or touch.
fn merge(intervals: &mut Vec<(u64, u64)>) {
    intervals.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
    for &(start, end) in intervals.iter() {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    *intervals = merged;
}

/// `3e11fa47-71ca-11e1-9e33-c80aa9429562` (any case, hyphens optional) → bytes.
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || text.len() != 36 && text.len() != 32 {
        return None;
    }
    let mut uuid = [0u8; 16];
    for (byte, pair) in uuid.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(uuid)
}

fn write_uuid(f: &mut fmt::Formatter<'_>, uuid: &[u8; 16]) -> fmt::Result {
    for (i, byte) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            f.write_str("-")?;
        }
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

impl fmt::Display for GtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidSet::MariaDb(state) => {
                for (i, (domain, (server, seq))) in state.iter().enumerate() {
                    write!(f, "{}{domain}-{server}-{seq}", if i > 0 { "," } else { "" })?;
                }
            }
            GtidSet::Mysql(sets) => {
                for (i, (uuid, intervals)) in sets.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write_uuid(f, uuid)?;
                    for (start, end) in intervals {
                        match start == end {
                            true => write!(f, ":{start}")?,
                            false => write!(f, ":{start}-{end}")?,
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";

    fn uuid() -> [u8; 16] {
        parse_uuid(UUID).expect("valid uuid")
    }

    #[test]
    fn mariadb_states_parse_contain_and_advance() {
        let mut state = GtidSet::parse("1-2-7, 0-1-100").expect("valid");
        assert_eq!(state.to_string(), "0-1-100,1-2-7");
        let holds = |state: &GtidSet, domain, seq| GtidSet::of(Gtid::MariaDb { domain, server: 9, seq }).within(state);
        assert!(holds(&state, 0, 100));
        assert!(!holds(&state, 0, 101));
        assert!(!holds(&state, 2, 1));
        state.add(Gtid::MariaDb { domain: 0, server: 1, seq: 101 });
        assert_eq!(state.to_string(), "0-1-101,1-2-7");
        for bad in ["0-1", "0-1-x", "", ","] {
            assert!(GtidSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mysql_sets_parse_merge_and_print_like_the_server() {
        let text = format!("{}:1-77:80,\n{UUID}:78", UUID.to_uppercase());
        let set = GtidSet::parse(&text).expect("valid");
        assert_eq!(set.to_string(), format!("{UUID}:1-78:80"));
        let mut set = GtidSet::parse(&format!("{UUID}:1-5:7")).expect("valid");
        assert!(GtidSet::of(Gtid::Mysql { uuid: uuid(), gno: 5 }).within(&set));
        assert!(!GtidSet::of(Gtid::Mysql { uuid: uuid(), gno: 6 }).within(&set));
        assert!(!GtidSet::parse("0-1-5").expect("valid").within(&set));
        set.add(Gtid::Mysql { uuid: uuid(), gno: 6 });
        assert_eq!(set.to_string(), format!("{UUID}:1-7"));
        set.add(Gtid::Mysql { uuid: uuid(), gno: 9 });
        set.add(Gtid::Mysql { uuid: uuid(), gno: 8 });
        assert_eq!(set.to_string(), format!("{UUID}:1-9"));
        let huge = GtidSet::parse(&format!("{UUID}:1-900000000000")).expect("valid");
        assert_eq!(huge.to_string(), format!("{UUID}:1-900000000000"));
        assert_eq!(GtidSet::of(Gtid::Mysql { uuid: uuid(), gno: 77 }).to_string(), format!("{UUID}:77"));
        for bad in [format!("{UUID}:0-3"), format!("{UUID}:5-3"), format!("{UUID}:tag:1-3"), "zz:1".to_string()] {
            assert!(GtidSet::parse(&bad).is_err(), "{bad}");
        }
    }
}
