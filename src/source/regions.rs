//! The regions the receiver knows, what it holds of them, and how the
//! target's mappings changed since the last round.

use super::SendError;
use crate::pages::PageSet;
use crate::process::{Pagemap, Region, RegionKind, PM_PRESENT, PM_SWAPPED};
use crate::protocol::{RegionEntry, Run};

/// One region and the pages the receiver may hold data for.
pub struct Tracked {
    pub region: Region,
    /// Pages sent (normal or zero) and not discarded since.
    pub sent: PageSet,
}

pub struct RegionState {
    pub list: Vec<Tracked>,
    page_size: u64,
}

/// Pages scanned per pagemap read.
const SCAN: usize = 512;

impl RegionState {
    pub fn new(regions: Vec<Region>, page_size: u64) -> RegionState {
        RegionState {
            list: regions
                .into_iter()
                .map(|region| Tracked {
                    region,
                    sent: PageSet::default(),
                })
                .collect(),
            page_size,
        }
    }

    pub fn regions(&self) -> Vec<Region> {
        self.list.iter().map(|t| t.region.clone()).collect()
    }

    pub fn table(&self) -> Vec<RegionEntry> {
        self.list
            .iter()
            .map(|t| RegionEntry {
                start: t.region.start,
                end: t.region.end,
                prot: t.region.prot,
                name: t.region.name.clone(),
            })
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.list.iter().map(|t| t.region.len()).sum()
    }

    /// Take a new map reading. Regions keep what the receiver holds when
    /// their start is unchanged (the receiver keeps their file, resized);
    /// anything else is fresh. Returns whether the table changed and the
    /// fresh parts, as (new index, page run).
    pub fn update(&mut self, new: Vec<Region>) -> (bool, Vec<(usize, Run)>) {
        let ps = self.page_size;
        let changed = new.len() != self.list.len()
            || new.iter().zip(&self.list).any(|(n, o)| {
                n.start != o.region.start
                    || n.end != o.region.end
                    || n.prot != o.region.prot
                    || n.name != o.region.name
            });
        let mut old: Vec<Option<Tracked>> = std::mem::take(&mut self.list)
            .into_iter()
            .map(Some)
            .collect();
        let mut fresh = Vec::new();
        for (i, r) in new.into_iter().enumerate() {
            let pages = r.len() / ps;
            let prev = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| o.region.start == r.start))
                .and_then(Option::take);
            let sent = match prev {
                Some(mut t) => {
                    let old_pages = t.region.len() / ps;
                    if pages > old_pages {
                        crate::pages::push_run(
                            fresh_runs(&mut fresh, i),
                            old_pages,
                            pages - old_pages,
                        );
                    } else {
                        t.sent.truncate(pages);
                    }
                    t.sent
                }
                None => {
                    crate::pages::push_run(fresh_runs(&mut fresh, i), 0, pages);
                    PageSet::default()
                }
            };
            self.list.push(Tracked { region: r, sent });
        }
        let flat = fresh
            .into_iter()
            .flat_map(|(i, runs)| runs.into_iter().map(move |r| (i, r)))
            .collect();
        (changed, flat)
    }

    /// Pages the receiver may hold data for that are no longer populated in
    /// private anonymous regions (MADV_DONTNEED, a dropped huge page): they
    /// must be sent again as zero. Their sent marks are cleared.
    pub fn discards(&mut self, pagemap: &Pagemap) -> Result<Vec<Vec<Run>>, SendError> {
        let ps = self.page_size;
        let mut out = vec![Vec::new(); self.list.len()];
        let mut entries = vec![0u64; SCAN];
        for (i, t) in self.list.iter_mut().enumerate() {
            if t.region.kind != RegionKind::PrivateAnon {
                continue;
            }
            let pages = t.region.len() / ps;
            for (first, count) in t.sent.chunk_spans() {
                let end = (first + count).min(pages);
                let mut p = first;
                while p < end {
                    let n = (end - p).min(SCAN as u64) as usize;
                    pagemap.read(t.region.start + p * ps, &mut entries[..n])?;
                    for (j, e) in entries[..n].iter().enumerate() {
                        let page = p + j as u64;
                        if e & (PM_PRESENT | PM_SWAPPED) == 0 && t.sent.contains(page) {
                            t.sent.remove(page);
                            crate::pages::push_run(&mut out[i], page, 1);
                        }
                    }
                    p += n as u64;
                }
            }
        }
        Ok(out)
    }

    /// The pages of `runs` in region `i` that hold data: for private
    /// anonymous memory those present or swapped; elsewhere all (absent
    /// pages of file or shared mappings still have contents). Returns the
    /// populated runs and the number of pages skipped.
    pub fn populated(
        &self,
        pagemap: &Pagemap,
        i: usize,
        runs: &[Run],
    ) -> Result<(Vec<Run>, u64), SendError> {
        let t = &self.list[i];
        if t.region.kind != RegionKind::PrivateAnon {
            return Ok((runs.to_vec(), 0));
        }
        let ps = self.page_size;
        let mut out = Vec::new();
        let mut skipped = 0;
        let mut entries = vec![0u64; SCAN];
        for r in runs {
            let end = r.first + r.count as u64;
            let mut p = r.first;
            while p < end {
                let n = (end - p).min(SCAN as u64) as usize;
                pagemap.read(t.region.start + p * ps, &mut entries[..n])?;
                for (j, e) in entries[..n].iter().enumerate() {
                    if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                        crate::pages::push_run(&mut out, p + j as u64, 1);
                    } else {
                        skipped += 1;
                    }
                }
                p += n as u64;
            }
        }
        Ok((out, skipped))
    }
}

fn fresh_runs(fresh: &mut Vec<(usize, Vec<Run>)>, i: usize) -> &mut Vec<Run> {
    if fresh.last().is_none_or(|(j, _)| *j != i) {
        fresh.push((i, Vec::new()));
    }
    &mut fresh.last_mut().expect("just pushed").1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PROT_R;

    fn r(start: u64, end: u64) -> Region {
        Region {
            start,
            end,
            prot: PROT_R,
            name: String::new(),
            kind: RegionKind::PrivateAnon,
        }
    }

    #[test]
    fn update_finds_fresh_parts() {
        let mut s = RegionState::new(vec![r(0x1000, 0x3000), r(0x10000, 0x20000)], 0x1000);
        s.list[0].sent.insert_run(0, 2);
        s.list[1].sent.insert_run(0, 16);
        // Region 0 grows by two pages, region 1 shrinks, a new one appears.
        let (changed, fresh) = s.update(vec![
            r(0x1000, 0x5000),
            r(0x10000, 0x18000),
            r(0x30000, 0x31000),
        ]);
        assert!(changed);
        assert_eq!(
            fresh,
            vec![
                (0, Run { first: 2, count: 2 }),
                (2, Run { first: 0, count: 1 })
            ]
        );
        assert!(s.list[0].sent.contains(1));
        assert!(!s.list[1].sent.contains(8) && s.list[1].sent.contains(7));
        let (changed, fresh) = s.update(s.regions());
        assert!(!changed && fresh.is_empty());
    }
}
