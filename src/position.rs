//! Source positions: where a change sits in the source's log, how positions
//! order, and how they are written down (RocksDB, logs, `status`).
//!
//! A position is always the point a source can resume from. For PostgreSQL that
//! is an LSN: a transaction's *commit* LSN orders it, and its *end* LSN (the byte
//! after its commit record) is what gets checkpointed, as the native subscriber
//! stores in its replication origin.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
}

/// A binlog file and the offset of the next event in it, with the MariaDB GTID
/// state (`domain-server-seq` per domain) that coordinate stands for, when known.
/// The GTID state follows from the coordinate, so only the coordinate is compared.
#[derive(Clone, Debug)]
pub struct BinlogPosition {
    pub file: String,
    pub pos: u64,
    pub gtid: Option<String>,
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
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.file, self.pos).cmp(&(&other.file, other.pos))
    }
}

impl std::hash::Hash for BinlogPosition {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.file, self.pos).hash(state);
    }
}

impl Position {
    /// The LSN, for a PostgreSQL position.
    pub fn lsn(&self) -> Option<Lsn> {
        match self {
            Position::Lsn(lsn) => Some(*lsn),
            Position::Binlog { .. } => None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Lsn(lsn) => write!(f, "lsn:{lsn}"),
            Position::Binlog(BinlogPosition { file, pos, gtid: None }) => write!(f, "{file}:{pos}"),
            Position::Binlog(BinlogPosition { file, pos, gtid: Some(gtid) }) => write!(f, "{file}:{pos};gtid={gtid}"),
        }
    }
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("lsn", rest)) => Ok(Position::Lsn(rest.parse()?)),
            _ => {
                let (coordinate, gtid) = match s.split_once(";gtid=") {
                    Some((coordinate, gtid)) => (coordinate, Some(gtid.to_string())),
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
        // The GTID state follows the coordinate: it does not change the order.
        assert_eq!(with_gtid.cmp(&binlog), std::cmp::Ordering::Equal);
    }
}
