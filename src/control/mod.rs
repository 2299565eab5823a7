//! Driving a running migration from outside: a QMP server on a Unix
//! socket (`send --qmp PATH`) and a small client for it (`procmig status`,
//! `procmig cancel`, `procmig set`). Both only use the migration's
//! [`crate::source::MigrationHandle`].

pub mod client;
pub mod dest;
pub mod qmp;
mod source;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::protocol::transport::Closer;

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

/// Post-copy's connections while it can be resumed, and whether the last
/// break was asked for (migrate-pause): kept by both sides' handles.
#[derive(Default)]
pub struct PauseLink {
    closers: Mutex<Vec<Closer>>,
    asked: AtomicBool,
}

impl PauseLink {
    /// The connections post-copy runs on now (empty: it cannot pause).
    pub fn set(&self, closers: Vec<Closer>) {
        *self.closers.lock().expect("not poisoned") = closers;
    }

    /// migrate-pause: shut them; refused with `cannot` when there are
    /// none (pausing would lose the restored process).
    pub fn shut(&self, cannot: &str) -> Result<(), String> {
        let closers = self.closers.lock().expect("not poisoned");
        if closers.is_empty() {
            return Err(cannot.into());
        }
        self.asked.store(true, Relaxed);
        for c in closers.iter() {
            c.close();
        }
        Ok(())
    }

    /// Whether the last break was migrate-pause; reading clears it.
    pub fn asked(&self) -> bool {
        self.asked.swap(false, Relaxed)
    }
}
