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
//!
//! Between two neighbours on the ladder the best is often a mix: lz4 leaves
//! a 1 Gbit/s link full and the CPU half idle, zstd-1 the reverse. So the
//! chosen candidate gives a share of its batches to a neighbour, steered
//! window by window by [`QueueMeter`]: a writer that finds the next batch
//! ready (the link is the limit) moves the share toward the neighbour that
//! compresses more, one that waits for it (the workers are) toward the
//! faster one, until both are about busy (see [`Adaptive::batches_ready`]).

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
/// The neighbour's share of the batches moves in steps of 1/MIX_STEPS.
pub const MIX_STEPS: i32 = 16;
/// The writer found the next batch already compressed for at least this
/// share of a window's batches: the link is the limit, and the mix moves
/// toward more compression; below it, toward more speed.
const LINK_FULL: f64 = 0.8;
/// Batches in one window of [`QueueMeter`].
pub const QUEUE_WINDOW: u32 = 16;

/// The writer's view of who waits on whom: of the batches it wrote, how
/// many were already there when it came for them. Time on the socket would
/// not say it: a rate limit or a qdisc lets a burst out at once after a
/// pause, so a link kept full looks half idle.
#[derive(Default)]
pub struct QueueMeter {
    batches: u32,
    ready: u32,
}

impl QueueMeter {
    /// The writer came for a batch, and it was `ready` or not.
    pub fn took(&mut self, ctl: &Adaptive, ready: bool) {
        self.batches += 1;
        self.ready += ready as u32;
        if self.batches >= QUEUE_WINDOW {
            ctl.batches_ready(self.ready as f64 / self.batches as f64);
            *self = QueueMeter::default();
        }
    }
}

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
    /// The mix: the candidate it belongs to (the last one [`Self::decide`]
    /// settled on) in the high half, and the share of that candidate's
    /// batches given to a neighbour in the low half, in steps of
    /// 1/[`MIX_STEPS`] as an i32: above 0 to the next candidate (more
    /// compression), below 0 to the previous one (faster).
    mix: AtomicU64,
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
            mix: AtomicU64::new(pack_mix(2, 0)),
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
            // A new home starts unmixed; the same one keeps its share.
            let _ = self.mix.fetch_update(Relaxed, Relaxed, |v| {
                (unpack_mix(v).0 != i).then_some(pack_mix(i, 0))
            });
        }
    }

    /// The writer found the share `ready` of a window's batches ready. While
    /// the settled candidate is in use (not a window given to another
    /// to check the model), move its neighbour's share one step: toward
    /// more compression when the link is full (the workers have time to
    /// spare, or the link would not be the limit), toward more speed when
    /// the link waits on them. At the balance both are about busy, and the
    /// share wanders a step either side of it.
    pub fn batches_ready(&self, ready: f64) {
        let step = if ready >= LINK_FULL { 1 } else { -1 };
        let choice = self.choice();
        // One atomic update: a decide() settling elsewhere meanwhile wins.
        let _ = self.mix.fetch_update(Relaxed, Relaxed, |v| {
            let (home, share) = unpack_mix(v);
            if home != choice {
                return None;
            }
            // Sending raw is never mixed, with or into: where raw is the
            // choice, the "link" is often memory on this very machine, and
            // taking CPU from it to compress did not pay (measured on
            // loopback).
            let lo = if home > 1 { -MIX_STEPS + 1 } else { 0 };
            let hi = if home > 0 && home + 1 < CANDIDATES.len() {
                MIX_STEPS - 1
            } else {
                0
            };
            Some(pack_mix(home, (share + step).clamp(lo, hi)))
        });
    }

    /// The choice, and the candidate for a worker's next batch: the choice
    /// itself, or its neighbour for the mix's share of the batches (`acc`
    /// is the worker's running share, so that the two alternate evenly).
    fn pick(&self, acc: &mut i32) -> (usize, usize) {
        let i = self.choice();
        let (home, share) = unpack_mix(self.mix.load(Relaxed));
        if home != i || share == 0 {
            return (i, i);
        }
        *acc += share.abs();
        if *acc < MIX_STEPS {
            return (i, i);
        }
        *acc -= MIX_STEPS;
        (i, if share > 0 { i + 1 } else { i - 1 })
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

fn pack_mix(home: usize, share: i32) -> u64 {
    ((home as u64) << 32) | share as u32 as u64
}

fn unpack_mix(v: u64) -> (usize, i32) {
    ((v >> 32) as usize, v as u32 as i32)
}

pub fn name(m: Compression, level: i32) -> String {
    match m {
        Compression::Zstd | Compression::Zlib => format!("{m}-{level}"),
        _ => m.to_string(),
    }
}

/// A worker's contexts for every candidate.
pub struct AutoWorker {
    /// The choice the last batch was made under (its neighbour may have
    /// compressed it, for the mix): the writer's observations are the
    /// choice's, mix included.
    pub last: usize,
    /// Running share of the mix (see [`Adaptive::pick`]).
    mixed: i32,
    contexts: Vec<Compressor>,
    scratch: Vec<u8>,
    batches: u64,
    probes: u64,
}

impl AutoWorker {
    pub fn new() -> Result<AutoWorker, crate::codec::CodecError> {
        Ok(AutoWorker {
            last: 0,
            mixed: 0,
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
        let (choice, i) = ctl.pick(&mut self.mixed);
        self.last = choice;
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

    /// Settle `ctl` on candidate `i` as decide() would.
    fn settle(ctl: &Adaptive, i: usize) {
        ctl.choice.store(i, Relaxed);
        ctl.mix.store(pack_mix(i, 0), Relaxed);
    }

    /// Which candidates 16 batches of one worker go to.
    fn batches(ctl: &Adaptive) -> Vec<usize> {
        let mut acc = 0;
        (0..MIX_STEPS)
            .map(|_| {
                let (choice, used) = ctl.pick(&mut acc);
                assert_eq!(choice, ctl.choice());
                used
            })
            .collect()
    }

    fn count(v: &[usize], i: usize) -> usize {
        v.iter().filter(|&&x| x == i).count()
    }

    #[test]
    fn a_full_link_mixes_in_more_compression_a_waiting_one_more_speed() {
        let ctl = Adaptive::new(2);
        settle(&ctl, 1); // lz4
        assert_eq!(batches(&ctl), vec![1; 16]);
        for _ in 0..4 {
            ctl.batches_ready(0.95);
        }
        let b = batches(&ctl);
        assert_eq!((count(&b, 2), count(&b, 1)), (4, 12), "{b:?}");
        // The link waits on the workers: back toward lz4, and never into
        // sending raw.
        for _ in 0..10 {
            ctl.batches_ready(0.2);
        }
        assert_eq!(batches(&ctl), vec![1; 16]);
        settle(&ctl, 2); // zstd-1
        for _ in 0..3 {
            ctl.batches_ready(0.5);
        }
        let b = batches(&ctl);
        assert_eq!((count(&b, 1), count(&b, 2)), (3, 13), "{b:?}");
        // The share is bounded: the choice keeps at least one batch in 16.
        for _ in 0..40 {
            ctl.batches_ready(1.0);
        }
        let b = batches(&ctl);
        assert_eq!((count(&b, 3), count(&b, 2)), (15, 1), "{b:?}");
    }

    #[test]
    fn raw_is_never_mixed() {
        let ctl = Adaptive::new(2);
        settle(&ctl, 0);
        for _ in 0..5 {
            ctl.batches_ready(1.0);
        }
        assert_eq!(batches(&ctl), vec![0; 16]);
    }

    #[test]
    fn exploring_keeps_the_mix_and_a_new_choice_drops_it() {
        let ctl = Adaptive::new(2);
        settle(&ctl, 1);
        ctl.batches_ready(1.0);
        ctl.batches_ready(1.0);
        // A window given to another candidate to check the model: pure,
        // and its link measurements do not move the mix.
        ctl.choice.store(3, Relaxed);
        ctl.batches_ready(1.0);
        assert_eq!(batches(&ctl), vec![3; 16]);
        ctl.choice.store(1, Relaxed);
        assert_eq!(count(&batches(&ctl), 2), 2);
        // decide() settling elsewhere starts that choice unmixed.
        set(&ctl, 1, 2.5, 900e6);
        set(&ctl, 2, 4.0, 450e6);
        ctl.set_link(125e6);
        assert_eq!(ctl.choice(), 2);
        assert_eq!(batches(&ctl), vec![2; 16]);
    }

    #[test]
    fn the_queue_meter_reports_the_share_of_batches_found_ready() {
        let ctl = Adaptive::new(2);
        settle(&ctl, 1);
        let mut q = QueueMeter::default();
        for k in 0..QUEUE_WINDOW {
            q.took(&ctl, k < 13); // 13 of 16 ready: 0.81, the link is full
        }
        assert_eq!(count(&batches(&ctl), 2), 1);
        for k in 0..QUEUE_WINDOW {
            q.took(&ctl, k < 12); // 0.75: the link waits
        }
        assert_eq!(batches(&ctl), vec![1; 16]);
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
