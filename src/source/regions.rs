//! The regions the receiver knows, what it holds of them, how the
//! target's mappings changed since the last round, and what each round
//! sends ([`RoundPlan`]) or leaves for later ([`Carried`]).

use super::SendError;
use crate::dirty::Dirty;
use crate::pages::{push_run, union, PageSet, Run};
use crate::process::{holds_data, Pagemap, Region, RegionKind, PM_PRESENT, PM_SWAPPED};
use crate::protocol::RegionEntry;

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
                        push_run(fresh_runs(&mut fresh, i), old_pages, pages - old_pages);
                    } else {
                        t.sent.truncate(pages);
                    }
                    t.sent
                }
                None => {
                    push_run(fresh_runs(&mut fresh, i), 0, pages);
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
                            push_run(&mut out[i], page, 1);
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
    /// pages of file or shared mappings still have contents). In the
    /// `first` round (nothing sent yet) a uffd-wp marker on a page never
    /// populated holds nothing either, so a sparse region costs its
    /// populated pages, not its size; later, a marker may stand for a page
    /// dropped since it was sent, which must go again (as zeros), so it
    /// counts. Returns the populated runs and the number of pages skipped.
    pub fn populated(
        &self,
        pagemap: &Pagemap,
        i: usize,
        runs: &[Run],
        first: bool,
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
                    let data = if first {
                        holds_data(*e)
                    } else {
                        e & (PM_PRESENT | PM_SWAPPED) != 0
                    };
                    if data {
                        push_run(&mut out, p + j as u64, 1);
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

/// Pages due but not sent yet (collected in the round that decided to go
/// to downtime, or unreadable this round), keyed by region start: region
/// indexes change when the table does.
#[derive(Debug, Default, Clone)]
pub struct Carried(Vec<(u64, Run)>);

impl Carried {
    pub fn push(&mut self, region_start: u64, run: Run) {
        self.0.push((region_start, run));
    }

    pub fn pages(&self) -> u64 {
        self.0.iter().map(|(_, r)| r.count as u64).sum()
    }

    /// The runs of the region at `start`, clipped to its `pages`.
    fn runs_for(&self, start: u64, pages: u64) -> Vec<Run> {
        let mut out = Vec::new();
        for (_, r) in self.0.iter().filter(|(s, _)| *s == start) {
            if r.first < pages {
                push_run(&mut out, r.first, r.end().min(pages) - r.first);
            }
        }
        out
    }
}

/// What one round sends: page runs per region index, sorted by region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundPlan {
    runs: Vec<(usize, Run)>,
}

impl RoundPlan {
    /// Every page of every region (the bulk round).
    pub fn whole(state: &RegionState) -> RoundPlan {
        let mut runs = Vec::new();
        for (i, t) in state.list.iter().enumerate() {
            let mut whole = Vec::new();
            push_run(&mut whole, 0, t.region.len() / state.page_size);
            runs.extend(whole.into_iter().map(|r| (i, r)));
        }
        RoundPlan { runs }
    }

    /// Dirty pages, fresh parts (new regions, grown tails), regions whose
    /// tracking was lost (whole), discarded pages and what was carried,
    /// merged per region; carried pages of regions that are gone are
    /// dropped, and clipped to a region's current size.
    pub fn build(
        state: &RegionState,
        dirty: &Dirty,
        fresh: &[(usize, Run)],
        discards: &[Vec<Run>],
        carried: &Carried,
    ) -> RoundPlan {
        let ps = state.page_size;
        let mut out = Vec::new();
        for (i, t) in state.list.iter().enumerate() {
            let pages = t.region.len() / ps;
            let mut runs = if dirty.refresh.contains(&i) {
                let mut whole = Vec::new();
                push_run(&mut whole, 0, pages);
                whole
            } else {
                let f: Vec<Run> = fresh
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, r)| *r)
                    .collect();
                union(&dirty.runs.get(i).cloned().unwrap_or_default(), &f)
            };
            if let Some(d) = discards.get(i) {
                runs = union(&runs, d);
            }
            runs = union(&runs, &carried.runs_for(t.region.start, pages));
            out.extend(runs.into_iter().map(|r| (i, r)));
        }
        RoundPlan { runs: out }
    }

    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|(_, r)| r.count as u64).sum()
    }

    /// The runs of the regions `keep` selects, and the others.
    pub fn split(self, keep: impl Fn(usize) -> bool) -> (RoundPlan, RoundPlan) {
        let (a, b) = self.runs.into_iter().partition(|(i, _)| keep(*i));
        (RoundPlan { runs: a }, RoundPlan { runs: b })
    }

    /// This plan without the pages `drop` (region index, run).
    pub fn without(self, drop: &[(usize, Run)]) -> RoundPlan {
        let runs = self
            .runs
            .into_iter()
            .flat_map(|(i, r)| {
                let mut out = Vec::new();
                for p in r.first..r.end() {
                    if !drop
                        .iter()
                        .any(|(j, d)| *j == i && d.first <= p && p < d.end())
                    {
                        push_run(&mut out, p, 1);
                    }
                }
                out.into_iter().map(move |r| (i, r))
            })
            .collect();
        RoundPlan { runs }
    }

    /// This plan and the pages `extra` (region index, run), merged.
    pub fn with(self, extra: &[(usize, Run)]) -> RoundPlan {
        let mut per: Vec<(usize, Vec<Run>)> = self.per_region();
        for &(i, r) in extra {
            match per.iter_mut().find(|(j, _)| *j == i) {
                Some((_, runs)) => *runs = union(runs, &[r]),
                None => per.push((i, vec![r])),
            }
        }
        per.sort_by_key(|(i, _)| *i);
        RoundPlan {
            runs: per
                .into_iter()
                .flat_map(|(i, runs)| runs.into_iter().map(move |r| (i, r)))
                .collect(),
        }
    }

    /// Not sent now: keep it for a later round.
    pub fn carry(self, state: &RegionState) -> Carried {
        Carried(
            self.runs
                .into_iter()
                .map(|(i, r)| (state.list[i].region.start, r))
                .collect(),
        )
    }

    /// The runs, grouped by region index.
    pub fn per_region(&self) -> Vec<(usize, Vec<Run>)> {
        let mut out: Vec<(usize, Vec<Run>)> = Vec::new();
        for &(i, r) in &self.runs {
            match out.last_mut() {
                Some((j, runs)) if *j == i => runs.push(r),
                _ => out.push((i, vec![r])),
            }
        }
        out
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

    proptest::proptest! {
        /// `without` keeps exactly the plan's pages that no drop covers,
        /// whatever the drops' order and overlaps.
        #[test]
        fn without_removes_exactly_the_dropped_pages(
            plan in proptest::collection::vec((0usize..3, 0u64..200, 1u32..40), 0..12),
            drop in proptest::collection::vec((0usize..3, 0u64..200, 1u32..40), 0..12),
        ) {
            let run = |(i, first, count): (usize, u64, u32)| (i, Run { first, count });
            let plan: Vec<(usize, Run)> = plan.into_iter().map(run).collect();
            let drop: Vec<(usize, Run)> = drop.into_iter().map(run).collect();
            let pages = |v: &[(usize, Run)]| {
                let mut set = std::collections::BTreeSet::new();
                for &(i, r) in v {
                    for p in r.first..r.end() {
                        set.insert((i, p));
                    }
                }
                set
            };
            let want: std::collections::BTreeSet<_> =
                pages(&plan).difference(&pages(&drop)).copied().collect();
            let got = RoundPlan { runs: plan.clone() }.without(&drop);
            proptest::prop_assert_eq!(pages(&got.runs), want);
            proptest::prop_assert!(got.runs.iter().all(|(_, r)| r.count > 0));
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

    #[test]
    fn round_plan_merges_and_carries_by_region_start() {
        let mut s = RegionState::new(vec![r(0x1000, 0x5000), r(0x10000, 0x14000)], 0x1000);
        let dirty = Dirty {
            runs: vec![vec![Run { first: 0, count: 1 }], vec![]],
            refresh: vec![1],
        };
        let fresh = [(0, Run { first: 3, count: 1 })];
        let discards = vec![vec![Run { first: 1, count: 1 }], vec![]];
        let plan = RoundPlan::build(&s, &dirty, &fresh, &discards, &Carried::default());
        assert_eq!(
            plan.per_region(),
            vec![
                (
                    0,
                    vec![Run { first: 0, count: 2 }, Run { first: 3, count: 1 }]
                ),
                (1, vec![Run { first: 0, count: 4 }])
            ]
        );
        assert_eq!(plan.pages(), 7);
        // Carried across a table change: region 0 disappears, region 1
        // moves to index 0 and shrinks; its pages follow it, clipped.
        let carried = plan.carry(&s);
        s.update(vec![r(0x10000, 0x12000)]);
        let none = Dirty {
            runs: vec![vec![]],
            refresh: vec![],
        };
        let next = RoundPlan::build(&s, &none, &[], &[], &carried);
        assert_eq!(
            next.per_region(),
            vec![(0, vec![Run { first: 0, count: 2 }])]
        );
        assert_eq!(RoundPlan::whole(&s).pages(), 2);
    }
}
