//! The handle of a running migration: its status, its counters, a way to
//! cancel it, and the parameters that may change while it runs. The signal
//! handler, the CLI and (later) the control socket all drive a migration
//! through it; the migration reads the tunables at each batch or round.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::SendConfig;
use crate::progress::{ProgressSource, Reading};
use crate::stats::{Counters, RoundReport, SendFailure};
use crate::units::human_bytes;

/// Where a migration is, with QEMU's names (`query-migrate` status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Attaching, connecting, arming the tracker.
    Setup = 0,
    /// Copying while the process runs (bulk and iterate).
    Active = 1,
    /// The process is stopped for the final round (QEMU: `device`).
    Device = 2,
    Completed = 3,
    Failed = 4,
    Cancelled = 5,
    /// Handed over; the destination runs the process and fetches what it
    /// lacks.
    PostcopyActive = 6,
}

impl Status {
    fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Setup,
            1 => Status::Active,
            2 => Status::Device,
            3 => Status::Completed,
            4 => Status::Failed,
            6 => Status::PostcopyActive,
            _ => Status::Cancelled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::PostcopyActive => "postcopy-active",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parameters that may change while the migration runs.
#[derive(Debug, Default)]
pub struct Tunables {
    /// Wire bytes per second; 0 is unlimited.
    max_bandwidth: AtomicU64,
    /// In microseconds.
    downtime_limit_us: AtomicU64,
}

impl Tunables {
    /// `max-bandwidth`: wire bytes per second, after compression.
    pub fn max_bandwidth(&self) -> Option<u64> {
        Some(self.max_bandwidth.load(Relaxed)).filter(|&b| b > 0)
    }

    pub fn set_max_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.max_bandwidth
            .store(bytes_per_sec.unwrap_or(0), Relaxed);
    }

    /// `downtime-limit`.
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_micros(self.downtime_limit_us.load(Relaxed))
    }

    pub fn set_downtime_limit(&self, d: Duration) {
        self.downtime_limit_us
            .store(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }
}

struct Shared {
    cancel: Arc<AtomicBool>,
    status: AtomicU8,
    /// The status before it became failed or cancelled.
    failed_in: AtomicU8,
    rounds: Mutex<Vec<RoundReport>>,
    round: AtomicU32,
    counters: Arc<Counters>,
    tunables: Arc<Tunables>,
    live: Live,
    started: std::time::Instant,
    /// Once finished: (total, setup, downtime).
    times: Mutex<Option<(Duration, Duration, Duration)>>,
    /// Started with `--postcopy-after`: post-copy may be asked for.
    postcopy_enabled: bool,
    /// `migrate-start-postcopy` was asked.
    start_postcopy: AtomicBool,
    pause: crate::control::PauseLink,
}

/// Figures of the round in progress, for progress displays and queries.
#[derive(Default)]
struct Live {
    /// Pages the round is to send, and pages done (sent or skipped) when
    /// it began.
    plan_pages: AtomicU64,
    done_at_start: AtomicU64,
    /// Bytes of the migrated regions.
    total_bytes: AtomicU64,
    page_size: AtomicU64,
    /// Pages dirtied per second before the round (f64 bits).
    dirty_rate: AtomicU64,
    expected_downtime_us: AtomicU64,
}

/// A cheap, cloneable handle on one migration.
#[derive(Clone)]
pub struct MigrationHandle {
    shared: Arc<Shared>,
}

impl MigrationHandle {
    /// A handle for a migration with `cfg`. `cancel` may be shared with a
    /// signal handler (see `cancel::install_signal_flag`).
    pub fn new(cfg: &SendConfig, cancel: Arc<AtomicBool>) -> MigrationHandle {
        let tunables = Tunables::default();
        tunables.set_max_bandwidth(cfg.max_bandwidth);
        tunables.set_downtime_limit(cfg.downtime_limit);
        MigrationHandle {
            shared: Arc::new(Shared {
                cancel,
                status: AtomicU8::new(Status::Setup as u8),
                failed_in: AtomicU8::new(Status::Setup as u8),
                rounds: Mutex::new(Vec::new()),
                round: AtomicU32::new(0),
                counters: Arc::new(Counters::new(cfg.compress_threads)),
                tunables: Arc::new(tunables),
                live: Live::default(),
                started: std::time::Instant::now(),
                times: Mutex::new(None),
                postcopy_enabled: cfg.postcopy_after.is_some(),
                start_postcopy: AtomicBool::new(false),
                pause: Default::default(),
            }),
        }
    }

    /// Ask the migration to stop; before the handover the process is
    /// resumed as it was.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.load(Relaxed)
    }

    /// The flag itself, for watchers that close connections on cancel.
    pub fn cancel_flag(&self) -> &Arc<AtomicBool> {
        &self.shared.cancel
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.shared.status.load(Relaxed))
    }

    pub(crate) fn set_status(&self, s: Status) {
        let old = self.shared.status.swap(s as u8, Relaxed);
        if matches!(s, Status::Failed | Status::Cancelled) {
            self.shared.failed_in.store(old, Relaxed);
        }
    }

    /// Pages sent or skipped so far.
    fn pages_done(&self) -> u64 {
        let c = self.counters();
        Counters::get(&c.normal_pages)
            + Counters::get(&c.zero_pages)
            + Counters::get(&c.skipped_pages)
    }

    /// A round of `plan_pages` pages begins.
    pub(crate) fn begin_round(&self, round: u32, plan_pages: u64) {
        let l = &self.shared.live;
        l.plan_pages.store(plan_pages, Relaxed);
        l.done_at_start.store(self.pages_done(), Relaxed);
        self.set_round(round);
    }

    /// What the migration is about: its regions' size and page size.
    pub(crate) fn set_size(&self, total_bytes: u64, page_size: u64) {
        self.shared.live.total_bytes.store(total_bytes, Relaxed);
        self.shared.live.page_size.store(page_size, Relaxed);
    }

    /// The planner's latest view.
    pub(crate) fn set_estimates(&self, dirty_pages_per_s: f64, expected: Duration) {
        let l = &self.shared.live;
        l.dirty_rate.store(dirty_pages_per_s.to_bits(), Relaxed);
        l.expected_downtime_us
            .store(expected.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Pages the current round is to send, and how many of them are done.
    pub fn round_progress(&self) -> (u64, u64) {
        let l = &self.shared.live;
        let plan = l.plan_pages.load(Relaxed);
        let now = self.pages_done();
        let done = now - l.done_at_start.load(Relaxed).min(now);
        (done.min(plan), plan)
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> Vec<RoundReport> {
        self.shared
            .rounds
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub(crate) fn push_round(&self, r: &RoundReport) {
        if let Ok(mut v) = self.shared.rounds.lock() {
            v.push(r.clone());
        }
    }

    /// What a failed or cancelled migration did before it stopped.
    pub fn failure(&self, pid: i32, error: &super::SendError) -> SendFailure {
        let c = self.counters();
        SendFailure {
            status: self.status().to_string(),
            error: error.to_string(),
            pid,
            failed_in: Status::from_u8(self.shared.failed_in.load(Relaxed)).to_string(),
            process: match error {
                super::SendError::HandoverInDoubt { .. }
                | super::SendError::PostcopyBroken { .. } => "stopped",
                _ => "resumed",
            }
            .into(),
            transferred: Counters::get(&c.wire_bytes),
            normal: Counters::get(&c.normal_pages),
            duplicate: Counters::get(&c.zero_pages),
            rounds: self.rounds(),
        }
    }

    /// QMP `migrate-start-postcopy`: switch at the end of the current
    /// round. Refused unless the migration was started with
    /// `--postcopy-after` (QEMU: the postcopy-ram capability) and is
    /// still pre-copying.
    pub fn start_postcopy(&self) -> Result<(), String> {
        if !self.shared.postcopy_enabled {
            return Err("post-copy is not enabled: start the migration with --postcopy-after (e.g. --postcopy-after command)".into());
        }
        match self.status() {
            Status::Setup | Status::Active => {
                self.shared.start_postcopy.store(true, Relaxed);
                Ok(())
            }
            s => Err(format!(
                "the migration is {s}: too late to switch to post-copy"
            )),
        }
    }

    pub(crate) fn postcopy_requested(&self) -> bool {
        self.shared.start_postcopy.load(Relaxed)
    }

    /// QMP `migrate-pause`: shut post-copy's connections; the destination
    /// pauses and this sender exits with the command that resumes it.
    /// Refused unless post-copy runs and the destination can wait for a
    /// resume.
    pub fn pause(&self) -> Result<(), String> {
        let s = self.status();
        if s != Status::PostcopyActive {
            return Err(format!(
                "migrate-pause pauses post-copy; this migration is {s}"
            ));
        }
        self.shared.pause.shut("this post-copy cannot be resumed (the destination does not wait for a resume): pausing it would lose the restored process")
    }

    /// The connections post-copy runs on (empty: it cannot pause).
    pub(crate) fn set_postcopy_link(&self, closers: Vec<crate::protocol::transport::Closer>) {
        self.shared.pause.set(closers);
    }

    /// Whether the last break was migrate-pause; reading clears it.
    pub(crate) fn pause_asked(&self) -> bool {
        self.shared.pause.asked()
    }

    /// Time since the migration began, or its total once finished; its
    /// setup time and downtime once finished (QEMU's total-time,
    /// setup-time, downtime).
    pub fn times(&self) -> (Duration, Option<(Duration, Duration)>) {
        match *self.shared.times.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((total, setup, down)) => (total, Some((setup, down))),
            None => (self.shared.started.elapsed(), None),
        }
    }

    pub(crate) fn set_times(&self, setup: Duration, downtime: Duration) {
        *self.shared.times.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((self.shared.started.elapsed(), setup, downtime));
    }

    /// Bytes of the migrated regions, the page size, the dirty rate
    /// (pages/s) and the expected downtime, as the planner last saw them.
    pub fn live_figures(&self) -> (u64, u64, f64, Duration) {
        let l = &self.shared.live;
        (
            l.total_bytes.load(Relaxed),
            l.page_size.load(Relaxed),
            f64::from_bits(l.dirty_rate.load(Relaxed)),
            Duration::from_micros(l.expected_downtime_us.load(Relaxed)),
        )
    }

    /// The round being sent (0 is the bulk copy).
    pub fn round(&self) -> u32 {
        self.shared.round.load(Relaxed)
    }

    pub(crate) fn set_round(&self, r: u32) {
        self.shared.round.store(r, Relaxed);
    }

    /// Live counters of pages and bytes.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.shared.counters
    }

    pub fn tunables(&self) -> &Arc<Tunables> {
        &self.shared.tunables
    }
}

/// The sender's progress display reads the handle.
pub struct SendProgress(pub MigrationHandle);

impl ProgressSource for SendProgress {
    fn read(&self, wire_rate: f64) -> Reading {
        let h = &self.0;
        let l = &h.shared.live;
        let (done, plan) = h.round_progress();
        let ps = l.page_size.load(Relaxed).max(1);
        let rate = format!("{}/s", human_bytes(wire_rate as u64));
        let round = h.round();
        let stage = match (h.status(), round) {
            (Status::Setup, _) => "setup".to_string(),
            (Status::Device, _) => "downtime".to_string(),
            (_, 0) => "bulk".to_string(),
            (_, r) => format!("round {r}"),
        };
        let message = if h.status() == Status::Setup {
            String::new()
        } else if round == 0 && h.status() != Status::Device {
            format!(
                "{} of {} left, {rate}",
                human_bytes((plan - done) * ps),
                human_bytes(l.total_bytes.load(Relaxed))
            )
        } else {
            format!(
                "{} of {plan} pages left, dirty {:.0} pages/s, {rate}, expected downtime {:.0} ms",
                plan - done,
                f64::from_bits(l.dirty_rate.load(Relaxed)),
                l.expected_downtime_us.load(Relaxed) as f64 / 1000.0
            )
        };
        Reading {
            stage,
            fraction: (plan > 0).then(|| done as f64 / plan as f64),
            message,
        }
    }

    fn wire_bytes(&self) -> u64 {
        Counters::get(&self.0.counters().wire_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunables_change_live() {
        let mut cfg = SendConfig::new(1, "x:1".into());
        cfg.max_bandwidth = Some(5);
        let h = MigrationHandle::new(&cfg, Arc::new(AtomicBool::new(false)));
        let seen = h.clone();
        assert_eq!(seen.tunables().max_bandwidth(), Some(5));
        h.tunables().set_max_bandwidth(None);
        assert_eq!(seen.tunables().max_bandwidth(), None);
        h.tunables().set_downtime_limit(Duration::from_millis(40));
        assert_eq!(seen.tunables().downtime_limit(), Duration::from_millis(40));
        assert_eq!(seen.status(), Status::Setup);
        h.set_status(Status::Device);
        assert_eq!(seen.status().as_str(), "device");
        assert!(!seen.is_cancelled());
        h.cancel();
        assert!(seen.is_cancelled());
    }
}
