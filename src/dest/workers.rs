//! The worker pool: decompression workers that each decompress a Pages
//! frame with their own context into the region's shared mapping (a frame
//! of one run straight into place, others through a bounce buffer), and
//! check the raw checksum; and [`WorkerPool`], the dispatcher's
//! handle on them (spawn, submit, poll, barrier, finish).
//!
//! Ordering: the dispatcher never hands out two frames that touch the same
//! page within a round ([`RoundMap`]), and waits for every frame of a round
//! to be applied ([`WorkerPool::barrier`]) before it reads past the round's
//! RoundEnd. So two workers never write the same page at once, and an older
//! copy of a page can never land after a newer one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};

use super::staging::RegionFile;
use crate::codec::{CodecError, Decompressor};
use crate::pages::PageSet;
use crate::protocol::{PagesHeader, WireCodec};
use crate::restore::{shell_wants, Mirror};

/// Why a frame could not be applied, or the workers could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A worker could not create its decompression context.
    #[error("{0}")]
    Init(CodecError),
    /// The frame's data does not decompress.
    #[error("region {region} round {round}: {source}")]
    Decompress {
        region: u32,
        round: u32,
        source: CodecError,
    },
    /// The pages came out a different size than the header says.
    #[error("size mismatch in a batch of region {region} (page {page}): {len} bytes, expected {expected}")]
    Size {
        region: u32,
        page: u64,
        len: usize,
        expected: u32,
    },
    /// The pages do not match the checksum the source computed.
    #[error("checksum mismatch in a batch of region {region} (page {page}): data corrupted")]
    Checksum { region: u32, page: u64 },
    /// The workers are gone (they stopped, or the pool was finished).
    #[error("decompression workers stopped")]
    Stopped,
}

/// One frame to apply, with the region files of its round.
pub struct ApplyJob {
    pub header: PagesHeader,
    pub payload: Vec<u8>,
    pub regions: Arc<Regions>,
}

/// Region files shared with the workers.
pub struct Regions {
    pub files: Vec<RegionFile>,
    pub page_size: u64,
    /// `--restore`: the process built during pre-copy, which gets a copy
    /// of every page of the regions it holds ([`crate::restore::Shell`]).
    pub mirror: Option<Arc<Mirror>>,
}

impl Regions {
    /// No regions yet (before the first table).
    pub fn empty(page_size: u64) -> Regions {
        Regions {
            files: Vec::new(),
            page_size,
            mirror: None,
        }
    }
}

// SAFETY: workers write through raw pointers into disjoint page ranges of
// the mappings (guaranteed by RoundMap and the round barrier); the files and
// mappings themselves are only read.
unsafe impl Sync for Regions {}
// SAFETY: as above; MmapRaw and File are Send.
unsafe impl Send for Regions {}

/// The dispatcher's handle on the decompression workers. Every submitted
/// job reports once on `done`; payload buffers come back on `free`.
pub struct WorkerPool {
    jobs: Option<Sender<ApplyJob>>,
    done: Receiver<Result<(), ApplyError>>,
    free: Receiver<Vec<u8>>,
    in_flight: usize,
    handles: Vec<JoinHandle<()>>,
    busy_ns: Arc<Vec<AtomicU64>>,
}

impl WorkerPool {
    /// Start `threads` workers.
    pub fn spawn(threads: usize) -> WorkerPool {
        let busy_ns = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let (job_tx, job_rx) = bounded::<ApplyJob>(threads * 2);
        let (done_tx, done_rx) = bounded(threads * 4 + 8);
        let (free_tx, free_rx) = bounded(threads * 4 + 4);
        let handles = (0..threads)
            .map(|index| {
                let worker = Worker {
                    index,
                    jobs: job_rx.clone(),
                    done: done_tx.clone(),
                    free: free_tx.clone(),
                    busy_ns: busy_ns.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("decompress-{index}"))
                    .spawn(move || worker.run())
                    .expect("spawn decompression thread")
            })
            .collect();
        WorkerPool {
            jobs: Some(job_tx),
            done: done_rx,
            free: free_rx,
            in_flight: 0,
            handles,
            busy_ns,
        }
    }

    /// Nanoseconds each worker spent applying frames.
    pub fn busy_ns(&self) -> &[AtomicU64] {
        &self.busy_ns
    }

    /// A payload buffer a worker is done with, if one is back.
    pub fn spare_buffer(&self) -> Option<Vec<u8>> {
        self.free.try_recv().ok()
    }

    fn take_result(&mut self, r: Result<(), ApplyError>) -> Result<(), ApplyError> {
        // A worker that could not start reports without a job.
        self.in_flight = self.in_flight.saturating_sub(1);
        r
    }

    /// Collect finished jobs without waiting; the first error ends it.
    pub fn poll(&mut self) -> Result<(), ApplyError> {
        while let Ok(r) = self.done.try_recv() {
            self.take_result(r)?;
        }
        Ok(())
    }

    /// Hand a frame to the workers, waiting for room in the queue.
    pub fn submit(&mut self, job: ApplyJob) -> Result<(), ApplyError> {
        let jobs = self.jobs.clone().ok_or(ApplyError::Stopped)?;
        // Keep `done` drained while waiting for room, so workers never block.
        let mut job = job;
        loop {
            match jobs.send_timeout(job, Duration::from_millis(50)) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(j)) => {
                    job = j;
                    self.poll()?;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Err(ApplyError::Stopped),
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Wait until every submitted job is applied.
    pub fn barrier(&mut self) -> Result<(), ApplyError> {
        while self.in_flight > 0 {
            let r = self.done.recv().map_err(|_| ApplyError::Stopped)?;
            self.take_result(r)?;
        }
        Ok(())
    }

    /// Close the job queue, wait for what is in flight, and join the
    /// workers; returns the first error among the jobs still in flight.
    /// Afterwards no worker touches a mapping. Calling it again does
    /// nothing.
    pub fn finish(&mut self) -> Result<(), ApplyError> {
        self.jobs = None;
        let mut first = Ok(());
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(r) => {
                    if let Err(e) = self.take_result(r) {
                        if first.is_ok() {
                            first = Err(e);
                        }
                    }
                }
                Err(_) => break,
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        first
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// One worker thread's ends of the channels.
struct Worker {
    index: usize,
    jobs: Receiver<ApplyJob>,
    done: Sender<Result<(), ApplyError>>,
    free: Sender<Vec<u8>>,
    busy_ns: Arc<Vec<AtomicU64>>,
}

impl Worker {
    /// Apply jobs until the queue closes; one report on `done` per job.
    fn run(self) {
        let mut d = match Decompressor::new() {
            Ok(d) => d,
            Err(e) => {
                let _ = self.done.send(Err(ApplyError::Init(e)));
                return;
            }
        };
        let mut bounce = Vec::new();
        for job in self.jobs.iter() {
            let t = Instant::now();
            let r = apply(&job.regions, &mut d, &job.header, &job.payload, &mut bounce);
            self.busy_ns[self.index].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            // Release the region files before reporting, so the
            // dispatcher owns them alone after a barrier.
            let ApplyJob {
                payload, regions, ..
            } = job;
            drop(regions);
            let _ = self.free.try_send(payload);
            if self.done.send(r).is_err() {
                break;
            }
        }
    }
}

/// Runs at least this long are populated in one call before the copy
/// (one fault per page otherwise).
const POPULATE_AHEAD: u32 = 16;

fn apply(
    regions: &Regions,
    d: &mut Decompressor,
    h: &PagesHeader,
    payload: &[u8],
    bounce: &mut Vec<u8>,
) -> Result<(), ApplyError> {
    let data = &payload[h.data_offset..];
    let rf = &regions.files[h.region as usize];
    let ps = regions.page_size as usize;
    let page = h.runs[0].first;
    let decompress = |d: &mut Decompressor, out: &mut [u8]| {
        d.decompress(h.codec, data, out)
            .map_err(|source| ApplyError::Decompress {
                region: h.region,
                round: h.round,
                source,
            })
    };
    // The decoder header checked that the runs make `raw_len` bytes.
    debug_assert_eq!(
        h.runs.iter().map(|r| r.count as usize).sum::<usize>() * ps,
        h.raw_len as usize
    );
    // Where the pages end up before they are checked: a frame of one run
    // (the bulk copy's usual case) is decompressed straight into the
    // image's mapping; stored pages are checked in the payload; other
    // frames go through a bounce buffer and are copied run by run. Pages
    // that fail the check may already be in the image: the session then
    // fails, and a failed session commits nothing.
    let (raw, direct): (&[u8], bool) = match &h.runs[..] {
        _ if h.codec == WireCodec::Raw => (data, false),
        [run] => {
            let at = run.first as usize * ps;
            let len = h.raw_len as usize;
            debug_assert!(at + len <= rf.len() as usize);
            if run.count >= POPULATE_AHEAD {
                rf.populate(at, len);
            }
            // SAFETY: [at, at+len) lies inside the mapping (checked by the
            // dispatcher against the region's page count), and no other
            // thread touches these pages now (RoundMap + round barrier).
            let out = unsafe { std::slice::from_raw_parts_mut(rf.ptr().add(at), len) };
            decompress(d, out)?;
            (out, true)
        }
        _ => {
            bounce.resize(h.raw_len as usize, 0);
            decompress(d, bounce)?;
            (bounce, false)
        }
    };
    if raw.len() != h.raw_len as usize {
        return Err(ApplyError::Size {
            region: h.region,
            page,
            len: raw.len(),
            expected: h.raw_len,
        });
    }
    if xxhash_rust::xxh3::xxh3_64(raw) != h.raw_xxh3 {
        return Err(ApplyError::Checksum {
            region: h.region,
            page,
        });
    }
    let mut off = 0;
    for run in &h.runs {
        let len = run.count as usize * ps;
        let pages = &raw[off..off + len];
        off += len;
        // Each page hashed once more while it is hot, so that the commit
        // digests the image without reading it again.
        rf.record(run.first, pages);
        if direct {
            continue;
        }
        let at = run.first as usize * ps;
        if run.count >= POPULATE_AHEAD {
            rf.populate(at, len);
        }
        debug_assert!(at + len <= rf.len() as usize);
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(pages.as_ptr(), rf.ptr().add(at), len) };
    }
    if let Some(m) = regions.mirror.as_ref().filter(|_| shell_wants(&rf.entry)) {
        let mut off = 0;
        let parts: Vec<(u64, &[u8])> = h
            .runs
            .iter()
            .map(|run| {
                let len = run.count as usize * ps;
                let part = (rf.entry.start + run.first * ps as u64, &raw[off..off + len]);
                off += len;
                part
            })
            .collect();
        m.write(&parts);
    }
    Ok(())
}

/// Pages touched in the current round, to refuse a page sent twice in one
/// round (which would let two workers race on it).
#[derive(Default)]
pub struct RoundMap {
    regions: HashMap<u32, PageSet>,
}

impl RoundMap {
    /// Mark pages [first, first+count) of `region`; false if any was
    /// already marked this round.
    pub fn mark(&mut self, region: u32, first: u64, count: u32) -> bool {
        self.regions
            .entry(region)
            .or_default()
            .insert_run(first, count as u64)
    }

    /// Start a new round.
    pub fn clear(&mut self) {
        self.regions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_map_refuses_repeats() {
        let mut m = RoundMap::default();
        assert!(m.mark(0, 10, 5));
        assert!(m.mark(1, 10, 5));
        assert!(m.mark(0, 15, 5000));
        assert!(!m.mark(0, 14, 1));
        assert!(!m.mark(0, 4000, 1));
        m.clear();
        assert!(m.mark(0, 14, 1));
    }
}
