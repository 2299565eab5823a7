//! The on-disk image a receiver writes: a directory holding `manifest.json`
//! and one sparse data file per region.
//!
//! ```text
//! img/
//!   manifest.json        format, version, source pid, page size, regions
//!   region-0000.bin      bytes [start, end) of region 0; holes read as zero
//!   region-0001.bin
//! ```
//!
//! A data file is exactly `end - start` bytes long. Pages the source never
//! populated stay holes. `xxh3` in the manifest is the XXH3-64 of the whole
//! file (holes included), written as 16 hex digits.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

/// Name of the manifest inside an image directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// `format` field of every manifest.
pub const FORMAT_NAME: &str = "procmig-image";
/// Current manifest version (its digest: [`digest_pages`]). Readers
/// accept it and the two before.
pub const FORMAT_VERSION: u32 = 3;
/// Version 2 digested the bytes of every page that is not all zero; still
/// read.
pub const FORMAT_VERSION_PAGE_BYTES: u32 = 2;
/// Version 1 digested every byte of a region, holes included; still read.
pub const FORMAT_VERSION_WHOLE_DIGEST: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The manifest could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path} is not a procmig manifest: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The manifest is of another format or version.
    #[error("{path}: unsupported image format {format:?} version {version} (this build reads {FORMAT_NAME:?} version {FORMAT_VERSION})")]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
    },
    /// The manifest contradicts itself (bad region bounds, file name, size).
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    /// A region's data file could not be opened or mapped.
    #[error("cannot map region file {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One region of the source process, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// First virtual address (page aligned).
    pub start: u64,
    /// One past the last address (page aligned).
    pub end: u64,
    /// Permissions as in /proc/PID/maps, e.g. `rw-p`.
    pub perms: String,
    /// Path or pseudo-name from /proc/PID/maps (`[heap]`, `[stack]`, a file, or empty).
    pub name: String,
    /// Data file, relative to the image directory.
    pub file: String,
    /// Pages that held data (sent as normal or zero pages).
    pub populated_pages: u64,
    /// XXH3-64 of the whole data file, 16 hex digits.
    pub xxh3: String,
}

impl RegionRecord {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// The manifest of an image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// PID of the source process.
    pub pid: u32,
    /// Command name of the source process (from /proc/PID/comm).
    pub comm: String,
    pub page_size: u64,
    /// Seconds since the epoch when the image was committed.
    pub created_unix: u64,
    pub regions: Vec<RegionRecord>,
}

/// Name of region `index`'s data file.
pub fn region_file_name(index: usize) -> String {
    format!("region-{index:04}.bin")
}

/// XXH3-64 as the manifest writes it.
pub fn hex_digest(h: u64) -> String {
    format!("{h:016x}")
}

/// XXH3-64 of a byte slice (the digest of format version 1).
pub fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The digest the manifest records (format version 3): XXH3-64 over the
/// pages whose XXH3-64 is neither that of an all-zero page nor 0, each as
/// its index and that page hash (two u64, little endian). Zero pages,
/// written or holes, add nothing, so the digest does not depend on how
/// sparse a copy of the file is, and [`digest_file`] can skip holes: its
/// work and memory follow the bytes received, not the size a region
/// declares. Built from page hashes, it lets the receiver hash each page
/// once, as it arrives (hot in the cache), and digest a region at the
/// commit from 8 bytes per page ([`PageDigest`]) instead of reading it all
/// again.
pub fn digest_pages(bytes: &[u8], page_size: usize) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    add_pages(&mut h, 0, bytes, page_size, FORMAT_VERSION);
    h.digest()
}

/// XXH3-64 of one page, as version 3 digests it.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Version 3's digest fed page hash by page hash, in page order.
pub struct PageDigest {
    h: xxhash_rust::xxh3::Xxh3,
    zero: u64,
}

impl PageDigest {
    pub fn new(page_size: usize) -> PageDigest {
        PageDigest {
            h: xxhash_rust::xxh3::Xxh3::new(),
            zero: page_hash(&vec![0u8; page_size]),
        }
    }

    /// Page `index` hashes to `hash` (pages in increasing order).
    pub fn add(&mut self, index: u64, hash: u64) {
        add_page_hash(&mut self.h, self.zero, index, hash);
    }

    pub fn finish(&self) -> u64 {
        self.h.digest()
    }
}

fn add_pages(
    h: &mut xxhash_rust::xxh3::Xxh3,
    first: u64,
    bytes: &[u8],
    page_size: usize,
    version: u32,
) {
    if version == FORMAT_VERSION_PAGE_BYTES {
        for (i, page) in bytes.chunks(page_size).enumerate() {
            if page.iter().any(|&b| b != 0) {
                h.update(&(first + i as u64).to_le_bytes());
                h.update(page);
            }
        }
        return;
    }
    let zero = page_hash(&vec![0u8; page_size]);
    for (i, page) in bytes.chunks(page_size).enumerate() {
        add_page_hash(h, zero, first + i as u64, page_hash(page));
    }
}

/// Version 3's one rule: page `index` counts unless its hash is 0 or that
/// of an all-zero page (`zero`).
fn add_page_hash(h: &mut xxhash_rust::xxh3::Xxh3, zero: u64, index: u64, hash: u64) {
    if hash != 0 && hash != zero {
        h.update(&index.to_le_bytes());
        h.update(&hash.to_le_bytes());
    }
}

/// [`digest_pages`] of a file, reading only its data extents
/// (SEEK_DATA/SEEK_HOLE; a filesystem without them reports one extent).
pub fn digest_file(file: &File, page_size: u64) -> std::io::Result<u64> {
    digest_file_as(file, page_size, FORMAT_VERSION)
}

/// [`digest_file`] as format `version` (2 or 3) digests a region.
pub fn digest_file_as(file: &File, page_size: u64, version: u32) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    digest_extents(file, len, page_size, |h, at, n| {
        file.read_exact_at(&mut buf[..n], at)?;
        add_pages(h, at / page_size, &buf[..n], page_size as usize, version);
        Ok(())
    })
}

/// Walk the data extents of the first `len` bytes of `file` in whole
/// pages, at most 1 MiB at a time: `add(h, offset, bytes)`.
fn digest_extents(
    file: &File,
    len: u64,
    page_size: u64,
    mut add: impl FnMut(&mut xxhash_rust::xxh3::Xxh3, u64, usize) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut off = 0u64;
    while off < len {
        let Some((start, end)) = data_extent(file, off, len)? else {
            break;
        };
        // Whole pages: extents are block-aligned, blocks may be smaller.
        let mut at = start / page_size * page_size;
        let end = end.div_ceil(page_size).saturating_mul(page_size).min(len);
        while at < end {
            let n = (1u64 << 20).min(end - at) as usize;
            add(&mut h, at, n)?;
            at += n as u64;
        }
        off = end.max(off + 1);
    }
    Ok(h.digest())
}

/// The next data extent at or after `off`: (start, end), or `None`.
pub fn data_extent(file: &File, off: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own changes only its offset, which
    // nothing else here uses (reads are positional).
    let start = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No SEEK_DATA here: all of it is data.
            Some(libc::EINVAL) => Ok(Some((off, len))),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((start as u64, (end as u64).min(len))))
}

/// An image directory opened for reading.
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// Open `dir`, read and check its manifest (format, version, region
    /// bounds and file names). Data files are not read.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let path = dir.join(MANIFEST_NAME);
        let text = std::fs::read(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| ImageError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != FORMAT_NAME
            || !(FORMAT_VERSION_WHOLE_DIGEST..=FORMAT_VERSION).contains(&manifest.version)
        {
            return Err(ImageError::Version {
                path,
                format: manifest.format,
                version: manifest.version,
            });
        }
        let invalid = |what: String| ImageError::Invalid {
            path: path.clone(),
            what,
        };
        let ps = manifest.page_size;
        if !ps.is_power_of_two() || !(512..=1 << 21).contains(&ps) {
            return Err(invalid(format!("bad page size {ps}")));
        }
        let mut prev_end = 0u64;
        for (i, r) in manifest.regions.iter().enumerate() {
            if r.start >= r.end || r.start % ps != 0 || r.end % ps != 0 || r.start < prev_end {
                return Err(invalid(format!(
                    "region {i} has bad bounds {:#x}-{:#x}",
                    r.start, r.end
                )));
            }
            if r.file != region_file_name(i) {
                return Err(invalid(format!("region {i} names file {:?}", r.file)));
            }
            prev_end = r.end;
        }
        Ok(Image {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The region that contains `addr`, if any.
    pub fn region_at(&self, addr: u64) -> Option<&RegionRecord> {
        self.manifest.regions.iter().find(|r| r.contains(addr))
    }

    /// Map a region's data file read-only. Its length must match the region.
    pub fn map_region(&self, region: &RegionRecord) -> Result<Mmap, ImageError> {
        let path = self.dir.join(&region.file);
        let map_err = |source| ImageError::Map {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(map_err)?;
        let len = file.metadata().map_err(map_err)?.len();
        if len != region.len() {
            return Err(ImageError::Invalid {
                path,
                what: format!(
                    "is {len} bytes long, region {:#x}-{:#x} needs {}",
                    region.start,
                    region.end,
                    region.len()
                ),
            });
        }
        // SAFETY: the file is opened read-only and mapped privately; a
        // concurrent writer could change the bytes we see, which only
        // affects the result of a comparison, never memory safety of safe
        // code reading a byte slice of a live mapping of a regular file.
        unsafe { Mmap::map(&file) }.map_err(map_err)
    }

    /// Recompute every region's digest and compare it with the manifest.
    /// Returns the indexes of the regions that differ.
    pub fn check_digests(&self) -> Result<Vec<usize>, ImageError> {
        let mut bad = Vec::new();
        for (i, r) in self.manifest.regions.iter().enumerate() {
            let d = if self.manifest.version == FORMAT_VERSION_WHOLE_DIGEST {
                digest(&self.map_region(r)?)
            } else {
                let path = self.dir.join(&r.file);
                let map_err = |source| ImageError::Map {
                    path: path.clone(),
                    source,
                };
                self.map_region(r)?; // checks the length
                let f = File::open(&path).map_err(map_err)?;
                digest_file_as(&f, self.manifest.page_size, self.manifest.version)
                    .map_err(map_err)?
            };
            if hex_digest(d) != r.xxh3 {
                bad.push(i);
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn page_digest_skips_holes_and_zero_pages() {
        let ps = 4096;
        let mut bytes = vec![0u8; 8 * ps];
        bytes[3 * ps + 5] = 7;
        bytes[6 * ps] = 1;
        let d = digest_pages(&bytes, ps);
        // The same data with explicit zeros or holes: the same digest.
        let dir = std::env::temp_dir().join(format!("procmig-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(bytes.len() as u64).unwrap();
        f.write_all_at(&bytes[3 * ps..4 * ps], 3 * ps as u64)
            .unwrap();
        f.write_all_at(&bytes[6 * ps..7 * ps], 6 * ps as u64)
            .unwrap();
        f.write_all_at(&vec![0u8; ps], 0).unwrap();
        assert_eq!(digest_file(&f, ps as u64).unwrap(), d);
        // From page hashes (the receiver's commit): the same.
        let mut pd = PageDigest::new(ps);
        for (i, page) in bytes.chunks(ps).enumerate() {
            pd.add(i as u64, page_hash(page));
        }
        assert_eq!(pd.finish(), d);
        // Version 2 (page bytes) is another digest, still computed.
        let v2 = digest_file_as(&f, ps as u64, FORMAT_VERSION_PAGE_BYTES).unwrap();
        assert_ne!(v2, d);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for i in [3u64, 6] {
            h.update(&i.to_le_bytes());
            h.update(&bytes[i as usize * ps..(i as usize + 1) * ps]);
        }
        assert_eq!(v2, h.digest());
        // A page that moved changes it.
        let mut moved = vec![0u8; 8 * ps];
        moved[2 * ps + 5] = 7;
        moved[6 * ps] = 1;
        assert_ne!(digest_pages(&moved, ps), d);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_huge_sparse_file_digests_in_no_time() {
        // 64 GiB declared, one page written: the digest reads one page.
        let dir = std::env::temp_dir().join(format!("procmig-digest-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("big"))
            .unwrap();
        f.set_len(64 << 30).unwrap();
        f.write_all_at(&[9u8; 4096], 40 << 30).unwrap();
        let mut page = vec![0u8; 4096];
        page.fill(9);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&((40u64 << 30) / 4096).to_le_bytes());
        h.update(&page_hash(&page).to_le_bytes());
        assert_eq!(digest_file(&f, 4096).unwrap(), h.digest());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
