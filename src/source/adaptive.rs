//! `--compress auto`: pick the method and level per batch that moves raw
//! pages fastest, from what is measured in this migration.
//!
//! The pipeline moves raw bytes at `min(L × r, N × s)`: the link (L wire
//! bytes/s) times the compression ratio r, or the N workers' compression
//! speed s (raw bytes per second per thread), whichever is smaller. The
//! writer measures L as bytes over the time it spent sending them
//! (rate-limiter waits and a full socket included), only in windows where
//! sending took most of its time: when the workers are the bottleneck the
//! socket never fills and its speed is unknown, so L stays unknown (∞)
//! until the link is saturated once — which the fastest method, chosen
//! while L is unknown, does quickly. Every candidate's r and s are measured on the
//! pages being sent: a worker compresses one batch with every candidate at
//! the start and then one batch in [`PROBE_EVERY`], and the estimates are
//! moving averages, so the choice follows the data and the link. Batches
//! that do not shrink go raw whatever was chosen.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::codec::{Compression, Compressor};
use crate::protocol::WireCodec;

/// The writer's measurement of the link, for [`Adaptive`]: bytes over the
/// time spent sending them (rate-limit waits and a full socket included),
/// taken only from windows where sending was most of the time. When the
/// workers are the bottleneck, writes return at once and say nothing about
/// the link.
pub struct LinkMeter {
    bytes: u64,
    sending: Duration,
    since: Instant,
}

/// Bytes in one measuring window.
const LINK_WINDOW: u64 = 4 << 20;

impl Default for LinkMeter {
    fn default() -> Self {
        LinkMeter {
            bytes: 0,
            sending: Duration::ZERO,
            since: Instant::now(),
        }
    }
}

impl LinkMeter {
    /// `bytes` took `took` to send; at the end of a window, tell `ctl`.
    pub fn sent(&mut self, ctl: &Adaptive, bytes: u64, took: Duration) {
        self.bytes += bytes;
        self.sending += took;
        if self.bytes >= LINK_WINDOW {
            if self.sending >= self.since.elapsed() / 2 {
                ctl.set_link(self.bytes as f64 / self.sending.as_secs_f64().max(1e-6));
            }
            *self = LinkMeter::default();
        }
    }
}

/// Candidates, fastest first. zlib is left out: zstd-1 beats it in both
/// speed and ratio on every kind of page we measured.
pub const CANDIDATES: [(Compression, i32); 6] = [
    (Compression::None, 0),
    (Compression::Lz4, 0),
    (Compression::Zstd, 1),
    (Compression::Zstd, 3),
    (Compression::Zstd, 6),
    (Compression::Zstd, 9),
];

/// One batch in this many is compressed with every candidate.
pub const PROBE_EVERY: u64 = 256;
/// Observations older than this many windows are not trusted.
const STALE_WINDOWS: u64 = 48;
/// Every this many windows, one goes to a candidate not observed lately.
const EXPLORE_EVERY: u64 = 16;
/// Bytes of a batch compressed by each candidate when probing.
const PROBE_BYTES: usize = 64 << 10;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.3;
/// memcpy-like speed assumed for sending raw (bytes/s per thread).
const RAW_SPEED: f64 = 8e9;

#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Raw bytes per output byte.
    ratio: f64,
    /// Raw bytes per second, one thread.
    speed: f64,
    samples: u32,
}

impl Estimate {
    fn add(&mut self, ratio: f64, speed: f64) {
        if self.samples == 0 {
            self.ratio = ratio;
            self.speed = speed;
        } else {
            self.ratio += ALPHA * (ratio - self.ratio);
            self.speed += ALPHA * (speed - self.speed);
        }
        self.samples += 1;
    }
}

/// Shared by the workers and the writer.
pub struct Adaptive {
    threads: usize,
    estimates: Mutex<[Estimate; CANDIDATES.len()]>,
    /// Raw bytes/s the whole pipeline achieved while each candidate was the
    /// choice, and in which observation window that was last seen.
    observed: Mutex<[Option<(f64, u64)>; CANDIDATES.len()]>,
    windows: AtomicU64,
    /// Link estimate, bytes/s, as f64 bits (0 = unknown).
    link: AtomicU64,
    choice: AtomicUsize,
    batches: AtomicU64,
    /// How many batches each candidate was chosen for.
    pub chosen: [AtomicU64; CANDIDATES.len()],
}

impl Adaptive {
    pub fn new(threads: usize) -> Adaptive {
        Adaptive {
            threads: threads.max(1),
            estimates: Mutex::new([Estimate::default(); CANDIDATES.len()]),
            observed: Mutex::new([None; CANDIDATES.len()]),
            windows: AtomicU64::new(0),
            link: AtomicU64::new(0),
            // zstd-1 until something is measured.
            choice: AtomicUsize::new(2),
            batches: AtomicU64::new(0),
            chosen: Default::default(),
        }
    }

    /// The writer's measurement of the link.
    pub fn set_link(&self, bytes_per_sec: f64) {
        let old = f64::from_bits(self.link.load(Relaxed));
        let new = if old > 0.0 {
            old + ALPHA * (bytes_per_sec - old)
        } else {
            bytes_per_sec
        };
        self.link.store(new.to_bits(), Relaxed);
        self.decide();
    }

    fn link(&self) -> f64 {
        f64::from_bits(self.link.load(Relaxed))
    }

    /// Modelled raw throughput of candidate `i`.
    fn throughput(&self, e: &Estimate, i: usize) -> f64 {
        let link = self.link();
        let link = if link > 0.0 { link } else { f64::INFINITY };
        let (ratio, speed) = if CANDIDATES[i].0 == Compression::None {
            (1.0, RAW_SPEED)
        } else {
            (e.ratio, e.speed)
        };
        (link * ratio).min(self.threads as f64 * speed)
    }

    /// Score of each candidate: what the pipeline achieved with it, if
    /// seen recently, else the model's estimate.
    fn scores(&self) -> Vec<Option<(f64, bool)>> {
        let est = self.estimates.lock().expect("estimates");
        let obs = self.observed.lock().expect("observed");
        let now = self.windows.load(Relaxed);
        est.iter()
            .enumerate()
            .map(|(i, e)| match obs[i] {
                Some((rate, when)) if now.saturating_sub(when) <= STALE_WINDOWS => {
                    Some((rate, true))
                }
                _ if CANDIDATES[i].0 != Compression::None && e.samples == 0 => None,
                _ => Some((self.throughput(e, i), false)),
            })
            .collect()
    }

    fn decide(&self) {
        // Until the link is measured the model would rank raw copying at
        // memory speed first: then only what was observed competes (and
        // with nothing observed yet, the current choice stays).
        let link_known = self.link() > 0.0;
        let mut best: Option<(usize, f64)> = None;
        for (i, s) in self.scores().into_iter().enumerate() {
            if let Some((t, seen)) = s {
                if (seen || link_known) && best.is_none_or(|(_, b)| t > b) {
                    best = Some((i, t));
                }
            }
        }
        if let Some((i, _)) = best {
            self.choice.store(i, Relaxed);
        }
    }

    /// The writer saw the pipeline move `rate` raw bytes/s while candidate
    /// `i` was used. Every [`EXPLORE_EVERY`] windows the best-modelled
    /// candidate not observed lately gets a window of its own, so that the
    /// model's guesses are checked against the real pipeline.
    pub fn observe(&self, i: usize, rate: f64) {
        let n = self.windows.fetch_add(1, Relaxed) + 1;
        {
            let mut obs = self.observed.lock().expect("observed");
            obs[i] = Some(match obs[i] {
                Some((old, when)) if n - when <= STALE_WINDOWS => (old + ALPHA * (rate - old), n),
                _ => (rate, n),
            });
        }
        // Early on (windows 2, 4, 8) and then regularly.
        if n % EXPLORE_EVERY == 0 || (n < EXPLORE_EVERY && n.is_power_of_two() && n > 1) {
            let scores = self.scores();
            let untried = scores
                .iter()
                .enumerate()
                .filter_map(|(j, s)| s.filter(|(_, seen)| !seen).map(|(t, _)| (j, t)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let best_seen = scores
                .iter()
                .filter_map(|s| s.filter(|(_, seen)| *seen).map(|(t, _)| t))
                .fold(0.0, f64::max);
            // Only worth a window if the model expects clearly better.
            if let Some((j, t)) = untried {
                if t > best_seen * 1.1 {
                    self.choice.store(j, Relaxed);
                    return;
                }
            }
        }
        self.decide();
    }

    /// Whether candidate `i`'s compression speed alone could beat the
    /// current choice's modelled throughput.
    fn could_win(&self, i: usize) -> bool {
        let est = self.estimates.lock().expect("estimates");
        let best = self.choice();
        let best_t = self.throughput(&est[best], best);
        est[i].samples == 0 || self.threads as f64 * est[i].speed >= best_t * 0.8
    }

    /// Whether this batch should probe every candidate.
    pub fn probe_now(&self, worker_batches: u64) -> bool {
        let n = self.batches.fetch_add(1, Relaxed);
        worker_batches == 0 || n % PROBE_EVERY == 0
    }

    pub fn choice(&self) -> usize {
        self.choice.load(Relaxed)
    }

    fn record(&self, i: usize, raw: usize, out: usize, secs: f64) {
        let mut est = self.estimates.lock().expect("estimates");
        est[i].add(raw as f64 / out.max(1) as f64, raw as f64 / secs.max(1e-9));
    }

    /// Summary for the report: candidate name and batches chosen.
    pub fn summary(&self) -> Vec<(String, u64)> {
        CANDIDATES
            .iter()
            .zip(&self.chosen)
            .map(|(&(m, l), n)| (name(m, l), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

pub fn name(m: Compression, level: i32) -> String {
    match m {
        Compression::Zstd | Compression::Zlib => format!("{m}-{level}"),
        _ => m.to_string(),
    }
}

/// A worker's contexts for every candidate.
pub struct AutoWorker {
    /// Candidate used for the last batch.
    pub last: usize,
    contexts: Vec<Compressor>,
    scratch: Vec<u8>,
    batches: u64,
    probes: u64,
}

impl AutoWorker {
    pub fn new() -> Result<AutoWorker, crate::codec::CodecError> {
        Ok(AutoWorker {
            last: 0,
            contexts: CANDIDATES
                .iter()
                .map(|&(m, l)| Compressor::new(m, l))
                .collect::<Result<_, _>>()?,
            scratch: Vec::new(),
            batches: 0,
            probes: 0,
        })
    }

    /// Compress `raw` into `out` with the chosen candidate (probing all of
    /// them now and then). `None`: send raw.
    pub fn compress(&mut self, ctl: &Adaptive, raw: &[u8], out: &mut Vec<u8>) -> Option<WireCodec> {
        if ctl.probe_now(self.batches) {
            // A 64 KiB sample is enough to rank the candidates, and keeps
            // probing cheap; candidates that cannot win at their measured
            // speed are probed only every eighth time.
            let sample = &raw[..raw.len().min(PROBE_BYTES)];
            let full_probe = self.probes % 8 == 0;
            self.probes += 1;
            for i in 1..CANDIDATES.len() {
                if !full_probe && !ctl.could_win(i) {
                    continue;
                }
                self.scratch.clear();
                let t = Instant::now();
                let r = self.contexts[i].compress(sample, &mut self.scratch);
                let secs = t.elapsed().as_secs_f64();
                let size = if r.is_some() {
                    self.scratch.len()
                } else {
                    sample.len()
                };
                ctl.record(i, sample.len(), size, secs);
            }
            ctl.decide();
        }
        self.batches += 1;
        let i = ctl.choice();
        self.last = i;
        ctl.chosen[i].fetch_add(1, Relaxed);
        let t = Instant::now();
        let start = out.len();
        let r = self.contexts[i].compress(raw, out);
        if CANDIDATES[i].0 != Compression::None && self.batches % 16 == 0 {
            // Keep the chosen candidate's estimate fresh between probes.
            let size = if r.is_some() {
                out.len() - start
            } else {
                raw.len()
            };
            ctl.record(i, raw.len(), size, t.elapsed().as_secs_f64());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ctl: &Adaptive, i: usize, ratio: f64, speed: f64) {
        ctl.estimates.lock().unwrap()[i].add(ratio, speed);
    }

    #[test]
    fn slow_link_prefers_ratio_fast_link_prefers_speed() {
        let ctl = Adaptive::new(2);
        set(&ctl, 1, 2.5, 900e6); // lz4
        set(&ctl, 2, 4.0, 450e6); // zstd-1
        set(&ctl, 3, 4.3, 250e6); // zstd-3
        set(&ctl, 4, 4.6, 90e6); // zstd-6
        set(&ctl, 5, 4.8, 40e6); // zstd-9
        ctl.set_link(12.5e6); // 100 Mbit/s: 12.5 × 4.8 = 60 < 2 × 40 = 80
        assert_eq!(CANDIDATES[ctl.choice()], (Compression::Zstd, 9));
        let ctl2 = Adaptive::new(2);
        for (i, r, s) in [
            (1, 2.5, 900e6),
            (2, 4.0, 450e6),
            (3, 4.3, 250e6),
            (4, 4.6, 90e6),
            (5, 4.8, 40e6),
        ] {
            set(&ctl2, i, r, s);
        }
        ctl2.set_link(125e6); // 1 Gbit/s: zstd-1 moves min(500, 900) = 500
        assert_eq!(CANDIDATES[ctl2.choice()], (Compression::Zstd, 1));
        let ctl3 = Adaptive::new(2);
        for (i, r, s) in [(1, 2.5, 900e6), (2, 4.0, 450e6)] {
            set(&ctl3, i, r, s);
        }
        ctl3.set_link(10e9); // loopback: raw copying wins
        assert_eq!(CANDIDATES[ctl3.choice()], (Compression::None, 0));
    }

    #[test]
    fn incompressible_data_goes_raw() {
        let ctl = Adaptive::new(2);
        for i in 1..CANDIDATES.len() {
            set(&ctl, i, 1.0, 500e6);
        }
        ctl.set_link(125e6);
        assert_eq!(CANDIDATES[ctl.choice()].0, Compression::None);
    }
}
