//! What the receiver counted and the report it prints at the end: the
//! session fills a [`Received`] as frames come in (checked against the
//! source's totals at End), and builds the [`RecvReport`] in one piece from
//! a [`Summary`] once the image is committed.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::protocol::{Totals, WireCodec};
use crate::stats::{self, RecvReport};

/// Read-side counters.
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes read from the socket once the region table was in, frame
    /// headers included.
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub page_frames: u64,
    pub zero_frames: u64,
}

impl Received {
    /// What was received, in the form of the source's End totals.
    pub fn totals(&self, rounds: u32) -> Totals {
        Totals {
            rounds,
            normal_pages: self.normal_pages,
            zero_pages: self.zero_pages,
            page_frames: self.page_frames,
            zero_frames: self.zero_frames,
        }
    }
}

/// Everything the report is made of, gathered when the session ends.
pub struct Summary<'a> {
    pub out: &'a Path,
    pub source_pid: u32,
    pub source_comm: &'a str,
    pub from: &'a str,
    pub received: &'a Received,
    pub rounds: u32,
    /// Regions in the final table, and their bytes.
    pub regions: usize,
    pub total: u64,
    /// The last compression seen in a Pages frame (`None`: only stored pages).
    pub codec: Option<WireCodec>,
    /// Busy time of each decompression worker.
    pub busy_ns: &'a [AtomicU64],
    /// From the connection to the end of the session.
    pub elapsed: Duration,
    /// From the connection until Applied was sent.
    pub transfer: Duration,
    pub commit: Duration,
    pub cpu: Duration,
}

impl From<Summary<'_>> for RecvReport {
    fn from(s: Summary<'_>) -> RecvReport {
        RecvReport {
            status: "completed".into(),
            out: s.out.display().to_string(),
            source_pid: s.source_pid,
            source_comm: s.source_comm.to_string(),
            from: s.from.to_string(),
            total_time_ms: s.elapsed.as_secs_f64() * 1000.0,
            received: s.received.bytes,
            throughput_mbps: stats::mbps(s.received.bytes, s.transfer),
            regions: s.regions,
            total: s.total,
            normal: s.received.normal_pages,
            duplicate: s.received.zero_pages,
            rounds: s.rounds,
            codec: codec_name(s.codec).into(),
            decompress_threads: s.busy_ns.len(),
            thread_busy_percent: stats::busy_percent(s.busy_ns, s.transfer),
            commit_ms: s.commit.as_secs_f64() * 1000.0,
            cpu_seconds: s.cpu.as_secs_f64(),
            restored_pid: None,
            restore_ms: None,
            restore_copy_ms: None,
            restore_early: None,
            postcopy: None,
            restore_notes: Vec::new(),
        }
    }
}

fn codec_name(c: Option<WireCodec>) -> &'static str {
    match c {
        None | Some(WireCodec::Raw) => "none",
        Some(WireCodec::Zlib) => "zlib",
        Some(WireCodec::Zstd) => "zstd",
        Some(WireCodec::Lz4) => "lz4",
    }
}

/// The receiver's progress display reads the session's counters: pages
/// in (round after round, so no percentage) and the wire.
pub struct RecvProgress(pub std::sync::Arc<crate::stats::Counters>);

impl crate::progress::ProgressSource for RecvProgress {
    fn read(&self, wire_rate: f64) -> crate::progress::Reading {
        use crate::units::human_bytes;
        let c = &self.0;
        crate::progress::Reading {
            stage: "receiving".into(),
            fraction: None,
            message: format!(
                "{} of pages in, {} on the wire ({}/s)",
                human_bytes(crate::stats::Counters::get(&c.read_bytes)),
                human_bytes(crate::stats::Counters::get(&c.wire_bytes)),
                human_bytes(wire_rate as u64)
            ),
        }
    }

    fn wire_bytes(&self) -> u64 {
        crate::stats::Counters::get(&self.0.wire_bytes)
    }
}
