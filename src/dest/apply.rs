//! Decompression workers: each decompresses a Pages frame with its own
//! context, checks the raw checksum, and copies the pages into the region's
//! shared mapping.
//!
//! Ordering: the dispatcher never hands out two frames that touch the same
//! page within a round ([`RoundMap`]), and waits for every frame of a round
//! to be applied before it reads past the round's RoundEnd. So two workers
//! never write the same page at once, and an older copy of a page can never
//! land after a newer one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::staging::RegionFile;
use crate::codec::Decompressor;
use crate::pages::PageSet;
use crate::protocol::{PagesHeader, WireCodec};

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
}

// SAFETY: workers write through raw pointers into disjoint page ranges of
// the mappings (guaranteed by RoundMap and the round barrier); the files and
// mappings themselves are only read.
unsafe impl Sync for Regions {}
// SAFETY: as above; MmapRaw and File are Send.
unsafe impl Send for Regions {}

/// Start `threads` workers. Each reports `Ok(())` or an error message per
/// job on `done`, and returns payload buffers on `free`.
pub fn spawn_workers(
    threads: usize,
    jobs: Receiver<ApplyJob>,
    done: Sender<Result<(), String>>,
    free: Sender<Vec<u8>>,
    busy_ns: Arc<Vec<AtomicU64>>,
) -> Vec<JoinHandle<()>> {
    (0..threads)
        .map(|index| {
            let (jobs, done, free, busy_ns) =
                (jobs.clone(), done.clone(), free.clone(), busy_ns.clone());
            std::thread::Builder::new()
                .name(format!("decompress-{index}"))
                .spawn(move || {
                    let mut d = match Decompressor::new() {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = done.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let mut raw = Vec::new();
                    for job in jobs.iter() {
                        let t = Instant::now();
                        let r = apply(&job.regions, &mut d, &job.header, &job.payload, &mut raw);
                        busy_ns[index].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                        // Release the region files before reporting, so the
                        // dispatcher owns them alone after a barrier.
                        let ApplyJob {
                            payload, regions, ..
                        } = job;
                        drop(regions);
                        let _ = free.try_send(payload);
                        if done.send(r).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn decompression thread")
        })
        .collect()
}

fn apply(
    regions: &Regions,
    d: &mut Decompressor,
    h: &PagesHeader,
    payload: &[u8],
    raw: &mut Vec<u8>,
) -> Result<(), String> {
    let data = &payload[h.data_offset..];
    // Stored pages are checked and copied straight from the payload.
    let raw: &[u8] = if h.codec == WireCodec::Raw {
        data
    } else {
        raw.resize(h.raw_len as usize, 0);
        d.decompress(h.codec, data, raw)
            .map_err(|e| format!("region {} round {}: {e}", h.region, h.round))?;
        raw
    };
    if raw.len() != h.raw_len as usize || xxhash_rust::xxh3::xxh3_64(raw) != h.raw_xxh3 {
        return Err(format!(
            "checksum mismatch in a batch of region {} (page {}): data corrupted",
            h.region, h.runs[0].first
        ));
    }
    let rf = &regions.files[h.region as usize];
    let ps = regions.page_size as usize;
    let mut off = 0;
    for run in &h.runs {
        let len = run.count as usize * ps;
        let at = run.first as usize * ps;
        // The dispatcher checked that the run lies inside the region.
        debug_assert!(at + len <= rf.len() as usize);
        // SAFETY: [at, at+len) lies inside the mapping (checked by the
        // dispatcher against the region's page count), and no other thread
        // writes these pages now (RoundMap + round barrier).
        unsafe {
            std::ptr::copy_nonoverlapping(raw[off..].as_ptr(), rf.ptr().add(at), len);
        }
        off += len;
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
