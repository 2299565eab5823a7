//! The sending pipeline: this thread reads pages into batches, the
//! compression workers encode them, the writer puts frames on the wire.
//! Rounds end with a RoundEnd frame that the writer reports back once it is
//! on the wire, which is how the state machine measures each round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::adaptive::Adaptive;
use super::batch::{Batch, Job, Out};
use super::compress::{self, WorkerConfig, WorkerQueues};
use super::handle::MigrationHandle;
use super::regions::Carried;
use super::writer::{self, WriterExit, WriterQueues, WriterShared};
use super::{SendConfig, SendError};
use crate::dirty::DirtyTracker;
use crate::pages::Run;
use crate::process::{MemReader, Region};
use crate::protocol::{transport, Control, Totals};
use crate::stats::Counters;

/// Where a round's pages are read from: the process's memory, and the
/// tracker that wants to see what was sent (compare hashes it).
pub struct PageSource<'a> {
    pub mem: &'a MemReader,
    pub tracker: Option<&'a mut (dyn DirtyTracker + 'static)>,
}

pub struct Pipeline {
    jobs: Option<Sender<Job>>,
    free: Receiver<Vec<u8>>,
    out: Option<Sender<Out>>,
    round_done: Receiver<u32>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<WriterExit>>,
    /// The connection's write half, back from the writer once it ended.
    returned: Option<transport::Writer>,
    buffers: usize,
    max_buffers: usize,
    jobs_sent: u64,
    batch_pages: u32,
    page_size: u64,
    cancel: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    /// While the target runs, a page may be unmapped between reading the
    /// maps and reading the page: such pages are skipped and kept in
    /// `unreadable` instead of failing the migration.
    pub lenient: bool,
    pub unreadable: Carried,
    /// `--compress auto`'s controller.
    pub adaptive: Option<Arc<Adaptive>>,
}

impl Pipeline {
    pub fn start(
        cfg: &SendConfig,
        handle: &MigrationHandle,
        sock: transport::Writer,
        page_size: u64,
    ) -> Result<Pipeline, SendError> {
        let n = cfg.compress_threads;
        let counters = handle.counters().clone();
        let (job_tx, job_rx) = bounded::<Job>(n * 2);
        let (free_tx, free_rx) = bounded::<Vec<u8>>(n * 4 + 2);
        let (out_tx, out_rx) = bounded::<Out>(n * 2 + 4);
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(n * 4 + 2);
        let (done_tx, done_rx) = bounded::<u32>(64);
        let adaptive =
            (cfg.method == crate::codec::Compression::Auto).then(|| Arc::new(Adaptive::new(n)));
        let writer = writer::spawn_writer(
            sock,
            WriterQueues {
                rx: out_rx,
                spare: spare_tx,
                round_done: done_tx,
            },
            WriterShared {
                counters: counters.clone(),
                tunables: handle.tunables().clone(),
                adaptive: adaptive.clone(),
            },
        );
        let workers = compress::spawn_workers(
            &WorkerConfig {
                threads: n,
                compression: cfg.method,
                level: cfg.level,
                page_size: page_size as usize,
            },
            &WorkerQueues {
                jobs: job_rx,
                free: free_tx,
                out: out_tx.clone(),
                spare: spare_rx,
            },
            &counters,
            adaptive.as_ref(),
        )?;
        Ok(Pipeline {
            jobs: Some(job_tx),
            free: free_rx,
            out: Some(out_tx),
            round_done: done_rx,
            workers,
            writer: Some(writer),
            returned: None,
            buffers: 0,
            max_buffers: n * 4 + 2,
            jobs_sent: 0,
            batch_pages: cfg.batch_pages,
            page_size,
            cancel: handle.cancel_flag().clone(),
            counters,
            lenient: false,
            unreadable: Carried::default(),
            adaptive,
        })
    }

    fn stopped() -> SendError {
        SendError::Connection("the sending pipeline stopped".into())
    }

    /// A queue closed under us: a thread ended, most likely the writer on
    /// a failed connection. Join them and say what really happened.
    fn broken(&mut self) -> SendError {
        self.shutdown().err().unwrap_or_else(Self::stopped)
    }

    /// Queue a control frame behind every job submitted so far.
    pub fn control(&mut self, frame: Control) -> Result<(), SendError> {
        let out = self.out.as_ref().ok_or_else(Self::stopped)?;
        let msg = Out::Control {
            after_jobs: self.jobs_sent,
            frame,
        };
        out.send(msg).map_err(|_| self.broken())
    }

    /// Read and send the pages of `runs` (relative to `region.start`) as
    /// part of `batch`'s round and region, in batches of up to
    /// `batch_pages` pages.
    pub fn send_runs(
        &mut self,
        src: &mut PageSource,
        batch: Batch,
        region: &Region,
        runs: &[Run],
    ) -> Result<(), SendError> {
        let mut pending: Vec<Run> = Vec::new();
        let mut pages = 0u32;
        for run in runs {
            let mut first = run.first;
            let mut left = run.count;
            while left > 0 {
                let take = left.min(self.batch_pages - pages);
                pending.push(Run { first, count: take });
                pages += take;
                first += take as u64;
                left -= take;
                if pages == self.batch_pages {
                    self.submit(src, batch, region, std::mem::take(&mut pending), pages)?;
                    pages = 0;
                }
            }
        }
        if pages > 0 {
            self.submit(src, batch, region, pending, pages)?;
        }
        Ok(())
    }

    /// A buffer for a batch: a returned one, a new one while under the
    /// cap, or wait for one (the workers are behind).
    fn buffer(&mut self) -> Result<Vec<u8>, SendError> {
        match self.free.try_recv() {
            Ok(b) => Ok(b),
            Err(_) if self.buffers < self.max_buffers => {
                self.buffers += 1;
                Ok(Vec::new())
            }
            Err(_) => {
                Counters::add(&self.counters.busy, 1);
                self.free.recv().map_err(|_| self.broken())
            }
        }
    }

    fn submit(
        &mut self,
        src: &mut PageSource,
        batch: Batch,
        region: &Region,
        runs: Vec<Run>,
        pages: u32,
    ) -> Result<(), SendError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(SendError::Cancelled);
        }
        let mut data = self.buffer()?;
        data.resize(pages as usize * self.page_size as usize, 0);
        let mut runs = runs;
        if let Err(e) = src
            .mem
            .read_runs(region.start, self.page_size, &runs, &mut data)
        {
            if !self.lenient {
                return Err(e.into());
            }
            runs = self.read_readable(src.mem, region, &runs, &mut data);
            if runs.is_empty() {
                // Nothing readable: the buffer is dropped, and may be
                // allocated again later.
                self.buffers = self.buffers.saturating_sub(1);
                return Ok(());
            }
        }
        if let Some(t) = src.tracker.as_deref_mut() {
            t.sent(region, &runs, &data, self.page_size);
        }
        Counters::add(&self.counters.read_bytes, data.len() as u64);
        Counters::add(&self.counters.batches, 1);
        let jobs = self.jobs.as_ref().ok_or_else(Self::stopped)?;
        let sent = match jobs.try_send(Job { batch, runs, data }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => {
                Counters::add(&self.counters.busy, 1);
                jobs.send(job).map_err(|_| ())
            }
            Err(TrySendError::Disconnected(_)) => Err(()),
        };
        if sent.is_err() {
            return Err(self.broken());
        }
        self.jobs_sent += 1;
        Ok(())
    }

    /// Read `runs` page by page into `data`, keeping the pages that can be
    /// read (back to back) and noting the others in `unreadable`.
    fn read_readable(
        &mut self,
        mem: &MemReader,
        region: &Region,
        runs: &[Run],
        data: &mut Vec<u8>,
    ) -> Vec<Run> {
        let ps = self.page_size as usize;
        let mut ok = Vec::new();
        let mut w = 0;
        for run in runs {
            for p in run.first..run.first + run.count as u64 {
                let addr = region.start + p * ps as u64;
                if mem.read(addr, &mut data[w..w + ps]).is_ok() {
                    crate::pages::push_run(&mut ok, p, 1);
                    w += ps;
                } else {
                    self.unreadable
                        .push(region.start, Run { first: p, count: 1 });
                }
            }
        }
        data.truncate(w);
        ok
    }

    /// End `round` and wait until its RoundEnd frame is on the wire.
    pub fn end_round(&mut self, round: u32) -> Result<(), SendError> {
        self.control(Control::RoundEnd(round))?;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(SendError::Cancelled);
            }
            match self.round_done.recv_timeout(Duration::from_millis(50)) {
                Ok(r) if r == round => return Ok(()),
                Ok(_) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(self.broken());
                }
            }
        }
    }

    /// Queue the End frame and wait for the writer to put everything out.
    pub fn finish(&mut self, rounds: u32) -> Result<Totals, SendError> {
        if let Some(out) = &self.out {
            out.send(Out::End {
                after_jobs: self.jobs_sent,
                rounds,
            })
            .map_err(|_| Self::stopped())?;
        }
        self.shutdown()?.ok_or_else(Self::stopped)
    }

    /// Close the queues and join every thread. The writer's totals if it
    /// wrote End, `None` if stopped before; an error if the connection
    /// failed.
    pub fn shutdown(&mut self) -> Result<Option<Totals>, SendError> {
        self.jobs = None;
        self.out = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(exit)) => {
                self.returned = Some(exit.sock);
                exit.result
                    .map_err(|e| SendError::Connection(e.to_string()))
            }
            Some(Err(_)) => Err(SendError::Connection("writer thread panicked".into())),
            None => Ok(None),
        }
    }

    /// The write half, once the writer has ended.
    pub fn take_writer(&mut self) -> Option<transport::Writer> {
        self.returned.take()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
