//! The RAM region: where it lives and how it is laid out.
//!
//! The agent maps one anonymous private region of `size` bytes at the fixed
//! address [`BASE`] (`0x5a00_0000_0000`). With `P` the page size (from
//! `sysconf(_SC_PAGESIZE)`, 4096 on x86_64):
//!
//! ```text
//! BASE                          page 0: header (struct Header, below)
//! BASE + P                      ledger: one u32 generation per data page,
//!                               ledger_pages = ceil(data_pages * 4 / P) pages
//! BASE + (1 + ledger_pages) * P data page 0, data page 1, ...
//! ```
//!
//! `data_pages` is the largest count such that `1 + ledger_pages + data_pages`
//! pages fit in `size` (see [`Layout::compute`]). Data page `i` lives at
//! `BASE + (1 + ledger_pages + i) * P`.
//!
//! All header fields are native-endian (little-endian on x86_64 and
//! aarch64) 64-bit words at fixed offsets:
//!
//! | offset | field               | meaning                                     |
//! |-------:|---------------------|---------------------------------------------|
//! |      0 | `magic`             | `b"PMAGENT1"` read as a LE u64 ([`MAGIC`])  |
//! |      8 | `version`           | layout version ([`LAYOUT_VERSION`])         |
//! |     16 | `total_size`        | bytes of the region                         |
//! |     24 | `page_size`         | `P`                                         |
//! |     32 | `data_pages`        | number of data pages                        |
//! |     40 | `ledger_pages`      | number of ledger pages                      |
//! |     48 | `profile`           | 0 zero, 1 text, 2 random, 3 mixed           |
//! |     56 | `seed`              | `--seed`                                    |
//! |     64 | `working_set_pages` | writers pick pages in `0..working_set_pages`|
//! |     72 | `hot_pages`         | if non-zero, writers cycle over `0..hot_pages` |
//! |     80 | `threads`           | writer threads                              |
//! |     88 | `dirty_rate`        | pages per second (all writers)              |
//! |     96 | `writes`            | atomic: completed page rewrites             |
//! |    104 | `rng[64]`           | atomic: PRNG state of writer thread t       |
//! |    616 | `inflight[64]`      | atomic: 0, or 1 + index of the data page writer t is rewriting or discarding |
//! |   1128 | `churn_events`      | atomic: events done by the churn thread (`--churn`) |
//! |   1136 | `discards`          | atomic: completed discards (`--dontneed-rate`) |
//! |   1144 | `kernel_writes`     | atomic: completed rewrites done by read(2) from a pipe (`--kernel-writes`), also counted in `writes` |
//! |   1152 | `dontneed_rate`     | `--dontneed-rate` (pages per second)        |
//! |   1160 | `kernel_write_rate` | `--kernel-writes` (pages per second)        |
//! |   1168 | `churn_rate`        | `--churn` (events per second)               |
//!
//! Version 1 ended at offset 1128; version 2 added the fields from 1128 on
//! and the discarded flag in the ledger. Every earlier offset is unchanged.
//!
//! # The ledger
//!
//! The ledger entry of data page `i` (a `u32` at `BASE + P + 4 * i`) holds
//! the page's generation in its low 31 bits ([`GEN_MASK`]) and the
//! *discarded* flag in bit 31 ([`DISCARDED`]). The generation is 0 after
//! the initial fill and bumped by one by each rewrite (after `2^31 - 1` it
//! wraps to 1; 0 always means "initial fill").
//!
//! * Flag clear: the page's bytes are `content(profile, seed, i, gen)` (see
//!   [`crate::content`]).
//! * Flag set: the page was discarded with `madvise(MADV_DONTNEED)` and
//!   must read as all zero bytes. `gen` is still the generation the page
//!   had before the discard: a discard does not change the generation, it
//!   only sets the flag, so the generation never restarts and two
//!   different contents of one page never share a generation.
//!
//! Only pages of the working set (or the hot pages) ever change, and each
//! of them belongs to exactly one writer slot `t` (writers own contiguous
//! shares of the set); whoever acts on the page (the writer thread, the
//! discard thread, the kernel-write thread) does so on behalf of that slot,
//! one at a time. Except while its slot names it, a page is always as its
//! ledger entry says.
//!
//! A *rewrite* of page `i` on slot `t` does, in this order (each step a
//! SeqCst atomic access or fenced):
//!
//! 1. `inflight[t] = i + 1`
//! 2. `ledger[i] = gen` where `gen = (ledger[i] & GEN_MASK) + 1`: the flag
//!    is cleared, the generation continues from before the discard
//! 3. write `content(profile, seed, i, gen)` into the page, stamp first
//!    (with `--kernel-writes` some rewrites write this content into a pipe
//!    and read(2) it from the pipe straight into the page, so the kernel
//!    does the write)
//! 4. `writes += 1` (and `kernel_writes += 1` for a kernel write)
//! 5. `inflight[t] = 0`
//!
//! A *discard* of page `i` on slot `t` (`--dontneed-rate`):
//!
//! 1. `inflight[t] = i + 1`
//! 2. `ledger[i] |= DISCARDED` (before the page is dropped)
//! 3. `madvise(page, P, MADV_DONTNEED)`: the page reads as zero from now on
//! 4. `discards += 1`
//! 5. `inflight[t] = 0`
//!
//! So in a snapshot of the stopped process, every page not named by an
//! `inflight` slot matches its ledger entry (content of its generation, or
//! all zero if discarded), and, since a discard leaves generations alone,
//! `writes <= sum(ledger & GEN_MASK) <= writes + (non-zero inflight slots)`.
//! Also `(pages with the flag set) <= discards + (non-zero inflight slots)`
//! and `kernel_writes <= writes`.

use std::mem::{offset_of, size_of};
use std::sync::atomic::AtomicU64;

/// Fixed virtual address of the RAM region.
pub const BASE: u64 = 0x5a00_0000_0000;
/// `b"PMAGENT1"` as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PMAGENT1");
/// Version of this layout.
pub const LAYOUT_VERSION: u64 = 2;
/// Number of writer slots in the header (the most `--threads` allows).
pub const MAX_THREADS: usize = 64;
/// Smallest region, in pages.
pub const MIN_PAGES: u64 = 16;
/// Largest region (the address space above [`BASE`] is not unbounded).
pub const MAX_SIZE: u64 = 1 << 40;
/// Bytes per ledger entry.
pub const LEDGER_ENTRY: u64 = 4;
/// Ledger flag: the page was discarded and must be all zero.
pub const DISCARDED: u32 = 1 << 31;
/// Ledger bits holding the generation.
pub const GEN_MASK: u32 = DISCARDED - 1;

/// The generation after `entry` (a ledger entry, flag or not): one more,
/// wrapping from [`GEN_MASK`] to 1 (0 means "initial fill").
pub fn next_gen(entry: u32) -> u32 {
    (((entry & GEN_MASK) + 1) & GEN_MASK).max(1)
}

/// The header in page 0. Plain fields are written once before anything
/// else runs; the atomics are shared by the writer threads.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    pub magic: u64,
    pub version: u64,
    pub total_size: u64,
    pub page_size: u64,
    pub data_pages: u64,
    pub ledger_pages: u64,
    pub profile: u64,
    pub seed: u64,
    pub working_set_pages: u64,
    pub hot_pages: u64,
    pub threads: u64,
    pub dirty_rate: u64,
    pub writes: AtomicU64,
    pub rng: [AtomicU64; MAX_THREADS],
    pub inflight: [AtomicU64; MAX_THREADS],
    pub churn_events: AtomicU64,
    pub discards: AtomicU64,
    pub kernel_writes: AtomicU64,
    pub dontneed_rate: u64,
    pub kernel_write_rate: u64,
    pub churn_rate: u64,
}

// The table at the top of this file documents these offsets; the struct
// is the one definition, and the layout must not change by accident.
const _: () = {
    assert!(offset_of!(Header, inflight) == 616);
    assert!(offset_of!(Header, churn_rate) == 1168);
    assert!(size_of::<Header>() == HEADER_LEN);
};

/// Bytes of the header.
pub const HEADER_LEN: usize = 1176;

/// Where things are in a region of a given size and page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub page_size: u64,
    pub total_size: u64,
    pub ledger_pages: u64,
    pub data_pages: u64,
}

/// Why a size does not make a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    TooSmall { size: u64, min: u64 },
    TooLarge { size: u64 },
    BadPageSize(u64),
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutError::TooSmall { size, min } => {
                write!(
                    f,
                    "size {size} is too small: the region needs at least {min} bytes"
                )
            }
            LayoutError::TooLarge { size } => {
                write!(f, "size {size} is too large: at most {MAX_SIZE} bytes")
            }
            LayoutError::BadPageSize(ps) => write!(f, "unsupported page size {ps}"),
        }
    }
}

impl std::error::Error for LayoutError {}

impl Layout {
    /// Lay out a region of `size` bytes (rounded up to whole pages).
    pub fn compute(size: u64, page_size: u64) -> Result<Layout, LayoutError> {
        if !page_size.is_power_of_two() || page_size < 2 * size_of::<Header>() as u64 {
            return Err(LayoutError::BadPageSize(page_size));
        }
        if size > MAX_SIZE {
            return Err(LayoutError::TooLarge { size });
        }
        let pages = size.div_ceil(page_size);
        if pages < MIN_PAGES {
            return Err(LayoutError::TooSmall {
                size,
                min: MIN_PAGES * page_size,
            });
        }
        let avail = pages - 1;
        let ledger_for = |d: u64| (d * LEDGER_ENTRY).div_ceil(page_size);
        // d + ceil(4d / P) <= avail; start from the real-valued solution.
        let mut data = avail * page_size / (page_size + LEDGER_ENTRY);
        while data + 1 + ledger_for(data + 1) <= avail {
            data += 1;
        }
        while data + ledger_for(data) > avail {
            data -= 1;
        }
        Ok(Layout {
            page_size,
            total_size: pages * page_size,
            ledger_pages: ledger_for(data),
            data_pages: data,
        })
    }

    /// Byte offset of the ledger from the base.
    pub fn ledger_offset(&self) -> u64 {
        self.page_size
    }

    /// Byte offset of data page 0 from the base.
    pub fn data_offset(&self) -> u64 {
        (1 + self.ledger_pages) * self.page_size
    }

    /// Byte offset of data page `i` from the base.
    pub fn page_offset(&self, i: u64) -> u64 {
        self.data_offset() + i * self.page_size
    }
}

/// A copy of the header fields, read from raw bytes (an image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderView {
    pub magic: u64,
    pub version: u64,
    pub total_size: u64,
    pub page_size: u64,
    pub data_pages: u64,
    pub ledger_pages: u64,
    pub profile: u64,
    pub seed: u64,
    pub working_set_pages: u64,
    pub hot_pages: u64,
    pub threads: u64,
    pub dirty_rate: u64,
    pub writes: u64,
    pub inflight: Vec<u64>,
    pub churn_events: u64,
    pub discards: u64,
    pub kernel_writes: u64,
    pub dontneed_rate: u64,
    pub kernel_write_rate: u64,
    pub churn_rate: u64,
}

fn word(bytes: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(bytes[off..off + 8].try_into().expect("8 bytes"))
}

impl HeaderView {
    /// Parse the header from the first bytes of a region. `None` if there
    /// are fewer than [`HEADER_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<HeaderView> {
        if bytes.len() < HEADER_LEN {
            return None;
        }
        Some(HeaderView {
            magic: word(bytes, offset_of!(Header, magic)),
            version: word(bytes, offset_of!(Header, version)),
            total_size: word(bytes, offset_of!(Header, total_size)),
            page_size: word(bytes, offset_of!(Header, page_size)),
            data_pages: word(bytes, offset_of!(Header, data_pages)),
            ledger_pages: word(bytes, offset_of!(Header, ledger_pages)),
            profile: word(bytes, offset_of!(Header, profile)),
            seed: word(bytes, offset_of!(Header, seed)),
            working_set_pages: word(bytes, offset_of!(Header, working_set_pages)),
            hot_pages: word(bytes, offset_of!(Header, hot_pages)),
            threads: word(bytes, offset_of!(Header, threads)),
            dirty_rate: word(bytes, offset_of!(Header, dirty_rate)),
            writes: word(bytes, offset_of!(Header, writes)),
            inflight: (0..MAX_THREADS)
                .map(|t| word(bytes, offset_of!(Header, inflight) + 8 * t))
                .collect(),
            churn_events: word(bytes, offset_of!(Header, churn_events)),
            discards: word(bytes, offset_of!(Header, discards)),
            kernel_writes: word(bytes, offset_of!(Header, kernel_writes)),
            dontneed_rate: word(bytes, offset_of!(Header, dontneed_rate)),
            kernel_write_rate: word(bytes, offset_of!(Header, kernel_write_rate)),
            churn_rate: word(bytes, offset_of!(Header, churn_rate)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(l: &Layout) {
        let ps = l.page_size;
        assert!(l.ledger_pages * ps >= l.data_pages * LEDGER_ENTRY);
        assert!((l.ledger_pages - 1) * ps < l.data_pages * LEDGER_ENTRY);
        assert!(1 + l.ledger_pages + l.data_pages <= l.total_size / ps);
        // One more data page would not fit.
        let d = l.data_pages + 1;
        assert!(1 + (d * LEDGER_ENTRY).div_ceil(ps) + d > l.total_size / ps);
    }

    #[test]
    fn layouts() {
        let l = Layout::compute(64 << 20, 4096).unwrap();
        assert_eq!(l.total_size, 64 << 20);
        assert_eq!(l.ledger_pages, 16);
        assert_eq!(l.data_pages, 16384 - 17);
        check(&l);

        let l = Layout::compute(16 * 4096, 4096).unwrap();
        assert_eq!((l.ledger_pages, l.data_pages), (1, 14));
        check(&l);

        let l = Layout::compute(1 << 30, 4096).unwrap();
        assert_eq!(l.ledger_pages, 256);
        assert_eq!(l.data_pages, 262144 - 257);
        assert_eq!(l.page_offset(0), 257 * 4096);
        check(&l);

        // Not a multiple of the page size: rounded up.
        let l = Layout::compute(100_000, 4096).unwrap();
        assert_eq!(l.total_size, 25 * 4096);
        check(&l);

        for size in (16u64..5000).map(|p| p * 4096 + 17) {
            check(&Layout::compute(size, 4096).unwrap());
        }
        for ps in [4096u64, 16384, 65536] {
            for pages in [16u64, 17, 1000, 16385, 100_000] {
                check(&Layout::compute(pages * ps, ps).unwrap());
            }
        }
    }

    #[test]
    fn bad_layouts() {
        assert!(matches!(
            Layout::compute(15 * 4096, 4096),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::compute(0, 4096),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::compute(MAX_SIZE + 1, 4096),
            Err(LayoutError::TooLarge { .. })
        ));
        assert!(matches!(
            Layout::compute(1 << 20, 1000),
            Err(LayoutError::BadPageSize(1000))
        ));
        assert!(LayoutError::TooSmall { size: 1, min: 2 }
            .to_string()
            .contains("too small"));
    }

    #[test]
    fn generations_wrap_past_the_flag() {
        assert_eq!(next_gen(0), 1);
        assert_eq!(next_gen(41), 42);
        assert_eq!(next_gen(DISCARDED | 41), 42);
        assert_eq!(next_gen(GEN_MASK), 1);
        assert_eq!(next_gen(DISCARDED | GEN_MASK), 1);
        assert_eq!(next_gen(u32::MAX), 1);
    }

    #[test]
    fn magic_spells_name() {
        assert_eq!(&MAGIC.to_le_bytes(), b"PMAGENT1");
    }
}
