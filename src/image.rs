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
/// Current manifest version. Readers accept this version only.
pub const FORMAT_VERSION: u32 = 1;

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

/// XXH3-64 of a byte slice (the digest the manifest records).
pub fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
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
        if manifest.format != FORMAT_NAME || manifest.version != FORMAT_VERSION {
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

    /// Recompute every region's XXH3 and compare it with the manifest.
    /// Returns the indexes of the regions that differ.
    pub fn check_digests(&self) -> Result<Vec<usize>, ImageError> {
        let mut bad = Vec::new();
        for (i, r) in self.manifest.regions.iter().enumerate() {
            let map = self.map_region(r)?;
            if hex_digest(digest(&map)) != r.xxh3 {
                bad.push(i);
            }
        }
        Ok(bad)
    }
}
