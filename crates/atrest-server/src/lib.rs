//! The atrest database server: the encrypted SQLite engine served over the
//! PostgreSQL wire protocol (v3), so that psql, psycopg, tokio-postgres
//! and pgbench talk to it unchanged.
//!
//! What it is: a server *resource* (a directory with configuration,
//! identity, TLS certificate, roles, state, and one encrypted file set per
//! database), and the process that serves it: TLS, SCRAM-SHA-256(-PLUS),
//! the simple and extended query protocols, transactions with PostgreSQL
//! semantics, cancel requests, timeouts, a connection limit, graceful
//! shutdown and Prometheus metrics.
//!
//! What it is not: PostgreSQL. The SQL dialect is SQLite's, with the
//! PostgreSQL spellings clients commonly send translated (see [`sql`]).
//! There is no `pg_catalog`, no COPY, no LISTEN/NOTIFY.
//!
//! Encryption happens below, in `atrest-storage`; nothing here sees a key.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod archive;
pub mod backup;
pub mod cmk;
pub mod config;
pub mod connection;
pub mod control;
pub mod ctx;
pub mod databases;
pub mod error;
pub mod http;
pub mod infer;
pub mod keys;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod monitor;
pub mod postgres;
pub mod provision;
pub mod replicas;
pub mod replication;
pub mod resource;
pub mod rotation;
pub mod scram;
pub mod session;
pub mod sql;
pub mod types;
