//! Message framing: the 16-byte header, OP_MSG (2013) and the legacy OP_QUERY (2004) / OP_REPLY (1) pair
//! that old drivers use for their first `isMaster`.

use bson::Document;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const OP_REPLY: i32 = 1;
pub const OP_QUERY: i32 = 2004;
pub const OP_MSG: i32 = 2013;

/// The largest message accepted; matches `maxMessageSizeBytes` advertised by `hello`.
pub const MAX_MESSAGE_SIZE: i32 = 48_000_000;

const CHECKSUM_PRESENT: u32 = 1;
const MORE_TO_COME: u32 = 1 << 1;

/// A command as the server executes it: one document, with OP_MSG kind-1 sequences already merged in.
#[derive(Debug)]
pub struct Request {
    pub request_id: i32,
    pub op_code: i32,
    pub command: Document,
    /// The client asked for no reply (OP_MSG moreToCome, e.g. `w: 0` writes).
    pub no_reply: bool,
}

/// Why a message could not be turned into a [`Request`].
#[derive(Debug)]
pub enum ReadError {
    /// The connection is gone (or the header is not something we can resynchronise from): close it.
    Closed,
    /// The frame was read completely but its content is malformed: answer with an error, keep the connection.
    Malformed { request_id: i32, op_code: i32, message: String },
}

/// Reads one complete message. Never panics on hostile input.
pub async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Request, ReadError> {
    let mut header = [0u8; 16];
    reader.read_exact(&mut header).await.map_err(|_| ReadError::Closed)?;
    let length = i32::from_le_bytes(header[0..4].try_into().unwrap());
    let request_id = i32::from_le_bytes(header[4..8].try_into().unwrap());
    let op_code = i32::from_le_bytes(header[12..16].try_into().unwrap());
    // A bad length means we cannot find the next message boundary, so the stream is unusable.
    if !(16..=MAX_MESSAGE_SIZE).contains(&length) {
        return Err(ReadError::Closed);
    }
    let mut body = vec![0u8; length as usize - 16];
    reader.read_exact(&mut body).await.map_err(|_| ReadError::Closed)?;
    let malformed = |message: String| ReadError::Malformed { request_id, op_code, message };
    match op_code {
        OP_MSG => {
            let (command, no_reply) = parse_op_msg(&body).map_err(malformed)?;
            Ok(Request { request_id, op_code, command, no_reply })
        }
        OP_QUERY => {
            let command = parse_op_query(&body).map_err(malformed)?;
            Ok(Request { request_id, op_code, command, no_reply: false })
        }
        // Anything else (OP_COMPRESSED included: compression is never advertised) is a protocol violation.
        _ => Err(ReadError::Closed),
    }
}

fn parse_op_msg(body: &[u8]) -> Result<(Document, bool), String> {
    let flags = u32::from_le_bytes(body.get(0..4).ok_or("OP_MSG too short")?.try_into().unwrap());
    let mut end = body.len();
    if flags & CHECKSUM_PRESENT != 0 {
        end = end.checked_sub(4).filter(|&e| e >= 4).ok_or("OP_MSG checksum missing")?;
    }
    let mut pos = 4;
    let mut main: Option<Document> = None;
    let mut sequences: Vec<(String, Vec<Document>)> = Vec::new();
    while pos < end {
        let kind = body[pos];
        pos += 1;
        match kind {
            0 => {
                let len = doc_len(body, pos, end)?;
                if main.is_some() {
                    return Err("OP_MSG has two kind-0 sections".into());
                }
                main = Some(parse_doc(&body[pos..pos + len])?);
                pos += len;
            }
            1 => {
                let size = read_i32(body, pos)?;
                let section_end = usize::try_from(size)
                    .ok()
                    .filter(|&s| s >= 4)
                    .and_then(|s| pos.checked_add(s))
                    .filter(|&e| e <= end)
                    .ok_or("bad kind-1 section size")?;
                let mut p = pos + 4;
                let nul = body[p..section_end].iter().position(|&b| b == 0).ok_or("unterminated identifier")?;
                let identifier = std::str::from_utf8(&body[p..p + nul]).map_err(|e| e.to_string())?.to_string();
                p += nul + 1;
                let mut docs = Vec::new();
                while p < section_end {
                    let len = doc_len(body, p, section_end)?;
                    docs.push(parse_doc(&body[p..p + len])?);
                    p += len;
                }
                sequences.push((identifier, docs));
                pos = section_end;
            }
            other => return Err(format!("unknown OP_MSG section kind {other}")),
        }
    }
    let mut command = main.ok_or("OP_MSG without a kind-0 section")?;
    for (identifier, docs) in sequences {
        if command.contains_key(&identifier) {
            return Err(format!("duplicate field {identifier} in body and document sequence"));
        }
        command.insert(identifier, docs.into_iter().map(bson::Bson::Document).collect::<Vec<_>>());
    }
    Ok((command, flags & MORE_TO_COME != 0))
}

fn parse_op_query(body: &[u8]) -> Result<Document, String> {
    // flags (4), fullCollectionName (cstring), numberToSkip (4), numberToReturn (4), query document.
    let nul = body.get(4..).and_then(|b| b.iter().position(|&c| c == 0)).ok_or("bad OP_QUERY collection name")?;
    let name = std::str::from_utf8(&body[4..4 + nul]).map_err(|e| e.to_string())?;
    if !name.ends_with(".$cmd") {
        return Err(format!("OP_QUERY is only supported for commands, not on {name}"));
    }
    let pos = 4 + nul + 1 + 8;
    let len = doc_len(body, pos, body.len())?;
    let mut query = parse_doc(&body[pos..pos + len])?;
    // Legacy drivers wrap the command as {$query: {...}, $readPreference: ...}.
    if let Ok(inner) = query.get_document("$query") {
        query = inner.clone();
    }
    if !query.contains_key("$db") {
        query.insert("$db", name.trim_end_matches(".$cmd"));
    }
    Ok(query)
}

fn read_i32(buf: &[u8], pos: usize) -> Result<i32, String> {
    let bytes = buf.get(pos..pos + 4).ok_or("truncated message")?;
    Ok(i32::from_le_bytes(bytes.try_into().unwrap()))
}

/// Length of the BSON document starting at `pos`, checked to fit before `end`.
fn doc_len(buf: &[u8], pos: usize, end: usize) -> Result<usize, String> {
    let len = read_i32(buf, pos)?;
    usize::try_from(len).ok().filter(|&l| l >= 5 && pos + l <= end).ok_or_else(|| "bad BSON document length".into())
}

fn parse_doc(bytes: &[u8]) -> Result<Document, String> {
    Document::from_reader(bytes).map_err(|e| format!("invalid BSON: {e}"))
}

/// Writes the reply to `request` in the same protocol it arrived in.
pub async fn write_reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    request_id: i32,
    responding_to_op: i32,
    response_to: i32,
    reply: &Document,
) -> std::io::Result<()> {
    let mut doc_bytes = Vec::new();
    reply.to_writer(&mut doc_bytes).map_err(std::io::Error::other)?;
    let mut body = Vec::with_capacity(doc_bytes.len() + 21);
    let op_code = if responding_to_op == OP_QUERY {
        body.extend_from_slice(&0i32.to_le_bytes()); // responseFlags
        body.extend_from_slice(&0i64.to_le_bytes()); // cursorID
        body.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
        body.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
        body.extend_from_slice(&doc_bytes);
        OP_REPLY
    } else {
        body.extend_from_slice(&0u32.to_le_bytes()); // flagBits
        body.push(0);
        body.extend_from_slice(&doc_bytes);
        OP_MSG
    };
    let mut message = Vec::with_capacity(body.len() + 16);
    message.extend_from_slice(&(body.len() as i32 + 16).to_le_bytes());
    message.extend_from_slice(&request_id.to_le_bytes());
    message.extend_from_slice(&response_to.to_le_bytes());
    message.extend_from_slice(&op_code.to_le_bytes());
    message.extend_from_slice(&body);
    writer.write_all(&message).await?;
    writer.flush().await
}
