//! The source side: the migration state machine.
//!
//! Phases, as in KVM/QEMU: **setup** (attach, connect, handshake),
//! **bulk** (send every populated page), **downtime** (process stopped, last
//! pages sent, End frame, wait for the receiver's Ack), **complete** (leave
//! the process stopped, killed or running). This version copies in
//! stop-and-copy mode: the process is stopped from the start of bulk, so
//! bulk and downtime coincide and one round suffices.
//!
//! Threads: this one reads the target (it owns the ptrace attachment, which
//! is tied to the thread), `compress-threads` workers compress, and one
//! writer owns the socket. Any error, cancel (SIGINT/SIGTERM) or panic
//! unwinds through [`Attachment`]'s drop, which resumes the process as it
//! was found.

mod compress;
mod writer;

use std::io;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};

use crate::cancel::ShutdownOnCancel;
use crate::codec::Method;
use crate::progress::Progress;
use crate::protocol::{self, Control, Hello, ReadError, RegionEntry, Run};
use crate::stats::{self, CompressionReport, Counters, SendReport};
use crate::target::{
    self, Attachment, Leave, MemReader, Pagemap, Region, RegionFilter, RegionKind, TargetError,
    PM_PRESENT, PM_SWAPPED,
};
use compress::Job;
use writer::Out;

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
    pub method: Method,
    pub level: i32,
    pub compress_threads: usize,
    /// Wire bytes per second, after compression.
    pub max_bandwidth: Option<u64>,
    pub on_complete: OnComplete,
    pub regions: Vec<RegionFilter>,
    /// Pages per compression batch.
    pub batch_pages: u32,
    pub progress: bool,
}

impl SendConfig {
    pub fn new(pid: i32, to: String) -> SendConfig {
        SendConfig {
            pid,
            to,
            method: Method::Zstd,
            level: 1,
            compress_threads: default_threads(),
            max_bandwidth: None,
            on_complete: OnComplete::Stop,
            regions: Vec::new(),
            batch_pages: DEFAULT_BATCH_PAGES,
            progress: false,
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
    Target(#[from] TargetError),
    /// The receiver address does not resolve.
    #[error("cannot resolve receiver address {to:?}: {reason}")]
    Resolve { to: String, reason: String },
    /// Connecting failed.
    #[error("cannot connect to receiver {to}: {source}")]
    Connect { to: String, source: io::Error },
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
}

fn connect(to: &str) -> Result<TcpStream, SendError> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| SendError::Resolve {
            to: to.into(),
            reason: e.to_string(),
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(SendError::Connect {
        to: to.into(),
        source: last,
    })
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn handshake(sock: &mut TcpStream, cfg: &SendConfig, page_size: u64) -> Result<(), SendError> {
    let fail = |reason: String| SendError::Handshake {
        to: cfg.to.clone(),
        reason,
    };
    let hello = Control::Hello(Hello {
        version: protocol::VERSION,
        min_version: protocol::MIN_VERSION,
        page_size: page_size as u32,
        capabilities: protocol::CAPABILITIES,
        codec: cfg.method.wire() as u8,
        level: cfg.level,
        compress_threads: cfg.compress_threads as u16,
        pid: cfg.pid as u32,
        comm: comm(cfg.pid),
    });
    protocol::write_control(sock, &hello).map_err(|e| fail(e.to_string()))?;
    sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
    match protocol::read_control(sock) {
        Ok(Control::Welcome(w)) => {
            if !(protocol::MIN_VERSION..=protocol::VERSION).contains(&w.version) {
                return Err(fail(format!(
                    "receiver speaks protocol version {}",
                    w.version
                )));
            }
            if w.capabilities & cfg.method.capability() != cfg.method.capability() {
                return Err(fail(format!("receiver cannot decode {}", cfg.method)));
            }
            Ok(())
        }
        Ok(Control::Error { message, .. }) => Err(SendError::Remote(message)),
        Ok(other) => Err(fail(format!("unexpected {:?} frame", other.kind()))),
        Err(ReadError::Decode(e)) => Err(fail(format!("not a procmig receiver ({e})"))),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Groups populated pages into batches of at most `max` pages.
struct Batcher {
    max: u32,
    runs: Vec<Run>,
    pages: u32,
}

impl Batcher {
    fn push(&mut self, page: u64) -> bool {
        match self.runs.last_mut() {
            Some(r) if r.first + r.count as u64 == page => r.count += 1,
            _ => self.runs.push(Run {
                first: page,
                count: 1,
            }),
        }
        self.pages += 1;
        self.pages >= self.max
    }

    fn take(&mut self) -> Option<(Vec<Run>, u32)> {
        if self.pages == 0 {
            return None;
        }
        let pages = std::mem::replace(&mut self.pages, 0);
        Some((std::mem::take(&mut self.runs), pages))
    }
}

/// Pages scanned per pagemap read (2 MiB of address space).
const SCAN_PAGES: usize = 512;

/// The reading side of one migration: turns regions into jobs.
struct Reader<'a> {
    cfg: &'a SendConfig,
    cancel: &'a AtomicBool,
    mem: MemReader,
    pagemap: Pagemap,
    page_size: u64,
    jobs: Sender<Job>,
    free: crossbeam_channel::Receiver<Vec<u8>>,
    buffers: usize,
    max_buffers: usize,
    counters: Arc<Counters>,
    jobs_sent: u64,
}

impl Reader<'_> {
    fn send_region(&mut self, round: u32, index: u32, region: &Region) -> Result<(), SendError> {
        let ps = self.page_size;
        let pages = region.len() / ps;
        let mut batch = Batcher {
            max: self.cfg.batch_pages,
            runs: Vec::new(),
            pages: 0,
        };
        let mut entries = vec![0u64; SCAN_PAGES];
        let mut page = 0u64;
        while page < pages {
            let n = (pages - page).min(SCAN_PAGES as u64) as usize;
            let skip_absent = region.kind == RegionKind::PrivateAnon;
            if skip_absent {
                self.pagemap
                    .read(region.start + page * ps, &mut entries[..n])?;
            }
            for (i, e) in entries[..n].iter().enumerate() {
                if skip_absent && e & (PM_PRESENT | PM_SWAPPED) == 0 {
                    Counters::add(&self.counters.skipped_pages, 1);
                    continue;
                }
                if batch.push(page + i as u64) {
                    self.submit(round, index, region, &mut batch)?;
                }
            }
            page += n as u64;
        }
        self.submit(round, index, region, &mut batch)
    }

    fn submit(
        &mut self,
        round: u32,
        index: u32,
        region: &Region,
        batch: &mut Batcher,
    ) -> Result<(), SendError> {
        let Some((runs, pages)) = batch.take() else {
            return Ok(());
        };
        if self.cancel.load(Ordering::Relaxed) {
            return Err(SendError::Cancelled);
        }
        let mut data = match self.free.try_recv() {
            Ok(b) => b,
            Err(_) if self.buffers < self.max_buffers => {
                self.buffers += 1;
                Vec::new()
            }
            Err(_) => {
                Counters::add(&self.counters.busy, 1);
                self.free
                    .recv()
                    .map_err(|_| SendError::Connection("pipeline stopped".into()))?
            }
        };
        let len = pages as usize * self.page_size as usize;
        data.resize(len, 0);
        self.mem
            .read_runs(region.start, self.page_size, &runs, &mut data)?;
        Counters::add(&self.counters.read_bytes, len as u64);
        Counters::add(&self.counters.batches, 1);
        let job = Job {
            round,
            region: index,
            runs,
            data,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                Counters::add(&self.counters.busy, 1);
                self.jobs
                    .send(job)
                    .map_err(|_| SendError::Connection("pipeline stopped".into()))?;
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(SendError::Connection("pipeline stopped".into()))
            }
        }
        self.jobs_sent += 1;
        Ok(())
    }
}

/// Run one migration of `cfg.pid` to `cfg.to`. Setting `cancel` (e.g. from
/// a signal handler) stops it; the process is then resumed as it was.
pub fn send(cfg: &SendConfig, cancel: &Arc<AtomicBool>) -> Result<SendReport, SendError> {
    let r = send_inner(cfg, cancel);
    if r.is_err() && cancel.load(Ordering::Relaxed) {
        return Err(SendError::Cancelled);
    }
    r
}

fn send_inner(cfg: &SendConfig, cancel: &Arc<AtomicBool>) -> Result<SendReport, SendError> {
    let t_start = Instant::now();
    let cpu_start = stats::cpu_time();
    let pid = cfg.pid;
    let page_size = target::page_size();

    // setup
    let mut attachment = Attachment::seize(pid)?;
    let mut sock = connect(&cfg.to)?;
    let _watch = ShutdownOnCancel::new(cancel.clone(), &sock);
    handshake(&mut sock, cfg, page_size)?;
    let setup = t_start.elapsed();

    // bulk, stopped (stop-and-copy)
    let t_stop = Instant::now();
    attachment.stop()?;
    let threads_stopped = attachment.thread_count();
    let all = target::read_regions(pid)?;
    let regions = target::select_regions(pid, all, &cfg.regions, page_size)?;
    let total: u64 = regions.iter().map(|r| r.len()).sum();
    let mem = MemReader::open(pid)?;
    let pagemap = Pagemap::open(pid, page_size)?;

    let counters = Arc::new(Counters::new(cfg.compress_threads));
    let (job_tx, job_rx) = bounded::<Job>(cfg.compress_threads * 2);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(cfg.compress_threads * 4 + 2);
    let (out_tx, out_rx) = bounded::<Out>(cfg.compress_threads * 2);
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(cfg.compress_threads * 4 + 2);
    let write_sock = sock
        .try_clone()
        .map_err(|e| SendError::Connection(e.to_string()))?;
    let writer = writer::spawn_writer(
        write_sock,
        cfg.max_bandwidth,
        out_rx,
        spare_tx,
        counters.clone(),
    );
    let workers = compress::spawn_workers(
        cfg.compress_threads,
        cfg.method,
        cfg.level,
        page_size as usize,
        job_rx,
        free_tx,
        out_tx.clone(),
        spare_rx,
        counters.clone(),
    )?;
    let progress = cfg
        .progress
        .then(|| Progress::start("send", total, counters.clone()));

    let table: Vec<RegionEntry> = regions
        .iter()
        .map(|r| RegionEntry {
            start: r.start,
            end: r.end,
            prot: r.prot,
            name: r.name.clone(),
        })
        .collect();
    let _ = out_tx.send(Out::Control {
        after_jobs: 0,
        frame: Control::Regions(table),
    });
    let mut reader = Reader {
        cfg,
        cancel,
        mem,
        pagemap,
        page_size,
        jobs: job_tx,
        free: free_rx,
        buffers: 0,
        max_buffers: cfg.compress_threads * 4 + 2,
        counters: counters.clone(),
        jobs_sent: 0,
    };
    let round = 0;
    let mut result = (|| {
        for (i, r) in regions.iter().enumerate() {
            reader.send_region(round, i as u32, r)?;
        }
        Ok(())
    })();
    if result.is_ok() {
        let after = reader.jobs_sent;
        let _ = out_tx.send(Out::Control {
            after_jobs: after,
            frame: Control::RoundEnd(round),
        });
        let _ = out_tx.send(Out::End {
            after_jobs: after,
            rounds: round + 1,
        });
    } else {
        // Unblock the writer if it is stuck on a full socket.
        let _ = sock.shutdown(Shutdown::Both);
    }
    drop(reader);
    drop(out_tx);
    for w in workers {
        let _ = w.join();
    }
    let written = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
    if let Some(p) = progress {
        p.finish();
    }
    let t_transfer = t_stop.elapsed();
    if result.is_ok() {
        if let Err(e) = written {
            result = Err(remote_reason(&mut sock).unwrap_or(SendError::Connection(e.to_string())));
        }
    }
    result?;

    // Wait for the receiver to commit the image.
    sock.set_read_timeout(Some(Duration::from_secs(600))).ok();
    let ack = match protocol::read_control(&mut sock) {
        Ok(Control::Ack(a)) => a,
        Ok(Control::Error { message, .. }) => return Err(SendError::Remote(message)),
        Ok(other) => return Err(SendError::BadAck(format!("{:?}", other.kind()))),
        Err(e) => {
            return Err(SendError::Connection(format!(
                "waiting for acknowledgement: {e}"
            )))
        }
    };
    let downtime = t_stop.elapsed();

    // complete
    let leave = match cfg.on_complete {
        OnComplete::Stop => Leave::Stopped,
        OnComplete::Kill => Leave::Killed,
        OnComplete::Resume => Leave::AsFound,
    };
    attachment.detach(leave)?;
    let total_time = t_start.elapsed();

    let c = &counters;
    let g = Counters::get;
    let wire = g(&c.wire_bytes);
    let compressed_pages = g(&c.compressed_pages);
    let compressed_size = g(&c.compressed_bytes);
    let batches = g(&c.batches);
    let mut report = SendReport {
        status: "completed".into(),
        pid,
        mode: "stop-and-copy".into(),
        total_time_ms: 0.0,
        setup_time_ms: 0.0,
        downtime_ms: 0.0,
        transfer_time_ms: 0.0,
        transferred: wire,
        throughput_mbps: stats::mbps(wire, t_transfer),
        total,
        page_size,
        regions: regions.len(),
        threads_stopped,
        normal: g(&c.normal_pages),
        normal_bytes: g(&c.normal_pages) * page_size,
        duplicate: g(&c.zero_pages),
        skipped: g(&c.skipped_pages),
        dirty_sync_count: 1,
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
                (compressed_pages * page_size) as f64 / compressed_size as f64
            } else {
                0.0
            },
            raw_batches: g(&c.raw_batches),
            thread_busy_percent: stats::busy_percent(&c.worker_busy_ns, t_transfer),
        },
        cpu_seconds: (stats::cpu_time() - cpu_start).as_secs_f64(),
        dest_decompress_busy_ms: ack.decompress_busy_ns as f64 / 1e6,
        dest_commit_ms: ack.commit_ns as f64 / 1e6,
        on_complete: cfg.on_complete.to_string(),
    };
    report.set_times(total_time, setup, downtime, t_transfer);
    Ok(report)
}

/// After a write failed: did the receiver explain why in an Error frame?
fn remote_reason(sock: &mut TcpStream) -> Option<SendError> {
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut payload = Vec::new();
    // Skip nothing: the receiver only ever sends Welcome, Ack or Error, and
    // Welcome was read during the handshake.
    match protocol::read_frame(sock, &mut payload) {
        Ok(kind) => match Control::decode(kind, &payload) {
            Ok(Control::Error { message, .. }) => Some(SendError::Remote(message)),
            _ => None,
        },
        Err(_) => None,
    }
}
