//! The hash of every page written into a region's image file, kept as the
//! pages arrive (hot in the cache), so that the commit digests a region
//! from 8 bytes per page ([`crate::image::PageDigest`]) instead of reading
//! the whole image again. Stored in chunks allocated on first use, so a
//! region declared huge but sent few pages costs what was sent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::image::{page_hash, PageDigest};

/// Pages per chunk (2 MiB of 4 KiB pages, 4 KiB of hashes).
const CHUNK: u64 = 512;

/// Page hashes of one region: 0 for a page never written, written with
/// zeros, or cut off by a resize.
pub struct PageHashes {
    chunks: Vec<OnceLock<Box<[AtomicU64]>>>,
    pages: u64,
    page_size: usize,
}

impl PageHashes {
    pub fn new(pages: u64, page_size: usize) -> PageHashes {
        PageHashes {
            chunks: (0..pages.div_ceil(CHUNK))
                .map(|_| OnceLock::new())
                .collect(),
            pages,
            page_size,
        }
    }

    fn slot(&self, page: u64) -> &AtomicU64 {
        let chunk = self.chunks[(page / CHUNK) as usize]
            .get_or_init(|| (0..CHUNK).map(|_| AtomicU64::new(0)).collect());
        &chunk[(page % CHUNK) as usize]
    }

    /// `bytes` (whole pages) now hold pages `first..` of the region.
    /// Callers write disjoint pages at a time (as they write the image).
    pub fn record(&self, first: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks(self.page_size).enumerate() {
            self.slot(first + i as u64).store(page_hash(page), Relaxed);
        }
    }

    /// Pages `first..first+count` are now zero.
    pub fn forget(&self, first: u64, count: u64) {
        for page in first..first + count {
            if let Some(chunk) = self.chunks[(page / CHUNK) as usize].get() {
                chunk[(page % CHUNK) as usize].store(0, Relaxed);
            }
        }
    }

    /// The region now has `pages` pages (same start): hashes past the end
    /// go, new pages are zero.
    pub fn resize(&mut self, pages: u64) {
        if pages < self.pages {
            let keep = pages.div_ceil(CHUNK);
            self.chunks.truncate(keep as usize);
            if let Some(chunk) = self.chunks.last().and_then(|c| c.get()) {
                for slot in &chunk[(pages - (keep - 1) * CHUNK) as usize..] {
                    slot.store(0, Relaxed);
                }
            }
        }
        self.chunks
            .resize_with(pages.div_ceil(CHUNK) as usize, OnceLock::new);
        self.pages = pages;
    }

    /// The region's digest (format version 3), as
    /// [`crate::image::digest_pages`] of its bytes.
    pub fn digest(&self) -> u64 {
        let mut d = PageDigest::new(self.page_size);
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk.get() else { continue };
            for (i, slot) in chunk.iter().enumerate() {
                d.add(c as u64 * CHUNK + i as u64, slot.load(Relaxed));
            }
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::digest_pages;

    #[test]
    fn digests_as_the_bytes_would_through_writes_zeros_and_resizes() {
        let ps = 4096;
        let pages = 1500u64; // three chunks, the last partial
        let mut bytes = vec![0u8; pages as usize * ps];
        let h = PageHashes::new(pages, ps);
        assert_eq!(h.digest(), digest_pages(&bytes, ps));
        let mut write = |h: &PageHashes, first: u64, n: u64, fill: u8| {
            let at = first as usize * ps;
            let len = n as usize * ps;
            for (k, b) in bytes[at..at + len].iter_mut().enumerate() {
                *b = fill ^ (k % 251) as u8;
            }
            h.record(first, &bytes[at..at + len]);
            bytes.clone()
        };
        write(&h, 3, 2, 1);
        write(&h, 1020, 10, 2);
        let now = write(&h, 4, 1, 3); // rewritten
        assert_eq!(h.digest(), digest_pages(&now, ps));
        // Zeroed pages, and a page written with zeros, add nothing.
        h.forget(1020, 4);
        let mut b = now.clone();
        b[1020 * ps..1024 * ps].fill(0);
        assert_eq!(h.digest(), digest_pages(&b, ps));
        h.record(1025, &vec![0u8; ps]);
        b[1025 * ps..1026 * ps].fill(0);
        assert_eq!(h.digest(), digest_pages(&b, ps));
        // Shrunk past written pages, then grown again: they are gone.
        let mut h = h;
        h.resize(1022);
        h.resize(1100);
        let mut grown = b[..1022 * ps].to_vec();
        grown.resize(1100 * ps, 0);
        assert_eq!(h.digest(), digest_pages(&grown, ps));
        // A page moved is another digest.
        h.forget(3, 1);
        h.record(2, &grown[3 * ps..4 * ps]);
        assert_ne!(h.digest(), digest_pages(&grown, ps));
    }
}
