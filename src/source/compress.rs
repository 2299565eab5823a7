//! The compression workers: each takes a batch of pages, finds the zero
//! pages, compresses the rest with its own reusable context, and hands the
//! encoded frames to the writer.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::adaptive::{Adaptive, AutoWorker};
use super::batch::{Encoded, Job, JobTotals, Out};
use crate::codec::{Compression, Compressor};
use crate::pages::Run;
use crate::protocol::{self, Control, WireCodec};
use crate::stats::Counters;

/// How the workers compress.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    pub threads: usize,
    pub compression: Compression,
    pub level: i32,
    pub page_size: usize,
}

/// The queues a worker serves: jobs in, their buffers back through
/// `free`, frames out to the writer in buffers taken from `spare`.
#[derive(Clone)]
pub struct WorkerQueues {
    pub jobs: Receiver<Job>,
    pub free: Sender<Vec<u8>>,
    pub out: Sender<Out>,
    pub spare: Receiver<Vec<u8>>,
}

/// Spawn the workers. Each ends when `jobs` closes or `out` does.
pub fn spawn_workers(
    cfg: &WorkerConfig,
    queues: &WorkerQueues,
    counters: &Arc<Counters>,
    adaptive: Option<&Arc<Adaptive>>,
) -> Result<Vec<JoinHandle<()>>, crate::codec::CodecError> {
    let mut handles = Vec::with_capacity(cfg.threads);
    for index in 0..cfg.threads {
        // Create the context here so a bad level fails before any thread runs.
        let compressor = match adaptive {
            Some(ctl) => Strategy::Auto(AutoWorker::new()?, ctl.clone()),
            None => Strategy::Fixed(Compressor::new(cfg.compression, cfg.level)?),
        };
        let worker = Worker {
            compressor,
            page_size: cfg.page_size,
            scratch: Vec::new(),
            flags: Vec::new(),
        };
        let (queues, counters) = (queues.clone(), counters.clone());
        let h = std::thread::Builder::new()
            .name(format!("compress-{index}"))
            .spawn(move || worker.serve(index, queues, counters))
            .expect("spawn compression thread");
        handles.push(h);
    }
    Ok(handles)
}

enum Strategy {
    Fixed(Compressor),
    Auto(AutoWorker, Arc<Adaptive>),
}

impl Strategy {
    fn candidate(&self) -> Option<usize> {
        match self {
            Strategy::Fixed(_) => None,
            Strategy::Auto(w, _) => Some(w.last),
        }
    }

    fn compress(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Option<WireCodec> {
        match self {
            Strategy::Fixed(c) => c.compress(raw, out),
            Strategy::Auto(w, ctl) => w.compress(ctl, raw, out),
        }
    }
}

struct Worker {
    compressor: Strategy,
    page_size: usize,
    scratch: Vec<u8>,
    flags: Vec<bool>,
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise OR over 64-byte blocks; the compiler vectorises this.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits.
        unsafe { page.align_to::<u64>() }
    };
    if head.iter().chain(tail).any(|&b| b != 0) {
        return false;
    }
    words
        .chunks(8)
        .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

/// Split `runs` (with their pages in `data`) into zero and non-zero runs.
/// `is_zero_page` receives one flag per page, in order.
fn split_zero(
    runs: &[Run],
    data: &[u8],
    page_size: usize,
    is_zero_page: &mut Vec<bool>,
) -> (Vec<Run>, Vec<Run>) {
    let mut zero: Vec<Run> = Vec::new();
    let mut normal: Vec<Run> = Vec::new();
    is_zero_page.clear();
    let mut pages = data.chunks_exact(page_size);
    for r in runs {
        for p in r.first..r.first + r.count as u64 {
            let z = pages.next().is_some_and(is_zero);
            is_zero_page.push(z);
            crate::pages::push_run(if z { &mut zero } else { &mut normal }, p, 1);
        }
    }
    (zero, normal)
}

impl Worker {
    fn serve(mut self, index: usize, q: WorkerQueues, counters: Arc<Counters>) {
        for job in q.jobs.iter() {
            let t = Instant::now();
            let mut buf = q.spare.try_recv().unwrap_or_default();
            buf.clear();
            let totals = self.encode(&job, &mut buf, &counters);
            let raw_bytes = job.data.len() as u64;
            let candidate = self.compressor.candidate();
            counters.worker_busy_ns[index].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            let _ = q.free.send(job.data);
            let encoded = Encoded {
                bytes: buf,
                totals,
                raw_bytes,
                candidate,
            };
            if q.out.send(Out::Frames(encoded)).is_err() {
                break;
            }
        }
    }

    fn encode(&mut self, job: &Job, buf: &mut Vec<u8>, counters: &Counters) -> JobTotals {
        let ps = self.page_size;
        let (zero, normal) = split_zero(&job.runs, &job.data, ps, &mut self.flags);
        let mut t = JobTotals::default();
        if !zero.is_empty() {
            t.zero_pages = crate::pages::count(&zero);
            t.zero_frames = 1;
            Control::Zero {
                round: job.batch.round,
                region: job.batch.region,
                runs: zero,
            }
            .encode(buf);
        }
        Counters::add(&counters.zero_pages, t.zero_pages);
        if normal.is_empty() {
            return t;
        }
        t.normal_pages = crate::pages::count(&normal);
        t.page_frames = 1;
        // The non-zero pages, contiguous: the job's data itself when it has
        // no zero page, else gathered into scratch.
        let raw: &[u8] = if t.zero_pages == 0 {
            &job.data
        } else {
            self.scratch.clear();
            for (page, &z) in job.data.chunks_exact(ps).zip(&self.flags) {
                if !z {
                    self.scratch.extend_from_slice(page);
                }
            }
            &self.scratch
        };
        let compressor = &mut self.compressor;
        let e = protocol::encode_pages(
            buf,
            job.batch.round,
            job.batch.region,
            &normal,
            raw,
            |raw, out| compressor.compress(raw, out),
        );
        if e.codec == WireCodec::Raw {
            Counters::add(&counters.raw_batches, 1);
        } else {
            Counters::add(&counters.compressed_pages, t.normal_pages);
            Counters::add(&counters.compressed_bytes, e.data_len as u64);
        }
        Counters::add(&counters.normal_pages, t.normal_pages);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&page[1..]));
    }

    #[test]
    fn split_zero_runs() {
        let ps = 16;
        let mut data = vec![0u8; ps * 5];
        data[ps] = 1; // page 1 of run 1
        data[4 * ps + 3] = 9; // page 21
        let runs = [
            Run { first: 0, count: 3 },
            Run {
                first: 20,
                count: 2,
            },
        ];
        let mut flags = Vec::new();
        let (z, n) = split_zero(&runs, &data, ps, &mut flags);
        assert_eq!(flags, [true, false, true, true, false]);
        assert_eq!(
            z,
            vec![
                Run { first: 0, count: 1 },
                Run { first: 2, count: 1 },
                Run {
                    first: 20,
                    count: 1
                }
            ]
        );
        assert_eq!(
            n,
            vec![
                Run { first: 1, count: 1 },
                Run {
                    first: 21,
                    count: 1
                }
            ]
        );
    }
}
