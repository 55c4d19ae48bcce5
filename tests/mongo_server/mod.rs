//! A MongoDB wire-protocol test server: enough of a MongoDB 7.0 replica-set primary for the official
//! driver to run CRUD, snapshot reads and change streams against an in-memory store.
//!
//! Writes append to an ordered change log (the stand-in for the oplog) that change streams read, with
//! resume tokens, `startAtOperationTime`, `updateLookup`, `drop`/`rename`/`invalidate` events and a way to
//! lose history ([`MongoTestServer::forget_history_before_now`]).
//!
//! ```ignore
//! mod mongo_server;
//! let server = mongo_server::MongoTestServer::start();
//! let client = mongodb::Client::with_uri_str(server.uri("app")).await?;
//! ```
#![allow(dead_code)] // each test binary uses its own subset

mod commands;
mod query;
mod store;
mod update;
mod wire;

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bson::{doc, oid::ObjectId, Document};
use tokio::io::BufReader;
use tokio::sync::watch;

use store::State;

/// A running test server. It serves on its own thread and tokio runtime, so it works from sync tests and
/// from any async runtime; dropping it stops the server and closes every connection.
pub struct MongoTestServer {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MongoTestServer {
    /// Starts a server on `127.0.0.1` with an OS-assigned port.
    pub fn start() -> MongoTestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the test server's port");
        listener.set_nonblocking(true).expect("make the listener non-blocking");
        let port = listener.local_addr().expect("listener address").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            log_seq: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            process_id: ObjectId::new(),
            election_id: ObjectId::new(),
            port,
            next_connection_id: AtomicI32::new(1),
            next_request_id: AtomicI32::new(1),
        });
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mongo-test-server-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the test server");
                runtime.block_on(accept_loop(server_shared, listener));
                // Dropping the runtime here cancels every connection task and closes its socket.
            })
            .expect("spawn the test server thread");
        MongoTestServer { port, shared, thread: Some(thread) }
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for database `db`. `directConnection=true` makes the driver talk to this one
    /// server (a replica-set primary named `rs0`) without discovering other members.
    pub fn uri(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}?directConnection=true", self.port)
    }

    /// Drops the retained change log, as if the oplog had rolled over: a change stream resuming from any
    /// earlier point (token or operation time) fails with `ChangeStreamHistoryLost` (code 286), while one
    /// resuming from the current end of the log still works.
    pub fn forget_history_before_now(&self) {
        self.shared.lock().forget_history();
    }
}

impl Drop for MongoTestServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State shared by all connections of one server.
struct Shared {
    state: Mutex<State>,
    /// The log's last `seq`, published after each command so waiting change streams wake up.
    log_seq: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    process_id: ObjectId,
    election_id: ObjectId,
    port: u16,
    next_connection_id: AtomicI32,
    next_request_id: AtomicI32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection task must not take the whole server down with a poisoned lock.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A command failure, sent as `{ok: 0, errmsg, code, codeName}` (or as a write error entry).
#[derive(Debug)]
struct CommandError {
    code: i32,
    code_name: &'static str,
    message: String,
}

impl CommandError {
    fn new(code: i32, code_name: &'static str, message: impl Into<String>) -> CommandError {
        CommandError { code, code_name, message: message.into() }
    }

    fn to_reply(&self) -> Document {
        doc! { "ok": 0.0, "errmsg": &self.message, "code": self.code, "codeName": self.code_name }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register the listener with tokio");
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => {
                // Accept errors (e.g. too many open files) are transient; keep serving.
                if let Ok((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(shared.clone(), stream));
                }
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let connection_id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let (request_id, op_code, reply) = match wire::read_request(&mut reader).await {
            Ok(request) => {
                let reply = commands::execute(&shared, request.command, connection_id).await;
                if request.no_reply {
                    continue;
                }
                (request.request_id, request.op_code, reply)
            }
            Err(wire::ReadError::Closed) => return,
            Err(wire::ReadError::Malformed { request_id, op_code, message }) => {
                (request_id, op_code, CommandError::new(9, "FailedToParse", message).to_reply())
            }
        };
        let id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        if wire::write_reply(&mut writer, id, op_code, request_id, &reply).await.is_err() {
            return;
        }
    }
}
