//! `procmig send`'s configuration: every choice, validated by the CLI,
//! with the defaults a user gets when they give none.

use std::time::Duration;

use super::converge::ThrottleParams;
use crate::codec::Compression;
use crate::dirty;
use crate::process::RegionFilter;

/// What to do with the source process after a successful migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnComplete {
    /// Leave it stopped (SIGSTOP), as a migrated VM is left paused.
    Stop,
    /// Kill it.
    Kill,
    /// Let it run again.
    Resume,
}

crate::value_enum_text!(OnComplete, "--on-complete");

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Pre-copy while the process runs, then a short downtime.
    Live,
    /// Stop the process for the whole copy.
    StopAndCopy,
}

crate::value_enum_text!(Mode, "--mode");

/// `--postcopy-after`: when to switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyAfter {
    /// Before any page is sent: every private anonymous page comes by
    /// post-copy (CRIU's lazy pages). A live migration only.
    Start,
    /// After the bulk copy and this many pre-copy rounds.
    Rounds(u32),
    /// When pre-copy stops converging (the dirty rate outruns the link for
    /// two rounds, or the planner gives up).
    Auto,
    /// Only when told (QMP `migrate-start-postcopy`); a migration that
    /// converges first ends with an ordinary downtime, as in QEMU.
    Command,
}

impl std::str::FromStr for PostcopyAfter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(PostcopyAfter::Auto),
            "command" => return Ok(PostcopyAfter::Command),
            "start" => return Ok(PostcopyAfter::Start),
            _ => {}
        }
        s.parse().map(PostcopyAfter::Rounds).map_err(|_| {
            format!("--postcopy-after takes a round count, start, auto or command, not {s:?}")
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
    /// Wire bytes per second, after compression (the initial value; the
    /// migration's handle may change it while it runs).
    pub max_bandwidth: Option<u64>,
    pub on_complete: OnComplete,
    pub regions: Vec<RegionFilter>,
    /// Pages per compression batch.
    pub batch_pages: u32,
    /// Show progress on stderr, and how.
    pub progress: Option<crate::progress::Display>,
    pub mode: Mode,
    pub dirty_tracking: dirty::Tracking,
    /// downtime-limit (initial value, like max_bandwidth).
    pub downtime_limit: Duration,
    /// Rounds after the bulk copy before giving up (or forcing downtime).
    pub max_iterations: u32,
    /// Give up as soon as the process has outrun the link for a few syncs
    /// in a row (on unless the user set max_iterations).
    pub stop_early: bool,
    pub auto_converge: bool,
    pub throttle: ThrottleParams,
    /// Go to downtime after max_iterations even if the estimate is over
    /// the limit.
    pub force_downtime: bool,
    /// Longest wait for the receiver's answers, and how long a dead link
    /// may go unnoticed (TCP keepalive, TCP_USER_TIMEOUT).
    pub timeout: Duration,
    /// Switch to post-copy (needs a receiver with `--restore`).
    pub postcopy_after: Option<PostcopyAfter>,
    /// `--tls-creds`: the connection is TLS 1.3 with these credentials.
    pub tls: Option<crate::protocol::tls::TlsClient>,
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
            progress: None,
            mode: Mode::Live,
            dirty_tracking: dirty::Tracking::Auto,
            downtime_limit: Duration::from_millis(300),
            max_iterations: DEFAULT_MAX_ITERATIONS,
            stop_early: true,
            auto_converge: false,
            throttle: ThrottleParams::default(),
            force_downtime: false,
            timeout: Duration::from_secs(30),
            postcopy_after: None,
            tls: None,
        }
    }
}

/// Rounds after the bulk copy when the user sets no cap.
pub const DEFAULT_MAX_ITERATIONS: u32 = 30;

/// Pages per batch: 64 pages (256 KiB) gives zstd-1 nearly its whole-file
/// ratio while keeping per-batch latency low (see docs/benchmarks.md).
pub const DEFAULT_BATCH_PAGES: u32 = 64;

/// Number of CPUs, the default for compress-threads.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_print_and_parse_with_one_list_of_names() {
        assert_eq!(Mode::StopAndCopy.to_string(), "stop-and-copy");
        assert_eq!("resume".parse::<OnComplete>(), Ok(OnComplete::Resume));
        let e = "later".parse::<OnComplete>().unwrap_err();
        assert_eq!(e, "unknown --on-complete \"later\" (stop, kill, resume)");
        assert_eq!("lz4".parse::<Compression>(), Ok(Compression::Lz4));
        assert_eq!(Compression::None.to_string(), "none");
    }
}
