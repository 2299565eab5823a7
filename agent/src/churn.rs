//! Mapping churn (`run --churn RATE`): a thread that keeps changing the
//! process's memory map outside the RAM region, the way a real program's
//! allocator does, so that a live migration sees mappings appear, move,
//! shrink and vanish between rounds, and threads come and go.
//!
//! Each event is one of ([`Event`]):
//!
//! * map: `mmap` a new anonymous private read-write mapping of 1 to 64
//!   pages at an address the kernel picks, and fill it;
//! * unmap: `munmap` a whole churn mapping;
//! * trim: `munmap` some pages at the head or the tail of one;
//! * grow: `mremap` one to more pages with `MREMAP_MAYMOVE` (it may move),
//!   and fill the new pages;
//! * shrink: `mremap` one to fewer pages;
//! * dontneed: `madvise(MADV_DONTNEED)` a few pages of one (they read as
//!   zero afterwards);
//! * rewrite: give a few pages of one new content;
//! * thread: start a short-lived thread (5 to 100 ms) that rewrites pages
//!   of one mapping every 2 ms, then exits.
//!
//! At most [`MAX_MAPS`] churn mappings and [`MAX_BYTES`] of them exist at
//! once. A mapping a helper thread writes to is left alone by the churn
//! thread until the helper has exited. Mappings with an odd id are named
//! `[anon:procmig-churn-<id>]` (`PR_SET_VMA_ANON_NAME`), or, on kernels
//! without CONFIG_ANON_VMA_NAME, marked `MADV_NOHUGEPAGE`, so that they
//! stay separate mappings; the others may merge with their neighbours, as
//! anonymous memory usually does.
//!
//! Every page of a churn mapping is either all zero (dontneed) or starts
//! with the words `(b"PMCHURN1", id, page, version)` (u64 LE) followed by
//! PRNG bytes seeded from those, so that a page in the wrong place or of
//! the wrong version shows in a byte-for-byte comparison. `page` counts
//! from the mapping's first page when it was created (trimming the head
//! does not renumber the rest). Nothing here is checked by `verify`.

use std::ffi::CString;
use std::slice;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::content::{mix64, SplitMix};

/// Most churn mappings alive at once.
pub const MAX_MAPS: usize = 64;
/// Most bytes in churn mappings at once.
pub const MAX_BYTES: u64 = 16 << 20;
/// Most pages of a new mapping, and of one growth.
pub const MAX_NEW_PAGES: u64 = 64;
/// Most helper threads alive at once.
pub const MAX_HELPERS: usize = 8;
/// First word of every non-zero churn page.
pub const CHURN_MAGIC: u64 = u64::from_le_bytes(*b"PMCHURN1");

/// Versions of churn page content; every write takes a new one.
static VERSION: AtomicU64 = AtomicU64::new(1);

/// The kinds of churn event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Map,
    Unmap,
    Trim,
    Grow,
    Shrink,
    DontNeed,
    Rewrite,
    Thread,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::Map,
        Event::Unmap,
        Event::Trim,
        Event::Grow,
        Event::Shrink,
        Event::DontNeed,
        Event::Rewrite,
        Event::Thread,
    ];

    /// Relative frequency.
    fn weight(self) -> u64 {
        match self {
            Event::Map => 4,
            Event::Rewrite => 3,
            Event::Unmap
            | Event::Trim
            | Event::Grow
            | Event::Shrink
            | Event::DontNeed
            | Event::Thread => 2,
        }
    }
}

/// One churn mapping.
struct Map {
    addr: usize,
    pages: u64,
    id: u64,
    /// Number of the mapping's current first page (see the module docs).
    first: u64,
    /// A helper thread writing to this mapping.
    helper: Option<JoinHandle<()>>,
}

/// The churn thread's state. Dropping it joins the helpers and unmaps
/// every churn mapping.
pub struct Churn<'a> {
    maps: Vec<Map>,
    rng: SplitMix,
    seed: u64,
    page_size: usize,
    next_id: u64,
    /// Incremented once per event (the header's `churn_events`).
    events: &'a AtomicU64,
    /// Events done, by kind ([`Event::ALL`] order).
    pub done: [u64; 8],
}

/// Write churn page content for `(id, page)` at a fresh version.
fn fill(buf: &mut [u8], seed: u64, id: u64, page: u64) {
    let version = VERSION.fetch_add(1, Relaxed);
    expected(buf, seed, id, page, version);
}

/// The content of churn page `(id, page, version)`.
fn expected(buf: &mut [u8], seed: u64, id: u64, page: u64, version: u64) {
    let mut rng = SplitMix(mix64(seed ^ mix64(id ^ mix64(page ^ mix64(version)))));
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = match k {
            0 => CHURN_MAGIC,
            1 => id,
            2 => page,
            3 => version,
            _ => rng.next_u64(),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// The page at `addr`.
///
/// # Safety
///
/// `addr` must be the start of `len` mapped, writable bytes that nothing
/// else reads or writes while the slice is alive.
unsafe fn page_at<'p>(addr: usize, len: usize) -> &'p mut [u8] {
    // SAFETY: as the caller promises.
    unsafe { slice::from_raw_parts_mut(addr as *mut u8, len) }
}

impl<'a> Churn<'a> {
    pub fn new(seed: u64, page_size: usize, events: &'a AtomicU64) -> Churn<'a> {
        Churn {
            maps: Vec::new(),
            rng: SplitMix(mix64(seed ^ 0x6368_7572_6e00_0000)),
            seed,
            page_size,
            next_id: 1,
            events,
            done: [0; 8],
        }
    }

    fn max_pages(&self) -> u64 {
        MAX_BYTES / self.page_size as u64
    }

    /// Pages in churn mappings now.
    pub fn pages(&self) -> u64 {
        self.maps.iter().map(|m| m.pages).sum()
    }

    /// Churn mappings now.
    #[cfg(test)]
    pub fn maps(&self) -> usize {
        self.maps.len()
    }

    /// Pages another map or growth may take.
    fn budget(&self) -> u64 {
        self.max_pages().saturating_sub(self.pages())
    }

    /// Join the helpers that have exited.
    fn reap(&mut self) {
        for m in &mut self.maps {
            if m.helper.as_ref().is_some_and(JoinHandle::is_finished) {
                if let Some(h) = m.helper.take() {
                    let _ = h.join();
                }
            }
        }
    }

    /// Wait for every helper to exit.
    pub fn join_helpers(&mut self) {
        for m in &mut self.maps {
            if let Some(h) = m.helper.take() {
                let _ = h.join();
            }
        }
    }

    /// A random mapping with no helper and at least `min_pages` pages.
    fn pick(&mut self, min_pages: u64) -> Option<usize> {
        let idle: Vec<usize> = (0..self.maps.len())
            .filter(|&k| self.maps[k].helper.is_none() && self.maps[k].pages >= min_pages)
            .collect();
        if idle.is_empty() {
            None
        } else {
            Some(idle[self.rng.below(idle.len() as u64) as usize])
        }
    }

    /// Rewrite page `k` of mapping `m`.
    fn rewrite_page(&self, m: usize, k: u64) {
        let map = &self.maps[m];
        let ps = self.page_size;
        // SAFETY: page k < pages of a live churn mapping, which only this
        // thread touches while it has no helper (callers pick such maps).
        let page = unsafe { page_at(map.addr + k as usize * ps, ps) };
        fill(page, self.seed, map.id, map.first + k);
    }

    /// Do one random event; returns what it did, or `None` if nothing was
    /// possible (every mapping busy and no room for a new one).
    pub fn step(&mut self) -> Option<Event> {
        self.reap();
        let total: u64 = Event::ALL.iter().map(|e| e.weight()).sum();
        let mut r = self.rng.below(total);
        let mut event = Event::Map;
        for e in Event::ALL {
            if r < e.weight() {
                event = e;
                break;
            }
            r -= e.weight();
        }
        let done = self
            .apply(event)
            .or_else(|| self.apply(Event::Map))
            .or_else(|| self.apply(Event::Unmap));
        if let Some(e) = done {
            self.done[e as usize] += 1;
            self.events.fetch_add(1, SeqCst);
        }
        done
    }

    fn apply(&mut self, event: Event) -> Option<Event> {
        let ps = self.page_size;
        match event {
            Event::Map => {
                if self.maps.len() >= MAX_MAPS {
                    return None;
                }
                let pages = (1 + self.rng.below(MAX_NEW_PAGES)).min(self.budget());
                if pages == 0 {
                    return None;
                }
                let len = pages as usize * ps;
                // SAFETY: a new mapping at an address the kernel picks
                // (no MAP_FIXED) cannot affect existing memory.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return None;
                }
                let id = self.next_id;
                self.next_id += 1;
                if id % 2 == 1 && !name_mapping(p as usize, len, &format!("procmig-churn-{id}")) {
                    // SAFETY: only changes the new mapping's flags.
                    unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
                }
                self.maps.push(Map {
                    addr: p as usize,
                    pages,
                    id,
                    first: 0,
                    helper: None,
                });
                let m = self.maps.len() - 1;
                for k in 0..pages {
                    self.rewrite_page(m, k);
                }
            }
            Event::Unmap => {
                let m = self.pick(1)?;
                let map = self.maps.swap_remove(m);
                // SAFETY: the whole of a churn mapping, which nothing
                // refers to any more (it has no helper).
                unsafe { libc::munmap(map.addr as *mut libc::c_void, map.pages as usize * ps) };
            }
            Event::Trim => {
                let m = self.pick(2)?;
                let cut = 1 + self.rng.below(self.maps[m].pages - 1);
                let head = self.rng.below(2) == 0;
                let map = &mut self.maps[m];
                let at = if head {
                    map.addr
                } else {
                    map.addr + (map.pages - cut) as usize * ps
                };
                // SAFETY: part of a churn mapping that nothing refers to.
                let rc = unsafe { libc::munmap(at as *mut libc::c_void, cut as usize * ps) };
                if rc != 0 {
                    return None;
                }
                if head {
                    map.addr += cut as usize * ps;
                    map.first += cut;
                }
                map.pages -= cut;
            }
            Event::Grow => {
                let m = self.pick(1)?;
                let more = (1 + self.rng.below(MAX_NEW_PAGES)).min(self.budget());
                if more == 0 {
                    return None;
                }
                let map = &mut self.maps[m];
                let old = map.pages;
                // SAFETY: resizes a churn mapping that nothing refers to;
                // if it moves, only `map.addr` knew the old address.
                let p = unsafe {
                    libc::mremap(
                        map.addr as *mut libc::c_void,
                        old as usize * ps,
                        (old + more) as usize * ps,
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if p == libc::MAP_FAILED {
                    return None;
                }
                map.addr = p as usize;
                map.pages = old + more;
                for k in old..old + more {
                    self.rewrite_page(m, k);
                }
            }
            Event::Shrink => {
                let m = self.pick(2)?;
                let map = &mut self.maps[m];
                let keep = 1 + self.rng.below(map.pages - 1);
                // SAFETY: shrinks a churn mapping in place (no
                // MREMAP_MAYMOVE); nothing refers to its tail.
                let p = unsafe {
                    libc::mremap(
                        map.addr as *mut libc::c_void,
                        map.pages as usize * ps,
                        keep as usize * ps,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return None;
                }
                map.pages = keep;
            }
            Event::DontNeed => {
                let m = self.pick(1)?;
                let map = &self.maps[m];
                let n = 1 + self.rng.below(map.pages.min(4));
                let from = self.rng.below(map.pages - n + 1);
                // SAFETY: pages of a churn mapping that nothing refers to;
                // they become zero, a valid value for bytes.
                unsafe {
                    libc::madvise(
                        (map.addr + from as usize * ps) as *mut libc::c_void,
                        n as usize * ps,
                        libc::MADV_DONTNEED,
                    )
                };
            }
            Event::Rewrite => {
                let m = self.pick(1)?;
                let pages = self.maps[m].pages;
                for _ in 0..1 + self.rng.below(pages.min(8)) {
                    let k = self.rng.below(pages);
                    self.rewrite_page(m, k);
                }
            }
            Event::Thread => {
                if self.maps.iter().filter(|m| m.helper.is_some()).count() >= MAX_HELPERS {
                    return None;
                }
                let m = self.pick(1)?;
                let life = Duration::from_millis(5 + self.rng.below(96));
                let seed = self.seed;
                let rng_seed = self.rng.next_u64();
                let map = &mut self.maps[m];
                let (addr, pages, id, first) = (map.addr, map.pages, map.id, map.first);
                let helper = thread::Builder::new()
                    .name("churn-helper".into())
                    .stack_size(256 << 10)
                    .spawn(move || {
                        let started = Instant::now();
                        let mut rng = SplitMix(rng_seed);
                        loop {
                            let k = rng.below(pages);
                            // SAFETY: the churn thread leaves this mapping
                            // alone (mapped, unread, unwritten) until this
                            // thread has been joined.
                            let page = unsafe { page_at(addr + k as usize * ps, ps) };
                            fill(page, seed, id, first + k);
                            if started.elapsed() >= life {
                                break;
                            }
                            thread::sleep(Duration::from_millis(2));
                        }
                    })
                    .ok()?;
                map.helper = Some(helper);
            }
        }
        Some(event)
    }

    /// Do `rate` events per second forever.
    pub fn run(mut self, rate: f64) -> ! {
        crate::workload::pace(rate, || {
            self.step();
        })
    }

    /// Check every page of every churn mapping: all zero, or the content
    /// of its own `(id, page)` at some version. Joins the helpers first.
    #[cfg(test)]
    pub fn check(&mut self) -> Result<(), String> {
        self.join_helpers();
        let ps = self.page_size;
        let mut want = vec![0u8; ps];
        for map in &self.maps {
            for k in 0..map.pages {
                // SAFETY: a page of a live churn mapping; the helpers have
                // been joined, and this is the only access.
                let page = unsafe { page_at(map.addr + k as usize * ps, ps) };
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                let word =
                    |w: usize| u64::from_le_bytes(page[8 * w..8 * w + 8].try_into().unwrap());
                let page_no = map.first + k;
                if (word(0), word(1), word(2)) != (CHURN_MAGIC, map.id, page_no) {
                    return Err(format!(
                        "map {} page {page_no} at {:#x}: stamp {:#x} {} {}",
                        map.id,
                        map.addr + k as usize * ps,
                        word(0),
                        word(1),
                        word(2)
                    ));
                }
                expected(&mut want, self.seed, map.id, page_no, word(3));
                if page != &want[..] {
                    return Err(format!("map {} page {page_no}: damaged", map.id));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Churn<'_> {
    fn drop(&mut self) {
        self.join_helpers();
        for map in self.maps.drain(..) {
            // SAFETY: a churn mapping; its helper has exited and nothing
            // else refers to it.
            unsafe {
                libc::munmap(
                    map.addr as *mut libc::c_void,
                    map.pages as usize * self.page_size,
                )
            };
        }
    }
}

/// Name an anonymous mapping (`[anon:NAME]` in /proc/PID/maps). False if
/// the kernel refuses (no CONFIG_ANON_VMA_NAME).
fn name_mapping(addr: usize, len: usize, name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: prctl reads the NUL-terminated name (the kernel copies it)
    // and only labels the mapping; it does not change memory.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            name.as_ptr() as libc::c_ulong,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use procmig::process::page_size;

    #[test]
    fn churn_stays_in_bounds_and_consistent() {
        let events = AtomicU64::new(0);
        let ps = page_size() as usize;
        let mut churn = Churn::new(5, ps, &events);
        let mut steps = 0;
        for round in 0..40 {
            for _ in 0..100 {
                if churn.step().is_some() {
                    steps += 1;
                }
                assert!(churn.maps() <= MAX_MAPS);
                assert!(churn.pages() * ps as u64 <= MAX_BYTES);
            }
            if round % 10 == 9 {
                churn.check().unwrap();
            }
        }
        assert_eq!(events.load(SeqCst), steps);
        assert!(steps >= 3900, "{steps}");
        for e in Event::ALL {
            assert!(
                churn.done[e as usize] > 0,
                "{e:?} never happened: {:?}",
                churn.done
            );
        }
        churn.check().unwrap();
    }
}
