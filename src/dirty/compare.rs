//! Dirty tracking by comparison: the XXH3 of every page as it was sent; a
//! page is dirty when its current hash differs. Works on any kernel.
//!
//! The hashes are taken from the data actually sent (the `sent` hook), not
//! from a separate read, so a page that changes A → B → A between reads can
//! never leave the receiver with B.

use std::collections::HashMap;

use super::{Dirty, DirtyError, DirtyTracker, Tracking};
use crate::process::{Attachment, MemReader, Pagemap, Region, RegionKind, PM_PRESENT, PM_SWAPPED};
use crate::protocol::Run;

/// Pages read per pass.
const CHUNK_PAGES: u64 = 256;

pub struct CompareTracker {
    page_size: u64,
    mem: MemReader,
    pagemap: Pagemap,
    zero_hash: u64,
    /// Per region (start, end): the hash of each page as the receiver has it.
    hashes: HashMap<(u64, u64), Vec<u64>>,
    buf: Vec<u8>,
    entries: Vec<u64>,
}

impl CompareTracker {
    pub fn new(pid: i32, page_size: u64) -> Result<CompareTracker, DirtyError> {
        Ok(CompareTracker {
            page_size,
            mem: MemReader::open(pid)?,
            pagemap: Pagemap::open(pid, page_size)?,
            zero_hash: xxhash_rust::xxh3::xxh3_64(&vec![0u8; page_size as usize]),
            hashes: HashMap::new(),
            buf: vec![0u8; (CHUNK_PAGES * page_size) as usize],
            entries: vec![0u64; CHUNK_PAGES as usize],
        })
    }

    /// Regions tracked.
    pub fn tracked(&self) -> usize {
        self.hashes.len()
    }

    /// A table for `r`: the receiver starts with zeros (holes).
    fn table_for(&mut self, r: &Region) -> &mut Vec<u64> {
        let pages = (r.len() / self.page_size) as usize;
        let zero = self.zero_hash;
        self.hashes
            .entry((r.start, r.end))
            .or_insert_with(|| vec![zero; pages])
    }

    fn scan(&mut self, r: &Region, out: &mut Vec<Run>) -> Result<(), DirtyError> {
        let ps = self.page_size;
        let pages = r.len() / ps;
        let zero = self.zero_hash;
        let mut table = self.hashes.remove(&(r.start, r.end)).unwrap_or_default();
        table.resize(pages as usize, zero);
        let mut page = 0u64;
        let result = (|| {
            while page < pages {
                let n = (pages - page).min(CHUNK_PAGES);
                let addr = r.start + page * ps;
                let skip_absent = r.kind == RegionKind::PrivateAnon;
                if skip_absent {
                    self.pagemap.read(addr, &mut self.entries[..n as usize])?;
                }
                // Read the whole chunk when anything in it may hold data.
                let any = !skip_absent
                    || self.entries[..n as usize]
                        .iter()
                        .any(|e| e & (PM_PRESENT | PM_SWAPPED) != 0);
                if any {
                    self.mem.read(addr, &mut self.buf[..(n * ps) as usize])?;
                }
                for i in 0..n {
                    let h = if any {
                        let p = (i * ps) as usize;
                        xxhash_rust::xxh3::xxh3_64(&self.buf[p..p + ps as usize])
                    } else {
                        zero
                    };
                    if h != table[(page + i) as usize] {
                        crate::pages::push_run(out, page + i, 1);
                    }
                }
                page += n;
            }
            Ok::<(), DirtyError>(())
        })();
        self.hashes.insert((r.start, r.end), table);
        result
    }
}

impl DirtyTracker for CompareTracker {
    fn method(&self) -> Tracking {
        Tracking::Compare
    }

    fn arm(&mut self, _att: &mut Attachment, regions: &[Region]) -> Result<(), DirtyError> {
        for r in regions {
            self.table_for(r);
        }
        Ok(())
    }

    fn collect(
        &mut self,
        _att: Option<&mut Attachment>,
        regions: &[Region],
        fresh: &[(usize, Run)],
    ) -> Result<Dirty, DirtyError> {
        let ps = self.page_size;
        let mut dirty = Dirty {
            runs: vec![Vec::new(); regions.len()],
            refresh: Vec::new(),
        };
        // Carry tables over to resized regions (same start), drop the rest.
        let mut old: HashMap<u64, Vec<u64>> =
            self.hashes.drain().map(|((s, _), t)| (s, t)).collect();
        for (i, r) in regions.iter().enumerate() {
            let pages = (r.len() / ps) as usize;
            match old.remove(&r.start) {
                Some(mut t) => {
                    t.resize(pages, self.zero_hash);
                    self.hashes.insert((r.start, r.end), t);
                }
                None => {
                    self.hashes
                        .insert((r.start, r.end), vec![self.zero_hash; pages]);
                    if !fresh.iter().any(|(fi, _)| *fi == i) {
                        dirty.refresh.push(i);
                        continue;
                    }
                }
            }
            let mut runs = Vec::new();
            self.scan(r, &mut runs)?;
            dirty.runs[i] = runs;
        }
        Ok(dirty)
    }

    fn sent(&mut self, region: &Region, runs: &[Run], data: &[u8], page_size: u64) {
        let Some(table) = self.hashes.get_mut(&(region.start, region.end)) else {
            return;
        };
        let mut pages = data.chunks_exact(page_size as usize);
        for r in runs {
            for p in r.first..r.first + r.count as u64 {
                if let (Some(slot), Some(bytes)) = (table.get_mut(p as usize), pages.next()) {
                    *slot = xxhash_rust::xxh3::xxh3_64(bytes);
                }
            }
        }
    }

    fn finish(&mut self, _att: Option<&mut Attachment>) {
        self.hashes.clear();
    }
}
