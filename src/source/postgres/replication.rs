//! The walsender connection: PostgreSQL's streaming replication protocol, built
//! on `postgres-protocol`'s message codecs (tokio-postgres has no CopyBoth).
//!
//! The connection starts with `replication=database`, so it takes replication
//! commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `START_REPLICATION`)
//! and plain SQL. Reads are cancel-safe: every byte read lands in `self.read`
//! before it is parsed, so `recv` can sit in a `select!`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pgoutput::PG_EPOCH_OFFSET_MICROS;
use crate::pgconn::{ConnectParams, PgError};
use crate::position::Lsn;
use crate::tls::MaybeTls;

/// A message from the server while streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one pgoutput message.
    XLogData { wal_start: Lsn, data: Bytes },
    /// The server's current end of WAL; `reply_requested` asks for a status update now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// What `CREATE_REPLICATION_SLOT` answered.
#[derive(Clone, Debug)]
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot_name: String,
}

/// One walsender connection.
pub struct ReplicationConnection {
    stream: MaybeTls,
    read: BytesMut,
    write: BytesMut,
    endpoint: String,
}

const COPY_BOTH_RESPONSE: u8 = b'W';

impl ReplicationConnection {
    /// Connects and authenticates (trust, password, md5, SCRAM-SHA-256).
    pub async fn connect(params: &ConnectParams) -> Result<ReplicationConnection, PgError> {
        let endpoint = format!("{}:{}", params.host, params.port);
        let stream = TcpStream::connect((params.host.as_str(), params.port))
            .await
            .map_err(|e| PgError::Io(format!("cannot reach PostgreSQL at {endpoint} for replication: {e}")))?;
        stream.set_nodelay(true).map_err(|e| PgError::Io(e.to_string()))?;
        let stream =
            params.tls.negotiate(stream, &params.host).await.map_err(|e| {
                PgError::Connect(format!("TLS with PostgreSQL at {endpoint} for replication failed: {e}"))
            })?;
        let mut conn = ReplicationConnection {
            stream,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::new(),
            endpoint,
        };
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", "cutover"),
            // pgoutput prints values with these settings; the target reads them back.
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut conn.write).map_err(|e| PgError::Io(e.to_string()))?;
        conn.flush().await?;
        conn.authenticate(params).await?;
        loop {
            match conn.next_message().await? {
                backend::Message::ReadyForQuery(_) => return Ok(conn),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), PgError> {
        let endpoint = self.endpoint.clone();
        let password = || {
            params.password.as_deref().ok_or_else(|| {
                PgError::Connect(format!(
                    "PostgreSQL at {} asks for a password for user {}: set one in the URL, password_file or password_env",
                    endpoint, params.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write)
                        .map_err(|e| PgError::Io(e.to_string()))?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(|e| PgError::Io(e.to_string()))?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next().map_err(|e| PgError::Io(e.to_string()))? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(PgError::Connect(format!(
                            "PostgreSQL at {} offers no SASL mechanism cutover supports (SCRAM-SHA-256)",
                            self.endpoint
                        )));
                    }
                    let state = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", state.message(), &mut self.write)
                        .map_err(|e| PgError::Io(e.to_string()))?;
                    scram = Some(state);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| protocol("SASL continue before start"))?;
                    state.update(body.data()).map_err(|e| auth_failed(&self.endpoint, e))?;
                    frontend::sasl_response(state.message(), &mut self.write)
                        .map_err(|e| PgError::Io(e.to_string()))?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| protocol("SASL final before start"))?;
                    state.finish(body.data()).map_err(|e| auth_failed(&self.endpoint, e))?;
                    continue;
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => return Err(protocol("unexpected message during authentication")),
            }
            self.flush().await?;
        }
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.stream.write_all(&self.write).await.map_err(|e| self.lost(e))?;
        self.write.clear();
        Ok(())
    }

    fn lost(&self, e: std::io::Error) -> PgError {
        PgError::Io(format!("replication connection to {} lost: {e}", self.endpoint))
    }

    /// The next backend message; CopyBothResponse is answered as `CopyInResponse`-less
    /// bookkeeping here because postgres-protocol does not know it.
    async fn next_message(&mut self) -> Result<backend::Message, PgError> {
        loop {
            if self.read.len() >= 5 && self.read[0] == COPY_BOTH_RESPONSE {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if self.read.len() > len {
                    self.read.advance(len + 1);
                    continue;
                }
            } else if let Some(message) =
                backend::Message::parse(&mut self.read).map_err(|e| protocol(&e.to_string()))?
            {
                match message {
                    backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => continue,
                    other => return Ok(other),
                }
            }
            let n = self.stream.read_buf(&mut self.read).await.map_err(|e| self.lost(e))?;
            if n == 0 {
                return Err(PgError::Io(format!("replication connection to {} closed by the server", self.endpoint)));
            }
        }
    }

    /// Runs one command with the simple query protocol; returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        frontend::query(sql, &mut self.write).map_err(|e| PgError::Io(e.to_string()))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_message().await? {
                backend::Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next().map_err(|e| protocol(&e.to_string()))? {
                        row.push(match range {
                            Some(r) => Some(
                                String::from_utf8(buffer.get(r).unwrap_or_default().to_vec())
                                    .map_err(|_| protocol("non-UTF-8 text in a result row"))?,
                            ),
                            None => None,
                        });
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// Creates a logical slot with pgoutput and exports its snapshot. The snapshot
    /// lives only while this connection stays idle: import it first.
    pub async fn create_slot(&mut self, name: &str, temporary: bool) -> Result<CreatedSlot, PgError> {
        let temporary = if temporary { " TEMPORARY" } else { "" };
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput EXPORT_SNAPSHOT",
                crate::schema::quote_ident(name)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| protocol("CREATE_REPLICATION_SLOT returned no row"))?;
        let field =
            |i: usize| row.get(i).cloned().flatten().ok_or_else(|| protocol("CREATE_REPLICATION_SLOT row is short"));
        let consistent_point = field(1)?.parse().map_err(|_| protocol("CREATE_REPLICATION_SLOT returned a bad LSN"))?;
        Ok(CreatedSlot { consistent_point, snapshot_name: field(2)? })
    }

    /// Starts streaming the slot from `from` with the given publications.
    pub async fn start_replication(&mut self, slot: &str, from: Lsn, publications: &[String]) -> Result<(), PgError> {
        let names: Vec<String> = publications.iter().map(|p| crate::schema::quote_ident(p)).collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', publication_names {}, messages 'true')",
            crate::schema::quote_ident(slot),
            crate::schema::quote_literal(&names.join(","))
        );
        frontend::query(&sql, &mut self.write).map_err(|e| PgError::Io(e.to_string()))?;
        self.flush().await?;
        // The server answers CopyBothResponse (skipped by next_message) or an error.
        loop {
            if self.read.len() >= 5 && self.read[0] == COPY_BOTH_RESPONSE {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if self.read.len() > len {
                    self.read.advance(len + 1);
                    return Ok(());
                }
            } else if !self.read.is_empty() {
                match self.next_message().await? {
                    backend::Message::ErrorResponse(body) => {
                        let error = server_error(&body);
                        // Drain to ReadyForQuery so the error is the whole story.
                        while !matches!(self.next_message().await?, backend::Message::ReadyForQuery(_)) {}
                        return Err(error);
                    }
                    _ => return Err(protocol("unexpected answer to START_REPLICATION")),
                }
            }
            let n = self.stream.read_buf(&mut self.read).await.map_err(|e| self.lost(e))?;
            if n == 0 {
                return Err(PgError::Io(format!("replication connection to {} closed", self.endpoint)));
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, PgError> {
        match self.next_message().await? {
            backend::Message::CopyData(body) => {
                let mut data = body.into_bytes();
                if data.is_empty() {
                    return Err(protocol("empty CopyData in the replication stream"));
                }
                let kind = data.get_u8();
                match kind {
                    b'w' if data.len() >= 24 => {
                        let wal_start = Lsn(data.get_u64());
                        data.advance(16); // wal end, send time
                        Ok(ReplicationMessage::XLogData { wal_start, data })
                    }
                    b'k' if data.len() >= 17 => {
                        let wal_end = Lsn(data.get_u64());
                        data.advance(8);
                        Ok(ReplicationMessage::Keepalive { wal_end, reply_requested: data.get_u8() == 1 })
                    }
                    _ => Err(protocol(&format!("bad replication message kind 0x{kind:02x} or length"))),
                }
            }
            backend::Message::ErrorResponse(body) => Err(server_error(&body)),
            backend::Message::CopyDone => {
                Err(PgError::Io(format!("the server at {} ended the replication stream", self.endpoint)))
            }
            // Anything else ends the stream (a shutting-down server may send CommandComplete).
            _ => Err(PgError::Io(format!("the server at {} left the replication stream", self.endpoint))),
        }
    }

    /// Standby status update: the server may release WAL up to `flushed`; `reply` asks
    /// it to answer with a keepalive at once.
    pub async fn send_status(&mut self, received: Lsn, flushed: Lsn, reply: bool) -> Result<(), PgError> {
        let mut body = BytesMut::with_capacity(34);
        body.extend_from_slice(b"r");
        body.extend_from_slice(&received.0.to_be_bytes());
        body.extend_from_slice(&flushed.0.to_be_bytes());
        body.extend_from_slice(&flushed.0.to_be_bytes());
        body.extend_from_slice(&pg_now().to_be_bytes());
        body.extend_from_slice(&[u8::from(reply)]);
        frontend::CopyData::new(body.freeze()).map_err(|e| PgError::Io(e.to_string()))?.write(&mut self.write);
        self.flush().await
    }
}

/// Now, in microseconds since 2000-01-01.
fn pg_now() -> i64 {
    let since_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    i64::try_from(since_unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_MICROS
}

fn protocol(what: &str) -> PgError {
    PgError::Protocol(what.to_string())
}

fn auth_failed(endpoint: &str, e: std::io::Error) -> PgError {
    PgError::Connect(format!("authentication with PostgreSQL at {endpoint} failed: {e}"))
}

fn server_error(body: &backend::ErrorResponseBody) -> PgError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = String::new();
    let mut hint = String::new();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = format!(" ({value})"),
            b'H' => hint = format!(" hint: {value}"),
            _ => {}
        }
    }
    PgError::Server { code, message: format!("{message}{detail}{hint}") }
}
