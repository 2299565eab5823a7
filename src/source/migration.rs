//! One migration on the source, as its phases: [`Migration::setup`],
//! [`Migration::bulk`], [`Migration::iterate`], [`Migration::downtime`],
//! [`Migration::handover`] and [`Migration::complete`], run in that order
//! by [`Migration::run`]. What the copy phases share lives in [`Copy`];
//! what must be undone on any exit (ptrace, tracker, throttle, pipeline,
//! connection) lives in [`Migration`] and is undone by `cleanup`.

use std::time::{Duration, Instant};

use super::batch::Batch;
use super::converge::{Decision, Limits, PlanInputs, Planner};
use super::handle::{MigrationHandle, SendProgress, Status};
use super::pipeline::{PageSource, Pipeline};
use super::postcopy::{Missing, Served, Server};
use super::regions::{Carried, RegionState, RoundPlan};
use super::report::{self, RoundFacts, Snapshot, Summary};
use super::setup::Link;
use super::throttle::Throttle;
use super::{Mode, OnComplete, PostcopyAfter, SendConfig, SendError};
use crate::dirty::{self, DirtyTracker};
use crate::pages::Run;
use crate::process::{self, Attachment, Leave, MemReader, Pagemap, RegionKind};
use crate::progress::Progress;
use crate::protocol::{self, error_code, AckInfo, Control};
use crate::stats::{self, ms, Counters, DowntimeParts, RoundReport, SendReport};

/// Raw bytes a round must move for its rate to stand for the link's.
const MEASURABLE_ROUND: u64 = 4 << 20;

/// What the copy phases share, from setup to the report.
pub(super) struct Copy {
    state: RegionState,
    mem: MemReader,
    pagemap: Pagemap,
    rounds: Vec<RoundReport>,
    /// The round being sent or last sent (0 is the bulk copy).
    round: u32,
    syncs: u32,
    planner: Planner,
    /// Pages due but not sent yet.
    unsent: Carried,
    /// The estimate that ended iteration.
    expected: Duration,
    /// Pages per second dirtied before the last sync.
    dirty_rate: f64,
    /// Stopping every thread, as measured when arming the tracker.
    stop_cost: Duration,
    /// The last dirty sync (maps, tracker, discarded pages).
    sync_cost: Duration,
    /// From a round's last frame on the wire to the receiver's
    /// RoundApplied: the tail the final round and End will pay again.
    tail_cost: Duration,
    last_collect: Instant,
    t_start: Instant,
    setup_time: Duration,
    t_pipeline: Instant,
    /// When the process was stopped for good.
    t_stop: Option<Instant>,
    cpu_start: Duration,
    progress: Option<Progress>,
    tracker_name: String,
    /// Mappings not migrated, as found at setup.
    left_out: Vec<process::LeftOut>,
    parts: DowntimeParts,
    /// What became of the process state (version 3).
    state_note: String,
    /// The captured state, sent before End.
    state_bytes: Option<Vec<u8>>,
    /// Post-copy: switch at the downtime, and what the destination then
    /// lacks (private anonymous pages, served after the handover).
    postcopy: bool,
    missing: Vec<Missing>,
    served: Option<Served>,
    /// Rounds in a row in which the process dirtied faster than the link
    /// carried (`--postcopy-after auto`).
    outrun: u32,
    /// Pages the restorer touches before the process runs (each thread's
    /// rseq area): never left missing in post-copy.
    restorer_pages: Vec<u64>,
}

/// How the handover ended.
pub(super) struct Handover {
    ack: AckInfo,
    downtime: Duration,
    transfer: Duration,
    threads_stopped: usize,
}

/// One migration's state, and what must be undone on any exit.
pub(super) struct Migration<'a> {
    cfg: &'a SendConfig,
    handle: &'a MigrationHandle,
    page_size: u64,
    att: Option<Attachment>,
    link: Option<Link>,
    tracker: Option<Box<dyn DirtyTracker>>,
    throttle: Option<Throttle>,
    pipeline: Option<Pipeline>,
    /// The writer failed: the connection is not usable for an Error frame.
    connection_lost: bool,
    /// Who owns the process (see `handover`).
    owner: Owner,
    /// The process was stopped when we found it (known once handed over).
    was_stopped: bool,
}

/// Which side owns the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// The source: any failure resumes the process as it was.
    Source,
    /// Commit was sent and not yet confirmed: the process stays stopped.
    InDoubt,
    /// The receiver confirmed the commit.
    Destination,
}

/// Bytes per second a receiver is assumed to sync at least, to bound the
/// wait for Ack after Commit (it digests, syncs and renames the image).
const SYNC_RATE: f64 = 50e6;

impl<'a> Migration<'a> {
    pub fn new(cfg: &'a SendConfig, handle: &'a MigrationHandle) -> Migration<'a> {
        Migration {
            cfg,
            handle,
            page_size: process::page_size(),
            att: None,
            link: None,
            tracker: None,
            throttle: None,
            pipeline: None,
            connection_lost: false,
            owner: Owner::Source,
            was_stopped: false,
        }
    }

    fn live(&self) -> bool {
        self.cfg.mode == Mode::Live
    }

    pub fn run(&mut self) -> Result<SendReport, SendError> {
        match self.phases() {
            // A broken connection often has the receiver's reason waiting
            // in it (an Error frame sent before it closed).
            Err(SendError::Connection(e)) if self.owner == Owner::Source => {
                let remote = self.link.as_mut().and_then(|l| l.remote_reason());
                Err(remote.unwrap_or(SendError::Connection(e)))
            }
            r => r,
        }
    }

    fn phases(&mut self) -> Result<SendReport, SendError> {
        let mut copy = self.setup()?;
        let start = self.cfg.postcopy_after == Some(PostcopyAfter::Start) && self.live();
        let carried = if start {
            self.switch_at_start(&mut copy)?
        } else {
            self.bulk(&mut copy)?;
            if self.live() {
                self.iterate(&mut copy)?
            } else {
                Carried::default()
            }
        };
        self.downtime(&mut copy, carried)?;
        let handover = self.handover(&mut copy)?;
        self.complete(copy, handover)
    }

    /// Attach, connect and shake hands, arm the tracker, start the pipeline.
    fn setup(&mut self) -> Result<Copy, SendError> {
        let (cfg, ps) = (self.cfg, self.page_size);
        let t_start = Instant::now();
        let cpu_start = stats::cpu_time();
        self.handle.set_status(Status::Setup);
        self.att = Some(Attachment::seize(cfg.pid)?);
        let mut link = Link::open(cfg, self.handle, ps)?;
        if cfg.postcopy_after.is_some() && !link.postcopy {
            return Err(SendError::PostcopyUnsupported);
        }
        if link.restore {
            // Before anything is stopped.
            let reasons = crate::restore::check(cfg.pid).map_err(|reason| SendError::Capture {
                pid: cfg.pid,
                reason,
            })?;
            if !reasons.is_empty() {
                return Err(SendError::NotRestorable {
                    pid: cfg.pid,
                    reasons,
                });
            }
        }
        let writer = link.writer.take().expect("a fresh link has its writer");
        self.link = Some(link);
        let t_first_stop = Instant::now();
        self.attach_stopped()?;
        let stop_cost = t_first_stop.elapsed();
        let (all, left_out) = process::read_mappings(cfg.pid)?;
        let state = RegionState::new(self.select(all)?, ps);
        let mut t_stop = None;
        if self.live() {
            let mut tracker = dirty::create(cfg.dirty_tracking, cfg.pid, ps)?;
            tracker.arm(self.att.as_mut().expect("attached"), &state.regions())?;
            self.tracker = Some(tracker);
            // Run free while we copy: detached, signals reach it as usual.
            if let Some(a) = self.att.take() {
                a.detach(Leave::AsFound)?;
            }
            if cfg.auto_converge {
                self.throttle = Some(Throttle::start(cfg.pid));
            }
        } else {
            t_stop = Some(Instant::now());
        }
        let last_collect = Instant::now();
        let setup_time = t_start.elapsed();
        let mem = MemReader::open(cfg.pid)?;
        let pagemap = Pagemap::open(cfg.pid, ps)?;
        self.pipeline = Some(Pipeline::start(cfg, self.handle, writer, ps)?);
        self.handle.set_size(state.total(), ps);
        let progress = cfg
            .progress
            .map(|d| Progress::start("send", d, SendProgress(self.handle.clone())));
        let tracker_name = self
            .tracker
            .as_ref()
            .map_or("none".to_string(), |t| t.method().to_string());
        Ok(Copy {
            state,
            mem,
            pagemap,
            rounds: Vec::new(),
            round: 0,
            syncs: 0,
            planner: Planner::default(),
            unsent: Carried::default(),
            expected: Duration::ZERO,
            dirty_rate: 0.0,
            stop_cost,
            sync_cost: Duration::ZERO,
            tail_cost: Duration::ZERO,
            last_collect,
            t_start,
            setup_time,
            t_pipeline: Instant::now(),
            t_stop,
            cpu_start,
            progress,
            tracker_name,
            left_out,
            parts: DowntimeParts::default(),
            state_note: "not captured".into(),
            state_bytes: None,
            postcopy: false,
            missing: Vec::new(),
            served: None,
            outrun: 0,
            restorer_pages: Vec::new(),
        })
    }

    /// Round 0: every populated page, while the process runs (live).
    fn bulk(&mut self, c: &mut Copy) -> Result<(), SendError> {
        self.handle.set_status(Status::Active);
        let live = self.live();
        if !live {
            // Stopped for good already: capture before any page is read
            // (the injected calls make the kernel update rseq areas).
            self.capture_state(c)?;
        }
        let plan = RoundPlan::whole(&c.state);
        self.round_zero(c, &plan, live)
    }

    /// The region table, then round 0 with the pages of `plan`; reading
    /// `lenient`ly while the process runs (a page may vanish meanwhile).
    fn round_zero(
        &mut self,
        c: &mut Copy,
        plan: &RoundPlan,
        lenient: bool,
    ) -> Result<(), SendError> {
        self.pipeline_mut()
            .control(Control::Regions(c.state.table()))?;
        self.pipeline_mut().lenient = lenient;
        let facts = RoundFacts {
            round: 0,
            dirty_pages: 0,
            dirty_rate: 0.0,
            expected_downtime: Duration::ZERO,
            throttle_percent: 0,
        };
        let r = self.send_planned(c, plan, facts)?;
        c.rounds.push(r);
        Ok(())
    }

    /// `--postcopy-after start`: no bulk copy; an empty round 0, and every
    /// populated page carried to the switch, where the private anonymous
    /// ones are left for post-copy.
    fn switch_at_start(&mut self, c: &mut Copy) -> Result<Carried, SendError> {
        self.handle.set_status(Status::Active);
        self.round_zero(c, &RoundPlan::default(), true)?;
        c.postcopy = true;
        // Only what the process populated, as a bulk copy would read: the
        // rest of its address space is zero, served there locally.
        let ps = self.page_size;
        let mut carried = Carried::default();
        for (i, t) in c.state.list.iter().enumerate() {
            let mut whole = Vec::new();
            crate::pages::push_run(&mut whole, 0, t.region.len() / ps);
            let (runs, _) = c.state.populated(&c.pagemap, i, &whole, true)?;
            for r in runs {
                carried.push(t.region.start, r);
            }
        }
        Ok(carried)
    }

    /// Rounds of dirty pages until the planner says stop (the pages then
    /// collected are returned, to go in the final round) or give up.
    fn iterate(&mut self, c: &mut Copy) -> Result<Carried, SendError> {
        loop {
            if self.handle.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            let t_sync = Instant::now();
            let fresh = self.sync_regions(&mut c.state)?;
            let dirty = self.collect(&c.state, &fresh)?;
            c.syncs += 1;
            let since = c.last_collect.elapsed();
            c.last_collect = Instant::now();
            let discards = c.state.discards(&c.pagemap)?;
            c.sync_cost = t_sync.elapsed();
            let unsent = std::mem::take(&mut c.unsent);
            let plan = RoundPlan::build(&c.state, &dirty, &fresh, &discards, &unsent);
            c.dirty_rate = dirty.pages() as f64 / since.as_secs_f64().max(1e-3);
            let inputs = self.plan_inputs(c, plan.pages());
            let limits = self.limits();
            let p = c.planner.decide(&inputs, &limits);
            c.expected = p.expected_downtime;
            self.handle.set_estimates(c.dirty_rate, p.expected_downtime);
            if let Some(after) = self.cfg.postcopy_after {
                let outrun =
                    inputs.wire_rate > 0.0 && inputs.dirty_rate > inputs.wire_rate * inputs.ratio;
                c.outrun = if outrun { c.outrun + 1 } else { 0 };
                let told = self.handle.postcopy_requested();
                let switch = told
                    || match after {
                        PostcopyAfter::Rounds(n) => c.round >= n,
                        PostcopyAfter::Auto => {
                            c.outrun >= 2 || matches!(p.decision, Decision::GiveUp)
                        }
                        PostcopyAfter::Command | PostcopyAfter::Start => false,
                    };
                // `auto` and converged anyway: an ordinary downtime is
                // shorter. A round count or a command is the user's
                // explicit choice.
                let converged = matches!(p.decision, Decision::Downtime);
                if switch && (told || matches!(after, PostcopyAfter::Rounds(_)) || !converged) {
                    c.postcopy = true;
                    self.discard_ahead(c, &plan)?;
                    return Ok(plan.carry(&c.state));
                }
            }
            match p.decision {
                Decision::Downtime => return Ok(plan.carry(&c.state)),
                Decision::GiveUp => {
                    return Err(SendError::NotConverging {
                        rounds: c.round,
                        dirty_pages: plan.pages(),
                        expected_ms: p.expected_downtime.as_secs_f64() * 1000.0,
                        fixed_ms: inputs.fixed_cost.as_secs_f64() * 1000.0,
                        limit_ms: limits.downtime_limit.as_millis(),
                        rate: c.dirty_rate,
                        send_rate: inputs.wire_rate * inputs.ratio / self.page_size as f64,
                    })
                }
                Decision::Iterate { throttle } => {
                    if let (Some(pct), Some(t)) = (throttle, &self.throttle) {
                        t.set(pct);
                    }
                    c.round += 1;
                    let facts = RoundFacts {
                        round: c.round,
                        dirty_pages: dirty.pages(),
                        dirty_rate: c.dirty_rate,
                        expected_downtime: p.expected_downtime,
                        throttle_percent: c.planner.throttle_percent(),
                    };
                    let r = self.send_planned(c, &plan, facts)?;
                    c.rounds.push(r);
                }
            }
        }
    }

    /// The planner's view of the rounds so far. Rates come from the last
    /// round when it moved enough to measure (the link, the data and the
    /// receiver change during a migration), else from all rounds.
    fn plan_inputs(&self, c: &Copy, pending_pages: u64) -> PlanInputs {
        let ps = self.page_size;
        let last = c.rounds.last();
        let measured: &[RoundReport] = match last {
            Some(r) if r.raw_bytes >= MEASURABLE_ROUND => std::slice::from_ref(r),
            _ => &c.rounds,
        };
        let (wire, raw, secs) = measured.iter().fold((0u64, 0u64, 0f64), |a, r| {
            (
                a.0 + r.bytes,
                a.1 + r.raw_bytes,
                a.2 + r.duration_ms / 1000.0,
            )
        });
        PlanInputs {
            round: c.round,
            pending_bytes: pending_pages * ps,
            wire_rate: if secs > 0.0 { wire as f64 / secs } else { 0.0 },
            ratio: if wire > 0 {
                raw as f64 / wire as f64
            } else {
                1.0
            },
            dirty_rate: c.dirty_rate * ps as f64,
            fixed_cost: c.stop_cost + c.sync_cost + c.tail_cost,
            last_round_dirtied: last.map_or(0, |r| r.dirty_pages * ps),
            last_round_sent: last.map_or(0, |r| r.bytes),
        }
    }

    fn limits(&self) -> Limits {
        let cfg = self.cfg;
        Limits {
            downtime_limit: self.handle.tunables().downtime_limit(),
            max_iterations: cfg.max_iterations,
            stop_early: cfg.stop_early,
            force_downtime: cfg.force_downtime,
            auto_converge: cfg.auto_converge.then_some(cfg.throttle),
        }
    }

    /// Live: stop every thread, take the last dirty set, and send it with
    /// what was carried. (Stop-and-copy stopped the process in setup.)
    fn downtime(&mut self, c: &mut Copy, carried: Carried) -> Result<(), SendError> {
        if !self.live() {
            return self.send_state(c);
        }
        if let Some(mut t) = self.throttle.take() {
            t.finish();
        }
        let t_stop = Instant::now();
        c.t_stop = Some(t_stop);
        self.handle.set_status(Status::Device);
        self.attach_stopped()?;
        // Before the final sync: what the injected calls dirty (the
        // kernel updates each thread's rseq area) is sent with it.
        let t_capture = Instant::now();
        self.capture_state(c)?;
        c.parts.capture_ms = ms(t_capture.elapsed());
        let t_sync = Instant::now();
        c.parts.stop_ms = ms(t_capture - t_stop);
        // Stopped: every page must read now.
        self.pipeline_mut().lenient = false;
        let fresh = self.sync_regions(&mut c.state)?;
        let dirty = self.collect(&c.state, &fresh)?;
        c.syncs += 1;
        let discards = c.state.discards(&c.pagemap)?;
        c.parts.sync_ms = ms(t_sync.elapsed());
        c.round += 1;
        let facts = RoundFacts {
            round: c.round,
            dirty_pages: dirty.pages() + carried.pages(),
            dirty_rate: c.dirty_rate,
            expected_downtime: c.expected,
            throttle_percent: 0,
        };
        let mut plan = RoundPlan::build(&c.state, &dirty, &fresh, &discards, &carried);
        if c.postcopy {
            // Private anonymous pages wait for post-copy; the rest (file
            // and shared memory, which userfaultfd's missing mode does not
            // serve here) goes now.
            let state = &c.state;
            let (later, now) = plan.split(|i| state.list[i].region.kind == RegionKind::PrivateAnon);
            // The pages the restorer touches go now, the rest later.
            let ps = self.page_size;
            let mut touched = Vec::new();
            for &a in &c.restorer_pages {
                if let Some(i) = state
                    .list
                    .iter()
                    .position(|t| t.region.start <= a && a < t.region.end)
                {
                    touched.push((
                        i,
                        Run {
                            first: (a - state.list[i].region.start) / ps,
                            count: 1,
                        },
                    ));
                }
            }
            let later = later.without(&touched);
            let now = now.with(&touched);
            c.missing = later
                .per_region()
                .into_iter()
                .map(|(i, runs)| {
                    let r = &state.list[i].region;
                    Missing {
                        index: i as u32,
                        start: r.start,
                        end: r.end,
                        runs,
                    }
                })
                .collect();
            plan = now;
        }
        let r = self.send_planned(c, &plan, facts)?;
        c.parts.transfer_ms = r.duration_ms;
        c.rounds.push(r);
        for m in &c.missing {
            for runs in m.runs.chunks(protocol::MAX_ZERO_RUNS as usize) {
                self.pipeline_mut().control(Control::Discard {
                    region: m.index,
                    runs: runs.to_vec(),
                })?;
            }
        }
        self.send_state(c)
    }

    /// Post-copy decided, the process still running: tell a receiver that
    /// takes it which pages will come by post-copy (this round's private
    /// anonymous pages), so that it drops its stale copies while this side
    /// stops the process. The Discard frames after the final round say
    /// what is missing.
    fn discard_ahead(&mut self, c: &Copy, plan: &RoundPlan) -> Result<(), SendError> {
        if !self.link.as_ref().is_some_and(|l| l.discard_ahead) {
            return Ok(());
        }
        let state = &c.state;
        let (later, _) = plan
            .clone()
            .split(|i| state.list[i].region.kind == RegionKind::PrivateAnon);
        for (i, runs) in later.per_region() {
            for runs in runs.chunks(protocol::MAX_ZERO_RUNS as usize) {
                self.pipeline_mut().control(Control::Discard {
                    region: i as u32,
                    runs: runs.to_vec(),
                })?;
            }
        }
        Ok(())
    }

    /// Post-copy after the handover: serve the destination's faults and
    /// push every missing page, then read its answer. Any failure here
    /// leaves the process stopped (the destination's copy has run).
    fn serve_postcopy(&mut self, c: &mut Copy, timeout: Duration) -> Result<Control, SendError> {
        let pid = self.cfg.pid;
        let link = self.link.as_mut().expect("connected");
        let next = super::resume::next_steps(pid, link.resume_token, &self.cfg.to);
        let broken = |reason: String| SendError::PostcopyBroken {
            pid,
            reason,
            next: next.clone(),
        };
        self.handle.set_status(Status::PostcopyActive);
        let reader = link.reader.try_clone().map_err(|e| broken(e.to_string()))?;
        let writer = link
            .writer
            .take()
            .ok_or_else(|| broken("no writer".into()))?;
        let server = Server {
            mem: &c.mem,
            page_size: self.page_size,
            missing: std::mem::take(&mut c.missing),
            method: self.cfg.method,
            level: self.cfg.level,
            max_bandwidth: self.handle.tunables().max_bandwidth(),
            threads: self.cfg.compress_threads,
        };
        let answers = link.channel.take();
        if link.resume_token != 0 {
            let mut closers = vec![link.closer.clone()];
            closers.extend(link.channel_closer.clone());
            self.handle.set_postcopy_link(closers);
        }
        let served = server.run(reader, writer, answers, timeout);
        self.handle.set_postcopy_link(Vec::new());
        let (answer, served, w) = served.map_err(|e| {
            if self.handle.pause_asked() {
                broken("paused by migrate-pause".into())
            } else {
                broken(e.to_string())
            }
        })?;
        link.writer = Some(w);
        c.served = Some(served);
        Ok(answer)
    }

    /// Send the captured state (before End).
    fn send_state(&mut self, c: &mut Copy) -> Result<(), SendError> {
        match c.state_bytes.take() {
            Some(bytes) => self.pipeline_mut().control(Control::State(bytes)),
            None => Ok(()),
        }
    }

    /// Version 3: capture the process state (stopped). Needed when the
    /// receiver restores; otherwise kept in the image if it can be
    /// captured.
    fn capture_state(&mut self, c: &mut Copy) -> Result<(), SendError> {
        let link = self.link.as_ref().expect("connected");
        if link.version < protocol::STATE_VERSION {
            c.state_note = "not sent (the receiver speaks an older protocol)".into();
            return Ok(());
        }
        let restore = link.restore;
        let pid = self.cfg.pid;
        let migrated: Vec<(u64, u64)> =
            c.state.regions().iter().map(|r| (r.start, r.end)).collect();
        let att = self.att.as_mut().expect("stopped for the downtime");
        let t = Instant::now();
        let (st, refused) = match crate::restore::capture(att, &migrated) {
            Ok(x) => x,
            Err(reason) if restore => return Err(SendError::Capture { pid, reason }),
            Err(reason) => {
                c.state_note = format!("not captured: {reason}");
                return Ok(());
            }
        };
        if restore && !refused.is_empty() {
            return Err(SendError::NotRestorable {
                pid,
                reasons: refused,
            });
        }
        let ps = self.page_size;
        c.restorer_pages = st
            .threads
            .iter()
            .filter_map(|t| t.rseq)
            .flat_map(|r| (r.addr / ps..(r.addr + r.len as u64).div_ceil(ps)).map(move |p| p * ps))
            .collect();
        let bytes = st.to_bytes();
        c.state_note = format!(
            "sent ({} kbytes, captured in {:.1} ms)",
            bytes.len() / 1024,
            ms(t.elapsed())
        );
        c.state_bytes = Some(bytes);
        Ok(())
    }

    /// End the stream, wait for Applied (every page in place; downtime
    /// ends), hand the process over with Commit (version 2), and wait for
    /// Ack (image committed).
    ///
    /// Ownership: until Commit is written the source owns the process, and
    /// any failure resumes it. Just before, the process is put in
    /// group-stop and detached, so it stays stopped even if procmig dies;
    /// from then on it never resumes by itself. Ack means the destination
    /// owns it; an Error frame means the receiver committed nothing, so it
    /// is the source's again and resumes; no answer leaves it stopped and
    /// says so ([`SendError::HandoverInDoubt`]).
    fn handover(&mut self, c: &mut Copy) -> Result<Handover, SendError> {
        let t_stop = c.t_stop.expect("stopped by now");
        let threads_stopped = self.att.as_ref().map_or(0, |a| a.thread_count());
        let t_end = Instant::now();
        let totals = self.pipeline_mut().finish(c.round + 1);
        if let Some(p) = c.progress.take() {
            p.finish();
        }
        let writer = self.pipeline_mut().take_writer();
        let link = self.link.as_mut().expect("connected");
        link.writer = writer;
        if let Err(e) = totals {
            self.connection_lost = true;
            return Err(link.remote_reason().unwrap_or(e));
        }
        // From the first page read to the End frame on the wire: the basis
        // of throughput and worker busy figures (in stop-and-copy mode this
        // is all downtime; live, it spans every round).
        let transfer = c.t_pipeline.elapsed();
        let version = link.version;
        match link.read_answer(link.timeout)? {
            Control::Applied => {}
            other => return Err(SendError::BadAck(format!("{:?}", other.kind()))),
        }
        let downtime = t_stop.elapsed();
        c.parts.apply_ms = ms(t_end.elapsed());
        if version >= protocol::HANDOVER_VERSION {
            // The last moment a signal may keep the process here.
            if self.handle.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            self.hand_over()?;
        }
        let link = self.link.as_mut().expect("connected");
        // The receiver digests, syncs and renames the image before Ack:
        // allow --timeout plus the data at a slow disk's pace.
        let data = Counters::get(&self.handle.counters().normal_pages) * self.page_size;
        let allowance = link.timeout + Duration::from_secs_f64(data as f64 / SYNC_RATE);
        let answer = if c.missing.is_empty() {
            link.read_answer(allowance)
        } else {
            self.serve_postcopy(c, allowance)
        };
        let ack = match answer {
            // Post-copy: the destination's copy has run; never take back.
            Err(e @ SendError::PostcopyBroken { .. }) => return Err(e),
            Ok(Control::Ack(a)) => a,
            Ok(other) if self.owner == Owner::InDoubt => {
                return Err(self.in_doubt(format!("the receiver answered {:?}", other.kind())))
            }
            Ok(other) => return Err(SendError::BadAck(format!("{:?}", other.kind()))),
            Err(SendError::Remote(m)) if self.owner == Owner::InDoubt => {
                // The receiver refused the commit: nothing was committed,
                // the process is ours again.
                self.take_back();
                return Err(SendError::Remote(m));
            }
            Err(e) if self.owner == Owner::InDoubt => return Err(self.in_doubt(e.to_string())),
            Err(e) => return Err(e),
        };
        if self.owner == Owner::InDoubt {
            self.owner = Owner::Destination;
        }
        Ok(Handover {
            ack,
            downtime,
            transfer,
            threads_stopped,
        })
    }

    /// Stop the process for good (group-stop, detached), then tell the
    /// receiver to commit.
    fn hand_over(&mut self) -> Result<(), SendError> {
        if let Some(a) = self.att.take() {
            self.was_stopped = a.was_stopped();
            a.detach(Leave::Stopped)?;
        }
        self.owner = Owner::InDoubt;
        let link = self.link.as_mut().expect("connected");
        link.disarm_cancel();
        let w = link.writer.as_mut().expect("the writer is back");
        protocol::write_control(w, &Control::Commit)
            .map_err(|e| self.in_doubt(format!("sending Commit: {e}")))
    }

    /// The receiver refused: resume the process as it was found.
    fn take_back(&mut self) {
        self.owner = Owner::Source;
        process::leave_detached(self.cfg.pid, Leave::AsFound, self.was_stopped);
    }

    fn in_doubt(&self, reason: String) -> SendError {
        SendError::HandoverInDoubt {
            pid: self.cfg.pid,
            reason,
        }
    }

    /// Tracking off, the process left as asked, and the report.
    fn complete(&mut self, c: Copy, h: Handover) -> Result<SendReport, SendError> {
        let cfg = self.cfg;
        let fallback_regions = self.tracker.as_ref().map_or(0, |t| t.fallback_regions());
        if let Some(mut t) = self.tracker.take() {
            t.finish(self.att.as_mut());
        }
        let leave = match cfg.on_complete {
            OnComplete::Stop => Leave::Stopped,
            OnComplete::Kill => Leave::Killed,
            OnComplete::Resume => Leave::AsFound,
        };
        if let Some(a) = self.att.take() {
            // A version-1 receiver: no handover, still attached.
            a.detach(leave)?;
        } else {
            // Handed over: the process is in group-stop, detached.
            process::leave_detached(cfg.pid, leave, self.was_stopped);
        }
        let auto_choices = self
            .pipeline
            .as_ref()
            .and_then(|p| p.adaptive.as_ref())
            .map(|a| a.summary())
            .unwrap_or_default();
        Ok(report::build(Summary {
            cfg,
            counters: self.handle.counters(),
            state: &c.state,
            page_size: self.page_size,
            live: self.live(),
            tracker: c.tracker_name,
            fallback_regions,
            threads_stopped: h.threads_stopped,
            syncs: c.syncs,
            expected_downtime: c.expected,
            rounds: c.rounds,
            auto_choices,
            left_out: c.left_out,
            cpu_seconds: (stats::cpu_time() - c.cpu_start).as_secs_f64(),
            ack: h.ack,
            total: c.t_start.elapsed(),
            setup: c.setup_time,
            downtime: h.downtime,
            downtime_parts: c.parts,
            state_note: c.state_note,
            postcopy: c.served,
            transfer: h.transfer,
            tls_peer: self.link.as_ref().and_then(|l| l.tls_peer.clone()),
        }))
    }

    /// Whatever happened: tracking off, throttle off, pipeline joined,
    /// process resumed as found (dropping the attachment detaches).
    pub fn cleanup(&mut self) {
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
            if let (Some(link), Some(w)) = (self.link.as_mut(), p.take_writer()) {
                link.writer = Some(w);
            }
        }
        self.att = None;
    }

    /// Best effort: tell the receiver why we stop, so it commits nothing
    /// and says why; then close the connection.
    pub fn tell_receiver(&mut self, e: &SendError) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let quiet = self.connection_lost
            || self.owner != Owner::Source
            || matches!(
                e,
                SendError::Connection(_) | SendError::Remote(_) | SendError::HandoverInDoubt { .. }
            );
        if let (false, Some(w)) = (quiet, link.writer.as_mut()) {
            let _ = w.set_timeout(Some(Duration::from_secs(2)));
            let code = if matches!(e, SendError::Cancelled) {
                error_code::CANCELLED
            } else {
                error_code::FAILED
            };
            let message = format!("source: {e}");
            let _ = protocol::write_control(w, &Control::Error { code, message });
        }
        link.closer.close();
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
        self.select(process::read_regions(self.cfg.pid)?)
    }

    /// The regions `--region` asks for, of `all`.
    fn select(&self, all: Vec<process::Region>) -> Result<Vec<process::Region>, SendError> {
        let cfg = self.cfg;
        Ok(process::select_regions(
            cfg.pid,
            all,
            &cfg.regions,
            self.page_size,
        )?)
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

    fn pipeline_mut(&mut self) -> &mut Pipeline {
        self.pipeline.as_mut().expect("pipeline started")
    }

    /// Send the populated pages of `plan` as one round, end it, and report
    /// it. Pages that could not be read are kept in `c.unsent`.
    fn send_planned(
        &mut self,
        c: &mut Copy,
        plan: &RoundPlan,
        facts: RoundFacts,
    ) -> Result<RoundReport, SendError> {
        let t = Instant::now();
        let counters = self.handle.counters().clone();
        let before = Snapshot::take(&counters);
        self.handle.begin_round(facts.round, plan.pages());
        let batch = |region: usize| Batch {
            round: facts.round,
            region: region as u32,
        };
        for (i, runs) in plan.per_region() {
            let (runs, skipped) = c.state.populated(&c.pagemap, i, &runs, facts.round == 0)?;
            Counters::add(&counters.skipped_pages, skipped);
            let region = c.state.list[i].region.clone();
            let mut src = PageSource {
                mem: &c.mem,
                tracker: self.tracker.as_deref_mut(),
            };
            self.pipeline
                .as_mut()
                .expect("pipeline started")
                .send_runs(&mut src, batch(i), &region, &runs)?;
            for run in &runs {
                c.state.list[i].sent.insert_run(run.first, run.count as u64);
            }
        }
        let pipeline = self.pipeline_mut();
        c.unsent = std::mem::take(&mut pipeline.unreadable);
        pipeline.end_round(facts.round)?;
        let t_tail = Instant::now();
        let link = self.link.as_mut().expect("connected");
        link.await_round_applied(facts.round)?;
        c.tail_cost = t_tail.elapsed();
        let r = before.report(facts, &counters, t.elapsed());
        self.handle.push_round(&r);
        Ok(r)
    }
}
