//! Driving a running migration from outside: a QMP server on a Unix
//! socket (`send --qmp PATH`) and a small client for it (`procmig status`,
//! `procmig cancel`, `procmig set`). Both only use the migration's
//! [`crate::source::MigrationHandle`].

pub mod client;
pub mod qmp;
