//! The destination side: accept one migration, decompress it with a pool of
//! workers into memory-mapped region files, check the totals, and commit the
//! image atomically. On any failure the staging directory is removed and
//! the source is told why in an Error frame.
//!
//! This module is the public face ([`Listener`], [`RecvConfig`], the
//! errors) and the connection set-up; the protocol itself is the state
//! machine in `session`, the decompression threads are `workers`, the image
//! on disk is `staging`, and `report` builds the final report.

mod gate;
mod hashes;
pub mod postcopy;
mod report;
mod session;
mod staging;
mod workers;
mod writeback;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::control::dest::{RecvHandle, RecvStatus};
use crate::protocol::transport::{self, CloseOnCancel};
use crate::protocol::{DecodeError, Kind, ReadError, Totals, VersionMismatch};
use crate::stats::RecvReport;
use session::Session;
use staging::Staging;
pub use staging::StagingError;
pub use workers::ApplyError;

/// Everything `procmig recv` needs, validated.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    /// `[ADDR:]PORT`; the address defaults to 127.0.0.1.
    pub listen: String,
    pub out: PathBuf,
    pub decompress_threads: usize,
    /// Replace an existing output.
    pub force: bool,
    /// Show progress on stderr, and how.
    pub progress: Option<crate::progress::Display>,
    /// Longest wait for a whole frame (and the connection's liveness,
    /// see `transport::Connection::set_liveness`).
    pub timeout: Duration,
    /// Most bytes of pages the image may hold (`--max-image-size`).
    pub max_image_size: Option<u64>,
    /// `--restore`: run the process here once its memory is in.
    pub restore: Option<crate::restore::RestoreOptions>,
    /// `--tls-creds`: only TLS 1.3 clients with these credentials.
    pub tls: Option<crate::protocol::tls::TlsServer>,
    /// `--recover-timeout`: how long a broken post-copy stays paused,
    /// waiting for the source to resume it (0: the restored process is
    /// killed at once).
    pub recover_timeout: Duration,
}

/// How long a broken post-copy waits for the source by default.
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// QEMU's default decompress-threads.
pub const DEFAULT_DECOMPRESS_THREADS: usize = 2;

/// Silence on the connection longer than this ends the migration.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("bad stream from {peer}: {source}")]
    Stream { peer: String, source: StreamError },
    /// The source reported an error or cancelled.
    #[error("source aborted the migration: {0}")]
    Aborted(String),
    /// SIGINT or SIGTERM.
    #[error("cancelled by signal")]
    Cancelled,
    /// The one client [`serve`] was given is not a procmig sender.
    #[error("{0}")]
    Rejected(String),
    /// `--restore`: the process could not be rebuilt here; nothing ran and
    /// nothing was committed, so the source keeps (and resumes) it.
    #[error("restore failed: {0}")]
    Restore(String),
}

/// What was wrong with the stream (the reason in [`RecvError::Stream`]).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The first frame is not a frame at all.
    #[error("not a procmig stream ({0})")]
    NotProcmig(DecodeError),
    /// A frame that does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The connection closed, broke or was cut mid-frame.
    #[error(transparent)]
    Read(ReadError),
    /// A whole frame did not arrive within `--timeout`.
    #[error("no whole frame within the --timeout (a dead link, or a peer too slow)")]
    Idle,
    /// A frame of the wrong kind where only one kind may come.
    #[error("expected {expected:?}, got {got:?}")]
    Expected { expected: Kind, got: Kind },
    /// A frame kind the current state does not accept.
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
    /// The protocol versions do not overlap.
    #[error(
        "source speaks protocol versions {}..={}, this receiver {}..={}",
        .0.peer_min, .0.peer_max, crate::protocol::MIN_VERSION, crate::protocol::VERSION
    )]
    Version(VersionMismatch),
    /// The post-copy preempt channel did not come (version 4).
    #[error("preempt channel: {0}")]
    Channel(String),
    #[error("unsupported page size {0}")]
    PageSize(u32),
    #[error("region {index} has bad bounds {start:#x}-{end:#x}")]
    RegionBounds { index: usize, start: u64, end: u64 },
    #[error("regions total {total} bytes, more than {max}")]
    TooLarge { total: u64, max: u64 },
    #[error("region table changed in the middle of a round")]
    TableMidRound,
    /// A Pages or Zero frame of another round than the current one.
    #[error("{kind:?} frame of round {got} in round {round}")]
    FrameRound { kind: Kind, got: u32, round: u32 },
    #[error("RoundEnd {got} in round {round}")]
    RoundEnd { got: u32, round: u32 },
    #[error("frame names region {region}, table has {regions}")]
    NoSuchRegion { region: u32, regions: usize },
    #[error("pages {first}+{count} lie outside region {region} ({pages} pages)")]
    RegionOutOfRange {
        region: u32,
        first: u64,
        count: u32,
        pages: u64,
    },
    #[error("page {page} of region {region} sent twice in round {round}")]
    PageTwice { page: u64, region: u32, round: u32 },
    #[error("totals differ: source sent {sent:?}, received {received:?}")]
    TotalsDiffer { sent: Totals, received: Totals },
    /// A worker could not apply a Pages frame.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    SendWelcome(io::Error),
    #[error("sending Applied: {0}")]
    SendApplied(io::Error),
    #[error("sending acknowledgement: {0}")]
    SendAck(io::Error),
    /// The State frame is missing, repeated or malformed.
    #[error("{0}")]
    State(String),
    /// A bug: the workers still held the region files after a barrier.
    #[error("internal: region files still shared")]
    RegionsShared,
}

impl From<ReadError> for StreamError {
    fn from(e: ReadError) -> StreamError {
        match e {
            ReadError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                StreamError::Idle
            }
            ReadError::Decode(e) => StreamError::Decode(e),
            e => StreamError::Read(e),
        }
    }
}

/// A bound receiver, ready to accept one migration.
pub struct Listener {
    cfg: RecvConfig,
    listener: transport::Listener,
    staging: Staging,
}

pub(crate) fn parse_listen(s: &str) -> Result<String, RecvError> {
    // A bare port listens on loopback only: anyone who can reach the port
    // can write an image, so other interfaces must be asked for by address.
    if s.parse::<u16>().is_ok() {
        return Ok(format!("127.0.0.1:{s}"));
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
        // Say it before anything is received, not after.
        if cfg.restore.is_some() {
            crate::restore::privileges().map_err(RecvError::Restore)?;
        }
        let staging = Staging::create(&cfg.out, cfg.force)?;
        let listener = transport::Listener::bind(&addr).map_err(|source| RecvError::Bind {
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
        self.run_with(cancel, None)
    }

    /// [`Listener::run`], keeping `handle` (a control socket's view) up to
    /// date.
    pub fn run_with(
        self,
        cancel: &Arc<AtomicBool>,
        handle: Option<Arc<RecvHandle>>,
    ) -> Result<RecvReport, RecvError> {
        let mut r = self.run_inner(cancel, handle.clone());
        if r.is_err() && cancel.load(Ordering::Relaxed) {
            r = Err(RecvError::Cancelled);
        }
        if let Some(h) = handle {
            h.set_status(match &r {
                Ok(_) => RecvStatus::Completed,
                Err(RecvError::Cancelled) => RecvStatus::Cancelled,
                Err(_) => RecvStatus::Failed,
            });
        }
        r
    }

    fn run_inner(
        self,
        cancel: &Arc<AtomicBool>,
        handle: Option<Arc<RecvHandle>>,
    ) -> Result<RecvReport, RecvError> {
        let Listener {
            cfg,
            listener,
            staging,
        } = self;
        let a = gate::admit(&listener, &cfg, cancel)?;
        let closer = a.closer.clone();
        let _watch = CloseOnCancel::new(cancel.clone(), a.closer);
        // Kept for the preempt channel of a post-copy migration.
        let listener = cfg.restore.is_some().then_some(listener);
        if let Some(h) = &handle {
            h.set_status(RecvStatus::Active);
        }
        Session::new(&cfg, a.peer, a.reader, a.writer, staging, cancel)
            .with_listener(listener, closer, cancel.clone())
            .with_handle(handle)
            .run(a.hello)
    }
}

/// Receive one migration from a connection already open (no listener):
/// what the fuzzer drives, from a Unix socket pair. The same admission and
/// session as `recv`; a rejected client is `RecvError::Rejected`.
pub fn serve(
    cfg: &RecvConfig,
    conn: transport::Connection,
    cancel: &Arc<AtomicBool>,
) -> Result<RecvReport, RecvError> {
    let staging = Staging::create(&cfg.out, cfg.force)?;
    let a = gate::hear_one(conn, cfg.timeout, cfg.tls.as_ref()).map_err(RecvError::Rejected)?;
    let _watch = CloseOnCancel::new(cancel.clone(), a.closer);
    Session::new(cfg, a.peer, a.reader, a.writer, staging, cancel).run(a.hello)
}
