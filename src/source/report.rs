//! The source's report, built once from a summary of the migration and the
//! pipeline's counters.

use std::time::Duration;

use super::regions::RegionState;
use super::SendConfig;
use crate::protocol::AckInfo;
use crate::stats::{self, ms, CompressionReport, Counters, DowntimeParts, RoundReport, SendReport};

/// Round reports start from the counters at the round's start.
pub struct Snapshot {
    wire: u64,
    read: u64,
    normal: u64,
    zero: u64,
}

/// What a round was about, besides what the counters say.
pub struct RoundFacts {
    pub round: u32,
    /// Pages the tracker reported written (0 for the bulk round).
    pub dirty_pages: u64,
    /// Pages per second dirtied before the round (the last measured rate,
    /// for the final round).
    pub dirty_rate: f64,
    pub expected_downtime: Duration,
    pub throttle_percent: u32,
}

impl Snapshot {
    pub fn take(c: &Counters) -> Snapshot {
        Snapshot {
            wire: Counters::get(&c.wire_bytes),
            read: Counters::get(&c.read_bytes),
            normal: Counters::get(&c.normal_pages),
            zero: Counters::get(&c.zero_pages),
        }
    }

    pub fn report(&self, f: RoundFacts, c: &Counters, took: Duration) -> RoundReport {
        let bytes = Counters::get(&c.wire_bytes) - self.wire;
        RoundReport {
            round: f.round,
            dirty_pages: f.dirty_pages,
            pages_sent: (Counters::get(&c.normal_pages) - self.normal)
                + (Counters::get(&c.zero_pages) - self.zero),
            raw_bytes: Counters::get(&c.read_bytes) - self.read,
            bytes,
            duration_ms: ms(took),
            dirty_rate: f.dirty_rate,
            throughput_mbps: stats::mbps(bytes, took),
            expected_downtime_ms: ms(f.expected_downtime),
            throttle_percent: f.throttle_percent,
        }
    }
}

/// Everything the report says that the counters do not.
pub struct Summary<'a> {
    pub cfg: &'a SendConfig,
    pub tls_peer: Option<String>,
    pub counters: &'a Counters,
    pub state: &'a RegionState,
    pub page_size: u64,
    pub live: bool,
    pub tracker: String,
    pub fallback_regions: usize,
    pub threads_stopped: usize,
    pub syncs: u32,
    pub expected_downtime: Duration,
    pub rounds: Vec<RoundReport>,
    pub auto_choices: Vec<(String, u64)>,
    pub left_out: Vec<crate::process::LeftOut>,
    pub cpu_seconds: f64,
    pub ack: AckInfo,
    pub total: Duration,
    pub setup: Duration,
    pub downtime: Duration,
    pub downtime_parts: DowntimeParts,
    pub transfer: Duration,
    pub state_note: String,
    pub postcopy: Option<crate::stats::PostcopySent>,
}

fn compression(s: &Summary) -> CompressionReport {
    let c = s.counters;
    let g = Counters::get;
    let (pages, size, batches) = (
        g(&c.compressed_pages),
        g(&c.compressed_bytes),
        g(&c.batches),
    );
    CompressionReport {
        method: s.cfg.method.to_string(),
        level: s.cfg.level,
        threads: s.cfg.compress_threads,
        pages,
        busy: g(&c.busy),
        busy_rate: if batches > 0 {
            g(&c.busy) as f64 / batches as f64
        } else {
            0.0
        },
        compressed_size: size,
        compression_rate: if size > 0 {
            (pages * s.page_size) as f64 / size as f64
        } else {
            0.0
        },
        raw_batches: g(&c.raw_batches),
        thread_busy_percent: stats::busy_percent(&c.worker_busy_ns, s.transfer),
        auto_choices: s.auto_choices.iter().cloned().collect(),
    }
}

pub fn build(s: Summary) -> SendReport {
    let c = s.counters;
    let g = Counters::get;
    let wire = g(&c.wire_bytes);
    SendReport {
        status: "completed".into(),
        pid: s.cfg.pid,
        tls_peer: s.tls_peer.clone(),
        mode: if s.live { "live" } else { "stop-and-copy" }.into(),
        dirty_tracking: s.tracker.clone(),
        fallback_regions: s.fallback_regions,
        total_time_ms: ms(s.total),
        setup_time_ms: ms(s.setup),
        downtime_ms: ms(s.downtime),
        downtime_parts: s.downtime_parts.clone(),
        expected_downtime_ms: ms(s.expected_downtime),
        transfer_time_ms: ms(s.transfer),
        transferred: wire,
        throughput_mbps: stats::mbps(wire, s.transfer),
        total: s.state.total(),
        page_size: s.page_size,
        regions: s.state.list.len(),
        threads_stopped: s.threads_stopped,
        normal: g(&c.normal_pages),
        normal_bytes: g(&c.normal_pages) * s.page_size,
        duplicate: g(&c.zero_pages),
        skipped: g(&c.skipped_pages),
        dirty_sync_count: s.syncs,
        cpu_throttle_percentage: s
            .rounds
            .iter()
            .map(|r| r.throttle_percent)
            .max()
            .unwrap_or(0),
        max_bandwidth: s.cfg.max_bandwidth,
        compression: compression(&s),
        cpu_seconds: s.cpu_seconds,
        dest_decompress_busy_ms: s.ack.decompress_busy_ns as f64 / 1e6,
        dest_commit_ms: s.ack.commit_ns as f64 / 1e6,
        on_complete: s.cfg.on_complete.to_string(),
        left_out: s.left_out,
        rounds: s.rounds,
        process_state: s.state_note,
        postcopy: s.postcopy,
        restored_pid: (s.ack.restored_pid != 0).then_some(s.ack.restored_pid),
    }
}
