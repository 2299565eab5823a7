//! One migration on one connection, as an explicit state machine: which
//! frames each state accepts, what is checked, and where each leads.
//!
//! ```text
//!  state                    frame            checks and action                          next state
//!  -----------------------  ---------------  -----------------------------------------  ----------------------
//!  (admission, gate.rs)     Hello            versions overlap (else an Error frame      AwaitRegions
//!                                            with code VERSION), page size, codec;
//!                                            send Welcome. A client that fails here
//!                                            is rejected and the receiver listens on
//!  AwaitRegions             Regions          bounds of each region, total cap;          InRound{0, false}
//!                                            create the region files
//!                           Error            the source aborted                         failed
//!                           anything else    "expected Regions"                         failed
//!  InRound{round, started}  Pages            of this round; runs inside the region;     InRound{round, true}
//!                                            no page twice this round; to a worker
//!                           Zero             the same checks; zero the pages            InRound{round, true}
//!                                            (round 0: the files are still zero)
//!                           Regions          only before any page of the round          InRound{round, false}
//!                                            ("region table changed in the middle
//!                                            of a round"); table checks, barrier,
//!                                            files kept, resized, created, removed
//!                           RoundEnd(round)  of this round; barrier (the whole round    InRound{round+1, false}
//!                                            is applied); forget the round's pages;
//!                                            send RoundApplied(round) (version 2)
//!                           State            (version 3) the process state, once        InRound{round, started}
//!                           Discard          (--restore) pages the restored process     InRound{round, started}
//!                                            gets by post-copy
//!                           End(totals)      barrier; stop the workers; totals          Applied
//!                                            compared; --restore: rebuild the process
//!                                            (stopped); send Applied (downtime ends)
//!                           Error            the source aborted                         failed
//!                           anything else    "unexpected ... frame"                     failed
//!  Applied                  Commit           (version 2; version 1 reads nothing)       Committed
//!                                            the source handed over: start the
//!                                            restored process; post-copy (pages and
//!                                            PostcopyDone, postcopy.rs); digest, sync,
//!                                            rename into place; send Ack
//!                           Error, EOF       the source kept the process: nothing       failed
//!                                            is committed
//!  Committed                (none read)      the report                                 (done)
//! ```
//!
//! Failure, from any state: the workers are stopped, the staging directory
//! is removed, and the source is sent an Error frame with the reason,
//! unless it is the source that aborted. A cancel (SIGINT/SIGTERM) is
//! checked before each frame is read.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::report::{Received, RecvProgress, Summary};
use super::staging::{RegionFile, Staging, StagingError};
use super::workers::{ApplyError, ApplyJob, Regions, RoundMap, WorkerPool};
use super::{RecvConfig, RecvError, StreamError};
use crate::progress::Progress;
use crate::protocol::transport::{Closer, Reader, Writer};
use crate::protocol::{
    self, error_code, AckInfo, Control, DecodeError, Hello, Kind, PagesHeader, ReadError,
    RegionEntry, Run, Totals, Welcome, WireCodec,
};
use crate::restore::{Memory, ProcessState, Restored};
use crate::stats::{self, Counters, RecvReport};

/// Most bytes of virtual address space an image may describe (the x86-64
/// user address space); the region files are sparse.
const MAX_TOTAL: u64 = 1 << 47;

/// Whether this receiver can take the migration `hello` offers: the
/// version both speak, or why not.
pub(super) fn check_hello(hello: &Hello) -> Result<u16, StreamError> {
    let version =
        protocol::negotiate(hello.min_version, hello.version).map_err(StreamError::Version)?;
    let ps = hello.page_size;
    if !ps.is_power_of_two() || !(4096..=protocol::MAX_PAGE_SIZE).contains(&ps) {
        return Err(StreamError::PageSize(ps));
    }
    WireCodec::from_u8(hello.codec)?;
    Ok(version)
}

/// Where the session stands; the table above says what each state accepts.
enum State {
    AwaitRegions,
    /// Receiving round `round`; `started` once it had a Pages or Zero frame
    /// (a new region table may only come before that).
    InRound {
        round: u32,
        started: bool,
    },
    /// Every page is applied and Applied was sent; the image is not yet
    /// committed.
    Applied {
        rounds: u32,
        transfer: Duration,
    },
    Committed(Box<RecvReport>),
}

/// Why a session ended early, before the peer's name is put on it.
enum Stop {
    Stream(StreamError),
    Aborted(String),
    Staging(StagingError),
    Restore(String),
    Cancelled,
}

impl From<StreamError> for Stop {
    fn from(e: StreamError) -> Stop {
        Stop::Stream(e)
    }
}

impl From<StagingError> for Stop {
    fn from(e: StagingError) -> Stop {
        Stop::Staging(e)
    }
}

impl From<ReadError> for Stop {
    fn from(e: ReadError) -> Stop {
        Stop::Stream(e.into())
    }
}

impl From<DecodeError> for Stop {
    fn from(e: DecodeError) -> Stop {
        Stop::Stream(e.into())
    }
}

impl From<ApplyError> for Stop {
    fn from(e: ApplyError) -> Stop {
        Stop::Stream(e.into())
    }
}

impl Stop {
    fn into_error(self, peer: String) -> RecvError {
        match self {
            Stop::Stream(source) => RecvError::Stream { peer, source },
            Stop::Aborted(message) => RecvError::Aborted(message),
            Stop::Staging(e) => RecvError::Staging(e),
            Stop::Restore(e) => RecvError::Restore(e),
            Stop::Cancelled => RecvError::Cancelled,
        }
    }
}

/// One frame read in a round.
enum Frame {
    Pages(PagesHeader, Vec<u8>),
    Control(Control),
}

/// The migrating process, as Hello describes it.
#[derive(Default)]
struct Source {
    pid: u32,
    comm: String,
    page_size: u64,
    /// The protocol version agreed on.
    version: u16,
}

/// One migration being received.
pub struct Session<'a> {
    cfg: &'a RecvConfig,
    cancel: &'a AtomicBool,
    peer: String,
    reader: BufReader<Reader>,
    writer: Writer,
    /// Filled in by Hello.
    source: Source,
    /// Declared before the region files and the staging directory, so that
    /// when dropped the workers stop before those go.
    pool: WorkerPool,
    regions: Arc<Regions>,
    writeback: super::writeback::Writeback,
    staging: Staging,
    /// Pages seen in the current round.
    round_map: RoundMap,
    received: Received,
    codec: Option<WireCodec>,
    /// A buffer to read the next frame into when no worker gave one back.
    spare: Vec<u8>,
    counters: Arc<Counters>,
    progress: Option<Progress>,
    started: Instant,
    cpu0: Duration,
    /// The State frame's bytes and what they decode to (version 3).
    state: Option<(Vec<u8>, ProcessState)>,
    /// `--restore`: the process, built and stopped until Commit; dropped
    /// (killed) on any failure before that.
    restored: Option<Restored>,
    restore_time: Option<Duration>,
    restore_copy: Option<Duration>,
    /// `--restore`: the process built during pre-copy and filled as pages
    /// arrive; `shell_note` says why there is none after a first try.
    shell: Option<crate::restore::Shell>,
    shell_note: Option<String>,
    /// Post-copy: source address ranges the restored process lacks.
    discards: Vec<(u64, u64)>,
    /// The restored process once it runs: killed if post-copy breaks.
    running: Option<i32>,
    /// `--restore`: the listener, for the source's preempt channel and a
    /// source resuming a paused post-copy.
    listener: Option<crate::protocol::transport::Listener>,
    /// The preempt channel's token (0: none); a resuming source shows it.
    token: u64,
    /// Post-copy answers come on this connection (version 4).
    channel: Option<(Reader, Closer)>,
    /// `recv --qmp`: the control socket's view of this session.
    handle: Option<Arc<crate::control::dest::RecvHandle>>,
    /// Shuts the main connection (migrate-pause during post-copy).
    closer: Option<Closer>,
    /// The cancel flag, shared: a resumed post-copy's connection is shut
    /// when it is set, as the first one is.
    cancel_flag: Option<Arc<AtomicBool>>,
}

impl<'a> Session<'a> {
    pub fn new(
        cfg: &'a RecvConfig,
        peer: String,
        reader: Reader,
        writer: Writer,
        staging: Staging,
        cancel: &'a AtomicBool,
    ) -> Session<'a> {
        Session {
            cfg,
            cancel,
            peer,
            reader: BufReader::with_capacity(1 << 20, reader),
            writer,
            source: Source::default(),
            pool: WorkerPool::spawn(cfg.decompress_threads.max(1)),
            regions: Arc::new(Regions::empty(0)),
            writeback: super::writeback::Writeback::spawn(),
            staging,
            round_map: RoundMap::default(),
            received: Received::default(),
            codec: None,
            spare: Vec::new(),
            counters: Arc::new(Counters::new(0)),
            progress: None,
            started: Instant::now(),
            cpu0: stats::cpu_time(),
            state: None,
            restored: None,
            restore_time: None,
            restore_copy: None,
            discards: Vec::new(),
            shell: None,
            shell_note: None,
            running: None,
            listener: None,
            token: 0,
            channel: None,
            handle: None,
            closer: None,
            cancel_flag: None,
        }
    }

    /// Count into `handle`'s counters and tell it of post-copy.
    pub fn with_handle(mut self, handle: Option<Arc<crate::control::dest::RecvHandle>>) -> Self {
        if let Some(h) = &handle {
            self.counters = h.counters().clone();
        }
        self.handle = handle;
        self
    }

    /// Keep `listener` for the preempt channel a post-copy source opens,
    /// `closer` of the main connection (migrate-pause shuts it), and the
    /// cancel flag (a resumed post-copy's connection is shut on cancel).
    pub fn with_listener(
        mut self,
        listener: Option<crate::protocol::transport::Listener>,
        closer: Closer,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        self.listener = listener;
        self.closer = Some(closer);
        self.cancel_flag = Some(cancel);
        self
    }

    /// Receive the migration of the client that sent `hello` (admitted by
    /// the gate): run the state machine to Committed, or fail.
    pub fn run(mut self, hello: Hello) -> Result<RecvReport, RecvError> {
        let stop = match self.drive(hello) {
            Ok(report) => return Ok(report),
            Err(stop) => stop,
        };
        // Post-copy broke: the restored process lacks memory the source
        // still holds; it cannot go on, and the source can be resumed.
        if let Some(pid) = self.running.take() {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Stop the workers before the mappings go; the first error wins.
        let _ = self.stop_workers();
        let Session {
            staging,
            mut writer,
            mut reader,
            peer,
            ..
        } = self;
        drop(staging);
        let e = stop.into_error(peer);
        // Tell the source why, unless it is the one that failed.
        if !matches!(e, RecvError::Aborted(_)) {
            let _ = writer.set_timeout(Some(Duration::from_secs(2)));
            let _ = protocol::write_control(
                &mut writer,
                &Control::Error {
                    code: error_code::FAILED,
                    message: e.to_string(),
                },
            );
            // Read on for a moment before closing: closing with unread
            // data would send a reset, which can destroy the Error frame
            // before the source reads it.
            reader
                .get_mut()
                .set_deadline(Some(Instant::now() + Duration::from_secs(1)));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        }
        Err(e)
    }

    fn drive(&mut self, hello: Hello) -> Result<RecvReport, Stop> {
        let mut state = self.on_hello(hello)?;
        loop {
            if !matches!(state, State::Applied { .. } | State::Committed(_)) {
                // Before each frame is read.
                self.check_cancel()?;
            }
            state = match state {
                State::AwaitRegions => self.await_regions()?,
                State::InRound { round, started } => self.in_round(round, started)?,
                State::Applied { rounds, transfer } => self.await_commit(rounds, transfer)?,
                State::Committed(report) => return Ok(*report),
            };
        }
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Read one frame into a reused buffer.
    fn read(&mut self) -> Result<(Kind, Vec<u8>), Stop> {
        let mut buf = self
            .pool
            .spare_buffer()
            .unwrap_or_else(|| std::mem::take(&mut self.spare));
        // A whole frame within the timeout, however its bytes trickle in.
        let deadline = Instant::now() + self.cfg.timeout;
        self.reader.get_mut().set_deadline(Some(deadline));
        let kind = protocol::read_frame(&mut self.reader, &mut buf)?;
        Ok((kind, buf))
    }

    /// Read one frame that must be a control frame.
    fn read_control(&mut self) -> Result<Control, Stop> {
        let (kind, buf) = self.read()?;
        let control = Control::decode(kind, &buf);
        self.spare = buf;
        Ok(control?)
    }

    fn send(&mut self, control: &Control) -> std::io::Result<()> {
        protocol::write_control(&mut self.writer, control)
    }

    /// The admitted client's Hello (checked by the gate): answer Welcome.
    fn on_hello(&mut self, hello: Hello) -> Result<State, Stop> {
        let version = check_hello(&hello)?;
        let ps = hello.page_size;
        let mut capabilities = protocol::CAPABILITIES;
        if self.cfg.restore.is_some() {
            if version < protocol::STATE_VERSION {
                return Err(Stop::Restore(format!(
                    "the source speaks protocol version {version}, which carries no process state"
                )));
            }
            capabilities |=
                protocol::CAP_RESTORE | protocol::CAP_POSTCOPY | protocol::CAP_DISCARD_AHEAD;
        }
        // A source that may switch to post-copy opens a channel of its own
        // for the answers to faults, at once.
        let token = if version >= protocol::CHANNEL_VERSION
            && hello.capabilities & protocol::CAP_PREEMPT != 0
            && self.listener.is_some()
        {
            capabilities |= protocol::CAP_PREEMPT;
            if !self.cfg.recover_timeout.is_zero() {
                capabilities |= protocol::CAP_RECOVER;
            }
            random_token()
        } else {
            0
        };
        self.send(&Control::Welcome(Welcome {
            version,
            capabilities,
            decompress_threads: self.cfg.decompress_threads as u16,
            channel_token: token,
        }))
        .map_err(StreamError::SendWelcome)?;
        self.token = token;
        if let Some(listener) = self.listener.as_ref() {
            if token != 0 {
                let (reader, closer) = super::gate::accept_channel(
                    listener,
                    token,
                    self.cfg.timeout,
                    self.cfg.tls.as_ref(),
                    self.cancel,
                )
                .map_err(|e| {
                    if self.cancel.load(Ordering::Relaxed) {
                        Stop::Cancelled
                    } else {
                        StreamError::Channel(e).into()
                    }
                })?;
                self.channel = Some((reader, closer));
            }
        }
        if token == 0 || self.cfg.recover_timeout.is_zero() {
            // Nothing more will be accepted (no resuming source): close
            // the port rather than let clients wait in its backlog.
            self.listener = None;
        }
        self.source = Source {
            pid: hello.pid,
            comm: hello.comm,
            page_size: ps as u64,
            version,
        };
        self.regions = Arc::new(Regions::empty(ps as u64));
        Ok(State::AwaitRegions)
    }

    fn await_regions(&mut self) -> Result<State, Stop> {
        let table = match self.read_control()? {
            Control::Regions(t) => t,
            Control::Error { message, .. } => return Err(Stop::Aborted(message)),
            other => {
                return Err(StreamError::Expected {
                    expected: Kind::Regions,
                    got: other.kind(),
                }
                .into())
            }
        };
        self.replace_table(&table)?;
        self.progress = self
            .cfg
            .progress
            .map(|d| Progress::start("recv", d, RecvProgress(self.counters.clone())));
        Ok(State::InRound {
            round: 0,
            started: false,
        })
    }

    /// Read and handle one frame of round `round`.
    fn in_round(&mut self, round: u32, started: bool) -> Result<State, Stop> {
        self.pool.poll()?;
        let frame = self.read_in_round()?;
        let control = match frame {
            Frame::Pages(h, payload) => return self.on_pages(round, h, payload),
            Frame::Control(c) => c,
        };
        match control {
            Control::Zero {
                round: of,
                region,
                runs,
            } => self.on_zero(round, of, region, &runs),
            Control::Regions(table) => self.on_regions(round, started, &table),
            Control::RoundEnd(of) => self.on_round_end(round, of),
            Control::End(totals) => self.on_end(round, totals),
            Control::State(bytes) if self.source.version >= protocol::STATE_VERSION => {
                self.on_state(bytes)?;
                Ok(State::InRound { round, started })
            }
            Control::Discard { region, runs } if self.cfg.restore.is_some() => {
                self.on_discard(region, &runs)?;
                Ok(State::InRound { round, started })
            }
            Control::Error { message, .. } => Err(Stop::Aborted(message)),
            other => Err(StreamError::Unexpected(other.kind()).into()),
        }
    }

    /// Read a frame during a round: counted, and Pages frames decoded in
    /// place.
    fn read_in_round(&mut self) -> Result<Frame, Stop> {
        let (kind, buf) = self.read()?;
        let frame_len = (protocol::HEADER_LEN + buf.len()) as u64;
        self.received.bytes += frame_len;
        Counters::add(&self.counters.wire_bytes, frame_len);
        if kind == Kind::Pages {
            let h = protocol::decode_pages_header(&buf, self.source.page_size as u32)?;
            return Ok(Frame::Pages(h, buf));
        }
        let control = Control::decode(kind, &buf);
        self.spare = buf;
        Ok(Frame::Control(control?))
    }

    fn on_pages(&mut self, round: u32, h: PagesHeader, payload: Vec<u8>) -> Result<State, Stop> {
        if h.round != round {
            return Err(StreamError::FrameRound {
                kind: Kind::Pages,
                got: h.round,
                round,
            }
            .into());
        }
        self.check_runs(round, h.region, &h.runs)?;
        if h.codec != WireCodec::Raw {
            self.codec = Some(h.codec);
        }
        let pages = h.raw_len as u64 / self.source.page_size;
        self.staging.make_room(
            self.received.normal_pages * self.source.page_size,
            h.raw_len as u64,
            self.cfg.max_image_size,
        )?;
        self.received.normal_pages += pages;
        self.received.page_frames += 1;
        self.regions.files[h.region as usize]
            .populated
            .fetch_add(pages, Ordering::Relaxed);
        Counters::add(&self.counters.read_bytes, h.raw_len as u64);
        let (region, raw_len) = (h.region, h.raw_len as u64);
        self.pool.submit(ApplyJob {
            header: h,
            payload,
            regions: self.regions.clone(),
        })?;
        // The bulk copy's pages only: a later round's are pages the
        // process rewrites, and each page written back is write-protected
        // again, so the next copy of it into the image takes a fault (in
        // the downtime too): a rewritten python heap on ext4 paused twice
        // as long with every round written back.
        if round == 0 {
            let regions = &self.regions;
            self.writeback.handed(region, raw_len, |r| {
                regions.files.get(r as usize).and_then(|f| f.dup())
            });
        }
        Ok(State::InRound {
            round,
            started: true,
        })
    }

    fn on_zero(&mut self, round: u32, of: u32, region: u32, runs: &[Run]) -> Result<State, Stop> {
        if of != round {
            return Err(StreamError::FrameRound {
                kind: Kind::Zero,
                got: of,
                round,
            }
            .into());
        }
        self.check_runs(round, region, runs)?;
        let ps = self.source.page_size;
        let n: u64 = runs.iter().map(|r| r.count as u64).sum();
        self.received.zero_pages += n;
        self.received.zero_frames += 1;
        let rf = &self.regions.files[region as usize];
        rf.populated.fetch_add(n, Ordering::Relaxed);
        Counters::add(&self.counters.read_bytes, n * ps);
        // Round 0 writes into fresh sparse files, still zero there (and
        // into the shell's fresh memory).
        if round > 0 {
            zero_pages(rf, runs, ps);
            if let Some(m) = self.regions.mirror.as_ref() {
                if crate::restore::shell_wants(&rf.entry) {
                    let ranges: Vec<(u64, u64)> = runs
                        .iter()
                        .map(|r| (rf.entry.start + r.first * ps, r.count as u64 * ps))
                        .collect();
                    m.zero(&ranges);
                }
            }
        }
        Ok(State::InRound {
            round,
            started: true,
        })
    }

    fn on_regions(
        &mut self,
        round: u32,
        started: bool,
        table: &[RegionEntry],
    ) -> Result<State, Stop> {
        if started {
            return Err(StreamError::TableMidRound.into());
        }
        self.replace_table(table)?;
        Ok(State::InRound { round, started })
    }

    fn on_round_end(&mut self, round: u32, of: u32) -> Result<State, Stop> {
        if of != round {
            return Err(StreamError::RoundEnd { got: of, round }.into());
        }
        self.pool.barrier()?;
        self.round_map.clear();
        // Discard frames ahead of the final round only let the shell drop
        // stale pages; what is missing is said after the last RoundEnd.
        self.discards.clear();
        if self.source.version >= protocol::ROUND_APPLIED_VERSION {
            self.send(&Control::RoundApplied(round))
                .map_err(StreamError::SendApplied)?;
        }
        Ok(State::InRound {
            round: round + 1,
            started: false,
        })
    }

    /// End after `rounds` whole rounds: every total, the round count
    /// included, is compared with what arrived.
    fn on_end(&mut self, rounds: u32, totals: Totals) -> Result<State, Stop> {
        self.pool.barrier()?;
        // Stop the workers before touching the mappings again.
        self.stop_workers()?;
        let received = self.received.totals(rounds);
        if received != totals {
            return Err(StreamError::TotalsDiffer {
                sent: totals,
                received,
            }
            .into());
        }
        if self.cfg.restore.is_some() {
            self.restore()?;
        }
        // The destination has every page: downtime ends here; the commit
        // (digests, sync, rename) follows and is confirmed by Ack.
        self.send(&Control::Applied)
            .map_err(StreamError::SendApplied)?;
        Ok(State::Applied {
            rounds: totals.rounds,
            transfer: self.started.elapsed(),
        })
    }

    /// Version 2: the source hands over with Commit; until then nothing
    /// is committed, and a source that goes away keeps the process.
    fn await_commit(&mut self, rounds: u32, transfer: Duration) -> Result<State, Stop> {
        if self.source.version >= protocol::HANDOVER_VERSION {
            match self.read_control()? {
                Control::Commit => {}
                Control::Error { message, .. } => return Err(Stop::Aborted(message)),
                other => {
                    return Err(StreamError::Expected {
                        expected: Kind::Commit,
                        got: other.kind(),
                    }
                    .into())
                }
            }
        }
        self.commit(rounds, transfer)
    }

    /// Post-copy: these pages stay missing in the restored process.
    fn on_discard(&mut self, region: u32, runs: &[Run]) -> Result<(), Stop> {
        let ps = self.source.page_size;
        let rf = self
            .regions
            .files
            .get(region as usize)
            .ok_or(StreamError::NoSuchRegion {
                region,
                regions: self.regions.files.len(),
            })?;
        for r in runs {
            if r.first
                .checked_add(r.count as u64)
                .is_none_or(|e| e > rf.pages)
            {
                return Err(StreamError::RegionOutOfRange {
                    region,
                    first: r.first,
                    count: r.count,
                    pages: rf.pages,
                }
                .into());
            }
            let s = rf.entry.start + r.first * ps;
            self.discards.push((s, s + r.count as u64 * ps));
        }
        // The shell drops its stale copies now, not in the downtime.
        if let Some(shell) = &mut self.shell {
            self.pool.barrier()?;
            let ps = self.source.page_size;
            let ranges: Vec<(u64, u64)> = runs
                .iter()
                .map(|r| {
                    (
                        rf.entry.start + r.first * ps,
                        rf.entry.start + (r.first + r.count as u64) * ps,
                    )
                })
                .collect();
            if let Err(e) = shell.drop_pages(&ranges) {
                self.drop_shell(e);
            }
        }
        Ok(())
    }

    fn on_state(&mut self, bytes: Vec<u8>) -> Result<(), Stop> {
        if self.state.is_some() {
            return Err(StreamError::State("a second State frame".into()).into());
        }
        let st = ProcessState::from_bytes(&bytes).map_err(StreamError::State)?;
        self.state = Some((bytes, st));
        Ok(())
    }

    /// Rebuild the process from the state and the region files; it stays
    /// stopped until Commit.
    fn restore(&mut self) -> Result<(), Stop> {
        let t = Instant::now();
        let opts = self.cfg.restore.as_ref().expect("restoring");
        crate::restore::privileges().map_err(Stop::Restore)?;
        let Some((_, st)) = &self.state else {
            return Err(StreamError::State("the source sent no process state".into()).into());
        };
        let mem = Memory {
            regions: self
                .regions
                .files
                .iter()
                .map(|f| (f.entry.start, f.entry.end, Staging::region_data(f)))
                .collect(),
        };
        let missing = (!self.discards.is_empty()).then_some(&self.discards[..]);
        let shell = self.shell.take();
        let mut r =
            crate::restore::restore(st, &mem, opts, missing, shell).map_err(Stop::Restore)?;
        r.notes.extend(self.shell_note.take());
        self.restore_copy = Some(r.copy_time);
        self.restored = Some(r);
        self.restore_time = Some(t.elapsed());
        Ok(())
    }

    fn commit(&mut self, rounds: u32, transfer: Duration) -> Result<State, Stop> {
        let t_commit = Instant::now();
        // Handed over: the restored process runs from here, whatever
        // happens to the image.
        let mut restored_pid = None;
        let mut notes = Vec::new();
        let mut postcopy = None;
        let mut early = None;
        if let Some(mut r) = self.restored.take() {
            notes = r.notes.clone();
            early = Some(r.early);
            let uffd = r.uffd.take();
            let pid = r.start().map_err(Stop::Restore)?;
            restored_pid = Some(pid);
            if let Some(uffd) = uffd {
                self.running = Some(pid);
                if let Some(h) = &self.handle {
                    h.set_status(crate::control::dest::RecvStatus::PostcopyActive);
                }
                let control: &dyn super::postcopy::Pausable = match &self.handle {
                    Some(h) => &**h,
                    None => &super::postcopy::NoControl,
                };
                let elsewhere = match &self.handle {
                    Some(_) => " (or, to wait on another address: `procmig recv --recover ADDR:PORT --qmp SOCKET`, QMP migrate-recover)",
                    None => "",
                };
                let recovery = match (&self.listener, &self.cancel_flag) {
                    (Some(listener), Some(cancel)) if self.token != 0 => {
                        Some(super::postcopy::Recovery {
                            listener,
                            cancel: cancel.clone(),
                            token: self.token,
                            source_pid: self.source.pid,
                            tls: self.cfg.tls.as_ref(),
                            wait: self.cfg.recover_timeout,
                            hint: format!(
                                "procmig send --resume {:016x} --pid {} --to {}{elsewhere}",
                                self.token,
                                self.source.pid,
                                listener
                                    .local_addr()
                                    .map_or(self.cfg.listen.clone(), |a| a.to_string())
                            ),
                            control,
                        })
                    }
                    _ => None,
                };
                if recovery.as_ref().is_some_and(|r| !r.wait.is_zero()) {
                    let mut link: Vec<Closer> = self.closer.iter().cloned().collect();
                    link.extend(self.channel.as_ref().map(|(_, c)| c.clone()));
                    control.linked(link);
                }
                let link = super::postcopy::Link {
                    reader: &mut self.reader,
                    writer: &mut self.writer,
                    channel: self.channel.take(),
                };
                let report = super::postcopy::run(
                    link,
                    uffd,
                    &self.regions,
                    &self.discards,
                    self.cfg.timeout,
                    self.cancel,
                    recovery,
                )
                .map_err(|e| {
                    Stop::Restore(format!(
                        "post-copy broke: {e}; the restored process {pid} was killed (the source holds the whole process, stopped)"
                    ))
                })?;
                self.running = None;
                if let Err(e) = crate::restore::clear_parent_death_signal(pid) {
                    notes.push(format!("after post-copy: {e}"));
                }
                postcopy = Some(report);
            }
        }
        let regions = self.take_regions()?;
        let total: u64 = regions.files.iter().map(|f| f.len()).sum();
        let source = &self.source;
        let out = &self.cfg.out;
        let written = self
            .writeback
            .finish()
            .map_err(|source| super::staging::StagingError::Write {
                path: out.clone(),
                source,
            })
            .and_then(|_| match &self.state {
                Some((bytes, _)) => self.staging.add_file(crate::restore::STATE_NAME, bytes),
                None => Ok(()),
            })
            .and_then(|_| {
                self.staging
                    .commit(&regions.files, source.pid, &source.comm, source.page_size)
            });
        match written {
            Ok(()) => {}
            // The process runs here already: the source must not get it
            // back because the image could not be kept.
            Err(e) if restored_pid.is_some() => {
                notes.push(format!("the image was not committed: {e}"))
            }
            Err(e) => return Err(e.into()),
        }
        let commit = t_commit.elapsed();
        let busy_ns = self.pool.busy_ns();
        let ack = AckInfo {
            normal_pages: self.received.normal_pages,
            zero_pages: self.received.zero_pages,
            decompress_busy_ns: busy_ns.iter().map(|b| b.load(Ordering::Relaxed)).sum(),
            commit_ns: commit.as_nanos() as u64,
            restored_pid: restored_pid.unwrap_or(0) as u32,
        };
        self.send(&Control::Ack(ack))
            .map_err(StreamError::SendAck)?;
        let mut report = RecvReport::from(Summary {
            out: &self.cfg.out,
            source_pid: self.source.pid,
            source_comm: &self.source.comm,
            from: &self.peer,
            received: &self.received,
            rounds,
            regions: regions.files.len(),
            total,
            codec: self.codec,
            busy_ns: self.pool.busy_ns(),
            elapsed: self.started.elapsed(),
            transfer,
            commit,
            cpu: stats::cpu_time() - self.cpu0,
        });
        report.restored_pid = restored_pid;
        report.restore_ms = self.restore_time.map(|d| d.as_secs_f64() * 1000.0);
        report.restore_copy_ms = self.restore_copy.map(|d| d.as_secs_f64() * 1000.0);
        report.restore_notes = notes;
        report.restore_early = early;
        report.postcopy = postcopy;
        Ok(State::Committed(Box::new(report)))
    }

    /// Stop the workers (waiting for what is in flight) and the progress
    /// line. Afterwards nothing but this thread touches the mappings.
    fn stop_workers(&mut self) -> Result<(), ApplyError> {
        let r = self.pool.finish();
        if let Some(p) = self.progress.take() {
            p.finish();
        }
        r
    }

    /// The region files, owned alone again (the workers hold none after a
    /// barrier).
    fn take_regions(&mut self) -> Result<Regions, StreamError> {
        let ps = self.source.page_size;
        let shared = std::mem::replace(&mut self.regions, Arc::new(Regions::empty(ps)));
        Arc::try_unwrap(shared).map_err(|_| StreamError::RegionsShared)
    }

    /// Move to a new region table (the first one, or one between rounds'
    /// pages): check it, let the workers finish with the old files, and
    /// keep, resize, create or remove files to match.
    fn replace_table(&mut self, table: &[RegionEntry]) -> Result<(), Stop> {
        let ps = self.source.page_size;
        check_table(table, ps)?;
        self.pool.barrier()?;
        let old = self.take_regions()?;
        let files = self.staging.reconcile(old.files, table, ps)?;
        self.writeback.new_table();
        self.follow_table(table);
        self.regions = Arc::new(Regions {
            files,
            page_size: ps,
            mirror: self.shell.as_ref().map(|s| s.mirror()),
        });
        Ok(())
    }

    /// `--restore`: start the process's shell on the first table, and
    /// make it follow the later ones. It is an optimisation: when it
    /// cannot, it is dropped (killed; it never ran) and the restore builds
    /// the process from the image.
    fn follow_table(&mut self, table: &[RegionEntry]) {
        let Some(opts) = &self.cfg.restore else {
            return;
        };
        if self.shell_note.is_some() {
            return;
        }
        let r = match &mut self.shell {
            Some(shell) => shell.follow(table),
            None => {
                let pid = opts.same_pid.then_some(self.source.pid as i32);
                crate::restore::Shell::spawn(pid, table).map(|s| self.shell = Some(s))
            }
        };
        if let Err(e) = r {
            self.drop_shell(e);
        }
    }

    /// The shell cannot serve: kill it (it never ran) and say why in the
    /// restore's notes; the restore builds the process from the image.
    fn drop_shell(&mut self, why: String) {
        self.shell = None;
        self.shell_note = Some(format!("not built during pre-copy: {why}"));
    }

    /// Check a run list against the region table and this round's map.
    fn check_runs(&mut self, round: u32, region: u32, runs: &[Run]) -> Result<(), StreamError> {
        let rf =
            self.regions
                .files
                .get(region as usize)
                .ok_or_else(|| StreamError::NoSuchRegion {
                    region,
                    regions: self.regions.files.len(),
                })?;
        for run in runs {
            let end = run.first.checked_add(run.count as u64);
            if end.is_none_or(|e| e > rf.pages) {
                return Err(StreamError::RegionOutOfRange {
                    region,
                    first: run.first,
                    count: run.count,
                    pages: rf.pages,
                });
            }
            if !self.round_map.mark(region, run.first, run.count) {
                return Err(StreamError::PageTwice {
                    page: run.first,
                    region,
                    round,
                });
            }
        }
        Ok(())
    }
}

/// Regions must be page-aligned, non-empty, in order, and not overlap, and
/// all of them together at most [`MAX_TOTAL`] bytes.
fn check_table(table: &[RegionEntry], ps: u64) -> Result<(), StreamError> {
    let mut prev = 0u64;
    let mut total = 0u64;
    for (index, r) in table.iter().enumerate() {
        if r.start % ps != 0 || r.end % ps != 0 || r.start >= r.end || r.start < prev {
            return Err(StreamError::RegionBounds {
                index,
                start: r.start,
                end: r.end,
            });
        }
        prev = r.end;
        total = total.saturating_add(r.end - r.start);
    }
    if total > MAX_TOTAL {
        return Err(StreamError::TooLarge {
            total,
            max: MAX_TOTAL,
        });
    }
    Ok(())
}

fn zero_pages(rf: &RegionFile, runs: &[Run], ps: u64) {
    for run in runs {
        let at = (run.first * ps) as usize;
        let len = run.count as usize * ps as usize;
        // SAFETY: the run was checked against the region's page count, and
        // no worker writes these pages now (RoundMap).
        unsafe { std::ptr::write_bytes(rf.ptr().add(at), 0, len) };
        rf.forget(run.first, run.count as u64);
    }
}

/// A channel token nobody can guess: 64 random bits, never 0.
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most the buffer's length into it.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let t = u64::from_le_bytes(b);
    if n == 8 && t != 0 {
        t
    } else {
        // getrandom cannot fail for 8 bytes once the pool is ready; the
        // clock is enough for a token that is checked, not secret.
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64))
            | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64) -> RegionEntry {
        RegionEntry {
            start,
            end,
            prot: 3,
            name: String::new(),
        }
    }

    #[test]
    fn table_checks() {
        assert!(check_table(&[entry(0x1000, 0x3000), entry(0x3000, 0x4000)], 4096).is_ok());
        for bad in [
            vec![entry(0x1001, 0x3000)],
            vec![entry(0x3000, 0x3000)],
            vec![entry(0x3000, 0x5000), entry(0x1000, 0x2000)],
        ] {
            let e = check_table(&bad, 4096).unwrap_err();
            assert!(e.to_string().contains("has bad bounds"), "{e}");
        }
        let e = check_table(&[entry(0, MAX_TOTAL + 4096)], 4096).unwrap_err();
        assert!(matches!(e, StreamError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_read_timeout_is_idleness() {
        let e = StreamError::from(ReadError::Io(std::io::ErrorKind::WouldBlock.into()));
        assert!(matches!(e, StreamError::Idle), "{e}");
        assert!(e.to_string().contains("--timeout"), "{e}");
        let e = StreamError::from(ReadError::Closed);
        assert_eq!(e.to_string(), "connection closed by peer");
    }
}
