//! Check a saved image of the agent's memory: every data page must hold the
//! content its ledger generation says (all zero if the ledger marks it
//! discarded), and the ledger must agree with the counters (see
//! [`crate::layout`] for the rules, including the slack allowed for pages a
//! writer was rewriting or discarding when the process stopped).

use std::path::Path;
use std::thread;

use procmig::image::Image;
use serde_json::{json, Value};

use crate::content::{is_zero, page_matches, read_stamp, Profile};
use crate::layout::{HeaderView, Layout, BASE, DISCARDED, GEN_MASK, LAYOUT_VERSION, MAGIC};

/// Bad pages listed individually in a report.
pub const MAX_LISTED: usize = 10;

/// What a bad page holds instead of the expected generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Looks {
    /// Its own stamp, with another generation (stale or ahead).
    Gen(u32),
    /// All zero bytes.
    Zero,
    /// Another page's stamp: misplaced.
    Page { index: u64, gen: u32 },
    /// Neither: damaged, or half of one generation and half of another.
    Torn,
}

impl std::fmt::Display for Looks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Looks::Gen(g) => write!(f, "gen {g}"),
            Looks::Zero => f.write_str("zero"),
            Looks::Page { index, gen } => write!(f, "page {index} gen {gen}"),
            Looks::Torn => f.write_str("torn"),
        }
    }
}

/// A data page whose content is not what its ledger entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPage {
    pub index: u64,
    pub addr: u64,
    /// The generation in the ledger (without the discarded flag).
    pub expected_gen: u32,
    /// The ledger marks the page discarded: it should be all zero.
    pub discarded: bool,
    pub looks: Looks,
}

impl std::fmt::Display for BadPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.discarded {
            write!(
                f,
                "page {} at {:#x}: expected zero (discarded at gen {}), looks like {}",
                self.index, self.addr, self.expected_gen, self.looks
            )
        } else {
            write!(
                f,
                "page {} at {:#x}: expected gen {}, looks like {}",
                self.index, self.addr, self.expected_gen, self.looks
            )
        }
    }
}

/// State of a page a writer was rewriting or discarding at the stop instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flight {
    /// Matches its ledger entry (for a discard: all zero).
    Current,
    /// As before: the previous generation, or all zero for a rewrite of
    /// a discarded page; for a discard, the generation it still has.
    Previous,
    /// Neither: caught mid-write.
    Torn,
}

impl Flight {
    fn name(self) -> &'static str {
        match self {
            Flight::Current => "current",
            Flight::Previous => "previous",
            Flight::Torn => "torn",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub slot: usize,
    pub index: u64,
    pub gen: u32,
    /// A discard (the ledger's flag is set), not a rewrite.
    pub discard: bool,
    pub state: Flight,
}

/// The outcome of verifying a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub profile: Profile,
    pub data_pages: u64,
    pub pages_checked: u64,
    pub writes: u64,
    /// Sum of the ledger's generations (flags masked off).
    pub ledger_sum: u64,
    /// Pages the ledger marks discarded (including in-flight discards).
    pub discarded: u64,
    /// The header's counters.
    pub discards: u64,
    pub kernel_writes: u64,
    pub churn_events: u64,
    pub in_flight: Vec<InFlight>,
    pub bad_total: u64,
    /// The first [`MAX_LISTED`] bad pages, by index.
    pub bad: Vec<BadPage>,
    /// Failures that are not about one page (counter mismatch, bad slots).
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.bad_total == 0 && self.problems.is_empty()
    }

    /// The human-readable report: one summary line, then details.
    pub fn lines(&self) -> Vec<String> {
        if self.ok() {
            return vec![format!(
                "verify: ok: {} pages checked, {} writes, {} in flight",
                self.pages_checked,
                self.writes,
                self.in_flight.len()
            )];
        }
        let mut first = format!("verify: FAILED: {} bad pages", self.bad_total);
        match (self.bad.first(), self.problems.first()) {
            (Some(b), _) => first += &format!(" (first: {b})"),
            (None, Some(p)) => first += &format!(" ({p})"),
            (None, None) => {}
        }
        let mut lines = vec![first];
        lines.extend(self.bad.iter().map(|b| format!("  {b}")));
        // A lone problem is already on the summary line.
        let skip = usize::from(self.bad.is_empty());
        lines.extend(self.problems.iter().skip(skip).map(|p| format!("  {p}")));
        lines
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "base": format!("{BASE:#x}"),
            "profile": self.profile.name(),
            "data_pages": self.data_pages,
            "pages_checked": self.pages_checked,
            "writes": self.writes,
            "ledger_sum": self.ledger_sum,
            "discarded": self.discarded,
            "discards": self.discards,
            "kernel_writes": self.kernel_writes,
            "churn_events": self.churn_events,
            "in_flight": self.in_flight.len(),
            "in_flight_pages": self.in_flight.iter().map(|f| json!({
                "thread": f.slot,
                "page": f.index,
                "gen": f.gen,
                "op": if f.discard { "discard" } else { "rewrite" },
                "state": f.state.name(),
            })).collect::<Vec<_>>(),
            "bad_pages": self.bad_total,
            "bad": self.bad.iter().map(|b| json!({
                "page": b.index,
                "addr": format!("{:#x}", b.addr),
                "expected_gen": b.expected_gen,
                "discarded": b.discarded,
                "looks_like": b.looks.to_string(),
            })).collect::<Vec<_>>(),
            "problems": self.problems,
        })
    }
}

/// Verify the image in `dir`: find the region holding [`BASE`] and check it.
/// `Err` means the image cannot be verified at all (missing, unreadable,
/// not an image of the agent); a failed check is an `Ok` report.
pub fn verify_image(dir: &Path, threads: usize) -> Result<Report, String> {
    let image = Image::open(dir).map_err(|e| e.to_string())?;
    let record = image.region_at(BASE).ok_or_else(|| {
        format!(
            "{}: no region contains the agent's base address {BASE:#x}",
            dir.display()
        )
    })?;
    let map = image.map_region(record).map_err(|e| e.to_string())?;
    let offset = (BASE - record.start) as usize;
    verify_region(&map[offset..], BASE, threads)
}

/// Verify a region whose bytes from `base` on are `bytes`, using up to
/// `threads` threads.
pub fn verify_region(bytes: &[u8], base: u64, threads: usize) -> Result<Report, String> {
    let h = HeaderView::parse(bytes).ok_or_else(|| {
        format!(
            "region at {base:#x} is {} bytes, too short for a header",
            bytes.len()
        )
    })?;
    if h.magic != MAGIC {
        return Err(format!(
            "no agent header at {base:#x} (magic {:#018x}, expected {MAGIC:#018x})",
            h.magic
        ));
    }
    if h.version != LAYOUT_VERSION {
        return Err(format!(
            "header at {base:#x} has layout version {}, this build reads {LAYOUT_VERSION}",
            h.version
        ));
    }
    let layout = Layout::compute(h.total_size, h.page_size)
        .map_err(|e| format!("header at {base:#x} is inconsistent: {e}"))?;
    if (layout.total_size, layout.data_pages, layout.ledger_pages)
        != (h.total_size, h.data_pages, h.ledger_pages)
    {
        return Err(format!(
            "header at {base:#x} is inconsistent: size {} page size {} gives {} data and {} ledger pages, header says {} and {}",
            h.total_size, h.page_size, layout.data_pages, layout.ledger_pages, h.data_pages, h.ledger_pages
        ));
    }
    let profile = Profile::from_code(h.profile)
        .ok_or_else(|| format!("header at {base:#x} names unknown profile {}", h.profile))?;
    if (bytes.len() as u64) < h.total_size {
        return Err(format!(
            "region at {base:#x} holds {} bytes, the agent's header says {}",
            bytes.len(),
            h.total_size
        ));
    }

    let ps = h.page_size as usize;
    let ledger_at = layout.ledger_offset() as usize;
    // (generation, discarded flag)
    let entry_of = |i: u64| {
        let at = ledger_at + 4 * i as usize;
        let e = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        (e & GEN_MASK, e & DISCARDED != 0)
    };
    let page_of = |i: u64| {
        let at = layout.page_offset(i) as usize;
        &bytes[at..at + ps]
    };

    let mut problems = Vec::new();
    let mut in_flight = Vec::new();
    let mut scratch = vec![0u8; ps];
    for (slot, &v) in h.inflight.iter().enumerate() {
        if v == 0 {
            continue;
        }
        let index = v - 1;
        if index >= h.data_pages || in_flight.iter().any(|f: &InFlight| f.index == index) {
            problems.push(format!("in-flight slot {slot} names bad page {index}"));
            continue;
        }
        let (gen, discard) = entry_of(index);
        let page = page_of(index);
        let state = if discard {
            if is_zero(page) {
                Flight::Current
            } else if page_matches(profile, h.seed, index, gen, page, &mut scratch) {
                Flight::Previous
            } else {
                Flight::Torn
            }
        } else if page_matches(profile, h.seed, index, gen, page, &mut scratch) {
            Flight::Current
        } else if is_zero(page)
            || (gen > 0 && page_matches(profile, h.seed, index, gen - 1, page, &mut scratch))
        {
            Flight::Previous
        } else {
            Flight::Torn
        };
        in_flight.push(InFlight {
            slot,
            index,
            gen,
            discard,
            state,
        });
    }

    // Check the pages in parallel, each thread a contiguous range.
    let n = h.data_pages;
    let threads = (threads.max(1) as u64).min(n.div_ceil(1024)).max(1);
    let skip: Vec<u64> = in_flight.iter().map(|f| f.index).collect();
    let (bad_total, mut bad, ledger_sum, discarded) = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (from, to) = (n * t / threads, n * (t + 1) / threads);
                let skip = &skip;
                s.spawn(move || {
                    let mut scratch = vec![0u8; ps];
                    let mut bad = Vec::new();
                    let mut bad_total = 0u64;
                    let mut sum = 0u64;
                    let mut discarded = 0u64;
                    for i in from..to {
                        let (gen, discard) = entry_of(i);
                        sum += u64::from(gen);
                        discarded += u64::from(discard);
                        if skip.contains(&i) {
                            continue;
                        }
                        let page = page_of(i);
                        let good = if discard {
                            is_zero(page)
                        } else {
                            page_matches(profile, h.seed, i, gen, page, &mut scratch)
                        };
                        if !good {
                            bad_total += 1;
                            if bad.len() < MAX_LISTED {
                                bad.push(BadPage {
                                    index: i,
                                    addr: base + layout.page_offset(i),
                                    expected_gen: gen,
                                    discarded: discard,
                                    looks: looks_like(page, i, (!discard).then_some(gen)),
                                });
                            }
                        }
                    }
                    (bad_total, bad, sum, discarded)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("verify thread panicked"))
            .fold(
                (0, Vec::new(), 0, 0),
                |(t, mut b, s, d), (t2, b2, s2, d2)| {
                    b.extend(b2);
                    (t + t2, b, s + s2, d + d2)
                },
            )
    });
    bad.truncate(MAX_LISTED);

    let k = h.inflight.iter().filter(|&&v| v != 0).count() as u64;
    if ledger_sum < h.writes || ledger_sum > h.writes + k {
        problems.push(format!(
            "writes counter is {} but the ledger sums to {ledger_sum} ({k} in flight)",
            h.writes
        ));
    }
    if discarded > h.discards + k {
        problems.push(format!(
            "{discarded} pages are marked discarded but the discards counter is {} ({k} in flight)",
            h.discards
        ));
    }
    if h.kernel_writes > h.writes {
        problems.push(format!(
            "kernel_writes counter is {} but writes is only {}",
            h.kernel_writes, h.writes
        ));
    }

    Ok(Report {
        profile,
        data_pages: h.data_pages,
        pages_checked: h.data_pages,
        writes: h.writes,
        ledger_sum,
        discarded,
        discards: h.discards,
        kernel_writes: h.kernel_writes,
        churn_events: h.churn_events,
        in_flight,
        bad_total,
        bad,
        problems,
    })
}

/// What a page that does not match `(index, gen)` (or, for `None`, all
/// zero) looks like.
fn looks_like(page: &[u8], index: u64, gen: Option<u32>) -> Looks {
    if is_zero(page) {
        return Looks::Zero;
    }
    match read_stamp(page) {
        Some((i, g)) if i == index && Some(g) != gen => Looks::Gen(g),
        Some((i, g)) if i != index => Looks::Page { index: i, gen: g },
        _ => Looks::Torn,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use procmig::image::{
        digest_pages, hex_digest, region_file_name, Manifest, RegionRecord, FORMAT_NAME,
        FORMAT_VERSION, MANIFEST_NAME,
    };

    use super::*;
    use crate::content::fill_page;
    use crate::workload::testbuf::PageBuf;
    use crate::workload::{Params, Ram};

    const PS: usize = 4096;

    /// A region built in memory: fill, then `rewrites` rewrites spread over
    /// 3 writers.
    struct Built {
        buf: PageBuf,
        layout: Layout,
    }

    impl Built {
        fn new(profile: Profile, pages: u64, rewrites: usize) -> Built {
            let layout = Layout::compute(pages * PS as u64, PS as u64).unwrap();
            let mut buf = PageBuf::new(layout.total_size as usize);
            let params = Params {
                profile,
                seed: 42,
                dirty_rate: 1000,
                working_set_pages: Some(layout.data_pages / 2),
                hot_pages: 0,
                threads: 3,
                fill_threads: 2,
                dontneed_rate: 0,
                kernel_write_rate: 0,
                churn_rate: 0,
            };
            let ram = Ram::create(buf.bytes(), layout, &params).unwrap();
            let mut writers = ram.into_writers();
            for k in 0..rewrites {
                writers[k % 3].rewrite_next();
            }
            Built { buf, layout }
        }

        fn bytes(&mut self) -> &mut [u8] {
            &mut self.buf.bytes()[..self.layout.total_size as usize]
        }

        fn gen(&mut self, i: u64) -> u32 {
            let at = PS + 4 * i as usize;
            u32::from_ne_bytes(self.bytes()[at..at + 4].try_into().unwrap())
        }

        fn set_gen(&mut self, i: u64, gen: u32) {
            let at = PS + 4 * i as usize;
            self.bytes()[at..at + 4].copy_from_slice(&gen.to_ne_bytes());
        }

        fn page(&mut self, i: u64) -> &mut [u8] {
            let at = self.layout.page_offset(i) as usize;
            &mut self.bytes()[at..at + PS]
        }

        /// A page rewritten at least twice.
        fn rewritten_page(&mut self) -> u64 {
            (0..self.layout.data_pages)
                .find(|&i| self.gen(i) >= 2)
                .expect("some page rewritten twice")
        }

        fn verify(&mut self) -> Report {
            verify_region(self.bytes(), BASE, 3).unwrap()
        }
    }

    /// A temporary image directory, removed on drop.
    struct TempImage(PathBuf);

    impl TempImage {
        fn write(name: &str, region_start: u64, bytes: &[u8]) -> TempImage {
            let dir = std::env::temp_dir()
                .join(format!("procmig-agent-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let file = region_file_name(0);
            fs::write(dir.join(&file), bytes).unwrap();
            let manifest = Manifest {
                format: FORMAT_NAME.into(),
                version: FORMAT_VERSION,
                pid: 1234,
                comm: "procmig-agent".into(),
                page_size: PS as u64,
                created_unix: 0,
                regions: vec![RegionRecord {
                    start: region_start,
                    end: region_start + bytes.len() as u64,
                    perms: "rw-p".into(),
                    name: String::new(),
                    file,
                    populated_pages: bytes.len() as u64 / PS as u64,
                    xxh3: hex_digest(digest_pages(bytes, PS)),
                }],
            };
            fs::write(
                dir.join(MANIFEST_NAME),
                serde_json::to_vec_pretty(&manifest).unwrap(),
            )
            .unwrap();
            TempImage(dir)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn only_bad(report: &Report) -> &BadPage {
        assert!(!report.ok());
        assert_eq!(report.bad_total, 1, "{:?}", report.lines());
        &report.bad[0]
    }

    #[test]
    fn good_image_passes() {
        for profile in [
            Profile::Zero,
            Profile::Text,
            Profile::Random,
            Profile::Mixed,
        ] {
            let mut b = Built::new(profile, 200, 400);
            let image = TempImage::write(&format!("good-{profile}"), BASE, b.bytes());
            let report = verify_image(&image.0, 3).unwrap();
            assert!(report.ok(), "{profile}: {:?}", report.lines());
            assert_eq!(report.writes, 400);
            assert_eq!(report.ledger_sum, 400);
            assert_eq!(report.pages_checked, b.layout.data_pages);
            assert_eq!(
                report.lines(),
                [format!(
                    "verify: ok: {} pages checked, 400 writes, 0 in flight",
                    b.layout.data_pages
                )]
            );
            let json = report.to_json();
            assert_eq!(json["ok"], true);
            assert_eq!(json["writes"], 400);
            assert_eq!(json["profile"], profile.name());
        }
    }

    #[test]
    fn flipped_byte_is_torn() {
        let mut b = Built::new(Profile::Text, 100, 300);
        let p = b.rewritten_page();
        let g = b.gen(p);
        b.page(p)[2000] ^= 0x20;
        let image = TempImage::write("flip", BASE, b.bytes());
        let report = verify_image(&image.0, 2).unwrap();
        let bad = only_bad(&report);
        assert_eq!(
            bad,
            &BadPage {
                index: p,
                addr: BASE + b.layout.page_offset(p),
                expected_gen: g,
                discarded: false,
                looks: Looks::Torn
            }
        );
        assert!(report.problems.is_empty());
        assert_eq!(
            report.lines()[0],
            format!(
                "verify: FAILED: 1 bad pages (first: page {p} at {:#x}: expected gen {g}, looks like torn)",
                BASE + b.layout.page_offset(p)
            )
        );
        assert_eq!(report.to_json()["bad"][0]["page"], p);
    }

    #[test]
    fn stale_page_is_named() {
        for profile in [Profile::Text, Profile::Random, Profile::Zero] {
            let mut b = Built::new(profile, 100, 300);
            let p = b.rewritten_page();
            let g = b.gen(p);
            fill_page(profile, 42, p, g - 1, b.page(p));
            let report = b.verify();
            let bad = only_bad(&report);
            assert_eq!((bad.index, bad.expected_gen), (p, g));
            assert_eq!(bad.looks, Looks::Gen(g - 1));
            assert!(report.lines()[0].contains(&format!("looks like gen {}", g - 1)));
        }
    }

    #[test]
    fn stale_zero_page_looks_zero() {
        let mut b = Built::new(Profile::Zero, 100, 300);
        let p = b.rewritten_page();
        b.page(p).fill(0);
        let report = b.verify();
        assert_eq!(only_bad(&report).looks, Looks::Zero);
    }

    #[test]
    fn misplaced_page_is_named() {
        let mut b = Built::new(Profile::Random, 100, 0);
        let copy = b.page(7).to_vec();
        b.page(9).copy_from_slice(&copy);
        let report = b.verify();
        let bad = only_bad(&report);
        assert_eq!(bad.index, 9);
        assert_eq!(bad.looks, Looks::Page { index: 7, gen: 0 });
    }

    #[test]
    fn bumped_ledger_without_rewrite() {
        let mut b = Built::new(Profile::Mixed, 100, 300);
        let p = b.rewritten_page();
        let g = b.gen(p);
        b.set_gen(p, g + 1);
        let report = b.verify();
        let bad = only_bad(&report);
        assert_eq!(
            (bad.index, bad.expected_gen, bad.looks),
            (p, g + 1, Looks::Gen(g))
        );
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("ledger sums to 301"));
    }

    #[test]
    fn counter_mismatch_alone_fails() {
        let mut b = Built::new(Profile::Text, 100, 50);
        let at = std::mem::offset_of!(crate::layout::Header, writes);
        b.bytes()[at..at + 8].copy_from_slice(&49u64.to_ne_bytes());
        let report = b.verify();
        assert!(!report.ok());
        assert_eq!(report.bad_total, 0);
        assert!(
            report.lines()[0].starts_with("verify: FAILED: 0 bad pages (writes counter is 49"),
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn many_bad_pages_are_capped() {
        let mut b = Built::new(Profile::Text, 100, 0);
        for i in 20..40 {
            b.page(i)[100] ^= 1;
        }
        let report = b.verify();
        assert_eq!(report.bad_total, 20);
        assert_eq!(
            report.bad.iter().map(|b| b.index).collect::<Vec<_>>(),
            (20..30).collect::<Vec<_>>()
        );
        assert_eq!(report.lines().len(), 11);
    }

    #[test]
    fn in_flight_pages_are_tolerated() {
        let layout = Layout::compute(100 * PS as u64, PS as u64).unwrap();
        let mut buf = PageBuf::new(layout.total_size as usize);
        let params = Params {
            profile: Profile::Text,
            seed: 42,
            dirty_rate: 1000,
            working_set_pages: None,
            hot_pages: 0,
            threads: 2,
            fill_threads: 1,
            dontneed_rate: 0,
            kernel_write_rate: 0,
            churn_rate: 0,
        };
        let ram = Ram::create(buf.bytes(), layout, &params).unwrap();
        let mut writers = ram.into_writers();
        for _ in 0..50 {
            writers[0].rewrite_next();
            writers[1].rewrite_next();
        }
        // Writer 0 stops right after bumping the ledger of its page 3
        // (data page 3); writer 1 stops half-way through its page 0.
        let (p0, g0) = writers[0].begin(3);
        let (p1, g1) = writers[1].begin(0);
        drop(writers);
        let half = {
            let mut page = vec![0u8; PS];
            fill_page(Profile::Text, 42, p1, g1, &mut page);
            page
        };
        let at = layout.page_offset(p1) as usize;
        buf.bytes()[at..at + PS / 2].copy_from_slice(&half[..PS / 2]);

        let report = verify_region(buf.bytes(), BASE, 2).unwrap();
        assert!(report.ok(), "{:?}", report.lines());
        assert_eq!(report.writes, 100);
        assert_eq!(report.ledger_sum, 102);
        let flights: Vec<_> = report
            .in_flight
            .iter()
            .map(|f| (f.slot, f.index, f.gen, f.state))
            .collect();
        assert_eq!(
            flights,
            [(0, p0, g0, Flight::Previous), (1, p1, g1, Flight::Torn)]
        );
        assert!(report.lines()[0].ends_with("100 writes, 2 in flight"));
    }

    fn set_word(b: &mut Built, at: usize, v: u64) {
        b.bytes()[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    #[test]
    fn discarded_zero_page_passes() {
        for profile in [Profile::Text, Profile::Mixed, Profile::Zero] {
            let mut b = Built::new(profile, 100, 300);
            let p = b.rewritten_page();
            let g = b.gen(p);
            b.set_gen(p, DISCARDED | g);
            b.page(p).fill(0);
            // Discarded at generation 0 too.
            b.set_gen(70, DISCARDED);
            b.page(70).fill(0);
            set_word(
                &mut b,
                std::mem::offset_of!(crate::layout::Header, discards),
                2,
            );
            let report = b.verify();
            assert!(report.ok(), "{profile}: {:?}", report.lines());
            assert_eq!(report.discarded, 2);
            assert_eq!(report.ledger_sum, 300, "discards keep generations");
            assert_eq!(report.to_json()["discarded"], 2);
        }
    }

    #[test]
    fn discarded_page_with_data_fails() {
        let mut b = Built::new(Profile::Text, 100, 300);
        let p = b.rewritten_page();
        let g = b.gen(p);
        // The ledger says discarded, but the page still holds its last
        // generation: the migration failed to zero it.
        b.set_gen(p, DISCARDED | g);
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, discards),
            1,
        );
        let report = b.verify();
        let bad = only_bad(&report);
        assert_eq!(
            bad,
            &BadPage {
                index: p,
                addr: BASE + b.layout.page_offset(p),
                expected_gen: g,
                discarded: true,
                looks: Looks::Gen(g)
            }
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(
            report.lines()[0].contains(&format!(
                "expected zero (discarded at gen {g}), looks like gen {g}"
            )),
            "{:?}",
            report.lines()
        );
        assert_eq!(report.to_json()["bad"][0]["discarded"], true);

        // An older generation or garbage is just as bad.
        fill_page(Profile::Text, 42, p, g - 1, b.page(p));
        assert_eq!(only_bad(&b.verify()).looks, Looks::Gen(g - 1));
        b.page(p).fill(0);
        b.page(p)[4095] = 1;
        assert_eq!(only_bad(&b.verify()).looks, Looks::Torn);
        b.page(p).fill(0);
        assert!(b.verify().ok());
    }

    #[test]
    fn discard_counter_must_cover_flagged_pages() {
        let mut b = Built::new(Profile::Text, 100, 30);
        for i in [60, 61] {
            let g = b.gen(i);
            b.set_gen(i, DISCARDED | g);
            b.page(i).fill(0);
        }
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, discards),
            1,
        );
        let report = b.verify();
        assert_eq!(report.bad_total, 0);
        assert!(!report.ok());
        assert!(
            report.problems[0]
                .contains("2 pages are marked discarded but the discards counter is 1"),
            "{:?}",
            report.problems
        );
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, discards),
            2,
        );
        assert!(b.verify().ok());
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, kernel_writes),
            31,
        );
        assert!(b.verify().problems[0].contains("kernel_writes counter is 31"));
    }

    #[test]
    fn in_flight_discard_is_tolerated() {
        let mut b = Built::new(Profile::Random, 100, 300);
        let p = b.rewritten_page();
        let g = b.gen(p);
        // Stopped after flagging the ledger, before the madvise.
        b.set_gen(p, DISCARDED | g);
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, inflight) + 8,
            p + 1,
        );
        let report = b.verify();
        assert!(report.ok(), "{:?}", report.lines());
        assert_eq!(report.discarded, 1);
        assert_eq!(
            report
                .in_flight
                .iter()
                .map(|f| (f.slot, f.index, f.gen, f.discard, f.state))
                .collect::<Vec<_>>(),
            [(1, p, g, true, Flight::Previous)]
        );
        // ... and after it.
        b.page(p).fill(0);
        assert_eq!(b.verify().in_flight[0].state, Flight::Current);
        // Without the slot the counter is short.
        set_word(
            &mut b,
            std::mem::offset_of!(crate::layout::Header, inflight) + 8,
            0,
        );
        assert!(!b.verify().ok());
    }

    #[test]
    fn truncated_or_short_images_are_errors() {
        let mut b = Built::new(Profile::Text, 64, 10);
        let image = TempImage::write("trunc", BASE, b.bytes());
        let file = image.0.join(region_file_name(0));
        let len = fs::metadata(&file).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - PS as u64)
            .unwrap();
        let err = verify_image(&image.0, 2).unwrap_err();
        assert!(err.contains("bytes long"), "{err}");

        // A consistent image whose region is shorter than the header says.
        let keep = b.layout.total_size as usize - PS;
        let short = b.bytes()[..keep].to_vec();
        let image = TempImage::write("short", BASE, &short);
        let err = verify_image(&image.0, 2).unwrap_err();
        assert!(err.contains("header says"), "{err}");
    }

    #[test]
    fn region_may_start_below_base() {
        let mut b = Built::new(Profile::Text, 64, 10);
        let mut bytes = vec![0u8; 2 * PS];
        bytes.extend_from_slice(b.bytes());
        let image = TempImage::write("below", BASE - 2 * PS as u64, &bytes);
        assert!(verify_image(&image.0, 2).unwrap().ok());
    }

    #[test]
    fn not_an_agent_image() {
        let missing = std::env::temp_dir().join("procmig-agent-test-does-not-exist");
        assert!(verify_image(&missing, 1)
            .unwrap_err()
            .contains("manifest.json"));

        let mut b = Built::new(Profile::Text, 32, 0);
        let image = TempImage::write("elsewhere", BASE + 0x1000_0000, b.bytes());
        let err = verify_image(&image.0, 1).unwrap_err();
        assert!(err.contains("no region contains"), "{err}");

        b.bytes()[0] ^= 1;
        let err = verify_region(b.bytes(), BASE, 1).unwrap_err();
        assert!(err.contains("magic"), "{err}");
        b.bytes()[0] ^= 1;

        let at = std::mem::offset_of!(crate::layout::Header, data_pages);
        b.bytes()[at] ^= 1;
        let err = verify_region(b.bytes(), BASE, 1).unwrap_err();
        assert!(err.contains("inconsistent"), "{err}");
        b.bytes()[at] ^= 1;

        assert!(verify_region(&b.bytes()[..100], BASE, 1).is_err());
        assert!(verify_region(b.bytes(), BASE, 1).unwrap().ok());
    }
}
