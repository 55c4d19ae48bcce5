//! cutover: change-data-capture replication for near-zero-downtime database moves.
//!
//! See `ARCHITECTURE.md` for the module map.

pub mod change;
pub mod checkpoint;
pub mod cleanup;
pub mod cli;
pub mod compare;
pub mod config;
pub mod connect;
pub mod copy;
pub mod demo;
pub mod failpoint;
pub mod finding;
pub mod hold;
pub mod metrics;
pub mod myconn;
pub mod notify;
pub mod pgconn;
pub mod pipeline;
pub mod position;
pub mod preflight;
pub mod progress;
pub mod resync;
pub mod retry;
pub mod sandbox;
pub mod schema;
pub mod sink;
pub mod source;
pub mod sql;
pub mod status;
pub mod switchover;
pub mod tls;
pub mod verify;
