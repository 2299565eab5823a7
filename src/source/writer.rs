//! The writer thread: the only one that writes to the socket. It puts the
//! workers' frames on the wire as they finish, keeps control frames in
//! order behind the jobs queued before them, and caps the wire rate.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::adaptive::Adaptive;
use super::compress::Encoded;
use crate::protocol::{Control, Totals};
use crate::stats::Counters;

/// Messages for the writer.
pub enum Out {
    /// A worker's frames for one job.
    Frames(Encoded),
    /// A control frame, written once `after_jobs` jobs have been written.
    Control { after_jobs: u64, frame: Control },
    /// The End frame, with totals the writer counted, after `after_jobs` jobs.
    End { after_jobs: u64, rounds: u32 },
}

/// Caps the wire rate with a virtual clock: each write moves the time the
/// link is free by `bytes / rate`; we sleep when that is ahead of now. Idle
/// time earns at most `burst` of credit.
pub struct RateLimiter {
    rate: f64,
    free_at: Instant,
    burst: Duration,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            rate: bytes_per_sec.max(1) as f64,
            free_at: Instant::now(),
            burst: Duration::from_millis(50),
        }
    }

    /// Account for `bytes` about to be sent; sleeps as needed.
    pub fn take(&mut self, bytes: usize) {
        let now = Instant::now();
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        if self.free_at < floor {
            self.free_at = floor;
        }
        self.free_at += Duration::from_secs_f64(bytes as f64 / self.rate);
        if self.free_at > now {
            std::thread::sleep(self.free_at - now);
        }
    }
}

struct Writer {
    sock: BufWriter<TcpStream>,
    adaptive: Option<Arc<Adaptive>>,
    /// Bytes and time spent sending since the last link estimate.
    window: (u64, Duration),
    window_start: Instant,
    /// Auto: the candidate of the current observation window, the raw
    /// bytes moved with it, and when the window began.
    observing: Option<(usize, u64, Instant)>,
    limiter: Option<RateLimiter>,
    counters: Arc<Counters>,
    totals: Totals,
    jobs_written: u64,
    scratch: Vec<u8>,
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Large frames go in slices so the rate stays smooth.
        for chunk in bytes.chunks(256 << 10) {
            let t = Instant::now();
            if let Some(l) = &mut self.limiter {
                l.take(chunk.len());
            }
            self.sock.write_all(chunk)?;
            Counters::add(&self.counters.wire_bytes, chunk.len() as u64);
            if let Some(a) = &self.adaptive {
                // The link's speed: bytes over the time spent sending them
                // (rate-limit waits and a full socket included), taken only
                // from windows where sending was most of the time. When
                // the workers are the bottleneck, writes return at once
                // and say nothing about the link.
                self.window.0 += chunk.len() as u64;
                self.window.1 += t.elapsed();
                let wall = self.window_start.elapsed();
                if self.window.0 >= 4 << 20 {
                    if self.window.1 >= wall / 2 {
                        a.set_link(self.window.0 as f64 / self.window.1.as_secs_f64().max(1e-6));
                    }
                    self.window = (0, Duration::ZERO);
                    self.window_start = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Auto: raw bytes/s achieved per candidate, over windows of 16 MiB
    /// moved with the same candidate.
    fn observe(&mut self, candidate: Option<usize>, raw: u64) {
        let (Some(a), Some(c)) = (&self.adaptive, candidate) else {
            return;
        };
        match &mut self.observing {
            Some((i, bytes, _)) if *i == c => *bytes += raw,
            _ => self.observing = Some((c, raw, Instant::now())),
        }
        if let Some((i, bytes, since)) = self.observing {
            if bytes >= 16 << 20 {
                a.observe(i, bytes as f64 / since.elapsed().as_secs_f64().max(1e-6));
                self.observing = None;
            }
        }
    }

    fn control(&mut self, frame: &Control) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        frame.encode(&mut buf);
        let r = self.put(&buf).and_then(|_| self.sock.flush());
        self.scratch = buf;
        r
    }
}

/// Start the writer. It returns the totals it sent once the End frame is
/// out, `None` if its queue closed before End (a stopped migration), or the
/// first socket error.
pub fn spawn_writer(
    sock: TcpStream,
    max_bandwidth: Option<u64>,
    rx: Receiver<Out>,
    spare: Sender<Vec<u8>>,
    round_done: Sender<u32>,
    counters: Arc<Counters>,
    adaptive: Option<Arc<Adaptive>>,
) -> JoinHandle<io::Result<Option<Totals>>> {
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            let mut w = Writer {
                sock: BufWriter::with_capacity(256 << 10, sock),
                adaptive,
                window: (0, Duration::ZERO),
                window_start: Instant::now(),
                observing: None,
                limiter: max_bandwidth.map(RateLimiter::new),
                counters,
                totals: Totals::default(),
                jobs_written: 0,
                scratch: Vec::new(),
            };
            let mut waiting: VecDeque<Out> = VecDeque::new();
            for msg in rx.iter() {
                match msg {
                    Out::Frames(enc) => {
                        w.put(&enc.bytes)?;
                        w.observe(enc.candidate, enc.raw_bytes);
                        let t = enc.totals;
                        w.totals.normal_pages += t.normal_pages;
                        w.totals.zero_pages += t.zero_pages;
                        w.totals.page_frames += t.page_frames;
                        w.totals.zero_frames += t.zero_frames;
                        w.jobs_written += 1;
                        let _ = spare.try_send(enc.bytes);
                    }
                    other => waiting.push_back(other),
                }
                // Control frames leave in the order they were queued, each
                // after the jobs queued before it.
                while let Some(front) = waiting.front() {
                    let after = match front {
                        Out::Control { after_jobs, .. } | Out::End { after_jobs, .. } => {
                            *after_jobs
                        }
                        Out::Frames(_) => unreachable!("frames are never queued"),
                    };
                    if after > w.jobs_written {
                        break;
                    }
                    match waiting.pop_front() {
                        Some(Out::Control { frame, .. }) => {
                            w.control(&frame)?;
                            if let Control::RoundEnd(r) = frame {
                                let _ = round_done.try_send(r);
                            }
                        }
                        Some(Out::End { rounds, .. }) => {
                            w.totals.rounds = rounds;
                            let end = Control::End(w.totals.clone());
                            w.control(&end)?;
                            return Ok(Some(w.totals));
                        }
                        _ => {}
                    }
                }
            }
            // Closed without End: the migration was stopped.
            let _ = w.sock.flush();
            Ok(None)
        })
        .expect("spawn writer thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_paces() {
        // 10 MB/s: 1 MB should take about 100 ms (minus the 50 ms burst).
        let mut l = RateLimiter::new(10_000_000);
        let t = Instant::now();
        for _ in 0..100 {
            l.take(10_000);
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(45), "{e:?}");
    }
}
