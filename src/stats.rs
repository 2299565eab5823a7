//! Counters shared by the pipeline threads, and the reports both sides
//! print at the end (QEMU `info migrate` figures, as text or JSON).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Live counters, updated by the reader, the workers and the writer.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of populated pages read from the target.
    pub read_bytes: AtomicU64,
    /// Bytes written to the socket, frame headers included.
    pub wire_bytes: AtomicU64,
    /// Non-zero pages sent.
    pub normal_pages: AtomicU64,
    /// Zero pages sent as runs without payload.
    pub zero_pages: AtomicU64,
    /// Pages never populated, not sent.
    pub skipped_pages: AtomicU64,
    /// Pages that went through a compressor.
    pub compressed_pages: AtomicU64,
    /// Payload bytes of Pages frames that went through a compressor.
    pub compressed_bytes: AtomicU64,
    /// Batches sent raw because they did not shrink.
    pub raw_batches: AtomicU64,
    /// Times the reader found every worker busy and had to wait (QEMU's
    /// compression "busy").
    pub busy: AtomicU64,
    /// Batches handed to workers.
    pub batches: AtomicU64,
    /// Per-worker busy time, in nanoseconds.
    pub worker_busy_ns: Vec<AtomicU64>,
}

impl Counters {
    pub fn new(workers: usize) -> Counters {
        Counters {
            worker_busy_ns: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// CPU time (user + system) this process used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Milliseconds, as reports show them.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Compression figures (QEMU's CompressionStats, plus per-thread busy).
#[derive(Debug, Clone, Serialize)]
pub struct CompressionReport {
    pub method: String,
    pub level: i32,
    pub threads: usize,
    /// Pages that went through a compressor.
    pub pages: u64,
    /// Times no worker was free.
    pub busy: u64,
    /// busy / batches.
    pub busy_rate: f64,
    /// Bytes of compressed page data put on the wire.
    pub compressed_size: u64,
    /// Raw bytes / compressed bytes of the pages that went through a compressor.
    pub compression_rate: f64,
    /// Batches sent raw because they did not shrink.
    pub raw_batches: u64,
    /// Busy time of each worker, as a percentage of the transfer time.
    pub thread_busy_percent: Vec<f64>,
    /// With `--compress auto`: batches sent with each method.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub auto_choices: std::collections::BTreeMap<String, u64>,
}

/// One pre-copy round (QEMU: a dirty-bitmap sync and the pass after it).
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// Pages the tracker reported written (0 for the bulk round).
    pub dirty_pages: u64,
    /// Pages sent (normal + zero).
    pub pages_sent: u64,
    /// Bytes of pages read for this round.
    pub raw_bytes: u64,
    /// Bytes put on the wire.
    pub bytes: u64,
    pub duration_ms: f64,
    /// Pages dirtied per second before this round.
    pub dirty_rate: f64,
    pub throughput_mbps: f64,
    pub expected_downtime_ms: f64,
    pub throttle_percent: u32,
}

/// The downtime, part by part (milliseconds), from the stop to Applied.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimeParts {
    /// Stopping every thread (ptrace interrupt, also threads born since).
    pub stop_ms: f64,
    /// The final dirty sync: maps, tracker, discarded pages.
    pub sync_ms: f64,
    /// Reading, compressing and writing the final round, until its
    /// RoundEnd is on the wire.
    pub transfer_ms: f64,
    /// Capturing the process state for restore (version 3).
    pub capture_ms: f64,
    /// The End frame out, then the receiver applies what it still had
    /// queued (and, with `recv --restore`, rebuilds the process) and
    /// answers Applied.
    pub apply_ms: f64,
}

/// The source's final report.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub status: String,
    pub pid: i32,
    /// Over TLS 1.3: the name in the receiver's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_peer: Option<String>,
    pub mode: String,
    pub dirty_tracking: String,
    /// Regions tracked by comparison because the tracker could not handle them.
    pub fallback_regions: usize,
    pub total_time_ms: f64,
    pub setup_time_ms: f64,
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    /// The estimate that ended iteration.
    pub expected_downtime_ms: f64,
    /// From the start of the page transfer until the End frame was written.
    pub transfer_time_ms: f64,
    /// Bytes put on the wire.
    pub transferred: u64,
    pub throughput_mbps: f64,
    /// Bytes of the migrated regions (virtual size).
    pub total: u64,
    pub page_size: u64,
    pub regions: usize,
    pub threads_stopped: usize,
    pub normal: u64,
    pub normal_bytes: u64,
    /// Zero pages (QEMU: duplicate).
    pub duplicate: u64,
    /// Unpopulated pages, not sent.
    pub skipped: u64,
    pub dirty_sync_count: u32,
    pub cpu_throttle_percentage: u32,
    pub max_bandwidth: Option<u64>,
    pub compression: CompressionReport,
    pub cpu_seconds: f64,
    /// Receiver: summed busy time of its decompression threads.
    pub dest_decompress_busy_ms: f64,
    /// Receiver: time to check, sync and commit the image.
    pub dest_commit_ms: f64,
    pub on_complete: String,
    /// Mappings not migrated, with the reason.
    pub left_out: Vec<crate::process::LeftOut>,
    pub rounds: Vec<RoundReport>,
    /// The process state for restore: sent, or why not.
    pub process_state: String,
    /// Post-copy, when the migration ended with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopySent>,
    /// The pid of the process restored on the destination, running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_pid: Option<u32>,
}

/// Post-copy, as the source saw it.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PostcopySent {
    /// Pages sent after the switch.
    pub pages: u64,
    /// Page requests received (faults on the destination).
    pub requests: u64,
    pub requested_pages: u64,
    /// Bytes put on the wire after the switch.
    pub bytes: u64,
    /// Answers to faults went on a preempt channel of their own.
    pub preempt_channel: bool,
}

/// Post-copy, as the destination saw it.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyReport {
    /// Pages the source sent after the switch (faulted and background).
    pub pages: u64,
    /// Faults that had to ask the source (QEMU: postcopy-requests).
    pub requested: u64,
    /// Faults on pages that were not missing, given the zero page here.
    pub zero_filled: u64,
    /// From a request to its page in place, microseconds.
    pub latency_us: Latency,
    /// 2^N microsecond buckets: `latency_histogram[n]` counts requests
    /// that took [2^n, 2^(n+1)) us (QEMU 10.1: postcopy-latency-dist).
    pub latency_histogram: Vec<u64>,
    /// Sum of the time faulting threads waited on the source (QEMU:
    /// postcopy-blocktime, here per request).
    pub blocked_ms: f64,
    /// From the process starting to the last page in place.
    pub to_last_page_ms: f64,
    /// Times post-copy was paused (the link broke) and resumed by a
    /// source (QEMU: postcopy-paused, then recovered).
    pub pauses: u32,
    /// Time spent paused, waiting for a source to resume.
    pub paused_ms: f64,
    /// Children the process forked while pages were missing, each served
    /// through its own userfaultfd (UFFD_EVENT_FORK).
    pub forked: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub median: u64,
    pub p99: u64,
    pub max: u64,
}

impl PostcopyReport {
    pub fn new(pages: u64, mut us: Vec<u64>, zero_filled: u64, took: Duration) -> PostcopyReport {
        us.sort_unstable();
        let at = |q: f64| {
            us.get(((us.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let mut hist = Vec::new();
        for &v in &us {
            let b = (64 - v.max(1).leading_zeros() - 1) as usize;
            if hist.len() <= b {
                hist.resize(b + 1, 0);
            }
            hist[b] += 1;
        }
        PostcopyReport {
            pages,
            requested: us.len() as u64,
            zero_filled,
            latency_us: Latency {
                median: at(0.5),
                p99: at(0.99),
                max: us.last().copied().unwrap_or(0),
            },
            latency_histogram: hist,
            blocked_ms: us.iter().sum::<u64>() as f64 / 1000.0,
            to_last_page_ms: took.as_secs_f64() * 1000.0,
            pauses: 0,
            paused_ms: 0.0,
            forked: 0,
        }
    }
}

impl fmt::Display for PostcopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "postcopy: {} pages, {} requested (latency median {} us, p99 {} us, max {} us), {} zero-filled here, blocked {:.1} ms, last page after {:.0} ms",
            self.pages,
            self.requested,
            self.latency_us.median,
            self.latency_us.p99,
            self.latency_us.max,
            self.zero_filled,
            self.blocked_ms,
            self.to_last_page_ms
        )?;
        if self.forked > 0 {
            writeln!(
                f,
                "postcopy: {} child(ren) forked while pages were missing, served too",
                self.forked
            )?;
        }
        if self.pauses > 0 {
            writeln!(
                f,
                "postcopy: paused {} time(s) for {:.0} ms in all, resumed over a new connection",
                self.pauses, self.paused_ms
            )?;
        }
        Ok(())
    }
}

/// The source's report when a migration fails or is cancelled: what was
/// done before, so an orchestrator still sees the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct SendFailure {
    /// `failed` or `cancelled`.
    pub status: String,
    pub error: String,
    pub pid: i32,
    /// The phase it was in: setup, active (pre-copy) or device (stopped).
    pub failed_in: String,
    /// What became of the process: `resumed` (as it was found) or
    /// `stopped` (handed over without confirmation: decide by hand).
    pub process: String,
    /// Bytes put on the wire.
    pub transferred: u64,
    pub normal: u64,
    pub duplicate: u64,
    pub rounds: Vec<RoundReport>,
}

fn kb(b: u64) -> u64 {
    b / 1024
}

impl fmt::Display for SendReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.compression;
        writeln!(f, "Migration status: {}", self.status)?;
        writeln!(
            f,
            "pid: {} ({} regions, {} threads stopped)",
            self.pid, self.regions, self.threads_stopped
        )?;
        if let Some(p) = &self.tls_peer {
            writeln!(f, "link: TLS 1.3 to {p}")?;
        }
        writeln!(
            f,
            "mode: {} (dirty tracking: {}{})",
            self.mode,
            self.dirty_tracking,
            if self.fallback_regions > 0 {
                format!(", {} regions by compare", self.fallback_regions)
            } else {
                String::new()
            }
        )?;
        writeln!(f, "total time: {:.0} ms", self.total_time_ms)?;
        writeln!(f, "setup: {:.0} ms", self.setup_time_ms)?;
        let p = &self.downtime_parts;
        writeln!(
            f,
            "downtime: {:.0} ms (stop {:.0}, sync {:.0}, transfer {:.0}, apply {:.0})",
            self.downtime_ms, p.stop_ms, p.sync_ms, p.transfer_ms, p.apply_ms
        )?;
        writeln!(f, "expected downtime: {:.0} ms", self.expected_downtime_ms)?;
        writeln!(f, "transfer time: {:.0} ms", self.transfer_time_ms)?;
        writeln!(f, "transferred ram: {} kbytes", kb(self.transferred))?;
        writeln!(f, "throughput: {:.2} mbps", self.throughput_mbps)?;
        writeln!(f, "total ram: {} kbytes", kb(self.total))?;
        writeln!(f, "duplicate: {} pages", self.duplicate)?;
        writeln!(f, "skipped: {} pages", self.skipped)?;
        writeln!(f, "normal: {} pages", self.normal)?;
        writeln!(f, "normal bytes: {} kbytes", kb(self.normal_bytes))?;
        writeln!(f, "dirty sync count: {}", self.dirty_sync_count)?;
        writeln!(
            f,
            "cpu throttle percentage: {}",
            self.cpu_throttle_percentage
        )?;
        writeln!(f, "page size: {} kbytes", kb(self.page_size))?;
        if let Some(bw) = self.max_bandwidth {
            writeln!(f, "max bandwidth: {bw} bytes/s")?;
        }
        writeln!(
            f,
            "compression: {} level {}, {} threads",
            c.method, c.level, c.threads
        )?;
        writeln!(f, "compression pages: {}", c.pages)?;
        writeln!(f, "compressed size: {} kbytes", kb(c.compressed_size))?;
        writeln!(f, "compression rate: {:.2}", c.compression_rate)?;
        writeln!(
            f,
            "compression busy: {} ({:.2}%)",
            c.busy,
            c.busy_rate * 100.0
        )?;
        writeln!(f, "raw batches: {}", c.raw_batches)?;
        if !c.auto_choices.is_empty() {
            let v: Vec<String> = c
                .auto_choices
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "auto choices (batches): {}", v.join(", "))?;
        }
        let busy: Vec<String> = c
            .thread_busy_percent
            .iter()
            .map(|p| format!("{p:.1}%"))
            .collect();
        writeln!(f, "compress threads busy: {}", busy.join(" "))?;
        writeln!(f, "cpu time: {:.2} s", self.cpu_seconds)?;
        writeln!(
            f,
            "dest decompress busy: {:.0} ms",
            self.dest_decompress_busy_ms
        )?;
        writeln!(f, "dest commit: {:.0} ms", self.dest_commit_ms)?;
        writeln!(f, "process state: {}", self.process_state)?;
        if let Some(p) = &self.postcopy {
            writeln!(
                f,
                "postcopy: {} pages ({} kbytes) after the switch, {} page requests served{}",
                p.pages,
                p.bytes / 1024,
                p.requests,
                if p.preempt_channel {
                    " on a preempt channel"
                } else {
                    ""
                }
            )?;
        }
        if let Some(p) = self.restored_pid {
            writeln!(f, "restored on the destination: pid {p}, running")?;
        }
        writeln!(f, "on complete: {}", self.on_complete)?;
        if self.on_complete == "stop" {
            writeln!(
                f,
                "the process is left stopped: `kill -CONT {}` resumes it here, `kill {}` ends it",
                self.pid, self.pid
            )?;
        }
        for (reason, n, names) in crate::process::summarize(&self.left_out) {
            let more = if n > names.len() { ", ..." } else { "" };
            writeln!(
                f,
                "left out: {n} mappings ({}{more}): {reason}",
                names.join(", ")
            )?;
        }
        writeln!(f, "rounds:\n  round  dirty pages  pages sent   wire kbytes  time ms  dirty pages/s      mbps  exp. downtime ms  throttle")?;
        for r in &self.rounds {
            writeln!(
                f,
                "  {:>5}  {:>11}  {:>10}  {:>12}  {:>7.0}  {:>13.0}  {:>8.1}  {:>16.0}  {:>7}%",
                r.round,
                r.dirty_pages,
                r.pages_sent,
                kb(r.bytes),
                r.duration_ms,
                r.dirty_rate,
                r.throughput_mbps,
                r.expected_downtime_ms,
                r.throttle_percent
            )?;
        }
        Ok(())
    }
}

/// The receiver's final report.
#[derive(Debug, Clone, Serialize)]
pub struct RecvReport {
    pub status: String,
    pub out: String,
    pub source_pid: u32,
    pub source_comm: String,
    /// The sender's address, and over TLS its certificate's name.
    pub from: String,
    pub total_time_ms: f64,
    /// Bytes read from the socket.
    pub received: u64,
    pub throughput_mbps: f64,
    pub regions: usize,
    pub total: u64,
    pub normal: u64,
    pub duplicate: u64,
    pub rounds: u32,
    pub codec: String,
    pub decompress_threads: usize,
    pub thread_busy_percent: Vec<f64>,
    pub commit_ms: f64,
    pub cpu_seconds: f64,
    /// `--restore`: the pid of the restored process, now running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_pid: Option<i32>,
    /// From every page applied to the restored process built (stopped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<f64>,
    /// Of restore_ms, copying memory into the process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_copy_ms: Option<f64>,
    /// The process was built during pre-copy (its memory filled as the
    /// pages arrived), so restoring it copied only what the shell lacked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_early: Option<bool>,
    /// What restore changed on the way (stdio, sockets), one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restore_notes: Vec<String>,
    /// Post-copy, when the migration ended with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
}

impl fmt::Display for RecvReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Migration status: {}", self.status)?;
        writeln!(f, "image: {}", self.out)?;
        writeln!(
            f,
            "source: pid {} ({}) from {}",
            self.source_pid, self.source_comm, self.from
        )?;
        if let Some(pid) = self.restored_pid {
            writeln!(
                f,
                "restored: pid {pid}, running (built in {:.1} ms, {:.1} ms of it copying memory{})",
                self.restore_ms.unwrap_or(0.0),
                self.restore_copy_ms.unwrap_or(0.0),
                if self.restore_early == Some(true) {
                    "; its memory was filled during pre-copy"
                } else {
                    ""
                }
            )?;
            for n in &self.restore_notes {
                writeln!(f, "restore note: {n}")?;
            }
            if let Some(p) = &self.postcopy {
                write!(f, "{p}")?;
            }
        }
        writeln!(f, "total time: {:.0} ms", self.total_time_ms)?;
        writeln!(f, "received: {} kbytes", kb(self.received))?;
        writeln!(f, "throughput: {:.2} mbps", self.throughput_mbps)?;
        writeln!(
            f,
            "total ram: {} kbytes in {} regions",
            kb(self.total),
            self.regions
        )?;
        writeln!(f, "normal: {} pages", self.normal)?;
        writeln!(f, "duplicate: {} pages", self.duplicate)?;
        writeln!(f, "rounds: {}", self.rounds)?;
        writeln!(f, "codec: {}", self.codec)?;
        let busy: Vec<String> = self
            .thread_busy_percent
            .iter()
            .map(|p| format!("{p:.1}%"))
            .collect();
        writeln!(
            f,
            "decompress threads: {} busy {}",
            self.decompress_threads,
            busy.join(" ")
        )?;
        writeln!(f, "commit: {:.0} ms", self.commit_ms)?;
        write!(f, "cpu time: {:.2} s", self.cpu_seconds)
    }
}

/// Megabits per second for `bytes` over `d`.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 * 8.0 / 1e6 / s
    } else {
        0.0
    }
}

/// Busy percentages of each worker over `wall`.
pub fn busy_percent(busy_ns: &[AtomicU64], wall: Duration) -> Vec<f64> {
    let w = wall.as_nanos().max(1) as f64;
    busy_ns
        .iter()
        .map(|b| (b.load(Relaxed) as f64 / w * 1000.0).round() / 10.0)
        .collect()
}
