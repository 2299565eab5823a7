//! The source side: the migration state machine.
//!
//! Phases, as in KVM/QEMU:
//!
//! 1. **setup**: attach (ptrace seize), connect, handshake, stop the target
//!    briefly to arm the dirty tracker (for uffd-wp: inject userfaultfd),
//!    then let it run again, detached.
//! 2. **bulk** (round 0): send every populated page while the target runs.
//! 3. **iterate** (rounds 1..): re-read the maps (send region changes),
//!    collect the dirty pages plus pages that vanished, and either send them
//!    or, when the expected downtime (dirty bytes ÷ measured wire rate,
//!    with the compression ratio seen so far) fits `--downtime-limit` and
//!    another round would not at least halve it, go on.
//! 4. **downtime**: stop every thread (also ones born meanwhile), take the
//!    last dirty set, send it, End, and wait for the receiver's Ack.
//! 5. **complete**: leave the process stopped, killed or running.
//!
//! `--mode stop-and-copy` skips 2–3: the target is stopped from the start.
//! Any error, cancel (SIGINT/SIGTERM) or panic ends tracking and resumes
//! the process as it was found ([`Attachment`]'s drop detaches); the
//! receiver gets an Error frame and commits nothing.
//!
//! Threads: this one reads the target and owns ptrace (which is tied to the
//! thread), `compress-threads` workers compress, one writer owns the
//! connection's write half, and with auto-converge one thread throttles
//! the target.
//!
//! Modules: `migration` is the state machine, one method per phase;
//! `converge` the planner that decides after each sync (pure arithmetic);
//! `regions` what the receiver holds and each round's plan; `pipeline`,
//! `compress`, `writer` and `batch` move pages to the wire; `adaptive` is
//! `--compress auto` with its link meter; `handle` the live view and
//! controls of a running migration; `report` builds the final report.

mod adaptive;
mod batch;
mod compress;
mod config;
mod converge;
mod handle;
mod migration;
mod pipeline;
mod postcopy;
mod regions;
mod report;
mod resume;
mod setup;
mod throttle;
mod writer;

use crate::dirty;
use crate::process::{self, ProcessError};
use crate::protocol::transport;
use crate::stats::SendReport;
pub use config::{
    default_threads, Mode, OnComplete, PostcopyAfter, SendConfig, DEFAULT_BATCH_PAGES,
    DEFAULT_MAX_ITERATIONS,
};
pub use converge::ThrottleParams;
pub use handle::{MigrationHandle, Status, Tunables};
use migration::Migration;
pub use resume::{resume, ResumeReport};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Resolving or connecting to the receiver failed.
    #[error(transparent)]
    Connect(#[from] transport::ConnectError),
    /// The receiver refused or broke the handshake.
    #[error("handshake with {to} failed: {reason}")]
    Handshake { to: String, reason: String },
    /// The receiver reported an error.
    #[error("receiver failed: {0}")]
    Remote(String),
    /// The connection broke while sending.
    #[error("connection to receiver lost: {0}")]
    Connection(String),
    /// The receiver answered with something unexpected at the end.
    #[error("receiver sent {0} instead of its acknowledgement")]
    BadAck(String),
    /// A worker could not be created.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// SIGINT or SIGTERM.
    #[error("cancelled by signal")]
    Cancelled,
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    /// The process exited during the migration.
    #[error("process {0} exited during the migration")]
    Exited(i32),
    /// Commit was sent but not confirmed: the receiver may or may not own
    /// the process, so it is left stopped.
    #[error("handover in doubt: the receiver was told to commit but did not confirm ({reason}); process {pid} is left stopped. If the destination committed the image, it owns the process: `kill {pid}` here. If it did not, `kill -CONT {pid}` resumes it here")]
    HandoverInDoubt { pid: i32, reason: String },
    /// The receiver restores, and this process cannot be restored (found
    /// before anything was stopped, or at the final stop).
    #[error("process {pid} cannot be restored on the destination: {}", .reasons.join("; "))]
    NotRestorable { pid: i32, reasons: Vec<String> },
    /// The process state could not be captured at the final stop.
    #[error("cannot capture the state of process {pid}: {reason}")]
    Capture { pid: i32, reason: String },
    /// Post-copy broke after the handover: the destination's copy has
    /// part of the memory, the stopped source all of it.
    #[error("post-copy failed: {reason}; process {pid} is left stopped here and holds all of its memory. {next}")]
    PostcopyBroken {
        pid: i32,
        reason: String,
        /// What to do next (resume the migration, or the process here).
        next: String,
    },
    /// --postcopy-after with a receiver that cannot do it.
    #[error(
        "post-copy needs a receiver that restores (`procmig recv --restore`, protocol version 3)"
    )]
    PostcopyUnsupported,
    /// Pre-copy did not converge within the iteration cap.
    #[error("migration does not converge: after {rounds} rounds {dirty_pages} pages are dirty (expected downtime {expected_ms:.0} ms, {fixed_ms:.0} ms of it stopping the process, its last dirty sync and the receiver's answer, > limit {limit_ms} ms; the process dirties {rate:.0} pages/s, {send_rate:.0} pages/s are sent); use --auto-converge, --force-downtime, more --max-bandwidth or a higher --downtime-limit")]
    NotConverging {
        rounds: u32,
        dirty_pages: u64,
        expected_ms: f64,
        /// The expected downtime besides sending the pages: stopping,
        /// the last sync and the receiver's answer, as last measured.
        fixed_ms: f64,
        limit_ms: u128,
        /// Pages dirtied per second.
        rate: f64,
        /// Pages sent per second.
        send_rate: f64,
    },
}

/// Run one migration of `cfg.pid` to `cfg.to`, driven through `handle`:
/// cancelling it (e.g. from a signal handler) stops the migration and
/// resumes the process as it was.
pub fn send(cfg: &SendConfig, handle: &MigrationHandle) -> Result<SendReport, SendError> {
    let mut m = Migration::new(cfg, handle);
    let r = m.run();
    // Whatever happened: tracking off, throttle off, process resumed.
    m.cleanup();
    match r {
        Ok(report) => {
            handle.set_times(
                Duration::from_secs_f64(report.setup_time_ms / 1000.0),
                Duration::from_secs_f64(report.downtime_ms / 1000.0),
            );
            handle.set_status(Status::Completed);
            Ok(report)
        }
        Err(e) => {
            let e = if matches!(
                e,
                SendError::HandoverInDoubt { .. } | SendError::PostcopyBroken { .. }
            ) {
                // After Commit, a signal does not resume the process either.
                e
            } else if handle.is_cancelled() {
                SendError::Cancelled
            } else if !process::alive(cfg.pid)
                && !matches!(e, SendError::Process(ProcessError::NoSuchProcess { .. }))
            {
                SendError::Exited(cfg.pid)
            } else {
                e
            };
            handle.set_status(if matches!(e, SendError::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            });
            m.tell_receiver(&e);
            Err(e)
        }
    }
}
