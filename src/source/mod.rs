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
//! socket, and with auto-converge one thread throttles the target.

mod adaptive;
mod compress;
mod converge;
mod pipeline;
mod regions;
mod setup;
mod writer;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::ShutdownOnCancel;
use crate::codec::Compression;
use crate::dirty::{self, DirtyTracker};
use crate::pages::union;
use crate::process::{self, Attachment, Leave, MemReader, Pagemap, ProcessError, RegionFilter};
use crate::progress::Progress;
use crate::protocol::{self, error_code, Control, Run};
use crate::stats::{self, CompressionReport, Counters, RoundReport, SendReport};
pub use converge::ThrottleParams;
use converge::{AutoConverge, Throttle};
use pipeline::Pipeline;
use regions::RegionState;

/// What to do with the source process after a successful migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnComplete {
    /// Leave it stopped (SIGSTOP), as a migrated VM is left paused.
    Stop,
    /// Kill it.
    Kill,
    /// Let it run again.
    Resume,
}

impl std::str::FromStr for OnComplete {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(OnComplete::Stop),
            "kill" => Ok(OnComplete::Kill),
            "resume" => Ok(OnComplete::Resume),
            _ => Err(format!("unknown --on-complete {s:?} (stop, kill, resume)")),
        }
    }
}

impl std::fmt::Display for OnComplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnComplete::Stop => "stop",
            OnComplete::Kill => "kill",
            OnComplete::Resume => "resume",
        })
    }
}

/// Everything `procmig send` needs, validated.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub pid: i32,
    /// `host:port` of the receiver.
    pub to: String,
    pub method: Compression,
    pub level: i32,
    pub compress_threads: usize,
    /// Wire bytes per second, after compression.
    pub max_bandwidth: Option<u64>,
    pub on_complete: OnComplete,
    pub regions: Vec<RegionFilter>,
    /// Pages per compression batch.
    pub batch_pages: u32,
    pub progress: bool,
    pub mode: Mode,
    pub dirty_tracking: dirty::Tracking,
    /// downtime-limit.
    pub downtime_limit: Duration,
    /// Rounds after the bulk copy before giving up (or forcing downtime).
    pub max_iterations: u32,
    pub auto_converge: bool,
    pub throttle: ThrottleParams,
    /// Go to downtime after max_iterations even if the estimate is over
    /// the limit.
    pub force_downtime: bool,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pre-copy while the process runs, then a short downtime.
    Live,
    /// Stop the process for the whole copy.
    StopAndCopy,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Mode::Live),
            "stop-and-copy" => Ok(Mode::StopAndCopy),
            _ => Err(format!("unknown --mode {s:?} (live, stop-and-copy)")),
        }
    }
}

impl SendConfig {
    pub fn new(pid: i32, to: String) -> SendConfig {
        SendConfig {
            pid,
            to,
            method: Compression::Zstd,
            level: 1,
            compress_threads: default_threads(),
            max_bandwidth: None,
            on_complete: OnComplete::Stop,
            regions: Vec::new(),
            batch_pages: DEFAULT_BATCH_PAGES,
            progress: false,
            mode: Mode::Live,
            dirty_tracking: dirty::Tracking::Auto,
            downtime_limit: Duration::from_millis(300),
            max_iterations: 30,
            auto_converge: false,
            throttle: ThrottleParams::default(),
            force_downtime: false,
        }
    }
}

/// Pages per batch: 64 pages (256 KiB) gives zstd-1 nearly its whole-file
/// ratio while keeping per-batch latency low (see docs/benchmarks.md).
pub const DEFAULT_BATCH_PAGES: u32 = 64;

/// Number of CPUs, the default for compress-threads.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Target(#[from] ProcessError),
    /// The receiver address does not resolve.
    #[error("cannot resolve receiver address {to:?}: {reason}")]
    Resolve { to: String, reason: String },
    /// Connecting failed.
    #[error("cannot connect to receiver {to}: {source}")]
    Connect { to: String, source: std::io::Error },
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
    /// Pre-copy did not converge within the iteration cap.
    #[error("migration does not converge: after {rounds} rounds {dirty_pages} pages are dirty (expected downtime {expected_ms:.0} ms > limit {limit_ms} ms, dirty rate {rate:.0} pages/s); use --auto-converge, --force-downtime, more --max-bandwidth or a higher --downtime-limit")]
    NotConverging {
        rounds: u32,
        dirty_pages: u64,
        expected_ms: f64,
        limit_ms: u128,
        rate: f64,
    },
}

/// Run one migration of `cfg.pid` to `cfg.to`. Setting `cancel` (e.g. from
/// a signal handler) stops it; the process is then resumed as it was.
pub fn send(cfg: &SendConfig, cancel: &Arc<AtomicBool>) -> Result<SendReport, SendError> {
    let mut m = Migration::new(cfg, cancel);
    let r = m.run();
    // Whatever happened: tracking off, throttle off, process resumed.
    m.cleanup();
    match r {
        Ok(report) => Ok(report),
        Err(e) => {
            let e = if cancel.load(Ordering::Relaxed) {
                SendError::Cancelled
            } else if !process::alive(cfg.pid)
                && !matches!(e, SendError::Target(ProcessError::NoSuchProcess { .. }))
            {
                SendError::Exited(cfg.pid)
            } else {
                e
            };
            m.tell_receiver(&e);
            Err(e)
        }
    }
}

/// One migration's state.
struct Migration<'a> {
    cfg: &'a SendConfig,
    cancel: &'a Arc<AtomicBool>,
    page_size: u64,
    att: Option<Attachment>,
    sock: Option<TcpStream>,
    tracker: Option<Box<dyn DirtyTracker>>,
    throttle: Option<Throttle>,
    pipeline: Option<Pipeline>,
    /// The writer failed: the socket is not usable for an Error frame.
    connection_lost: bool,
}

impl<'a> Migration<'a> {
    fn new(cfg: &'a SendConfig, cancel: &'a Arc<AtomicBool>) -> Migration<'a> {
        Migration {
            cfg,
            cancel,
            page_size: process::page_size(),
            att: None,
            sock: None,
            tracker: None,
            throttle: None,
            pipeline: None,
            connection_lost: false,
        }
    }

    fn cleanup(&mut self) {
        if let Some(mut t) = self.throttle.take() {
            t.finish();
        }
        if let Some(mut t) = self.tracker.take() {
            t.finish(self.att.as_mut());
        }
        if let Some(mut p) = self.pipeline.take() {
            if p.shutdown().is_err() {
                self.connection_lost = true;
            }
        }
        // Dropping the attachment detaches, leaving the process as found.
        self.att = None;
    }

    /// Best effort: tell the receiver why we stop, so it commits nothing
    /// and says why.
    fn tell_receiver(&mut self, e: &SendError) {
        let Some(sock) = self.sock.as_mut() else {
            return;
        };
        if !self.connection_lost && !matches!(e, SendError::Connection(_) | SendError::Remote(_)) {
            let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
            let code = if matches!(e, SendError::Cancelled) {
                error_code::CANCELLED
            } else {
                error_code::FAILED
            };
            let _ = protocol::write_control(
                sock,
                &Control::Error {
                    code,
                    message: format!("source: {e}"),
                },
            );
        }
        let _ = sock.shutdown(Shutdown::Both);
    }

    fn attach_stopped(&mut self) -> Result<&mut Attachment, SendError> {
        if self.att.is_none() {
            self.att = Some(Attachment::seize(self.cfg.pid)?);
        }
        let a = self.att.as_mut().expect("just set");
        a.stop()?;
        Ok(a)
    }

    fn regions(&self) -> Result<Vec<process::Region>, SendError> {
        let all = process::read_regions(self.cfg.pid)?;
        Ok(process::select_regions(
            self.cfg.pid,
            all,
            &self.cfg.regions,
            self.page_size,
        )?)
    }

    fn run(&mut self) -> Result<SendReport, SendError> {
        let cfg = self.cfg;
        let pid = cfg.pid;
        let ps = self.page_size;
        let live = cfg.mode == Mode::Live;
        let t_start = Instant::now();
        let cpu_start = stats::cpu_time();

        // setup
        self.att = Some(Attachment::seize(pid)?);
        let mut sock = setup::connect(&cfg.to)?;
        let _watch = ShutdownOnCancel::new(self.cancel.clone(), &sock);
        setup::handshake(&mut sock, cfg, ps)?;
        self.sock = Some(
            sock.try_clone()
                .map_err(|e| SendError::Connection(e.to_string()))?,
        );
        self.attach_stopped()?;
        let mut state = RegionState::new(self.regions()?, ps);
        let mut t_stop = None;
        let mut tracking_since = Instant::now();
        if live {
            let mut tracker = dirty::create(cfg.dirty_tracking, pid, ps)?;
            tracker.arm(self.att.as_mut().expect("attached"), &state.regions())?;
            tracking_since = Instant::now();
            self.tracker = Some(tracker);
            // Run free while we copy: detached, signals reach it as usual.
            if let Some(a) = self.att.take() {
                a.detach(Leave::AsFound)?;
            }
            if cfg.auto_converge {
                self.throttle = Some(Throttle::start(pid));
            }
        } else {
            t_stop = Some(Instant::now());
        }
        let setup_time = t_start.elapsed();
        let mem = MemReader::open(pid)?;
        let pagemap = Pagemap::open(pid, ps)?;
        self.pipeline = Some(Pipeline::start(cfg, &sock, ps)?);
        let t_pipeline = Instant::now();
        let counters = self.pipeline.as_ref().expect("started").counters.clone();
        let progress = cfg
            .progress
            .then(|| Progress::start("send", state.total(), counters.clone()));
        let tracker_name = self
            .tracker
            .as_ref()
            .map_or("none".to_string(), |t| t.method().to_string());

        // bulk: round 0, every populated page
        let mut rounds: Vec<RoundReport> = Vec::new();
        let mut round = 0u32;
        let mut syncs = 0u32;
        self.pipeline_mut()
            .control(Control::Regions(state.table()))?;
        let all = whole_regions(&state, ps);
        let t_round = Instant::now();
        let before = Snapshot::take(&counters);
        self.pipeline_mut().lenient = live;
        self.send_round(&mem, &pagemap, &mut state, round, &all)?;
        let mut unreadable = self.take_unreadable(&state);
        self.end_round(round)?;
        rounds.push(before.report(round, 0, &counters, t_round.elapsed(), Duration::ZERO, 0));
        let mut auto = AutoConverge::default();
        let mut last_collect = tracking_since;
        let mut expected = Duration::ZERO;
        let mut last_rate: f64;
        let mut prev_pending: Option<u64> = None;

        // iterate
        if live {
            let carried: Vec<(u64, Run)> = loop {
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(SendError::Cancelled);
                }
                let fresh = self.sync_regions(&mut state)?;
                let dirty = self.collect(&state, &fresh)?;
                syncs += 1;
                let since = last_collect.elapsed();
                last_collect = Instant::now();
                let discards = state.discards(&pagemap)?;
                let dirty_pages = dirty.pages();
                let pending = dirty_pages
                    + fresh.iter().map(|(_, r)| r.count as u64).sum::<u64>()
                    + discards
                        .iter()
                        .flatten()
                        .map(|r| r.count as u64)
                        .sum::<u64>();
                // Rate and ratio so far decide the expected downtime.
                let (wire, raw, secs) = rounds.iter().fold((0u64, 0u64, 0f64), |a, r| {
                    (
                        a.0 + r.bytes,
                        a.1 + r.raw_bytes,
                        a.2 + r.duration_ms / 1000.0,
                    )
                });
                let rate = if secs > 0.0 { wire as f64 / secs } else { 0.0 };
                let ratio = if wire > 0 {
                    raw as f64 / wire as f64
                } else {
                    1.0
                };
                expected = converge::expected_downtime(pending * ps, ratio, rate);
                // Leaving the loop, the pages just collected (and re-armed)
                // are carried into the final round: they were not sent.
                let carry = |state: &RegionState| {
                    let must = merge(state, ps, &dirty, &fresh, &discards);
                    with_carried(state, ps, must, &unreadable)
                        .into_iter()
                        .map(|(i, r)| (state.list[i].region.start, r))
                        .collect::<Vec<_>>()
                };
                last_rate = dirty_pages as f64 / since.as_secs_f64().max(1e-3);
                // Within the limit, one more round is still worth it when
                // it would at least halve the pause: sending P pages takes
                // P / T seconds, during which rate × P / T pages get dirty.
                // Both in theory and as observed over the last round (whose
                // fixed costs the theory does not see).
                let pages_per_s = rate * ratio / ps as f64;
                let shrink = if pages_per_s > 0.0 {
                    last_rate / pages_per_s
                } else {
                    1.0
                };
                let halving = shrink < 0.5 && prev_pending.is_none_or(|p| pending * 2 <= p);
                prev_pending = Some(pending);
                if expected <= cfg.downtime_limit
                    && (!halving
                        || expected <= converge::NOT_WORTH_A_ROUND
                        || round >= cfg.max_iterations)
                {
                    break carry(&state);
                }
                if round >= cfg.max_iterations {
                    if cfg.force_downtime || cfg.auto_converge {
                        break carry(&state);
                    }
                    return Err(SendError::NotConverging {
                        rounds: round,
                        dirty_pages: pending,
                        expected_ms: expected.as_secs_f64() * 1000.0,
                        limit_ms: cfg.downtime_limit.as_millis(),
                        rate: last_rate,
                    });
                }
                round += 1;
                let t_round = Instant::now();
                let before = Snapshot::take(&counters);
                let must = merge(&state, ps, &dirty, &fresh, &discards);
                let must = with_carried(&state, ps, must, &unreadable);
                self.send_round(&mem, &pagemap, &mut state, round, &must)?;
                unreadable = self.take_unreadable(&state);
                self.end_round(round)?;
                let took = t_round.elapsed();
                let mut r = before.report(round, dirty_pages, &counters, took, since, auto.percent);
                r.expected_downtime_ms = expected.as_secs_f64() * 1000.0;
                if cfg.auto_converge {
                    if let Some(p) = auto.update(&cfg.throttle, dirty_pages * ps, r.bytes) {
                        if let Some(t) = &self.throttle {
                            t.set(p);
                        }
                    }
                }
                rounds.push(r);
            };
            // downtime
            if let Some(mut t) = self.throttle.take() {
                t.finish();
            }
            t_stop = Some(Instant::now());
            self.attach_stopped()?;
            // Stopped: every page must read now.
            self.pipeline_mut().lenient = false;
            let fresh = self.sync_regions(&mut state)?;
            let dirty = self.collect(&state, &fresh)?;
            syncs += 1;
            let discards = state.discards(&pagemap)?;
            round += 1;
            let t_round = Instant::now();
            let before = Snapshot::take(&counters);
            let mut must = merge(&state, ps, &dirty, &fresh, &discards);
            must = with_carried(&state, ps, must, &carried);
            self.send_round(&mem, &pagemap, &mut state, round, &must)?;
            self.end_round(round)?;
            let carried_pages: u64 = carried.iter().map(|(_, r)| r.count as u64).sum();
            let mut r = before.report(
                round,
                dirty.pages() + carried_pages,
                &counters,
                t_round.elapsed(),
                Duration::ZERO,
                0,
            );
            r.dirty_rate = last_rate;
            r.expected_downtime_ms = expected.as_secs_f64() * 1000.0;
            rounds.push(r);
        }
        let t_stop = t_stop.expect("stopped by now");
        let threads_stopped = self.att.as_ref().map_or(0, |a| a.thread_count());
        let totals = self.pipeline_mut().finish(round + 1);
        if let Some(p) = progress {
            p.finish();
        }
        if let Err(e) = totals {
            self.connection_lost = true;
            let sock = self.sock.as_mut().expect("connected");
            return Err(setup::remote_reason(sock).unwrap_or(e));
        }
        // From the first page read to the End frame on the wire: the
        // basis of throughput and worker busy figures (in stop-and-copy
        // mode this is all downtime; live, it spans every round).
        let t_transfer = t_pipeline.elapsed();

        // Wait for the receiver: Applied (every page in place; downtime
        // ends), then Ack (image committed).
        let sock = self.sock.as_mut().expect("connected");
        sock.set_read_timeout(Some(Duration::from_secs(600))).ok();
        let mut downtime = None;
        let ack = loop {
            match protocol::read_control(sock) {
                Ok(Control::Applied) if downtime.is_none() => downtime = Some(t_stop.elapsed()),
                Ok(Control::Ack(a)) => break a,
                Ok(Control::Error { message, .. }) => return Err(SendError::Remote(message)),
                Ok(other) => return Err(SendError::BadAck(format!("{:?}", other.kind()))),
                Err(e) => {
                    return Err(SendError::Connection(format!(
                        "waiting for acknowledgement: {e}"
                    )))
                }
            }
        };
        let downtime = downtime.unwrap_or_else(|| t_stop.elapsed());

        // complete
        let fallback = self.tracker.as_ref().map_or(0, |t| t.fallback_regions());
        if let Some(mut t) = self.tracker.take() {
            t.finish(self.att.as_mut());
        }
        let leave = match cfg.on_complete {
            OnComplete::Stop => Leave::Stopped,
            OnComplete::Kill => Leave::Killed,
            OnComplete::Resume => Leave::AsFound,
        };
        if let Some(a) = self.att.take() {
            a.detach(leave)?;
        }
        let total_time = t_start.elapsed();
        let mut report = build_report(cfg, &counters, &state, ps, t_transfer);
        report.mode = if live { "live" } else { "stop-and-copy" }.into();
        report.dirty_tracking = tracker_name;
        report.fallback_regions = fallback;
        report.threads_stopped = threads_stopped;
        report.dirty_sync_count = syncs;
        report.expected_downtime_ms = expected.as_secs_f64() * 1000.0;
        report.cpu_throttle_percentage =
            rounds.iter().map(|r| r.throttle_percent).max().unwrap_or(0);
        report.rounds = rounds;
        if let Some(a) = self.pipeline.as_ref().and_then(|p| p.adaptive.as_ref()) {
            report.compression.auto_choices = a.summary().into_iter().collect();
        }
        report.cpu_seconds = (stats::cpu_time() - cpu_start).as_secs_f64();
        report.dest_decompress_busy_ms = ack.decompress_busy_ns as f64 / 1e6;
        report.dest_commit_ms = ack.commit_ns as f64 / 1e6;
        report.set_times(total_time, setup_time, downtime, t_transfer);
        Ok(report)
    }

    /// Read the maps again; tell the receiver if the table changed. Returns
    /// the fresh parts (new regions, grown tails).
    fn sync_regions(&mut self, state: &mut RegionState) -> Result<Vec<(usize, Run)>, SendError> {
        let new = self.regions()?;
        let (changed, fresh) = state.update(new);
        if changed {
            self.pipeline_mut()
                .control(Control::Regions(state.table()))?;
        }
        Ok(fresh)
    }

    /// The tracker's dirty pages; with the target stopped (final round)
    /// the attachment is passed along.
    fn collect(
        &mut self,
        state: &RegionState,
        fresh: &[(usize, Run)],
    ) -> Result<dirty::Dirty, SendError> {
        let tracker = self.tracker.as_mut().expect("live migration has a tracker");
        Ok(tracker.collect(self.att.as_mut(), &state.regions(), fresh)?)
    }

    /// Pages that could not be read this round, keyed by region start, to
    /// try again next round (their region may be gone by then).
    fn take_unreadable(&mut self, state: &RegionState) -> Vec<(u64, Run)> {
        std::mem::take(&mut self.pipeline_mut().unreadable)
            .into_iter()
            .map(|(i, r)| (state.list[i as usize].region.start, r))
            .collect()
    }

    fn end_round(&mut self, round: u32) -> Result<(), SendError> {
        let cancel = self.cancel;
        self.pipeline_mut().end_round(round, cancel)
    }

    fn pipeline_mut(&mut self) -> &mut Pipeline {
        self.pipeline.as_mut().expect("pipeline started")
    }

    /// Send the populated pages of `must` (region index, page run, sorted
    /// by region) as `round`, and mark what the receiver now holds.
    fn send_round(
        &mut self,
        mem: &MemReader,
        pagemap: &Pagemap,
        state: &mut RegionState,
        round: u32,
        must: &[(usize, Run)],
    ) -> Result<(), SendError> {
        let mut i = 0;
        while i < must.len() {
            let region = must[i].0;
            let mut runs = Vec::new();
            while i < must.len() && must[i].0 == region {
                runs.push(must[i].1);
                i += 1;
            }
            let (runs, skipped) = state.populated(pagemap, region, &runs)?;
            Counters::add(&self.pipeline_mut().counters.skipped_pages, skipped);
            let r = state.list[region].region.clone();
            let tracker = self.tracker.as_deref_mut();
            self.pipeline
                .as_mut()
                .expect("pipeline started")
                .send_runs(mem, tracker, self.cancel, round, region as u32, &r, &runs)?;
            for run in &runs {
                state.list[region]
                    .sent
                    .insert_run(run.first, run.count as u64);
            }
        }
        Ok(())
    }
}

/// Every page of every region, as (region index, run).
fn whole_regions(state: &RegionState, ps: u64) -> Vec<(usize, Run)> {
    let mut out = Vec::new();
    for (i, t) in state.list.iter().enumerate() {
        let mut runs = Vec::new();
        crate::pages::push_run(&mut runs, 0, t.region.len() / ps);
        out.extend(runs.into_iter().map(|r| (i, r)));
    }
    out
}

/// Everything to send in a round, per region: dirty, fresh (whole new
/// parts, refreshed regions) and discarded pages, merged.
fn merge(
    state: &RegionState,
    ps: u64,
    dirty: &dirty::Dirty,
    fresh: &[(usize, Run)],
    discards: &[Vec<Run>],
) -> Vec<(usize, Run)> {
    let mut out = Vec::new();
    for (i, t) in state.list.iter().enumerate() {
        let mut runs = dirty.runs.get(i).cloned().unwrap_or_default();
        let f: Vec<Run> = fresh
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, r)| *r)
            .collect();
        runs = union(&runs, &f);
        if dirty.refresh.contains(&i) {
            let mut whole = Vec::new();
            crate::pages::push_run(&mut whole, 0, t.region.len() / ps);
            runs = whole;
        }
        if let Some(d) = discards.get(i) {
            runs = union(&runs, d);
        }
        out.extend(runs.into_iter().map(|r| (i, r)));
    }
    out
}

/// Add pages collected earlier but not sent (`carried`, keyed by region
/// start) to `must`, for the regions that still exist, clipped to their
/// current size.
fn with_carried(
    state: &RegionState,
    ps: u64,
    must: Vec<(usize, Run)>,
    carried: &[(u64, Run)],
) -> Vec<(usize, Run)> {
    let mut out = Vec::new();
    for (i, t) in state.list.iter().enumerate() {
        let pages = t.region.len() / ps;
        let mine: Vec<Run> = must
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, r)| *r)
            .collect();
        let mut old = Vec::new();
        for (_, r) in carried.iter().filter(|(s, _)| *s == t.region.start) {
            if r.first < pages {
                let end = (r.first + r.count as u64).min(pages);
                crate::pages::push_run(&mut old, r.first, end - r.first);
            }
        }
        out.extend(union(&mine, &old).into_iter().map(|r| (i, r)));
    }
    out
}

/// Counter values at the start of a round.
struct Snapshot {
    wire: u64,
    read: u64,
    normal: u64,
    zero: u64,
}

impl Snapshot {
    fn take(c: &Counters) -> Snapshot {
        Snapshot {
            wire: Counters::get(&c.wire_bytes),
            read: Counters::get(&c.read_bytes),
            normal: Counters::get(&c.normal_pages),
            zero: Counters::get(&c.zero_pages),
        }
    }

    fn report(
        &self,
        round: u32,
        dirty_pages: u64,
        c: &Counters,
        took: Duration,
        dirtied_over: Duration,
        throttle: u32,
    ) -> RoundReport {
        let bytes = Counters::get(&c.wire_bytes) - self.wire;
        RoundReport {
            round,
            dirty_pages,
            pages_sent: (Counters::get(&c.normal_pages) - self.normal)
                + (Counters::get(&c.zero_pages) - self.zero),
            raw_bytes: Counters::get(&c.read_bytes) - self.read,
            bytes,
            duration_ms: took.as_secs_f64() * 1000.0,
            dirty_rate: if dirtied_over > Duration::ZERO {
                dirty_pages as f64 / dirtied_over.as_secs_f64()
            } else {
                0.0
            },
            throughput_mbps: stats::mbps(bytes, took),
            expected_downtime_ms: 0.0,
            throttle_percent: throttle,
        }
    }
}

fn build_report(
    cfg: &SendConfig,
    c: &Counters,
    state: &RegionState,
    ps: u64,
    t_transfer: Duration,
) -> SendReport {
    let g = Counters::get;
    let wire = g(&c.wire_bytes);
    let compressed_pages = g(&c.compressed_pages);
    let compressed_size = g(&c.compressed_bytes);
    let batches = g(&c.batches);
    SendReport {
        status: "completed".into(),
        pid: cfg.pid,
        mode: String::new(),
        dirty_tracking: String::new(),
        fallback_regions: 0,
        total_time_ms: 0.0,
        setup_time_ms: 0.0,
        downtime_ms: 0.0,
        expected_downtime_ms: 0.0,
        transfer_time_ms: 0.0,
        transferred: wire,
        throughput_mbps: stats::mbps(wire, t_transfer),
        total: state.total(),
        page_size: ps,
        regions: state.list.len(),
        threads_stopped: 0,
        normal: g(&c.normal_pages),
        normal_bytes: g(&c.normal_pages) * ps,
        duplicate: g(&c.zero_pages),
        skipped: g(&c.skipped_pages),
        dirty_sync_count: 0,
        cpu_throttle_percentage: 0,
        max_bandwidth: cfg.max_bandwidth,
        compression: CompressionReport {
            method: cfg.method.to_string(),
            level: cfg.level,
            threads: cfg.compress_threads,
            pages: compressed_pages,
            busy: g(&c.busy),
            busy_rate: if batches > 0 {
                g(&c.busy) as f64 / batches as f64
            } else {
                0.0
            },
            compressed_size,
            compression_rate: if compressed_size > 0 {
                (compressed_pages * ps) as f64 / compressed_size as f64
            } else {
                0.0
            },
            raw_batches: g(&c.raw_batches),
            thread_busy_percent: stats::busy_percent(&c.worker_busy_ns, t_transfer),
            auto_choices: Default::default(),
        },
        cpu_seconds: 0.0,
        dest_decompress_busy_ms: 0.0,
        dest_commit_ms: 0.0,
        on_complete: cfg.on_complete.to_string(),
        rounds: Vec::new(),
    }
}
