//! The writer thread: the only one that writes to the connection. It puts
//! the workers' frames on the wire as they finish, keeps control frames in
//! order behind the jobs queued before them, and caps the wire rate at the
//! migration's current `max-bandwidth` (read at every chunk, so a change
//! takes effect at once).

use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::adaptive::{Adaptive, LinkMeter, QueueMeter};
use super::batch::Out;
use super::handle::Tunables;
use crate::protocol::{transport, Control, Totals};
use crate::stats::Counters;

/// Caps the wire rate with a virtual clock: each write moves the time the
/// link is free by `bytes / rate`; we sleep when that is ahead of now. Idle
/// time earns at most `burst` of credit.
pub struct RateLimiter {
    free_at: Instant,
    burst: Duration,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            free_at: Instant::now(),
            burst: Duration::from_millis(50),
        }
    }
}

impl RateLimiter {
    /// Account for `bytes` about to be sent at `bytes_per_sec`; sleeps as
    /// needed.
    pub fn take(&mut self, bytes: usize, bytes_per_sec: u64) {
        let now = Instant::now();
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        if self.free_at < floor {
            self.free_at = floor;
        }
        self.free_at += Duration::from_secs_f64(bytes as f64 / bytes_per_sec.max(1) as f64);
        if self.free_at > now {
            std::thread::sleep(self.free_at - now);
        }
    }
}

/// The writer's queues: messages in, spent frame buffers back to the
/// workers, and each RoundEnd reported once it is on the wire.
pub struct WriterQueues {
    pub rx: Receiver<Out>,
    pub spare: Sender<Vec<u8>>,
    pub round_done: Sender<u32>,
}

/// What the writer shares with the rest of the migration.
pub struct WriterShared {
    pub counters: Arc<Counters>,
    pub tunables: Arc<Tunables>,
    pub adaptive: Option<Arc<Adaptive>>,
}

struct Writer {
    sock: BufWriter<transport::Writer>,
    shared: WriterShared,
    link: LinkMeter,
    queue: QueueMeter,
    /// Auto: the candidate of the current observation window, the raw
    /// bytes moved with it, and when the window began.
    observing: Option<(usize, u64, Instant)>,
    limiter: RateLimiter,
    totals: Totals,
    jobs_written: u64,
    scratch: Vec<u8>,
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Large frames go in slices so the rate stays smooth.
        for chunk in bytes.chunks(256 << 10) {
            let t = Instant::now();
            if let Some(rate) = self.shared.tunables.max_bandwidth() {
                self.limiter.take(chunk.len(), rate);
            }
            self.sock.write_all(chunk)?;
            Counters::add(&self.shared.counters.wire_bytes, chunk.len() as u64);
            if let Some(a) = &self.shared.adaptive {
                self.link.sent(a, chunk.len() as u64, t.elapsed());
            }
        }
        Ok(())
    }

    /// Auto: raw bytes/s achieved per candidate, over windows of 16 MiB
    /// moved with the same candidate.
    fn observe(&mut self, candidate: Option<usize>, raw: u64) {
        let (Some(a), Some(c)) = (&self.shared.adaptive, candidate) else {
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

    /// Write the control frames whose jobs are all out, in queue order.
    /// Returns the totals once End is written.
    fn release(
        &mut self,
        waiting: &mut VecDeque<Out>,
        q: &WriterQueues,
    ) -> io::Result<Option<Totals>> {
        while let Some(front) = waiting.front() {
            let after = match front {
                Out::Control { after_jobs, .. } | Out::End { after_jobs, .. } => *after_jobs,
                Out::Frames(_) => unreachable!("frames are never queued"),
            };
            if after > self.jobs_written {
                break;
            }
            match waiting.pop_front() {
                Some(Out::Control { frame, .. }) => {
                    self.control(&frame)?;
                    if let Control::RoundEnd(r) = frame {
                        let _ = q.round_done.try_send(r);
                    }
                }
                Some(Out::End { rounds, .. }) => {
                    self.totals.rounds = rounds;
                    let end = Control::End(self.totals.clone());
                    self.control(&end)?;
                    return Ok(Some(self.totals.clone()));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Write until End or until the queue closes; give the connection's
    /// write half back either way.
    fn run(mut self, q: WriterQueues) -> WriterExit {
        let result = self.write_all(q);
        let (sock, _unflushed) = self.sock.into_parts();
        WriterExit { result, sock }
    }

    fn write_all(&mut self, q: WriterQueues) -> io::Result<Option<Totals>> {
        let mut waiting: VecDeque<Out> = VecDeque::new();
        loop {
            let (msg, ready) = match q.rx.try_recv() {
                Ok(m) => (m, true),
                Err(_) => match q.rx.recv() {
                    Ok(m) => (m, false),
                    Err(_) => break,
                },
            };
            match msg {
                Out::Frames(enc) => {
                    if let Some(a) = &self.shared.adaptive {
                        self.queue.took(a, ready);
                    }
                    self.put(&enc.bytes)?;
                    self.observe(enc.candidate, enc.raw_bytes);
                    let t = enc.totals;
                    self.totals.normal_pages += t.normal_pages;
                    self.totals.zero_pages += t.zero_pages;
                    self.totals.page_frames += t.page_frames;
                    self.totals.zero_frames += t.zero_frames;
                    self.jobs_written += 1;
                    let _ = q.spare.try_send(enc.bytes);
                }
                other => waiting.push_back(other),
            }
            if let Some(totals) = self.release(&mut waiting, &q)? {
                return Ok(Some(totals));
            }
        }
        // Closed without End: the migration was stopped.
        let _ = self.sock.flush();
        Ok(None)
    }
}

/// How the writer ended: the totals it sent once the End frame is out,
/// `None` if its queue closed before End (a stopped migration), or the
/// first write error; and the write half, for a last Error frame.
pub struct WriterExit {
    pub result: io::Result<Option<Totals>>,
    pub sock: transport::Writer,
}

/// Start the writer.
pub fn spawn_writer(
    sock: transport::Writer,
    queues: WriterQueues,
    shared: WriterShared,
) -> JoinHandle<WriterExit> {
    let w = Writer {
        sock: BufWriter::with_capacity(256 << 10, sock),
        shared,
        link: LinkMeter::default(),
        queue: QueueMeter::default(),
        observing: None,
        limiter: RateLimiter::default(),
        totals: Totals::default(),
        jobs_written: 0,
        scratch: Vec::new(),
    };
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || w.run(queues))
        .expect("spawn writer thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_paces() {
        // 10 MB/s: 1 MB should take about 100 ms (minus the 50 ms burst).
        let mut l = RateLimiter::default();
        let t = Instant::now();
        for _ in 0..100 {
            l.take(10_000, 10_000_000);
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(45), "{e:?}");
    }
}
