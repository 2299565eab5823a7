//! Driving a running migration from outside: a QMP server on a Unix
//! socket (`send --qmp PATH`) and a small client for it (`procmig status`,
//! `procmig cancel`, `procmig set`). Both only use the migration's
//! [`crate::source::MigrationHandle`].

pub mod client;
pub mod dest;
pub mod qmp;
mod source;

use serde_json::{Map, Value};

/// What the control socket drives: a sending or a receiving migration.
pub trait Controlled: Send + Sync {
    /// `query-migrate`'s status, with QEMU's names.
    fn status(&self) -> &'static str;
    /// The pass being sent, counted from 1, while pre-copy runs
    /// (`MIGRATION_PASS`).
    fn pass(&self) -> Option<u32>;
    fn query_status(&self) -> Value;
    fn query_migrate(&self) -> Value;
    fn parameters(&self) -> Value;
    fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), String>;
    fn cancel(&self);
    fn start_postcopy(&self) -> Result<(), String>;
    /// migrate-pause: break post-copy's link on purpose; both sides pause
    /// (the sender exits with the command that resumes it).
    fn pause(&self) -> Result<(), String>;
    /// migrate-recover (the destination, paused): wait for the resuming
    /// source on `uri` too; returns the address bound.
    fn recover(&self, uri: &str) -> Result<String, String>;
}
