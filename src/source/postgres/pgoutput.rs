//! Decoder for PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1), as carried in the walsender's XLogData payloads.
//!
//! Pure and total: any byte string decodes to a message or to an error that
//! names the message type and the offset where it went wrong — never a panic.

use std::fmt;

use crate::change::Value;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Begin { final_lsn: u64, commit_time: i64, xid: u32 },
    Commit { flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    Origin { lsn: u64, name: String },
    Relation(Relation),
    Type { oid: u32, namespace: String, name: String },
    Insert { relid: u32, new: Vec<Value> },
    Update { relid: u32, old: Option<OldTuple>, new: Vec<Value> },
    Delete { relid: u32, old: OldTuple },
    Truncate { relids: Vec<u32>, cascade: bool, restart_identity: bool },
    Message { transactional: bool, lsn: u64, prefix: String, content: Vec<u8> },
}

/// A `Relation` message: the columns of a table as of this point in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub relid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row of an UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity columns (others null).
    Key(Vec<Value>),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Vec<Value>),
}

/// Bytes that are not a valid pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {kind} message at byte {offset}: {reason}")]
pub struct DecodeError {
    pub kind: MessageKind,
    pub offset: usize,
    pub reason: String,
}

/// The message type byte, shown readably in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageKind(pub Option<u8>);

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) if b.is_ascii_graphic() => write!(f, "'{}'", b as char),
            Some(b) => write!(f, "0x{b:02x}"),
            None => f.write_str("(empty)"),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
    kind: MessageKind,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { kind: self.kind, offset: self.offset, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.offset.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.error(format!("needs {n} more bytes, only {} left", self.bytes.len() - self.offset)));
        };
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.offset..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error("string is not NUL-terminated"));
        };
        let text = std::str::from_utf8(&rest[..nul]).map_err(|_| self.error("string is not valid UTF-8"))?.to_string();
        self.offset += nul + 1;
        Ok(text)
    }

    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.error(format!("negative {what} count {n}")))
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.count("column")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let len = usize::try_from(len).map_err(|_| self.error(format!("negative value length {len}")))?;
                    let bytes = self.take(len)?;
                    let text = std::str::from_utf8(bytes).map_err(|_| self.error("text value is not valid UTF-8"))?;
                    Value::Text(text.to_string())
                }
                other => {
                    self.offset -= 1;
                    return Err(self.error(format!("unknown tuple column kind 0x{other:02x}")));
                }
            });
        }
        Ok(values)
    }

    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple, DecodeError> {
        match marker {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            other => Err(self.error(format!("expected 'K' or 'O', found 0x{other:02x}"))),
        }
    }

    fn expect_new(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            b'N' => Ok(()),
            other => Err(self.error(format!("expected 'N' (new tuple), found 0x{other:02x}"))),
        }
    }

    fn finish<T>(self, message: T) -> Result<T, DecodeError> {
        if self.offset == self.bytes.len() {
            Ok(message)
        } else {
            Err(self.error(format!("{} trailing bytes", self.bytes.len() - self.offset)))
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { bytes, offset: 0, kind: MessageKind(bytes.first().copied()) };
    let tag = r.u8()?;
    let message = match tag {
        b'B' => Message::Begin { final_lsn: r.u64()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => Message::Commit { flags: r.u8()?, commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time: r.i64()? },
        b'O' => Message::Origin { lsn: r.u64()?, name: r.cstring()? },
        b'R' => {
            let relid = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let replica_identity = r.u8()?;
            let n = r.count("column")?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                columns.push(RelationColumn {
                    is_key: r.u8()? & 1 == 1,
                    name: r.cstring()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation { relid, namespace, name, replica_identity, columns })
        }
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.cstring()?, name: r.cstring()? },
        b'I' => {
            let relid = r.u32()?;
            r.expect_new()?;
            Message::Insert { relid, new: r.tuple()? }
        }
        b'U' => {
            let relid = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                marker => {
                    let old = r.old_tuple(marker)?;
                    r.expect_new()?;
                    Some(old)
                }
            };
            Message::Update { relid, old, new: r.tuple()? }
        }
        b'D' => {
            let relid = r.u32()?;
            let marker = r.u8()?;
            Message::Delete { relid, old: r.old_tuple(marker)? }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            // Bounded by the bytes present, so a garbled count cannot allocate wildly.
            let mut relids = Vec::with_capacity((n as usize).min(bytes.len() / 4));
            for _ in 0..n {
                relids.push(r.u32()?);
            }
            Message::Truncate { relids, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.cstring()?;
            let len = r.u32()? as usize;
            Message::Message { transactional: flags & 1 != 0, lsn, prefix, content: r.take(len)?.to_vec() }
        }
        _ => return Err(DecodeError { kind: r.kind, offset: 0, reason: "unknown message type".into() }),
    };
    r.finish(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0My Table\0");
        b.push(b'd');
        b.extend(2i16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(23u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"body\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    fn update_bytes() -> Vec<u8> {
        let mut b = vec![b'U'];
        b.extend(16384u32.to_be_bytes());
        b.push(b'K');
        b.extend(2i16.to_be_bytes());
        b.extend(b"t");
        b.extend(1i32.to_be_bytes());
        b.extend(b"7n");
        b.push(b'N');
        b.extend(2i16.to_be_bytes());
        b.extend(b"t");
        b.extend(1i32.to_be_bytes());
        b.extend(b"8u");
        b
    }

    #[test]
    fn decodes_relation_and_update() {
        let Ok(Message::Relation(rel)) = decode(&relation_bytes()) else { panic!("relation") };
        assert_eq!(rel.name, "My Table");
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
        assert_eq!(
            decode(&update_bytes()),
            Ok(Message::Update {
                relid: 16384,
                old: Some(OldTuple::Key(vec![Value::Text("7".into()), Value::Null])),
                new: vec![Value::Text("8".into()), Value::Unchanged],
            })
        );
    }

    #[test]
    fn truncated_messages_name_type_and_offset() {
        let bytes = update_bytes();
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut]).expect_err("truncated must fail");
            assert!(err.offset <= cut, "{err}");
        }
        let err = decode(&bytes[..7]).expect_err("truncated");
        assert_eq!(err.to_string(), "malformed pgoutput 'U' message at byte 6: needs 2 more bytes, only 1 left");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn corrupted_valid_messages_never_panic(at in 0usize..40, byte in any::<u8>(), which in 0usize..2) {
            let mut bytes = if which == 0 { relation_bytes() } else { update_bytes() };
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = decode(&bytes);
        }
    }
}
