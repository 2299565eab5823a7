//! The receiving side of the control socket (`recv --qmp PATH`): what
//! QEMU's destination answers (`query-migrate` with its status and the
//! bytes received, `query-status`, `migrate_cancel`, and in post-copy
//! `migrate-pause` and `migrate-recover`), from a [`RecvHandle`] the
//! receiver keeps up to date.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::{Controlled, PauseLink};
use crate::dest::postcopy::Pausable;
use crate::protocol::transport::{Closer, Listener};
use crate::stats::Counters;

/// Where a receiver is, with QEMU's incoming names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecvStatus {
    /// Listening, or hearing a client.
    Setup = 0,
    Active = 1,
    PostcopyActive = 2,
    Completed = 3,
    Failed = 4,
    Cancelled = 5,
    /// Post-copy's link broke; waiting for the source to resume it.
    PostcopyPaused = 6,
}

impl RecvStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecvStatus::Setup => "setup",
            RecvStatus::Active => "active",
            RecvStatus::PostcopyActive => "postcopy-active",
            RecvStatus::Completed => "completed",
            RecvStatus::Failed => "failed",
            RecvStatus::Cancelled => "cancelled",
            RecvStatus::PostcopyPaused => "postcopy-paused",
        }
    }

    fn from_u8(v: u8) -> RecvStatus {
        match v {
            0 => RecvStatus::Setup,
            1 => RecvStatus::Active,
            2 => RecvStatus::PostcopyActive,
            3 => RecvStatus::Completed,
            4 => RecvStatus::Failed,
            6 => RecvStatus::PostcopyPaused,
            _ => RecvStatus::Cancelled,
        }
    }
}

/// A receiver's status, counters and cancel flag, shared with its
/// control socket.
pub struct RecvHandle {
    status: AtomicU8,
    counters: Arc<Counters>,
    cancel: Arc<AtomicBool>,
    started: Instant,
    /// Post-copy's connections while it can pause (migrate-pause).
    pause: PauseLink,
    /// Addresses migrate-recover added to wait on.
    recover_on: Mutex<Vec<Listener>>,
}

impl RecvHandle {
    pub fn new(cancel: Arc<AtomicBool>) -> Arc<RecvHandle> {
        Arc::new(RecvHandle {
            status: AtomicU8::new(RecvStatus::Setup as u8),
            counters: Arc::new(Counters::new(0)),
            cancel,
            started: Instant::now(),
            pause: PauseLink::default(),
            recover_on: Mutex::new(Vec::new()),
        })
    }

    pub fn set_status(&self, s: RecvStatus) {
        self.status.store(s as u8, Relaxed);
    }

    pub fn get_status(&self) -> RecvStatus {
        RecvStatus::from_u8(self.status.load(Relaxed))
    }

    /// The counters the session adds to (bytes received and applied).
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }
}

impl Pausable for RecvHandle {
    fn paused(&self, paused: bool) {
        self.set_status(if paused {
            RecvStatus::PostcopyPaused
        } else {
            RecvStatus::PostcopyActive
        });
    }

    fn linked(&self, link: Vec<Closer>) {
        self.pause.set(link);
    }

    fn more_listeners(&self) -> Option<&Mutex<Vec<Listener>>> {
        Some(&self.recover_on)
    }

    fn pause_asked(&self) -> bool {
        self.pause.asked()
    }
}

impl Controlled for RecvHandle {
    fn status(&self) -> &'static str {
        self.get_status().as_str()
    }

    fn pass(&self) -> Option<u32> {
        None
    }

    fn query_status(&self) -> Value {
        let (status, running) = match self.get_status() {
            RecvStatus::Setup | RecvStatus::Active => ("inmigrate", false),
            RecvStatus::PostcopyActive | RecvStatus::PostcopyPaused | RecvStatus::Completed => {
                ("running", true)
            }
            RecvStatus::Failed | RecvStatus::Cancelled => ("inmigrate", false),
        };
        json!({"status": status, "running": running, "singlestep": false})
    }

    fn query_migrate(&self) -> Value {
        let s = self.get_status();
        let received = Counters::get(&self.counters.wire_bytes);
        let applied = Counters::get(&self.counters.read_bytes);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        json!({
            "status": s.as_str(),
            "total-time": self.started.elapsed().as_millis() as u64,
            "ram": {
                "transferred": received,
                "normal-bytes": applied,
                "mbps": received as f64 * 8.0 / 1e6 / secs,
            },
        })
    }

    fn parameters(&self) -> Value {
        json!({})
    }

    fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), String> {
        match args.keys().next() {
            None => Ok(()),
            Some(k) => Err(format!(
                "Parameter '{k}' is set on the source (procmig send), not on the destination"
            )),
        }
    }

    fn cancel(&self) {
        self.cancel.store(true, Relaxed);
    }

    fn start_postcopy(&self) -> Result<(), String> {
        Err("migrate-start-postcopy is the source's command (procmig send --qmp)".into())
    }

    fn pause(&self) -> Result<(), String> {
        let s = self.get_status();
        if s != RecvStatus::PostcopyActive {
            return Err(format!(
                "migrate-pause pauses post-copy; this migration is {}",
                s.as_str()
            ));
        }
        self.pause.shut("this post-copy cannot be resumed (an older source, or --recover-timeout 0): pausing it would kill the restored process")
    }

    fn recover(&self, uri: &str) -> Result<String, String> {
        let s = self.get_status();
        if s != RecvStatus::PostcopyPaused {
            return Err(format!(
                "migrate-recover needs a paused post-copy; this migration is {}",
                s.as_str()
            ));
        }
        let addr = match uri.split_once(':') {
            Some(("tcp", rest)) => rest,
            Some((scheme, _))
                if ["unix", "exec", "fd", "rdma", "file", "vsock"].contains(&scheme) =>
            {
                return Err(format!(
                    "migrate-recover takes tcp:HOST:PORT, not a {scheme}: URI"
                ))
            }
            _ => uri,
        };
        let addr = crate::dest::parse_listen(addr).map_err(|e| e.to_string())?;
        let l = Listener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = l.local_addr().map_or(addr, |a| a.to_string());
        self.recover_on.lock().expect("not poisoned").push(l);
        Ok(bound)
    }
}
