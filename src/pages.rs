//! The one vocabulary for pages: a [`Run`] of consecutive pages within a
//! region, sorted run lists (built with [`push_run`], merged with
//! [`union`]), and [`PageSet`], a sparse set of page indexes. The
//! protocol, the dirty trackers, the sender's round plans and the
//! receiver all speak it.

use std::collections::BTreeMap;

/// A run of consecutive pages, as page indexes within one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub count: u32,
}

impl Run {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + self.count as u64
    }
}

/// Pages in a run list.
pub fn count(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.count as u64).sum()
}

/// Merge a sorted list of page indexes into runs.
pub fn runs_from_pages(pages: impl IntoIterator<Item = u64>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some(r) if r.first + r.count as u64 == p && r.count < u32::MAX => r.count += 1,
            _ => runs.push(Run { first: p, count: 1 }),
        }
    }
    runs
}

/// Add the run [first, first+count) to sorted, non-overlapping `runs`,
/// merging as needed.
pub fn push_run(runs: &mut Vec<Run>, first: u64, count: u64) {
    let mut first = first;
    let mut count = count;
    while count > 0 {
        let c = count.min(u32::MAX as u64) as u32;
        match runs.last_mut() {
            Some(r)
                if r.first + r.count as u64 == first
                    && (r.count as u64 + c as u64) <= u32::MAX as u64 =>
            {
                r.count += c
            }
            _ => runs.push(Run { first, count: c }),
        }
        first += c as u64;
        count -= c as u64;
    }
}

/// Union of two sorted, non-overlapping run lists.
pub fn union(a: &[Run], b: &[Run]) -> Vec<Run> {
    let mut all: Vec<(u64, u64)> = a
        .iter()
        .chain(b)
        .map(|r| (r.first, r.first + r.count as u64))
        .collect();
    all.sort_unstable();
    let mut out: Vec<Run> = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in all {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                push_run(&mut out, cs, ce - cs);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = cur {
        push_run(&mut out, cs, ce - cs);
    }
    out
}

const CHUNK_PAGES: u64 = 64 * 64;

#[derive(Debug, Default, Clone)]
pub struct PageSet {
    chunks: BTreeMap<u64, Box<[u64; 64]>>,
}

impl PageSet {
    /// Insert pages [first, first+count); returns false if any was already in.
    pub fn insert_run(&mut self, first: u64, count: u64) -> bool {
        let mut fresh = true;
        for page in first..first + count {
            let chunk = self
                .chunks
                .entry(page / CHUNK_PAGES)
                .or_insert_with(|| Box::new([0u64; 64]));
            let bit = page % CHUNK_PAGES;
            let mask = 1u64 << (bit % 64);
            let word = &mut chunk[(bit / 64) as usize];
            fresh &= *word & mask == 0;
            *word |= mask;
        }
        fresh
    }

    pub fn remove(&mut self, page: u64) {
        if let Some(chunk) = self.chunks.get_mut(&(page / CHUNK_PAGES)) {
            let bit = page % CHUNK_PAGES;
            chunk[(bit / 64) as usize] &= !(1u64 << (bit % 64));
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        self.chunks.get(&(page / CHUNK_PAGES)).is_some_and(|c| {
            let bit = page % CHUNK_PAGES;
            c[(bit / 64) as usize] & (1u64 << (bit % 64)) != 0
        })
    }

    /// Forget pages at or beyond `pages`.
    pub fn truncate(&mut self, pages: u64) {
        self.chunks.retain(|&c, _| c * CHUNK_PAGES < pages);
        if let Some(chunk) = self.chunks.get_mut(&(pages / CHUNK_PAGES)) {
            for bit in pages % CHUNK_PAGES..CHUNK_PAGES {
                chunk[(bit / 64) as usize] &= !(1u64 << (bit % 64));
            }
        }
    }

    /// Ranges of 4096 pages that may hold members: (first page, count).
    pub fn chunk_spans(&self) -> Vec<(u64, u64)> {
        self.chunks
            .iter()
            .filter(|(_, c)| c.iter().any(|&w| w != 0))
            .map(|(&k, _)| (k * CHUNK_PAGES, CHUNK_PAGES))
            .collect()
    }

    /// Members as sorted runs.
    pub fn runs(&self) -> Vec<Run> {
        let mut out = Vec::new();
        for (&k, c) in &self.chunks {
            for (w, &word) in c.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    push_run(&mut out, k * CHUNK_PAGES + w as u64 * 64 + b, 1);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        assert_eq!(
            runs_from_pages([1, 2, 3, 7, 9, 10]),
            vec![
                Run { first: 1, count: 3 },
                Run { first: 7, count: 1 },
                Run { first: 9, count: 2 }
            ]
        );
        let mut v = Vec::new();
        push_run(&mut v, 0, 2);
        push_run(&mut v, 2, 3);
        push_run(&mut v, 8, 1);
        assert_eq!(
            v,
            vec![Run { first: 0, count: 5 }, Run { first: 8, count: 1 }]
        );
        assert_eq!(count(&v), 6);
    }

    #[test]
    fn set_and_runs() {
        let mut s = PageSet::default();
        assert!(s.insert_run(5, 3));
        assert!(!s.insert_run(7, 2));
        assert!(s.insert_run(10_000_000, 1));
        assert!(s.contains(6) && s.contains(8) && !s.contains(9));
        s.remove(6);
        assert_eq!(
            s.runs(),
            vec![
                Run { first: 5, count: 1 },
                Run { first: 7, count: 2 },
                Run {
                    first: 10_000_000,
                    count: 1
                }
            ]
        );
        s.truncate(8);
        assert_eq!(
            s.runs(),
            vec![Run { first: 5, count: 1 }, Run { first: 7, count: 1 }]
        );
    }

    #[test]
    fn union_merges() {
        let a = [
            Run { first: 0, count: 2 },
            Run {
                first: 10,
                count: 1,
            },
        ];
        let b = [
            Run { first: 1, count: 3 },
            Run {
                first: 11,
                count: 2,
            },
            Run {
                first: 20,
                count: 1,
            },
        ];
        assert_eq!(
            union(&a, &b),
            vec![
                Run { first: 0, count: 4 },
                Run {
                    first: 10,
                    count: 3
                },
                Run {
                    first: 20,
                    count: 1
                }
            ]
        );
    }
}
