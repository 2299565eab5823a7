//! The destination side: accept one migration, decompress it with a pool of
//! workers into memory-mapped region files, check the totals, and commit the
//! image atomically. On any failure the staging directory is removed and
//! the source is told why in an Error frame.

mod report;
mod staging;
mod workers;

use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{
    self, error_code, AckInfo, Control, Hello, Kind, ReadError, RegionEntry, Run, Totals, Welcome,
    WireCodec,
};
use crate::stats::{self, RecvReport};
use report::{Received, Summary};
use staging::Staging;
pub use staging::StagingError;
use workers::{ApplyJob, Regions, RoundMap, WorkerPool};

/// Everything `procmig recv` needs, validated.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    /// `[ADDR:]PORT`; the address defaults to 0.0.0.0.
    pub listen: String,
    pub out: PathBuf,
    pub decompress_threads: usize,
    /// Replace an existing output.
    pub force: bool,
    pub progress: bool,
}

/// QEMU's default decompress-threads.
pub const DEFAULT_DECOMPRESS_THREADS: usize = 2;

/// Silence on the connection longer than this ends the migration.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Most bytes of virtual address space an image may describe (the x86-64
/// user address space); the region files are sparse.
const MAX_TOTAL: u64 = 1 << 47;

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// `--listen` is not `[ADDR:]PORT`.
    #[error("invalid listen address {0:?} (expected PORT or ADDR:PORT)")]
    BadListen(String),
    /// Binding failed (port in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// Accepting a connection failed.
    #[error("accept failed: {0}")]
    Accept(io::Error),
    /// The stream broke or carried something invalid.
    #[error("bad stream from {peer}: {reason}")]
    Stream { peer: String, reason: String },
    /// The source reported an error or cancelled.
    #[error("source aborted the migration: {0}")]
    Aborted(String),
    /// SIGINT or SIGTERM.
    #[error("cancelled by signal")]
    Cancelled,
}

/// A bound receiver, ready to accept one migration.
pub struct Listener {
    cfg: RecvConfig,
    listener: TcpListener,
    staging: Staging,
}

fn parse_listen(s: &str) -> Result<String, RecvError> {
    if s.parse::<u16>().is_ok() {
        return Ok(format!("0.0.0.0:{s}"));
    }
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    if let Some((host, port)) = s.rsplit_once(':') {
        if port.parse::<u16>().is_ok() && !host.is_empty() {
            return Ok(s.to_string());
        }
    }
    Err(RecvError::BadListen(s.to_string()))
}

impl Listener {
    /// Check the output path, create the staging directory, and bind.
    pub fn bind(cfg: RecvConfig) -> Result<Listener, RecvError> {
        let addr = parse_listen(&cfg.listen)?;
        let staging = Staging::create(&cfg.out, cfg.force)?;
        let listener = TcpListener::bind(&addr).map_err(|source| RecvError::Bind {
            addr: addr.clone(),
            source,
        })?;
        Ok(Listener {
            cfg,
            listener,
            staging,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept one connection and receive the migration into the image.
    pub fn run(self, cancel: &Arc<AtomicBool>) -> Result<RecvReport, RecvError> {
        let r = self.run_inner(cancel);
        if r.is_err() && cancel.load(Ordering::Relaxed) {
            return Err(RecvError::Cancelled);
        }
        r
    }

    fn run_inner(self, cancel: &Arc<AtomicBool>) -> Result<RecvReport, RecvError> {
        self.listener
            .set_nonblocking(true)
            .map_err(RecvError::Accept)?;
        let (sock, peer) = loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(RecvError::Cancelled);
            }
            match self.listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecvError::Accept(e)),
            }
        };
        drop(self.listener);
        sock.set_nonblocking(false).map_err(RecvError::Accept)?;
        let _ = sock.set_nodelay(true);
        sock.set_read_timeout(Some(IDLE_TIMEOUT)).ok();
        let _watch = crate::cancel::ShutdownOnCancel::new(cancel.clone(), &sock);
        let mut session = Session {
            cfg: &self.cfg,
            peer: peer.to_string(),
            sock,
            cancel,
        };
        match session.receive(self.staging) {
            Ok(report) => Ok(report),
            Err(e) => {
                // Tell the source why, unless it is the one that failed.
                if !matches!(e, RecvError::Aborted(_)) {
                    let _ = session.sock.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = protocol::write_control(
                        &mut session.sock,
                        &Control::Error {
                            code: error_code::FAILED,
                            message: e.to_string(),
                        },
                    );
                }
                Err(e)
            }
        }
    }
}

struct Session<'a> {
    cfg: &'a RecvConfig,
    peer: String,
    sock: TcpStream,
    cancel: &'a AtomicBool,
}

impl Session<'_> {
    fn bad(&self, reason: impl Into<String>) -> RecvError {
        RecvError::Stream {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }

    fn read_err(&self, e: ReadError) -> RecvError {
        match e {
            ReadError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.bad(format!("no data for {} s", IDLE_TIMEOUT.as_secs()))
            }
            e => self.bad(e.to_string()),
        }
    }

    fn handshake(&mut self, r: &mut impl io::Read) -> Result<Hello, RecvError> {
        let hello = match protocol::read_control(r) {
            Ok(Control::Hello(h)) => h,
            Ok(other) => return Err(self.bad(format!("expected Hello, got {:?}", other.kind()))),
            Err(ReadError::Decode(e)) => {
                return Err(self.bad(format!("not a procmig stream ({e})")))
            }
            Err(e) => return Err(self.read_err(e)),
        };
        if hello.version < protocol::MIN_VERSION || hello.min_version > protocol::VERSION {
            let message = format!(
                "source speaks protocol versions {}..={}, this receiver {}..={}",
                hello.min_version,
                hello.version,
                protocol::MIN_VERSION,
                protocol::VERSION
            );
            let _ = protocol::write_control(
                &mut self.sock,
                &Control::Error {
                    code: error_code::VERSION,
                    message: message.clone(),
                },
            );
            return Err(self.bad(message));
        }
        let ps = hello.page_size;
        if !ps.is_power_of_two() || !(4096..=protocol::MAX_PAGE_SIZE).contains(&ps) {
            return Err(self.bad(format!("unsupported page size {ps}")));
        }
        WireCodec::from_u8(hello.codec).map_err(|e| self.bad(e.to_string()))?;
        protocol::write_control(
            &mut self.sock,
            &Control::Welcome(Welcome {
                version: protocol::VERSION.min(hello.version),
                capabilities: protocol::CAPABILITIES,
                decompress_threads: self.cfg.decompress_threads as u16,
            }),
        )
        .map_err(|e| self.bad(e.to_string()))?;
        Ok(hello)
    }

    fn check_table(&self, table: &[RegionEntry], ps: u64) -> Result<(), RecvError> {
        let mut prev = 0u64;
        let mut total = 0u64;
        for (i, r) in table.iter().enumerate() {
            if r.start % ps != 0 || r.end % ps != 0 || r.start >= r.end || r.start < prev {
                return Err(self.bad(format!(
                    "region {i} has bad bounds {:#x}-{:#x}",
                    r.start, r.end
                )));
            }
            prev = r.end;
            total = total.saturating_add(r.end - r.start);
        }
        if total > MAX_TOTAL {
            return Err(self.bad(format!(
                "regions total {total} bytes, more than {MAX_TOTAL}"
            )));
        }
        Ok(())
    }

    fn receive(&mut self, staging: Staging) -> Result<RecvReport, RecvError> {
        let t0 = Instant::now();
        let cpu0 = stats::cpu_time();
        let read_sock = self.sock.try_clone().map_err(|e| self.bad(e.to_string()))?;
        let mut r = BufReader::with_capacity(1 << 20, read_sock);
        let hello = self.handshake(&mut r)?;
        let ps = hello.page_size as u64;

        let mut payload = Vec::new();
        let kind = protocol::read_frame(&mut r, &mut payload).map_err(|e| self.read_err(e))?;
        let table = match Control::decode(kind, &payload) {
            Ok(Control::Regions(t)) => t,
            Ok(Control::Error { message, .. }) => return Err(RecvError::Aborted(message)),
            Ok(other) => return Err(self.bad(format!("expected Regions, got {:?}", other.kind()))),
            Err(e) => return Err(self.bad(e.to_string())),
        };
        self.check_table(&table, ps)?;
        let mut staging = staging;
        let files = staging.reconcile(Vec::new(), &table, ps)?;
        let mut st = Stream {
            regions: Arc::new(Regions {
                files,
                page_size: ps,
            }),
            staging,
            got: Received::default(),
            codec: None,
        };

        let threads = self.cfg.decompress_threads.max(1);
        let mut pool = WorkerPool::spawn(threads);
        let total: u64 = table.iter().map(|e| e.end - e.start).sum();
        let progress_counters = Arc::new(stats::Counters::new(0));
        let progress = self
            .cfg
            .progress
            .then(|| crate::progress::Progress::start("recv", total, progress_counters.clone()));

        let result = self.stream_loop(&mut r, &mut st, &mut pool, &progress_counters);
        // Stop the workers in every case before touching the mappings again.
        let drained = pool.finish();
        if let Some(p) = progress {
            p.finish();
        }
        let totals = result?;
        drained.map_err(|e| self.bad(e.to_string()))?;

        let expect = st.got.totals(totals.rounds);
        if expect != totals {
            return Err(self.bad(format!(
                "totals differ: source sent {totals:?}, received {expect:?}"
            )));
        }
        // The destination has every page: downtime ends here; the commit
        // (digests, sync, rename) follows and is confirmed by Ack.
        protocol::write_control(&mut self.sock, &Control::Applied)
            .map_err(|e| self.bad(format!("sending Applied: {e}")))?;
        let transfer = t0.elapsed();
        let t_commit = Instant::now();
        let regions = Arc::try_unwrap(st.regions)
            .map_err(|_| self.bad("internal: region files still shared"))?;
        let n_regions = regions.files.len();
        let total: u64 = regions.files.iter().map(|f| f.len()).sum();
        st.staging
            .commit(&regions.files, hello.pid, &hello.comm, ps)?;
        let commit = t_commit.elapsed();
        let busy_ns: u64 = pool
            .busy_ns()
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        protocol::write_control(
            &mut self.sock,
            &Control::Ack(AckInfo {
                normal_pages: st.got.normal_pages,
                zero_pages: st.got.zero_pages,
                decompress_busy_ns: busy_ns,
                commit_ns: commit.as_nanos() as u64,
            }),
        )
        .map_err(|e| self.bad(format!("sending acknowledgement: {e}")))?;
        Ok(RecvReport::from(Summary {
            out: &self.cfg.out,
            source_pid: hello.pid,
            source_comm: &hello.comm,
            received: &st.got,
            rounds: totals.rounds,
            regions: n_regions,
            total,
            codec: st.codec,
            busy_ns: pool.busy_ns(),
            elapsed: t0.elapsed(),
            transfer,
            commit,
            cpu: stats::cpu_time() - cpu0,
        }))
    }

    /// Check a run list against the region table and this round's map.
    fn check_runs(
        &self,
        regions: &Regions,
        map: &mut RoundMap,
        round: u32,
        region: u32,
        runs: &[Run],
    ) -> Result<(), RecvError> {
        let rf = regions.files.get(region as usize).ok_or_else(|| {
            self.bad(format!(
                "frame names region {region}, table has {}",
                regions.files.len()
            ))
        })?;
        for run in runs {
            let end = run.first.checked_add(run.count as u64);
            if end.is_none_or(|e| e > rf.pages) {
                return Err(self.bad(format!(
                    "pages {}+{} lie outside region {region} ({} pages)",
                    run.first, run.count, rf.pages
                )));
            }
            if !map.mark(region, run.first, run.count) {
                return Err(self.bad(format!(
                    "page {} of region {region} sent twice in round {round}",
                    run.first
                )));
            }
        }
        Ok(())
    }

    /// Read frames until End; returns the source's totals.
    fn stream_loop(
        &self,
        r: &mut impl io::Read,
        st: &mut Stream,
        pool: &mut WorkerPool,
        progress: &stats::Counters,
    ) -> Result<Totals, RecvError> {
        let ps = st.regions.page_size;
        let mut round = 0u32;
        // Whether the current round has had page frames yet: a new region
        // table may only come before them.
        let mut round_started = false;
        let mut map = RoundMap::default();
        let mut payload = Vec::new();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(RecvError::Cancelled);
            }
            pool.poll().map_err(|e| self.bad(e.to_string()))?;
            let mut buf = pool
                .spare_buffer()
                .unwrap_or_else(|| std::mem::take(&mut payload));
            let kind = protocol::read_frame(r, &mut buf).map_err(|e| self.read_err(e))?;
            let frame_len = (protocol::HEADER_LEN + buf.len()) as u64;
            st.got.bytes += frame_len;
            stats::Counters::add(&progress.wire_bytes, frame_len);
            if kind == Kind::Pages {
                let h = protocol::decode_pages_header(&buf, ps as u32)
                    .map_err(|e| self.bad(e.to_string()))?;
                if h.round != round {
                    return Err(
                        self.bad(format!("Pages frame of round {} in round {round}", h.round))
                    );
                }
                self.check_runs(&st.regions, &mut map, round, h.region, &h.runs)?;
                round_started = true;
                if h.codec != WireCodec::Raw {
                    st.codec = Some(h.codec);
                }
                let pages = (h.raw_len as u64) / ps;
                st.got.normal_pages += pages;
                st.got.page_frames += 1;
                st.regions.files[h.region as usize]
                    .populated
                    .fetch_add(pages, Ordering::Relaxed);
                stats::Counters::add(&progress.read_bytes, h.raw_len as u64);
                pool.submit(ApplyJob {
                    header: h,
                    payload: buf,
                    regions: st.regions.clone(),
                })
                .map_err(|e| self.bad(e.to_string()))?;
                continue;
            }
            let control = Control::decode(kind, &buf).map_err(|e| self.bad(e.to_string()))?;
            payload = buf;
            match control {
                Control::Zero {
                    round: rd,
                    region,
                    runs,
                } => {
                    if rd != round {
                        return Err(self.bad(format!("Zero frame of round {rd} in round {round}")));
                    }
                    self.check_runs(&st.regions, &mut map, round, region, &runs)?;
                    round_started = true;
                    let n: u64 = runs.iter().map(|r| r.count as u64).sum();
                    st.got.zero_pages += n;
                    st.got.zero_frames += 1;
                    let rf = &st.regions.files[region as usize];
                    rf.populated.fetch_add(n, Ordering::Relaxed);
                    stats::Counters::add(&progress.read_bytes, n * ps);
                    // Round 0 writes into fresh sparse files, still zero there.
                    if round > 0 {
                        zero_pages(rf, &runs, ps);
                    }
                }
                Control::Regions(table) => {
                    if round_started {
                        return Err(self.bad("region table changed in the middle of a round"));
                    }
                    self.check_table(&table, ps)?;
                    pool.barrier().map_err(|e| self.bad(e.to_string()))?;
                    let old = std::mem::replace(&mut st.regions, Arc::new(Regions::empty(ps)));
                    let old = Arc::try_unwrap(old)
                        .map_err(|_| self.bad("internal: region files still shared"))?;
                    let files = st.staging.reconcile(old.files, &table, ps)?;
                    st.regions = Arc::new(Regions {
                        files,
                        page_size: ps,
                    });
                }
                Control::RoundEnd(rd) => {
                    if rd != round {
                        return Err(self.bad(format!("RoundEnd {rd} in round {round}")));
                    }
                    pool.barrier().map_err(|e| self.bad(e.to_string()))?;
                    map.clear();
                    round += 1;
                    round_started = false;
                }
                Control::End(totals) => {
                    pool.barrier().map_err(|e| self.bad(e.to_string()))?;
                    return Ok(totals);
                }
                Control::Error { message, .. } => return Err(RecvError::Aborted(message)),
                other => return Err(self.bad(format!("unexpected {:?} frame", other.kind()))),
            }
        }
    }
}

/// What the dispatcher holds while frames stream in.
struct Stream {
    regions: Arc<Regions>,
    staging: Staging,
    got: Received,
    codec: Option<WireCodec>,
}

fn zero_pages(rf: &staging::RegionFile, runs: &[Run], ps: u64) {
    for run in runs {
        let at = (run.first * ps) as usize;
        let len = run.count as usize * ps as usize;
        // SAFETY: the run was checked against the region's page count, and
        // no worker writes these pages now (RoundMap).
        unsafe { std::ptr::write_bytes(rf.ptr().add(at), 0, len) };
    }
}
